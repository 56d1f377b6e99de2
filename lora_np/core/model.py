"""The tiny GPT, forward and backward, with LoRA on any of its linear weights.

Dimension legend: B batch, T time, D model width, H heads, M MLP width, V vocabulary.

Forward (pre-LayerNorm, GPT-2 style), numbered as the backward undoes it:

    x = W_e[tokens] + W_p[:T]                              embeddings
    for each block l:
      1. a = LN1(x)
      2. q, k, v = a·W_qᵀ + b_q, a·W_kᵀ + b_k, a·W_vᵀ + b_v
      3. y = causal multi-head attention(q, k, v)
      4. x = x + y·W_oᵀ + b_o
      5. m = LN2(x)
      6. u = m·W_1ᵀ + b_1
      7. z = GELU(u)
      8. x = x + z·W_2ᵀ + b_2
    logits = LN_f(x)·W_uᵀ                                  no bias, not tied to W_e

A linear weight named in `lora.targets` runs through lora_linear_forward instead of
linear_forward: h = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ.

The seam for the methods that came after LoRA (lora_np.core.lora.METHODS, filled by
lora_np/methods/): such a method brings its own pair for an adapted weight, in place of the
LoRA pair, and may insert layers of its own at three slots of a block (lora.SLOTS), on the output of
stage 4's projection, on the output of stage 8's, and after stage 8's residual add (the paper's
adapter baselines use them).

model_backward forms a gradient only for the names in `trainable`; everything else is
frozen and its gradient is never computed (the saving LoRA is about).
"""

import numpy as np

from .layers import (
    attention_backward,
    attention_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    lora_linear_backward,
    lora_linear_forward,
)
from .lora import METHODS, check_adapters, trainable_adapters
from .params import check_params, is_stored_weight


def check_tokens(tokens, cfg, name="tokens"):
    """Raise a clear error unless `tokens` is a (B, T) integer array of valid ids, T <= context."""
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of integer ids, got {type(tokens).__name__}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name} must hold integer ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"{name} must have shape (B, T) with B, T >= 1, got {tokens.shape}")
    if tokens.shape[1] > cfg.context_length:
        raise ValueError(f"{name} has T={tokens.shape[1]} positions, longer than context_length={cfg.context_length}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains id {bad}; ids must be in [0, vocab_size) = [0, {cfg.vocab_size})")


# ----------------------------------------------------------------------------
# one linear projection of a block, plain or with its adapter


def _proj_forward(x, params, adapters, lora, prefix, w, train, rng):
    name = prefix + w
    W, b = params[name], params[prefix + "b_" + w[2:]]  # "W_q" -> "b_q"
    if adapters is None or w not in lora.targets:
        out, cache = linear_forward(x, W, b)
        return out, ("linear", cache)
    p = lora.dropout if train else 0.0  # dropout is a training-time regularizer only
    if lora.method != "lora":  # a later method's own pair for an adapted weight (the seam, lora.METHODS)
        out, cache = METHODS[lora.method].linear_forward(x, W, b, adapters, name, lora, p, rng)
        return out, (lora.method, cache)
    A, B = adapters[name + ".A"], adapters[name + ".B"]
    out, cache = lora_linear_forward(x, W, b, A, B, lora.scaling, dropout=p, rng=rng)
    return out, ("lora", cache)


def _proj_backward(dout, cache, prefix, w, want, grads):
    kind, c = cache
    w_name, b_name = prefix + w, prefix + "b_" + w[2:]  # names, not arrays: keys of want and grads
    if kind == "linear":
        dx, dW, db = linear_backward(dout, c, need_dW=w_name in want, need_db=b_name in want)
        if dW is not None:
            grads[w_name] = dW
        if db is not None:
            grads[b_name] = db
        return dx
    if kind == "lora":
        dx, dA, dB = lora_linear_backward(dout, c, need_dA=w_name + ".A" in want, need_dB=w_name + ".B" in want)
        grads.update({n: g for n, g in ((w_name + ".A", dA), (w_name + ".B", dB)) if g is not None})
    else:
        dx, new = METHODS[kind].linear_backward(dout, c, w_name, want)
        grads.update(new)
    if b_name in want:  # ∂L/∂b = g, summed over positions; it does not involve W0 or the adapter
        grads[b_name] = dout.reshape(-1, dout.shape[-1]).sum(axis=0)
    return dx


def _layernorm_backward(dout, cache, prefix, want, grads):
    g, b = prefix + ".gamma", prefix + ".beta"
    dx, dgamma, dbeta = layernorm_backward(dout, cache, need_dgamma=g in want, need_dbeta=b in want)
    if dgamma is not None:
        grads[g] = dgamma
    if dbeta is not None:
        grads[b] = dbeta
    return dx


# ----------------------------------------------------------------------------
# one transformer block


