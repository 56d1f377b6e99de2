"""Forward/backward pairs for every layer of the tiny GPT, LoRA included.

Each `op_forward(...) -> (out, cache)` is followed by `op_backward(dout, cache)`, which
returns the gradients in the order of the forward's inputs. Nothing is stored on objects:
the cache is the whole memory of a layer, so each pair can be tested on its own.

Dimension legend: B batch, T time, D model width, H heads, hs = D/H head size,
M MLP width, V vocabulary, N any number of leading positions (usually B*T),
d_in / d_out the input / output width of a linear layer, r the LoRA rank.

Orientation follows the paper: a weight W has shape (d_out, d_in), the paper's
W0 ∈ R^{d×k}; tokens are rows, so the column-vector formula h = W0·x reads
`h = x @ W.T` in code.

Frozen means not computed: the backward of a layer with parameters takes
`need_d<param>` flags, and a gradient that is not needed is never formed; its slot in the
returned tuple is None. The LoRA layer treats W0 and b as frozen by definition: its backward
returns (dx, dA, dB) and has no slot for them (a bias that trains alongside the adapters is
handled by the model, which sums g over positions).

References
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3).
- Vaswani et al. 2017 (attention); Ba et al. 2016 (LayerNorm);
  Hendrycks & Gimpel 2016 (GELU, tanh approximation as in GPT-2).
"""

import math

import numpy as np

# ----------------------------------------------------------------------------
# linear: out = x·Wᵀ + b


def linear_forward(x, W, b):
    """Affine layer, h = W·x + b in column form.

    Inputs:
    - x: (..., d_in)
    - W: (d_out, d_in), an array, or a weight stored in another format that np.asarray turns into
      one (a quantized base weight: decoded for this product only, whatever its format)
    - b: (d_out,) or None for no bias

    Returns:
    - out: (..., d_out)
    - cache: (x, W, has_bias), W as given: a stored weight stays in its compact form
    """
    # One 2-D product, not a stack of small ones: BLAS sees (N, d_in) @ (d_in, d_out).
    out = x.reshape(-1, x.shape[-1]) @ np.asarray(W).T  # (N, d_out)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], W.shape[0]), (x, W, b is not None)


def linear_backward(dout, cache, *, need_dW=True, need_db=True):
    """Backward of linear_forward.

    Inputs:
    - dout: (..., d_out), upstream gradient g = ∂L/∂h
    - cache: from linear_forward
    - need_dW, need_db: form these gradients; False for a frozen parameter

    Returns:
    - dx: (..., d_in)    ∂L/∂x = Wᵀ·g
    - dW: (d_out, d_in)  ∂L/∂W = g·xᵀ, or None
    - db: (d_out,)       ∂L/∂b = g, summed over positions, or None
    """
    x, W, has_bias = cache
    W = np.asarray(W)  # a stored weight is decoded again, for dx (an array is W itself)
    g = dout.reshape(-1, W.shape[0])  # (N, d_out)
    dx = (g @ W).reshape(x.shape)  # ∂L/∂x = Wᵀ·g
    dW = g.T @ x.reshape(-1, W.shape[1]) if need_dW else None  # ∂L/∂W = g·xᵀ, (d_out, d_in)
    db = g.sum(axis=0) if (need_db and has_bias) else None
    return dx, dW, db


# ----------------------------------------------------------------------------
# LoRA linear: out = x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ   (paper eq. 3: h = W0·x + ΔW·x = W0·x + B·A·x)


