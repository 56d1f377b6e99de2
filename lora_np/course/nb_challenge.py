"""Notebook 5 of the course (challenge): the backward passes of LayerNorm, attention and the embedding (E7)."""

from .nb_common import HOW_TO_WORK, code, md, setup_code

CELLS = [
    md(
        r"""
# 5 · Challenge: the rest of the transformer's backward pass (E7: 20 points)

LoRA trains only the adapters, but the gradient that reaches the adapters of block 0 has come back through every layer
above them: the output head, the final LayerNorm, and each later block's MLP, LayerNorms and attention. Those backward
passes run at every LoRA step, even though their own parameters are frozen. In **`lora_challenge.py`** you write three
of them; the forwards are given (imported at the top of that file from `lora_np.layers`), and their docstrings
describe each cache:

- **E7** `layernorm_backward(dout, cache, *, need_dgamma=True, need_dbeta=True)` returns `(dx, dgamma, dbeta)`;
- **E7** `attention_backward(dy, cache)` returns `(dq, dk, dv)`;
- **E7** `embedding_backward(dout, cache)` returns `dW`.

This is the challenge exercise: the notebook explains the structure, and the derivations are yours. Everything is
checked against finite differences of the given forwards, in float64.

**Sources**, cited as [key, where]:

- **[LoRA]** E. J. Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685 (2021),
  Section 4.2.
- **[LN]** J. L. Ba, J. R. Kiros, G. E. Hinton, *Layer Normalization*, arXiv:1607.06450 (2016).
- **[Attention]** A. Vaswani et al., *Attention Is All You Need*, NeurIPS 2017, Section 3.2.
- **[llm.c]** A. Karpathy, `llm.c`, `doc/layernorm/layernorm.md`: the LayerNorm backward derived step by step.
"""
    ),
    md(HOW_TO_WORK),
    setup_code(
        """
        import lora_np.model
        from lora_np import LoraConfig, ModelConfig, init_lora, init_params
        from lora_np.gradcheck import numerical_vjp, rel_error
        from lora_np.layers import attention_forward, embedding_forward, layernorm_forward
        from lora_np.train import loss_and_grads
        from lora_challenge import attention_backward, embedding_backward, layernorm_backward
        """
    ),
    md(
        r"""
## 1. LayerNorm

Over the last axis of $x$ (width $D$) [LN], with the biased variance and $\varepsilon = 10^{-5}$:

$$\mu = \tfrac1D \textstyle\sum_i x_i,\quad \sigma^2 = \tfrac1D \sum_i (x_i - \mu)^2,\quad
\hat x = (x - \mu)\,/\sqrt{\sigma^2 + \varepsilon},\quad \text{out} = \gamma \odot \hat x + \beta .$$

The cache is `(xhat, rstd, gamma)` with `rstd` $= 1/\sqrt{\sigma^2+\varepsilon}$, shape `(..., 1)`.

- $\gamma$ and $\beta$ are shared by every position, so their gradients sum over all leading axes.
- Through $\hat x$, each $x_i$ acts three ways: directly, through $\mu$, and through $\sigma^2$. Write
  $\partial L/\partial \hat x = \text{dout}\odot\gamma$, then collect the three contributions to
  $\partial L/\partial x_i$; the two that go through $\mu$ and $\sigma^2$ become means over the row. llm.c's
  `doc/layernorm` walks through it.
- `need_dgamma=False` / `need_dbeta=False`: that gradient is not computed, and its slot is `None`. In a LoRA model
  every LayerNorm is frozen, so only `dx` is ever formed.

A property to test your result by: shifting a whole row of $x$ by a constant does not change $\hat x$, so every row of
`dx` sums to zero.
"""
    ),
    code(
        r"""
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 3, 8))  # (B, T, D)
        gamma, beta = rng.normal(size=8), rng.normal(size=8)
        dout = rng.normal(size=(2, 3, 8))

        out, cache = layernorm_forward(x, gamma, beta)
        dx, dgamma, dbeta = layernorm_backward(dout, cache)


        def ln():
            return layernorm_forward(x, gamma, beta)[0]


        for name, analytic, wrt in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
            assert analytic.shape == wrt.shape, f"{name} has shape {analytic.shape}, expected {wrt.shape}"
            err = rel_error(analytic, numerical_vjp(ln, wrt, dout))
            print(f"{name:7s}{str(analytic.shape):10s} relative error {err:.2e}")
            assert err < 1e-7
        print(f"largest |row sum of dx|: {np.abs(dx.sum(axis=-1)).max():.1e}")
        assert np.abs(dx.sum(axis=-1)).max() < 1e-12

        dx_frozen, dgamma_frozen, dbeta_frozen = layernorm_backward(dout, cache, need_dgamma=False, need_dbeta=False)
        assert dgamma_frozen is None and dbeta_frozen is None and np.allclose(dx_frozen, dx)
        """
    ),
    md(
        r"""
## 2. Causal multi-head attention

`attention_forward(q, k, v, n_heads)` takes the projected queries, keys and values, `(B, T, D)` each, and runs in
five stages [Attention, 3.2]; your backward undoes them in reverse order, 5 to 1:

1. split the heads: `(B, T, D)` $\to$ `(B, H, T, hs)`, $hs = D/H$;
2. scores $S = Q K^\top \cdot \frac{1}{\sqrt{hs}}$, `(B, H, T, T)`;
3. causal mask: $S_{ts} = -\infty$ for $s > t$ (a position sees itself and the past);
4. $P = \mathrm{softmax}(S)$ over the keys, row by row;
5. $Y = PV$, `(B, H, T, hs)`, heads merged back to `(B, T, D)`.

The cache is `(qh, kh, vh, att, scale)`: the split heads, the softmax output $P$ and $1/\sqrt{hs}$. Hints:

- stage 5 is two matrix products; for each, ask which shapes must come out;
- the softmax's Jacobian is $\partial p_i/\partial s_j = p_i(\delta_{ij} - p_j)$; applied to a row of
  $\partial L/\partial P$ it needs no $T\times T$ Jacobian per row, only $P$ and one sum over the keys;
- stage 1 is a reshape and a transpose, undone by the inverse transpose and reshape.
"""
    ),
    code(
        r"""
        Bsz, T, D, H = 2, 5, 8, 2
        q, k, v = (rng.normal(size=(Bsz, T, D)) for _ in range(3))
        dy = rng.normal(size=(Bsz, T, D))
        y, att_cache = attention_forward(q, k, v, H)
        dq, dk, dv = attention_backward(dy, att_cache)


        def att():
            return attention_forward(q, k, v, H)[0]


        for name, analytic, wrt in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            assert analytic.shape == wrt.shape, f"{name} has shape {analytic.shape}, expected {wrt.shape}"
            err = rel_error(analytic, numerical_vjp(att, wrt, dy))
            print(f"{name} {analytic.shape}: relative error {err:.2e}")
            assert err < 1e-7
        """
    ),
    md(
        r"""
**Inline Question 1.** Your backward has nothing to do for stage 3, the causal mask. Why is no masking needed on the
way back? Use the cell below: an upstream gradient on position 0 only.
"""
    ),
    code(
        r"""
        dy0 = np.zeros_like(dy)
        dy0[:, 0] = rng.normal(size=(Bsz, D))  # a gradient at position 0 only
        dq0, dk0, dv0 = attention_backward(dy0, att_cache)
        print(f"max |dq| {np.abs(dq0).max():.1e}, max |dk| {np.abs(dk0).max():.1e}; "
              f"dv at position 0 equals dy there: {np.allclose(dv0[:, 0], dy0[:, 0], rtol=0, atol=1e-12)}; "
              f"max |dv| elsewhere {np.abs(dv0[:, 1:]).max():.1e}")
        assert np.allclose(dq0, 0, atol=1e-12) and np.allclose(dk0, 0, atol=1e-12)
        assert np.allclose(dv0[:, 0], dy0[:, 0], rtol=0, atol=1e-12) and np.allclose(dv0[:, 1:], 0, atol=1e-12)
        """
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
The mask sets the scores $S_{ts}$, $s > t$, to $-\infty$ before the softmax, so the attention weights there are
$P_{ts} = e^{-\infty}/\ldots = 0$ exactly. The softmax backward multiplies by $P$ entry by entry,
$\partial L/\partial S_{ts} = P_{ts}\,(\partial L/\partial P_{ts} - \sum_{s'} P_{ts'}\,\partial L/\partial P_{ts'})$,
so it is exactly 0 wherever $P_{ts} = 0$: the masked scores get no gradient, and no query or key is updated through a
future position. Nothing has to be masked again. (The masked entries were constants, $-\infty$, not functions of
$q$ and $k$, so there is no gradient to pass through them either.)

The cell shows an extreme case. Position 0 attends only to itself, with weight $P_{00} = 1$, so $y_0 = v_0$ in every
head: $\partial L/\partial v_0 = \partial L/\partial y_0$, and no other value gets gradient from it. And a softmax over
a single unmasked entry is the constant 1, whatever the score, so $\partial L/\partial q$ and $\partial L/\partial k$
are zero (to round-off).
### END SOLUTION
"""
    ),
    md(
        r"""
## 3. The embedding

`embedding_forward(ids, W)` looks rows up: `out[...] = W[ids[...]]`, `W` of shape `(n_rows, D)`. Its cache is
`(ids, n_rows)`. The backward sums, into each row of `dW`, the rows of `dout` at the positions that looked that row
up; rows never looked up get zero. An id that occurs twice must get both contributions. The integer ids have no
gradient.
"""
    ),
    code(
        r"""
        ids = np.array([[1, 3, 1], [0, 1, 3]])  # row 1 is looked up three times, row 3 twice, rows 2 and 4 never
        W = rng.normal(size=(5, 4))
        dout_e = rng.normal(size=(2, 3, 4))
        _, emb_cache = embedding_forward(ids, W)
        dW = embedding_backward(dout_e, emb_cache)
        err = rel_error(dW, numerical_vjp(lambda: embedding_forward(ids, W)[0], W, dout_e))
        print(f"dW {dW.shape}: relative error {err:.2e}")
        assert dW.shape == W.shape and err < 1e-7
        assert np.allclose(dW[1], dout_e[0, 0] + dout_e[0, 2] + dout_e[1, 1]) and not dW[[2, 4]].any()

        # The tempting one-liner: fancy-index assignment keeps one contribution per repeated id.
        naive = np.zeros_like(W)
        naive[ids.reshape(-1)] += dout_e.reshape(-1, 4)
        print(f"naive dW[ids] += dout: relative error {rel_error(naive, dW):.2f}")
        assert rel_error(naive, dW) > 0.01
        """
    ),
    code('check("E7")'),
    md(
        r"""
**Inline Question 2.** In a LoRA fine-tuning step with adapters on $W_q, W_v$ (every other weight frozen), which of
your three backward passes run, how many times, and which parameter gradients do they form? Compare with full
fine-tuning. The cell below records every call the model's backward makes to lora_np's versions of these three
functions (the model runs lora_np's layers, not yours), for a 2-layer model.
"""
    ),
    code(
        r"""
        cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
        params = init_params(cfg, seed=0)
        lora = LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v"))
        adapters = init_lora(cfg, lora, seed=1)
        for name in adapters:  # a nonzero B, as after some training
            if name.endswith(".B"):
                adapters[name] = np.random.default_rng(2).normal(0.0, 0.1, adapters[name].shape)
        tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(4, 17))

        SPIED = ("layernorm_backward", "attention_backward", "embedding_backward")
        real = {name: getattr(lora_np.model, name) for name in SPIED}
        calls = []


        def spy(name):
            def wrapper(*args, **kwargs):
                calls.append((name, kwargs))
                return real[name](*args, **kwargs)

            return wrapper


        def record(*args):
            # run loss_and_grads(*args) with the three backward functions spied on; returns (grads, calls)
            calls.clear()
            for name in SPIED:
                setattr(lora_np.model, name, spy(name))
            try:
                _, grads = loss_and_grads(*args)
            finally:
                for name in SPIED:
                    setattr(lora_np.model, name, real[name])
            return grads, list(calls)


        for label, args in (("LoRA", (params, tokens[:, :-1], tokens[:, 1:], adapters, lora)),
                            ("full fine-tuning", (params, tokens[:, :-1], tokens[:, 1:]))):
            grads, seen = record(*args)
            print(f"{label}: {len(grads)} gradients")
            for name in SPIED:
                flags = sorted({str(kw) for n, kw in seen if n == name})
                print(f"  {name:19s} called {sum(n == name for n, _ in seen)} times, flags {flags}")
            if label == "LoRA":
                lora_seen, lora_grads = seen, grads

        L = cfg.n_layers
        ln_calls = [kw for n, kw in lora_seen if n == "layernorm_backward"]
        assert len(ln_calls) == 2 * L + 1 and all(kw == {"need_dgamma": False, "need_dbeta": False} for kw in ln_calls)
        assert sum(n == "attention_backward" for n, _ in lora_seen) == L
        assert not any(n == "embedding_backward" for n, _ in lora_seen)
        assert set(lora_grads) == set(adapters)
        """
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
With LoRA on $W_q, W_v$, the LayerNorm backward runs $2L + 1$ times (`ln1` and `ln2` of each block, and the final
`ln_f`), always with `need_dgamma=False, need_dbeta=False`: it forms only `dx`, because the gradient has to pass
through the LayerNorms to reach the adapters below them, while $\gamma$ and $\beta$ are frozen. The attention backward
runs $L$ times; it has no parameters, and `dq` and `dv` are exactly what the adapters of $W_q$ and $W_v$ in that block
need (`dk` flows on through the frozen $W_k$ to `dx`). The embedding backward does not run at all: $W_e$ and $W_p$
are frozen and nothing below them is trainable, so the model never forms their gradient.
Of these calls, `ln1` of block 0 computes a `dx` that nothing trainable uses (as do the input gradients of block 0's
$W_q$, $W_k$, $W_v$ products); lora_np computes them anyway.

Full fine-tuning calls the same LayerNorm and attention backwards, the same number of times, but with both flags
`True`, and it runs the embedding backward twice (for $W_e$ and for $W_p$). Frozen means not computed: LoRA's saving
in the backward pass is the weight gradients ($\gamma$, $\beta$ here, and above all every $\partial L/\partial W$ of the
linear layers) that are never formed, not the activation gradients, which must still flow through every layer above
an adapter [LoRA, 4.2: "we do not need to calculate the gradient for the vast majority of the parameters"].
### END SOLUTION
"""
    ),
    md(
        r"""
## Summary

- LayerNorm: $\gamma$, $\beta$ gradients sum over positions; `dx` has three paths (direct, through $\mu$, through
  $\sigma^2$), and its rows sum to zero.
- Attention: undo the five stages in reverse; the causal mask needs no backward, because the softmax's zeros stop
  the gradient.
- Embedding: accumulate with repeats (`np.add.at`), not fancy-index assignment.
- In a LoRA step these backward passes carry `dx` down to the adapters; their own parameter gradients are never formed.
"""
    ),
]