def block_forward(x, params, l, adapters, lora, train, rng):
    """One pre-LN block. x: (B, T, D) -> (B, T, D), and its cache (4a, 8a, 9: a method's layers, if any)."""
    p = f"blocks.{l}."
    c = {}
    inserted = METHODS[lora.method].layers if adapters is not None and lora.method != "lora" else {}

    def proj(inp, w):
        out, c[w] = _proj_forward(inp, params, adapters, lora, p, w, train, rng)
        return out

    def slot(h, name):  # a method's own layer at this slot, if it has one; its cache sits beside the rest
        if name not in inserted:
            return h
        out, c[name] = inserted[name][0](h, adapters, p)
        return out

    a, c["ln1"] = layernorm_forward(x, params[p + "ln1.gamma"], params[p + "ln1.beta"])  # 1
    q, k, v = proj(a, "W_q"), proj(a, "W_k"), proj(a, "W_v")  # 2. (B, T, D) each
    y, c["att"] = attention_forward(q, k, v, params.config.n_heads)  # 3.
    o = slot(proj(y, "W_o"), "after_attn")  # (B, T, D); 4a. before the residual add
    x = x + o  # 4. residual
    m, c["ln2"] = layernorm_forward(x, params[p + "ln2.gamma"], params[p + "ln2.beta"])  # 5
    u = proj(m, "W_1")  # 6. (B, T, M)
    z, c["gelu"] = gelu_forward(u)  # 7.
    h = slot(proj(z, "W_2"), "after_mlp")  # (B, T, D); 8a. before the residual add
    x = x + h  # 8. residual
    x = slot(x, "after_block")  # 9.
    if inserted:
        c["method"] = lora.method
    return x, c


def block_backward(dx, c, l, want, grads):
    """Backward of block_forward, stages 9 to 1. dx: (B, T, D), the gradient at the block's output."""
    p = f"blocks.{l}."
    inserted = METHODS[c["method"]].layers if "method" in c else {}

    def slot(dh, name):  # the backward of a method's layer at this slot, if the forward ran one
        return inserted[name][1](dh, c[name], p, want, grads) if name in c else dh

    dx = slot(dx, "after_block")  # 9. (its skip connection included in its backward)
    # 8. x = x + h with h = z·W_2ᵀ + b_2 (8a. through the method's layer): the residual passes dx through
    dz = _proj_backward(slot(dx, "after_mlp"), c["W_2"], p, "W_2", want, grads)
    du = gelu_backward(dz, c["gelu"])  # 7.
    dm = _proj_backward(du, c["W_1"], p, "W_1", want, grads)  # 6.
    dx = dx + _layernorm_backward(dm, c["ln2"], p + "ln2", want, grads)  # 5.
    # 4. x = x + o (4a. o through the method's layer): residual again
    dy = _proj_backward(slot(dx, "after_attn"), c["W_o"], p, "W_o", want, grads)
    dq, dk, dv = attention_backward(dy, c["att"])  # 3.
    da = (  # 2. a feeds all three projections, so their gradients add
        _proj_backward(dq, c["W_q"], p, "W_q", want, grads)
        + _proj_backward(dk, c["W_k"], p, "W_k", want, grads)
        + _proj_backward(dv, c["W_v"], p, "W_v", want, grads)
    )
    return dx + _layernorm_backward(da, c["ln1"], p + "ln1", want, grads)  # 1.


# ----------------------------------------------------------------------------
# the whole model


def model_forward(params, tokens, adapters=None, lora=None, *, train=False, rng=None):
    """Logits of the tiny GPT, with LoRA adapters if given.

    Inputs:
    - params: Params from init_params (its dtype, float32 or float64, is the compute dtype)
    - tokens: (B, T) integer ids, T <= context_length
    - adapters: dict from init_lora, or None for the plain model (LoRA's A and B, or the arrays of
      another method of lora.METHODS)
    - lora: the LoraConfig the adapters were made for (required with adapters)
    - train: True turns on LoRA dropout
    - rng: np.random.Generator for dropout (required when train and lora.dropout > 0)

    Returns:
    - logits: (B, T, V)
    - cache: everything model_backward needs
    """
    check_params(params)
    cfg = params.config
    check_tokens(tokens, cfg)
    if adapters is None and lora is not None:
        raise ValueError("lora was given without adapters; pass both (adapters from init_lora) or neither")
    if adapters is not None:
        if lora is None:
            raise ValueError("adapters were given without lora; pass the LoraConfig they were made with")
        check_adapters(params, adapters, lora)
        if train and lora.dropout > 0 and not isinstance(rng, np.random.Generator):
            raise ValueError(
                f"rng must be a np.random.Generator for LoRA dropout {lora.dropout} in training, got {rng!r}"
            )
    T = tokens.shape[1]

    x, c_tok = embedding_forward(tokens, params["W_e"])  # (B, T, D)
    pos, c_pos = embedding_forward(np.arange(T), params["W_p"])  # (T, D), broadcast over B
    x = x + pos
    blocks = []
    for l in range(cfg.n_layers):
        x, c = block_forward(x, params, l, adapters, lora, train, rng)
        blocks.append(c)
    xf, c_lnf = layernorm_forward(x, params["ln_f.gamma"], params["ln_f.beta"])
    logits, c_head = linear_forward(xf, params["W_u"], None)  # (B, T, V)

    cache = {
        "names": list(params) + (list(adapters) if adapters is not None else []),
        "params": list(params),
        "default_trainable": trainable_adapters(adapters) if adapters is not None else list(params),
        "adapted": lora.targets if adapters is not None else (),
        "stored": {n for n, a in params.items() if is_stored_weight(a)},
        "logits": (logits.shape, logits.dtype),
        "tok": c_tok,
        "pos": c_pos,
        "blocks": blocks,
        "ln_f": c_lnf,
        "head": c_head,
    }
    return logits, cache


