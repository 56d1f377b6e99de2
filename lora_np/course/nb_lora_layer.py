"""Notebook 1 of the course: the LoRA layer's forward (E1) and backward (E2)."""

from .nb_common import HOW_TO_WORK, code, md, setup_code

CELLS = [
    md(
        r"""
# 1 · The LoRA layer, forward and backward (E1: 10 points, E2: 20 points)

In this notebook you write the one layer LoRA adds to a network, in the style of CS231n's layer code: a forward
function that returns its output and a cache, and a backward function that turns the upstream gradient and that
cache into the gradients of the layer's inputs. Both go in **`lora_layer.py`**:

- **E1** `lora_linear_forward(x, W, b, A, B, scaling, *, dropout=0.0, rng=None)` returns `(out, cache)`;
- **E2** `lora_linear_backward(dout, cache, *, need_dA=True, need_dB=True)` returns `(dx, dA, dB)`.

The docstrings in `lora_layer.py` are the contract: argument shapes, return values, and the layout of the cache.

**Sources**, cited as [key, where]:

- **[LoRA]** E. J. Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685 (2021):
  eq. (3) and Section 4.1 (the update $BA$, its initialization and the scaling $\alpha/r$), Section 4.2.
- **[GPT-3]** T. Brown et al., arXiv:2005.14165 (2020), Table 2.1: $d_{model} = 12{,}288$, context 2048 tokens.
- **[CS231n]** Stanford CS231n, the layer assignments and the notes on gradient checks.
- **[llm.c]** A. Karpathy, `llm.c`, `train_gpt2.c` and `doc/layernorm`: each backward reads as its forward in reverse.
"""
    ),
    md(HOW_TO_WORK),
    setup_code(
        """
        from lora_np.gradcheck import numerical_vjp, rel_error
        from lora_layer import lora_linear_backward, lora_linear_forward
        """
    ),
    md(
        r"""
## 1. The forward pass (E1)

A pretrained weight $W_0 \in \mathbb{R}^{d\times k}$ is frozen, and its update is constrained to a product of two thin
matrices, $\Delta W = BA$ with $B \in \mathbb{R}^{d\times r}$, $A \in \mathbb{R}^{r\times k}$ and $r \ll \min(d, k)$
[LoRA, 4.1]. Both $W_0$ and $\Delta W$ multiply the same input, and the outputs add [LoRA, eq. (3)]:

$$h = W_0 x + \Delta W x = W_0 x + B A x .$$

The paper then scales $\Delta W x$ by $\alpha/r$, with $\alpha$ a constant [LoRA, 4.1]; the code calls this factor
`scaling` ($s$). With the layer's bias:

$$h = W_0 x + b + s\,B A x, \qquad s = \alpha / r .$$

**Orientation.** lora_np stores a weight as `(d_out, d_in)`, the paper's $d\times k$, and puts tokens in *rows*: `x` has
shape `(..., d_in)`, any number of leading axes (batch, time). So the column formula becomes, for the rows of `x`,

    out = x @ W.T + b + scaling * ((x @ A.T) @ B.T)

| array | shape | trained? |
|---|---|---|
| `x` | `(..., d_in)` | input |
| `W` ($W_0$) | `(d_out, d_in)` | frozen |
| `b` | `(d_out,)` or `None` | frozen |
| `A` | `(r, d_in)` | trained; random at the start |
| `B` | `(d_out, r)` | trained; zero at the start |
| `out` ($h$) | `(..., d_out)` | output |

![The LoRA layer's forward pass: shapes, the frozen path and the trainable path](figures/lora_layer.png)

What to get right:

1. **Flatten, then restore.** Work on `x2 = x.reshape(-1, d_in)`, shape `(N, d_in)`, and reshape the result to
   `(*x.shape[:-1], d_out)`.
2. **Never form `B @ A`.** It is a full `(d_out, d_in)` matrix, the very thing LoRA avoids training and storing.
   Compute the `r`-wide `xA = x2 @ A.T` first, shape `(N, r)`, scale it, then multiply by `B.T`.
3. **Dropout on the LoRA branch only.** With `dropout = p > 0`, the input of $A$ (not the frozen path) goes through
   inverted dropout: a mask of shape `(N, d_in)` whose entries are $0$ with probability $p$ and $1/(1-p)$ otherwise,
   drawn from `rng`, and `xd = x2 * mask`. lora_np draws it as
   `mask = ((rng.random(x2.shape) >= p) / (1 - p)).astype(x.dtype)`; any draw from `rng` with these values and this
   rate is correct. With `p = 0` there is no mask (`mask = None`, `xd = x2`) and no random draw. A `dropout` outside
   $[0, 1)$, or `dropout > 0` without an `rng`, raises `ValueError`.
4. **The cache is part of the contract:** `(x, W, xd, mask, xA, A, B, scaling)`, where `x` is the input as given,
   `xd` the `(N, d_in)` input of $A$ after dropout, `mask` the `(N, d_in)` mask or `None`, and **`xA = xd @ A.T`,
   not scaled**. E2 is graded on caches made by the reference forward, so this layout is what your backward reads.
5. **Keep the dtype**: float32 in, float32 out. `scaling` is a Python float, which does not change an array's
   dtype; a NumPy float64 scalar would (it would turn a float32 result into float64).

Write `lora_linear_forward` now, then run the cells below. All shapes differ ($d_{in} = 7$, $d_{out} = 5$, $r = 3$), so
a transposed product fails loudly instead of passing by accident.
"""
    ),
    code(
        r"""
        rng = np.random.default_rng(0)
        d_in, d_out, r, alpha = 7, 5, 3, 6.0
        s = alpha / r
        x = rng.normal(size=(2, 4, d_in))  # (B, T, d_in): N = 8 tokens
        W = rng.normal(size=(d_out, d_in))  # W0, frozen
        b = rng.normal(size=d_out)
        A = rng.normal(size=(r, d_in))
        B = rng.normal(size=(d_out, r))  # not zero here, so the LoRA branch contributes

        out, cache = lora_linear_forward(x, W, b, A, B, s)
        print("out:", out.shape, out.dtype)
        assert out.shape == (2, 4, d_out) and out.dtype == np.float64

        # The same numbers another way: one token at a time, with the column formula h = W0·x + b + s·B·A·x
        expected = np.array([[W @ xt + b + s * B @ (A @ xt) for xt in row] for row in x])
        print(f"relative error against the column formula: {rel_error(out, expected):.1e}")
        assert rel_error(out, expected) < 1e-12

        # The cache layout: (x, W, xd, mask, xA, A, B, scaling), with xA = xd @ A.T not scaled
        assert len(cache) == 8, f"the cache must have 8 entries, got {len(cache)}"
        x_c, W_c, xd, mask, xA, A_c, B_c, s_c = cache
        assert mask is None, "no dropout: mask must be None"
        assert xd.shape == (8, d_in) and np.array_equal(xd, x.reshape(-1, d_in))
        assert xA.shape == (8, r) and rel_error(xA, x.reshape(-1, d_in) @ A.T) < 1e-14, "xA must be xd @ A.T, unscaled"
        assert x_c.shape == x.shape and np.array_equal(x_c, x), "cache[0] must be x as given, shape (..., d_in)"
        assert np.array_equal(W_c, W) and np.array_equal(A_c, A) and np.array_equal(B_c, B) and s_c == s
        print("cache: x", x_c.shape, " W", W_c.shape, " xd", xd.shape, " mask", mask, " xA", xA.shape)
        """
    ),
    md(
        r"""
With $B = 0$, the paper's initialization [LoRA, 4.1], $\Delta W = 0$ and the layer is the frozen layer: the output
cannot depend on $A$ at all. In floating point this is exact, not approximate: every entry of the LoRA branch is a sum
of products with a factor 0. The cell checks it bit for bit, and checks float32 stays float32.
"""
    ),
    code(
        r"""
        B0 = np.zeros((d_out, r))
        out_a, _ = lora_linear_forward(x, W, b, A, B0, s)
        out_other_a, _ = lora_linear_forward(x, W, b, 100 * rng.normal(size=A.shape), B0, s)
        assert np.array_equal(out_a, out_other_a), "with B = 0 the output must not depend on A, to the last bit"
        x2 = x.reshape(-1, d_in)  # 2-D, so that x·W0ᵀ is one product however it is written
        out_2d, _ = lora_linear_forward(x2, W, b, A, B0, s)
        assert np.array_equal(out_2d, x2 @ W.T + b), "with B = 0 the output must be x·W0ᵀ + b, bit for bit"
        print("B = 0: output independent of A, and equal to x·W0ᵀ + b, bit for bit")

        f32 = [a.astype(np.float32) for a in (x, W, b, A, B)]
        out32, _ = lora_linear_forward(*f32, s)
        print("float32 in ->", out32.dtype, "out")
        assert out32.dtype == np.float32
        """
    ),
    md(
        r"""
**Dropout.** Each entry of the mask is $0$ (with probability $p$) or $1/(1-p)$, so that the expected value of
`xd` is `x` (inverted dropout: nothing to rescale at test time). The frozen path sees the clean `x`.
"""
    ),
    code(
        r"""
        p = 0.5
        out_d, cache_d = lora_linear_forward(x, W, b, A, B, s, dropout=p, rng=np.random.default_rng(1))
        _, _, xd_d, mask_d, xA_d, *_ = cache_d
        print(f"mask values: {np.unique(mask_d)}, share of zeros: {np.mean(mask_d == 0):.2f}")
        assert mask_d.shape == (8, d_in) and set(np.unique(mask_d)) <= {0.0, 1 / (1 - p)}
        same_draw = np.array_equal(mask_d, (np.random.default_rng(1).random((8, d_in)) >= p) / (1 - p))
        print("the same mask as lora_np's draw from a generator in the same state (not required):", same_draw)
        assert np.array_equal(xd_d, x.reshape(-1, d_in) * mask_d)
        x2 = x.reshape(-1, d_in)
        expected_d = (x2 @ W.T + b + s * (xd_d @ A.T) @ B.T).reshape(out.shape)  # clean x on the frozen path
        assert rel_error(out_d, expected_d) < 1e-12

        # bad arguments raise ValueError
        bad_arguments = {
            "dropout=1.0": {"dropout": 1.0, "rng": np.random.default_rng(0)},
            "dropout=0.1 without rng": {"dropout": 0.1, "rng": None},
        }
        for label, bad in bad_arguments.items():
            try:
                lora_linear_forward(x, W, b, A, B, s, **bad)
            except ValueError as e:
                print(f"{label}: ValueError: {e}")
            else:
                raise AssertionError(f"lora_linear_forward with {label} must raise ValueError")
        """
    ),
    md(
        """
Now the autograder's tests for E1 (they compare with the reference on many random shapes, float32 and float64, with
and without dropout):
"""
    ),
    code('check("E1")'),
    md(
        r"""
## 2. The backward pass (E2)

Take one token: input column $x \in \mathbb{R}^{k}$, upstream gradient $g = \partial L/\partial h \in \mathbb{R}^{d}$.
Name the two intermediate vectors $u = Ax \in \mathbb{R}^{r}$ and $v = Bu \in \mathbb{R}^{d}$, so that
$h = W_0x + b + s\,v$. Walking back one product at a time:

$$\frac{\partial L}{\partial v} = s\,g, \qquad
\frac{\partial L}{\partial B} = s\,g\,u^\top = s\,g\,(Ax)^\top \quad (d\times r), \qquad
\frac{\partial L}{\partial u} = s\,B^\top g \quad (r),$$

$$\frac{\partial L}{\partial A} = \frac{\partial L}{\partial u}\,x^\top = s\,B^\top g\,x^\top \quad (r\times k), \qquad
\frac{\partial L}{\partial x} = W_0^\top g + A^\top \frac{\partial L}{\partial u}
= W_0^\top g + s\,A^\top B^\top g \quad (k).$$

**Many tokens.** The code puts tokens in rows: $X$ `(N, d_in)` stacks the inputs $x_n^\top$ (after dropout: the
cached `xd`), $G$ `(N, d_out)` the upstream gradients $g_n^\top$ (`dout`, flattened), and $XA^\top$ `(N, r)` is the
cached `xA`. The loss sums over tokens, so each parameter's gradient is the sum over $n$ of the per-token outer products
above, and a sum of outer products $\sum_n a_n b_n^\top$ is one matrix product of the stacked rows. Work out the three
products, with their shapes, before you write them. Two hints:

- compute the `(N, r)` array $s\,GB$, the gradient at $XA^\top$, once: both $\partial L/\partial A$ and
  $\partial L/\partial X$ use it;
- check each result's shape against its parameter's: `dA` is `(r, d_in)`, `dB` is `(d_out, r)`, `dx` has the
  shape of the forward's `x`.

**With dropout**, the LoRA branch saw `xd = x2 * mask`: `dA` uses `xd`, and the branch's part of `dx` passes back
through the same mask (multiply by it). The frozen path saw the clean `x`.

![The LoRA layer's backward pass: the products formed, and the ones never formed](figures/lora_backward.png)

**Frozen means not computed.** $W_0$ and $b$ are frozen, so $\partial L/\partial W_0 = G^\top X$, a `(d_out, d_in)`
matrix, is never formed; the function has no slot for it. Likewise `need_dA=False` or `need_dB=False` means that
gradient is not computed at all, and its slot in the returned tuple is `None`. Do not modify `dout` or the cache.

Write `lora_linear_backward`, then check it against finite differences of **your own** forward. $B$ is random here,
not zero: at $B = 0$ the true $\partial L/\partial A$ is exactly zero, and a check there would pass even for a wrong
`dA` (Section 3 below).
"""
    ),
    code(
        r"""
        dout = rng.normal(size=(2, 4, d_out))


        def forward():  # your forward, re-run by numerical_vjp with one entry of x, A or B perturbed
            return lora_linear_forward(x, W, b, A, B, s)[0]


        out, cache = lora_linear_forward(x, W, b, A, B, s)
        dx, dA, dB = lora_linear_backward(dout, cache)
        for name, analytic, wrt in (("dx", dx, x), ("dA", dA, A), ("dB", dB, B)):
            assert analytic.shape == wrt.shape, f"{name} has shape {analytic.shape}, expected {wrt.shape}"
            err = rel_error(analytic, numerical_vjp(forward, wrt, dout))
            print(f"{name} {str(analytic.shape):9s} relative error {err:.2e}")
            assert err < 1e-7
        """
    ),
    md(
        """
The same check with dropout on. The forward is re-run with a generator in the same state each time, so every call
draws the same mask:
"""
    ),
    code(
        r"""
        def forward_dropout():
            return lora_linear_forward(x, W, b, A, B, s, dropout=0.3, rng=np.random.default_rng(7))[0]


        _, cache_d = lora_linear_forward(x, W, b, A, B, s, dropout=0.3, rng=np.random.default_rng(7))
        grads_d = lora_linear_backward(dout, cache_d)
        for name, analytic, wrt in zip(("dx", "dA", "dB"), grads_d, (x, A, B)):
            err = rel_error(analytic, numerical_vjp(forward_dropout, wrt, dout))
            print(f"dropout 0.3: {name} relative error {err:.2e}")
            assert err < 1e-7
        """
    ),
    md(
        """
Frozen means not computed: a gradient that is not asked for comes back as `None`, and the others do not change. The
backward must not write into `dout` or the cache.
"""
    ),
    code(
        r"""
        dout_before, cache_before = dout.copy(), [c.copy() if isinstance(c, np.ndarray) else c for c in cache]
        dx_1, dA_1, dB_1 = lora_linear_backward(dout, cache, need_dA=False)
        dx_2, dA_2, dB_2 = lora_linear_backward(dout, cache, need_dB=False)
        assert dA_1 is None and dB_2 is None
        assert np.allclose(dx_1, dx) and np.allclose(dB_1, dB) and np.allclose(dx_2, dx) and np.allclose(dA_2, dA)
        assert np.array_equal(dout, dout_before), "the backward modified dout"
        for c, c0 in zip(cache, cache_before):
            assert np.array_equal(c, c0) if isinstance(c, np.ndarray) else c is c0, "the backward modified the cache"
        print("need_dA=False -> dA is None; need_dB=False -> dB is None; inputs untouched")
        """
    ),
    code('check("E2")'),
    md(
        r"""
## 3. Step 0: $B = 0$

At the start of fine-tuning $B = 0$ [LoRA, 4.1]. Run your backward there:
"""
    ),
    code(
        r"""
        _, cache0 = lora_linear_forward(x, W, b, A, B0, s)
        dx0, dA0, dB0 = lora_linear_backward(dout, cache0)
        numeric_dA0 = numerical_vjp(lambda: lora_linear_forward(x, W, b, A, B0, s)[0], A, dout)
        print(f"B = 0:  ‖dA‖ = {np.linalg.norm(dA0):.3g}  ({np.count_nonzero(dA0)} nonzero entries of {dA0.size})")
        print(f"        finite differences: {np.count_nonzero(numeric_dA0)} nonzero entries of {numeric_dA0.size}")
        print(f"        ‖dB‖ = {np.linalg.norm(dB0):.3g}  ({np.count_nonzero(dB0)} nonzero entries of {dB0.size})")
        assert np.count_nonzero(dA0) == 0 and np.count_nonzero(numeric_dA0) == 0
        assert np.count_nonzero(dB0) == dB0.size
        """
    ),
    md(
        r"""
**Inline Question 1.** At step 0, why is $\partial L/\partial A$ *exactly* zero, not merely small, while
$\partial L/\partial B$ is not? What does that mean for the first update of the adapter?
"""
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
For one token, $\partial L/\partial A = s\,B^\top g\,x^\top$ and $\partial L/\partial B = s\,g\,(Ax)^\top$ (Section 2).
At step 0, $B = 0$ [LoRA, 4.1], so $B^\top g = 0$ whatever $g$ and $x$ are: every entry of $\partial L/\partial A$ is a
sum of products that each contain a factor 0, which floating point evaluates to exactly 0 (the cell above counts
zero nonzero entries). The finite differences agree exactly, for a reason that does not use the backward at all: while
$B = 0$ the output $h = W_0x + b + s\,B(Ax)$ does not depend on $A$, so perturbing $A$ changes nothing.

$\partial L/\partial B = s\,g\,(Ax)^\top$ needs only $g$ and $Ax$. $A$ is random, so $Ax \neq 0$, and $g \ne 0$ as long
as the model does not already fit the new task; every entry of $\partial L/\partial B$ was nonzero above.

So the first update moves $B$ only; $A$ keeps its initial value (with plain SGD, and with Adam too: notebook 4).
From the second step on, $B \ne 0$ and $A$ receives gradient through it.
### END SOLUTION
"""
    ),
    md(
        r"""
**Inline Question 2.** Matrix products are associative: `dA = (s * G @ B).T @ xd` equals `s * B.T @ (G.T @ xd)`.
A product of an $(m\times n)$ and an $(n\times p)$ matrix costs $m\,n\,p$ multiply-adds. In the cell below, compute the
multiply-adds of both orders for one GPT-3 attention matrix ($d_{out} = d_{in} = 12{,}288$ [GPT-3, Table 2.1]),
$r = 4$ and $N = 2048$ tokens (one sequence at GPT-3's context length). Then say which order is cheaper, and what the
other order builds on the way that LoRA sets out never to compute.
"""
    ),
    code(
        r"""
        N, d_out_big, d_in_big, r_big = 2048, 12288, 12288, 4
        ### BEGIN SOLUTION
        cost_r_wide = N * d_out_big * r_big + r_big * N * d_in_big  # G·B (N×d)(d×r), then (G·B)ᵀ·X (r×N)(N×k)
        cost_d_wide = d_out_big * N * d_in_big + r_big * d_out_big * d_in_big  # Gᵀ·X (d×N)(N×k), then Bᵀ·(Gᵀ·X)
        ### END SOLUTION
        print(f"(s·G·B)ᵀ·X_d : {cost_r_wide:>18,} multiply-adds")
        print(f"s·Bᵀ·(Gᵀ·X_d): {cost_d_wide:>18,} multiply-adds, {cost_d_wide / cost_r_wide:,.0f} times more")
        assert cost_r_wide == N * r_big * (d_out_big + d_in_big)
        assert cost_d_wide == d_out_big * d_in_big * (N + r_big)
        assert cost_d_wide > 1000 * cost_r_wide
        """
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
The order your backward uses, $(s\,GB)^\top X_d$, costs $N r\,(d_{out} + d_{in})$ multiply-adds and its intermediate
$GB$ is only `(N, r)`; the other order costs $d_{out} d_{in} (N + r)$, printed above as more than a thousand times more
for a GPT-3 attention matrix. The reason is the intermediate $G^\top X_d$: a full `(d_out, d_in)` matrix, which is
(up to dropout) $\partial L/\partial W_0$, the gradient of the frozen weight. Never forming it is where LoRA's backward
saves compute and memory [LoRA, 4.2: "we do not need to calculate the gradient for the vast majority of the
parameters"]. Notebook `03_gradients_by_hand` times the two orders.
### END SOLUTION
"""
    ),
    md(
        r"""
## Summary

- `lora_linear_forward`: $h = W_0x + b + s\,B(A\,\mathrm{drop}(x))$, with the `r`-wide $xA^\top$ computed first
  and cached.
- `lora_linear_backward`: $\partial L/\partial B = s\,G^\top(XA^\top)$, $\partial L/\partial A = (s\,GB)^\top X_d$,
  $\partial L/\partial X = GW_0 + (s\,GB)A$, checked against finite differences of your forward in float64;
  $\partial L/\partial W_0$ never formed.
- At $B = 0$: the output ignores $A$ and $\partial L/\partial A = 0$ exactly.

Next: notebook 2 puts these layers in a model: creating the adapters (E3), and merging them into $W_0$ (E4).
"""
    ),
]