def lora_linear_forward(x, W, b, A, B, scaling, *, dropout=0.0, rng=None):
    """A frozen linear layer W0 plus the low-rank update s·B·A.

    In column form (paper, eq. 3, with the scaling of Section 4.1):

        h = W0·x + b + s·B·A·drop(x),    s = alpha / r   (alpha / sqrt(r) for rsLoRA)

    Inputs:
    - x: (..., d_in)
    - W: (d_out, d_in), the frozen W0: an array, or a weight stored in another format that
      np.asarray turns into one (as in linear_forward)
    - b: (d_out,) or None
    - A: (r, d_in), drawn at random at init
    - B: (d_out, r), zero at init, so the layer starts as exactly W0
    - scaling: the float s
    - dropout: probability of zeroing an input of A (inverted dropout); 0 turns it off
    - rng: np.random.Generator, required when dropout > 0

    Returns:
    - out: (..., d_out)
    - cache: (x, W, xd, mask, xA, A, B, scaling), in this order:
        x     the input as given, (..., d_in); backward reads only its shape
        W     W0 (d_out, d_in) as given, for the frozen path of dx
        xd    the input of A, (N, d_in) with N = prod(x.shape[:-1]): x after dropout, or x itself
        mask  (N, d_in) with entries 0 or 1/(1 - dropout), or None when dropout is 0
        xA    A·x (N, r), the input of B
        A, B, scaling  as given
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout > 0.0 and rng is None:
        raise ValueError("rng must be a np.random.Generator when dropout > 0, got None")
    d_in = W.shape[1]
    x2 = x.reshape(-1, d_in)  # (N, d_in)
    h = x2 @ np.asarray(W).T  # (N, d_out)   W0·x: the frozen path
    if b is not None:
        h += b
    # Inverted dropout on the input of A only: the frozen path sees the clean x.
    if dropout > 0.0:
        mask = (rng.random(x2.shape) >= dropout) / (1.0 - dropout)
        mask = mask.astype(x.dtype)  # (N, d_in), entries 0 or 1/(1-p)
        xd = x2 * mask
    else:
        mask, xd = None, x2
    xA = xd @ A.T  # (N, r)   A·x, only r wide
    h += (scaling * xA) @ B.T  # (N, d_out)   s·B·(A·x): scale the r-wide factor; B·A is never formed
    # Cached: W0 for dx (x only for its shape); xd (the dropped-out x) for dA; xA = A·x for dB,
    # worth keeping because it is only r wide and recomputing it costs a d_in-wide product.
    cache = (x, W, xd, mask, xA, A, B, scaling)
    return h.reshape(*x.shape[:-1], W.shape[0]), cache


def lora_linear_backward(dout, cache, *, need_dA=True, need_dB=True):
    """Backward of lora_linear_forward. W0 and b are frozen: their gradients are not formed.

    With g = ∂L/∂h (column form) the chain rule through h = W0·x + s·B·(A·x) gives

        ∂L/∂B = s·g·(A·x)ᵀ          (d_out, r)
        ∂L/∂A = s·Bᵀ·g·xᵀ           (r, d_in)
        ∂L/∂x = W0ᵀ·g + s·Aᵀ·Bᵀ·g   (d_in,)

    With dropout, the LoRA branch sees m⊙x instead of x (m the scaled mask), so x becomes
    m⊙x in ∂L/∂A and the second term of ∂L/∂x is m⊙(s·Aᵀ·Bᵀ·g).

    Batched over N positions (rows), each outer product becomes a sum over rows, a matmul.
    The products are ordered so that nothing d_out × d_in is ever formed: Bᵀ·g is r wide,
    and it is reused by dA and dx.

    Inputs:
    - dout: (..., d_out)
    - cache: from lora_linear_forward
    - need_dA, need_dB: form these gradients; False for a frozen adapter

    Returns:
    - dx: (..., d_in)
    - dA: (r, d_in) or None
    - dB: (d_out, r) or None
    """
    x, W, xd, mask, xA, A, B, scaling = cache
    g = dout.reshape(-1, W.shape[0])  # (N, d_out)
    dx = g @ np.asarray(W)  # (N, d_in)   W0ᵀ·g, the frozen path (a stored W0 decoded again)
    dB = scaling * (g.T @ xA) if need_dB else None  # ∂L/∂B = s·g·(A·x)ᵀ, (d_out, N)@(N, r)
    dxA = scaling * (g @ B)  # (N, r)   s·Bᵀ·g, the gradient at A·x
    dA = dxA.T @ xd if need_dA else None  # ∂L/∂A = s·Bᵀ·g·xᵀ (x after dropout), (r, N)@(N, d_in)
    dxd = dxA @ A  # (N, d_in)   Aᵀ·(s·Bᵀ·g)
    # in the forward pass this was xd = x * mask, so the gradient passes through the mask
    dx += dxd if mask is None else dxd * mask
    return dx.reshape(x.shape), dA, dB


# ----------------------------------------------------------------------------
# embedding: out = W[ids]


def embedding_forward(ids, W):
    """Row lookup, out[...] = W[ids[...]].

    Inputs:
    - ids: integer array of any shape (...), entries in [0, n_rows)
    - W: (n_rows, D)

    Returns:
    - out: (..., D)
    - cache: (ids, n_rows)
    """
    return W[ids], (ids, W.shape[0])


def embedding_backward(dout, cache):
    """Backward of embedding_forward: each row of dW sums the dout rows that looked it up.

    Inputs:
    - dout: (..., D)
    - cache: from embedding_forward

    Returns:
    - dW: (n_rows, D). The integer ids have no gradient.
    """
    ids, n_rows = cache
    D = dout.shape[-1]
    dW = np.zeros((n_rows, D), dtype=dout.dtype)
    # np.add.at accumulates repeated ids; plain fancy assignment would keep only the last one.
    np.add.at(dW, ids.reshape(-1), dout.reshape(-1, D))
    return dW


# ----------------------------------------------------------------------------
# layernorm: out = gamma * (x - mean) / sqrt(var + eps) + beta, over the last axis

LN_EPS = 1e-5


def layernorm_forward(x, gamma, beta, eps=LN_EPS):
    """LayerNorm over the last axis, with the biased variance (as in GPT-2 and PyTorch).

    Inputs:
    - x: (..., D)
    - gamma, beta: (D,)
    - eps: added to the variance, so a constant row does not divide by zero

    Returns:
    - out: (..., D)
    - cache: (xhat, rstd, gamma); the normalized input and 1/std are all backward needs
    """
    # Two (..., D) buffers in all, each reused in place: x - mean becomes xhat, and the
    # squares become the output. (The arithmetic is unchanged, rounding included.)
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xhat = x - mean  # x - μ for now
    out = xhat * xhat
    var = out.mean(axis=-1, keepdims=True)  # biased: divides by D, not D - 1
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat *= rstd  # xhat = (x - μ) / sqrt(var + eps), (..., D)
    np.multiply(xhat, gamma, out=out)
    out += beta  # out = xhat·gamma + beta
    return out, (xhat, rstd, gamma)


def layernorm_backward(dout, cache, *, need_dgamma=True, need_dbeta=True):
    """Backward of layernorm_forward.

    With xhat = (x - μ)·rstd, the mean and the variance both depend on x, which gives

        dx = rstd · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat)),  dxhat = dout · gamma

    Inputs:
    - dout: (..., D)
    - cache: from layernorm_forward
    - need_dgamma, need_dbeta: form these gradients; False for frozen LayerNorm parameters

    Returns:
    - dx: (..., D)
    - dgamma: (D,) or None
    - dbeta: (D,) or None
    """
    xhat, rstd, gamma = cache
    lead = tuple(range(dout.ndim - 1))  # every axis but the last
    dgamma = (dout * xhat).sum(axis=lead) if need_dgamma else None
    dbeta = dout.sum(axis=lead) if need_dbeta else None
    # Two (..., D) buffers: dxhat, which becomes dx in place, and one for the variance's term.
    dx = dout * gamma  # dxhat
    through_mean = dx.mean(axis=-1, keepdims=True)  # mean(dxhat), (..., 1)
    through_var = dx * xhat
    np.multiply(xhat, through_var.mean(axis=-1, keepdims=True), out=through_var)  # xhat·mean(dxhat·xhat)
    dx -= through_mean
    dx -= through_var
    dx *= rstd  # dx = rstd·(dxhat - mean(dxhat) - xhat·mean(dxhat·xhat))
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------
# GELU, tanh approximation: out = 0.5·x·(1 + tanh(c·(x + 0.044715·x³))), c = sqrt(2/π)

GELU_C = math.sqrt(2.0 / math.pi)  # a Python float: a NumPy float64 scalar would upcast float32


def gelu_forward(x):
    """GELU with the tanh approximation used by GPT-2.

    Inputs:
    - x: any shape

    Returns:
    - out: same shape as x
    - cache: (x, t) with t = tanh(c·(x + 0.044715·x³)), kept so backward need not recompute it
    """
    # One buffer carries the tanh's argument and then t; a second becomes the output. Each line
    # is one pass over memory, in place. (x*x*x, not x**3: NumPy sends a float power to pow(),
    # about 30x slower here.)
    t = x * x
    t *= x
    t *= 0.044715
    t += x
    t *= GELU_C  # c·(x + 0.044715·x³)
    np.tanh(t, out=t)  # t, the layer's only transcendental: computed once, cached for backward
    out = t + 1.0
    out *= x
    out *= 0.5  # out = 0.5·x·(1 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    """Backward of gelu_forward.

    d/dx [0.5·x·(1 + t)] = 0.5·(1 + t) + 0.5·x·(1 - t²)·c·(1 + 3·0.044715·x²)

    Inputs:
    - dout: same shape as the forward's x
    - cache: from gelu_forward

    Returns:
    - dx: same shape as dout
    """
    x, t = cache
    # Two buffers, each line one pass in place; the formula above, term by term.
    dx = x * x
    dx *= 3 * 0.044715
    dx += 1.0
    dx *= GELU_C  # dx holds c·(1 + 3·0.044715·x²), the derivative of tanh's argument
    through_t = t * t
    np.subtract(1.0, through_t, out=through_t)  # 1 - t², the derivative of tanh
    through_t *= x
    through_t *= 0.5
    through_t *= dx  # 0.5·x·(1 - t²)·c·(1 + 3·0.044715·x²)
    np.add(t, 1.0, out=dx)
    dx *= 0.5  # 0.5·(1 + t)
    dx += through_t
    dx *= dout
    return dx


# ----------------------------------------------------------------------------
# causal multi-head attention (the projections W_q, W_k, W_v, W_o are linear layers outside)


def attention_forward(q, k, v, n_heads):
    """Causal multi-head scaled dot-product attention, softmax(q·kᵀ / sqrt(hs) + mask)·v.

    Inputs:
    - q, k, v: (B, T, D), the already projected queries, keys and values
    - n_heads: H, which must divide D

    Returns:
    - y: (B, T, D), the heads merged back
    - cache: (qh, kh, vh, att, scale). The softmax output att (B, H, T, T) is kept: backward
      needs it, and recomputing it would cost the whole forward again. The scores are not.
    """
    Bsz, T, D = q.shape
    hs = D // n_heads
    # 1. split heads: (B, T, D) -> (B, T, H, hs) -> (B, H, T, hs)
    qh = q.reshape(Bsz, T, n_heads, hs).transpose(0, 2, 1, 3)
    kh = k.reshape(Bsz, T, n_heads, hs).transpose(0, 2, 1, 3)
    vh = v.reshape(Bsz, T, n_heads, hs).transpose(0, 2, 1, 3)
    # 2. scores, scaled by 1/sqrt(hs) so their variance does not grow with the head size
    scale = 1.0 / math.sqrt(hs)  # a Python float, so float32 stays float32
    scores = qh @ kh.transpose(0, 1, 3, 2)  # (B, H, T, T)
    scores *= scale  # in place: the (B, H, T, T) arrays are the largest of the layer
    # 3. causal mask: position t attends to positions <= t only. copyto broadcasts the (T, T)
    # mask; boolean indexing (scores[..., future] = -inf) would gather indices, ~25x slower here
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T), True above the diagonal
    np.copyto(scores, -np.inf, where=future)
    # 4. softmax over the keys; the diagonal is never masked, so every row has a finite max
    scores -= scores.max(axis=-1, keepdims=True)
    att = np.exp(scores, out=scores)  # exp(-inf) = 0 exactly: masked weights are true zeros
    att /= att.sum(axis=-1, keepdims=True)
    # 5. weighted sum of the values, then merge heads: (B, H, T, hs) -> (B, T, D)
    yh = att @ vh  # (B, H, T, hs)
    y = yh.transpose(0, 2, 1, 3).reshape(Bsz, T, D)
    return y, (qh, kh, vh, att, scale)


def attention_backward(dy, cache):
    """Backward of attention_forward, stages undone in reverse (5, 4, 3, 2, 1).

    Inputs:
    - dy: (B, T, D)
    - cache: from attention_forward

    Returns:
    - dq, dk, dv: (B, T, D) each
    """
    qh, kh, vh, att, scale = cache
    Bsz, H, T, hs = qh.shape
    # 5. in the forward pass this was yh = att @ vh, merged to (B, T, D)
    dyh = dy.reshape(Bsz, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs)
    datt = dyh @ vh.transpose(0, 1, 3, 2)  # (B, H, T, T)
    dvh = att.transpose(0, 1, 3, 2) @ dyh  # (B, H, T, hs)
    # 4. softmax backward, row by row: dscores = att * (datt - sum(att * datt)), written into
    # datt's buffer: these (B, H, T, T) arrays are the largest of the layer
    dscores = datt
    dscores -= (att * datt).sum(axis=-1, keepdims=True)
    dscores *= att
    # 3. masked scores were constants (-inf): att is 0 there, so dscores is already 0
    # 2. scores = qh @ khᵀ * scale
    dscores *= scale
    dqh = dscores @ kh  # (B, H, T, hs)
    dkh = dscores.transpose(0, 1, 3, 2) @ qh  # (B, H, T, hs)

    # 1. undo the head split: (B, H, T, hs) -> (B, T, D)
    def merge(t):
        return t.transpose(0, 2, 1, 3).reshape(Bsz, T, H * hs)

    return merge(dqh), merge(dkh), merge(dvh)


# ----------------------------------------------------------------------------
# cross-entropy: loss = mean over positions of -log softmax(logits)[target]


def cross_entropy_forward(logits, targets):
    """Mean cross-entropy over every position.

    Inputs:
    - logits: (..., V)
    - targets: integer array (...), or a list of ints, entries in [0, V)

    Returns:
    - loss: float, mean of -log p(target)
    - cache: (probs, targets)
    """
    if not isinstance(logits, np.ndarray) or logits.ndim < 1 or logits.shape[-1] < 1:
        got = logits.shape if isinstance(logits, np.ndarray) else type(logits).__name__
        raise ValueError(f"logits must be an array (..., V) with V >= 1, got {got}")
    if logits.size == 0:
        raise ValueError(f"logits must have at least one position, got shape {logits.shape}")
    V = logits.shape[-1]
    targets = np.asarray(targets)  # a list of ids is fine; its dtype is checked below
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} (logits without V), got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= V:
        # a negative id would silently index from the end
        raise ValueError(
            f"targets must be integer ids in [0, V) = [0, {V}), got {targets.dtype} "
            f"in [{targets.min()}, {targets.max()}]"
        )
    # One exp over the (..., V) array and one (..., V) buffer, reused in place: at GPT-2's
    # V = 50,257 these arrays are the largest of the whole step.
    z = logits - logits.max(axis=-1, keepdims=True)  # shift for stability; softmax unchanged
    picked = np.take_along_axis(z, targets[..., None], axis=-1)  # (..., 1), z at the target
    probs = np.exp(z, out=z)  # z is not needed again: exp(z) takes its place
    sumexp = probs.sum(axis=-1, keepdims=True)  # (..., 1)
    probs /= sumexp  # softmax
    loss = -(picked - np.log(sumexp)).mean()  # -log p(target) = -(z_target - log Σ exp z)
    return float(loss), (probs, targets)


def cross_entropy_backward(dloss, cache):
    """Backward of cross_entropy_forward: ∂loss/∂logits = (softmax - onehot(target)) / N.

    Inputs:
    - dloss: float, upstream gradient of the scalar loss (1.0 for the loss itself)
    - cache: from cross_entropy_forward

    Returns:
    - dlogits: (..., V), in the dtype of the logits
    """
    probs, targets = cache
    V = probs.shape[-1]
    dlogits = probs.copy()
    d2 = dlogits.reshape(-1, V)  # (N, V), a view of dlogits
    d2[np.arange(d2.shape[0]), targets.reshape(-1)] -= 1.0  # softmax - onehot
    dlogits *= float(dloss) / targets.size  # in place with a Python float: float32 stays float32
    return dlogits