def _resolve_trainable(trainable, cache):
    if trainable is None:
        return set(cache["default_trainable"])
    if isinstance(trainable, str):
        raise TypeError(f"trainable must be a collection of names, got the string {trainable!r}")
    try:
        want = set(trainable)
    except TypeError:
        raise TypeError(f"trainable must be a collection of names, got {type(trainable).__name__}") from None
    odd = [n for n in want if not isinstance(n, str)]
    if odd:  # sorted() below would fail on a mix of types
        raise TypeError(f"trainable must hold parameter names (str), got {odd[0]!r} ({type(odd[0]).__name__})")
    known = set(cache["names"])
    unknown = sorted(want - known)
    if unknown:
        raise ValueError(
            f"unknown trainable names {unknown[:4]}: neither parameters nor adapters of this forward pass; "
            f"known names look like 'blocks.0.W_q', 'blocks.0.W_q.A', 'ln_f.gamma'"
        )
    adapter_names = set(cache["names"]) - set(cache["params"])
    frozen = sorted(n for n in want if n in adapter_names and n not in cache["default_trainable"])
    if frozen:
        raise ValueError(f"trainable includes {frozen[:2]}, adapter arrays that the method keeps frozen by "
                         f"definition; train the others: {sorted(cache['default_trainable'])[:3]}...")  # fmt: skip
    stored = sorted(n for n in want if n in cache["stored"])
    if stored:
        raise ValueError(f"trainable includes {stored[:2]}, stored in another format than an array (a quantized "
                         f"base): such a weight is frozen")  # fmt: skip
    both = sorted(n for n in want if n.rsplit(".", 1)[-1] in cache["adapted"])
    if both:
        raise ValueError(
            f"trainable includes {both[:4]}, frozen weights that carry LoRA adapters; "
            f"train the adapters (.A, .B) or run without adapters, not both"
        )
    return want


# what model_forward's cache holds; model_backward refuses anything else before reading it
_CACHE_KEYS = frozenset({"names", "params", "default_trainable", "adapted", "stored", "logits", "tok", "pos",
                         "blocks", "ln_f", "head"})  # fmt: skip


def model_backward(dlogits, cache, trainable=None):
    """Gradients of the names in `trainable`, and of nothing else.

    Inputs:
    - dlogits: (B, T, V), ∂L/∂logits (e.g. from cross_entropy_backward)
    - cache: from model_forward
    - trainable: names of params and adapters to differentiate. When None: every adapter
      entry when the forward had adapters, else every parameter.

    Returns:
    - grads: dict name -> array with the shape of that parameter, exactly the trainable names
    """
    if not isinstance(cache, dict) or not _CACHE_KEYS <= set(cache):
        got = f"a dict without {sorted(_CACHE_KEYS - set(cache))}" if isinstance(cache, dict) else type(cache).__name__
        raise TypeError(f"cache must be the cache model_forward returned, got {got}")
    shape, dtype = cache["logits"]
    if not isinstance(dlogits, np.ndarray) or dlogits.shape != shape or dlogits.dtype != dtype:
        got = (dlogits.shape, dlogits.dtype) if isinstance(dlogits, np.ndarray) else type(dlogits).__name__
        # a float64 dlogits would silently turn a float32 backward into float64
        raise ValueError(f"dlogits must be an array of shape {shape} and dtype {dtype} like the logits, got {got}")
    want = _resolve_trainable(trainable, cache)
    grads = {}
    # logits = xf·W_uᵀ
    dxf, dW_u, _ = linear_backward(dlogits, cache["head"], need_dW="W_u" in want, need_db=False)
    if dW_u is not None:
        grads["W_u"] = dW_u
    dx = _layernorm_backward(dxf, cache["ln_f"], "ln_f", want, grads)
    for l in reversed(range(len(cache["blocks"]))):
        dx = block_backward(dx, cache["blocks"][l], l, want, grads)
    # x = W_e[tokens] + W_p[:T]
    if "W_e" in want:
        grads["W_e"] = embedding_backward(dx, cache["tok"])
    if "W_p" in want:
        # the same positions for every sequence: sum over the batch, then a row lookup's
        # backward; (context_length, D), rows >= T stay zero as the forward never read them
        grads["W_p"] = embedding_backward(dx.sum(axis=0), cache["pos"])
    return grads
