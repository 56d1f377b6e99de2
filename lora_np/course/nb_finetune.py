"""Notebook 4 of the course: what to train, AdamW, and one LoRA fine-tuning step (E6); what alpha/r buys."""

from .nb_common import HOW_TO_WORK, code, md, setup_code

CELLS = [
    md(
        r"""
# 4 · One fine-tuning step (E6: 20 points)

Full fine-tuning updates every weight. LoRA freezes $W_0$ and updates only the adapters [LoRA, 4.1]. The difference
lies entirely in *what is trained*: which names get a gradient and an optimizer state. In **`lora_finetune.py`** you
write:

- **E6** `trainable_names(params, adapters=None, lora=None, bias="none")`: the names to train;
- **E6** `AdamW.step(self, grads)`: one step of Adam with decoupled weight decay (`__init__` is given).

Then you take one LoRA fine-tuning step with them and check, bit for bit, what moved and what did not. The model's
forward and backward are given: `lora_np.train.loss_and_grads(params, x, y, adapters, lora, trainable)` returns the
loss and a dict with a gradient for exactly the names in `trainable`, and forms no other gradient.

**Sources**, cited as [key, where]:

- **[LoRA]** E. J. Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685 (2021):
  Section 4.1 (initialization, the scaling $\alpha/r$), Section 4.2 (optimizer state for frozen weights).
- **[Adam]** D. Kingma, J. Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015, Algorithm 1.
- **[AdamW]** I. Loshchilov, F. Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
- **[loralib]** github.com/microsoft/LoRA, `loralib/utils.py`: `mark_only_lora_as_trainable(model, bias=...)`.
- **[rsLoRA]** D. Kalajdzievski, *A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA*,
  arXiv:2312.03732 (2023).
"""
    ),
    md(HOW_TO_WORK),
    setup_code(
        """
        from lora_np import LoraConfig, ModelConfig, init_lora, init_params, model_forward
        from lora_np.gradcheck import rel_error
        from lora_np.layers import cross_entropy_forward
        from lora_np.train import loss_and_grads
        from lora_finetune import AdamW, trainable_names
        """
    ),
    md(
        r"""
## 1. What to train (E6, first part)

Return a list of distinct names (their order does not matter):

- **No adapters** (pretraining, full fine-tuning): every parameter. A `bias` other than `"none"` makes no sense here
  (every bias trains already) and raises `ValueError`.
- **With adapters**: every adapter array and, following loralib's `mark_only_lora_as_trainable(bias=...)` [loralib],
  some biases:
  - `"none"`: no bias;
  - `"all"`: every bias, that is every name whose last part starts with `b_` (`blocks.0.b_q`, ...) and every
    LayerNorm `beta`;
  - `"lora_only"`: the biases of the adapted weights only: `b_q` when `W_q` is in `lora.targets`, and so on.
- Any other `bias` raises `ValueError`, naming the allowed values.

The paper trains no bias with LoRA; it leaves "adapting the MLP layers, LayerNorm layers, and biases to a future work"
[LoRA, 4.2].
"""
    ),
    code(
        r"""
        cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
        params = init_params(cfg, seed=0)  # float64; stands in for a pretrained model
        lora = LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v"))
        adapters = init_lora(cfg, lora, seed=1)  # lora_np's init_lora, so this notebook does not depend on your E3

        leaf = {n: n.rsplit(".", 1)[-1] for n in params}
        all_biases = [n for n in params if leaf[n].startswith("b_") or leaf[n] == "beta"]
        qv_biases = [n for n in params if leaf[n] in ("b_q", "b_v")]
        cases = {  # label: (what your function returns, what it should hold)
            "full fine-tuning": (trainable_names(params), list(params)),
            'LoRA, bias="none"': (trainable_names(params, adapters, lora), list(adapters)),
            'LoRA, bias="all"': (trainable_names(params, adapters, lora, bias="all"), list(adapters) + all_biases),
            'LoRA, bias="lora_only"': (
                trainable_names(params, adapters, lora, bias="lora_only"),
                list(adapters) + qv_biases,
            ),
        }
        for label, (got, want) in cases.items():
            print(f"{label:24s} {len(got):3d} names, e.g. {got[-1]}")
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            assert not missing and not extra, f"{label}: missing {missing[:3]}, unexpected {extra[:3]}"
            assert len(set(got)) == len(got), f"{label}: a name appears twice"

        for kwargs in ({"bias": "all"}, {"adapters": adapters, "lora": lora, "bias": "some"}):
            try:
                trainable_names(params, **kwargs)
            except ValueError as e:
                print(f"ValueError: {e}")
            else:
                raise AssertionError(f"trainable_names(params, {kwargs}) must raise ValueError")
        """
    ),
    md(
        r"""
## 2. AdamW (E6, second part)

For each trained array $p$ with gradient $g$, at step $t = 1, 2, \ldots$ [Adam, Algorithm 1; AdamW]:

$$p \leftarrow p - \eta\lambda\,p \quad\text{(decoupled weight decay; only for arrays with 2 or more axes)}$$
$$m \leftarrow \beta_1 m + (1-\beta_1)\,g, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\,g^2$$
$$p \leftarrow p - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}$$

with $\eta$ = `self.lr`, $\lambda$ = `self.weight_decay`, and $m, v$ kept in `self.state[name]` (zeros at the start).
`self.t` counts the steps. Weight decay skips vectors (biases, LayerNorm gains), as GPT-2 and nanoGPT do.

Three things to get right:

1. **Update in place** (`p -= ...`, `m *= ...`). `self.arrays` holds *the very arrays* of the model or the adapters;
   rebinding `self.arrays[name] = p - ...` would update a copy the model never sees.
2. **Check `grads` first**: exactly the trained names, each gradient with its array's shape and dtype, else
   `ValueError`. A gradient of the wrong shape could otherwise broadcast and update silently.
   `self._check_grads(grads)`, inherited from lora_np's `Optimizer`, does this.
3. **Keep the dtype**: use Python floats for the scalars, so float32 arrays stay float32.

The cell below repeats Algorithm 1 by hand for three steps and compares; it also checks the in-place update.
"""
    ),
    code(
        r"""
        lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
        rng = np.random.default_rng(0)
        arrays = {"W": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}  # a matrix (decayed) and a vector (not)
        the_W = arrays["W"]  # the array object the optimizer must update in place
        opt = AdamW(arrays, lr=lr, weight_decay=wd)

        by_hand = {k: a.copy() for k, a in arrays.items()}
        m = {k: np.zeros_like(a) for k, a in arrays.items()}
        v = {k: np.zeros_like(a) for k, a in arrays.items()}
        for t in (1, 2, 3):
            g = {"W": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
            opt.step(g)
            for k in by_hand:  # Algorithm 1, one line at a time
                if by_hand[k].ndim >= 2:
                    by_hand[k] = by_hand[k] - lr * wd * by_hand[k]
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                by_hand[k] = by_hand[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            errs = {k: rel_error(arrays[k], by_hand[k]) for k in by_hand}
            print(f"step {t}: relative error against Algorithm 1: W {errs['W']:.1e}, b {errs['b']:.1e}")
            assert max(errs.values()) < 1e-12
        assert arrays["W"] is the_W, "AdamW must not replace the arrays it trains"
        assert rel_error(the_W, by_hand["W"]) < 1e-12, "AdamW must update the arrays in place"
        """
    ),
    md(
        r"""
At step 1, $m/(1-\beta_1) = g$ and $\sqrt{v/(1-\beta_2)} = |g|$, so each entry moves by
$\eta\,g/(|g|+\epsilon)$: about $\eta$ in the direction of $-g$, whatever the gradient's size, and **exactly 0 where
$g = 0$**, since $m = v = 0$ there and the $\epsilon$ keeps $0/0$ away. Checked below, together with float32:
"""
    ),
    code(
        r"""
        for dtype in (np.float64, np.float32):
            p0 = np.random.default_rng(1).normal(size=(4, 5)).astype(dtype)
            g = np.random.default_rng(2).normal(size=(4, 5)).astype(dtype)
            g[0] = 0  # the first row gets no gradient
            p = {"W": p0.copy()}
            AdamW(p, lr=0.01).step({"W": g})
            assert p["W"].dtype == dtype, f"a {np.dtype(dtype).name} array came back as {p['W'].dtype}"
            assert np.array_equal(p["W"][0], p0[0]), "a zero gradient must give an update of exactly 0"
            step = (p0 - p["W"])[1:].astype(np.float64)
            print(f"{np.dtype(dtype).name}: step-1 moves of the other rows: between {np.abs(step).min():.6f} "
                  f"and {np.abs(step).max():.6f} (lr = 0.01)")
            assert np.all(np.sign(step) == np.sign(g[1:])) and np.abs(step).max() <= 0.01 * (1 + 1e-5)
        """
    ),
    code('check("E6")'),
    md(
        r"""
## 3. One LoRA fine-tuning step

Now put the pieces together. In the cell below, with **your** `trainable_names` and `AdamW` and the given
`loss_and_grads`:

1. `names`: the names to train for LoRA with no bias;
2. `optimizer`: an `AdamW` with learning rate `LR` on the arrays to train, `{n: adapters[n] for n in names}` (the
   adapters' own arrays, not copies);
3. `loss, grads`: the loss and the gradients on the batch `(x, y)`, for `names` only;
4. one optimizer step.
"""
    ),
    code(
        r"""
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.vocab_size, size=(8, cfg.context_length + 1))
        x, y = tokens[:, :-1], tokens[:, 1:]  # (8, 16) each: predict the next token
        params_before = {n: a.copy() for n, a in params.items()}
        adapters_before = {n: a.copy() for n, a in adapters.items()}
        LR = 1e-2
        """
    ),
    code(
        r"""
        ### BEGIN SOLUTION
        names = trainable_names(params, adapters, lora)
        optimizer = AdamW({n: adapters[n] for n in names}, lr=LR)
        loss, grads = loss_and_grads(params, x, y, adapters, lora, names)
        optimizer.step(grads)
        ### END SOLUTION
        print(f"loss {loss:.4f}; {len(grads)} gradients: {sorted(grads)[:2]} ...")
        """
    ),
    md("What moved, and what did not, bit for bit:"),
    code(
        r"""
        A_names = [n for n in adapters if n.endswith(".A")]
        B_names = [n for n in adapters if n.endswith(".B")]
        base_loss = cross_entropy_forward(model_forward(params, x)[0], y)[0]
        print(f"loss with the fresh adapters {loss!r}, loss of the base model {base_loss!r}")
        assert loss == base_loss  # B = 0: the adapted model is the base model, so the loss is the same float

        assert set(grads) == set(adapters), "gradients for the adapters and nothing else: no W0 gradient is formed"
        assert all(np.array_equal(params[n], params_before[n]) for n in params), "a base weight changed"
        assert all(not grads[n].any() for n in A_names), "∂L/∂A is exactly 0 at B = 0"
        assert all(np.array_equal(adapters[n], adapters_before[n]) for n in A_names), "A moved at step 1"
        assert all(np.all(adapters[n] != 0) for n in B_names), "every entry of every B moved"
        moved = np.concatenate([np.abs(adapters[n]).ravel() for n in B_names])
        print(f"{len(params)} base arrays unchanged, {len(A_names)} A's unchanged, {len(B_names)} B's moved: "
              f"every entry by between {moved.min():.6f} and {moved.max():.6f} (lr = {LR})")
        """
    ),
    md("A second step, on another batch: now $B \\neq 0$, and $A$ gets a gradient and moves."),
    code(
        r"""
        tokens2 = rng.integers(0, cfg.vocab_size, size=(8, cfg.context_length + 1))
        loss2, grads2 = loss_and_grads(params, tokens2[:, :-1], tokens2[:, 1:], adapters, lora, names)
        optimizer.step(grads2)
        for n in A_names:
            moved_by = np.abs(adapters[n] - adapters_before[n]).max()
            print(f"step 2: ‖∂L/∂A‖ of {n} = {np.linalg.norm(grads2[n]):.3g}; A moved by up to {moved_by:.4f}")
            assert not np.array_equal(adapters[n], adapters_before[n])
        assert all(np.array_equal(params[n], params_before[n]) for n in params)  # still frozen
        """
    ),
    md(
        r"""
**Inline Question 1.** Adam divides by $\sqrt{\hat v} + \epsilon$, which could amplify a tiny gradient into a step of
size $\eta$. Why then did $A$ not move at all at step 1, not even by a rounding error? And what would change with
`weight_decay=0.1`? The cell below tries it.
"""
    ),
    code(
        r"""
        fresh = {n: a.copy() for n, a in adapters_before.items()}
        _, g_fresh = loss_and_grads(params, x, y, fresh, lora, names)
        AdamW({n: fresh[n] for n in names}, lr=LR, weight_decay=0.1).step(g_fresh)
        for n in A_names:
            factor = fresh[n] / adapters_before[n]
            print(f"weight_decay 0.1, step 1: {n} = A0 × [{factor.min():.6f}, {factor.max():.6f}]; "
                  f"1 - lr·wd = {1 - LR * 0.1}")
            assert not np.array_equal(fresh[n], adapters_before[n])
            assert np.allclose(fresh[n], adapters_before[n] * (1 - LR * 0.1), rtol=1e-12, atol=0)
        """
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
Because $\partial L/\partial A$ was exactly zero, not tiny: at step 0, $B = 0$, so
$\partial L/\partial A = s\,B^\top g\,x^\top = 0$ entry by entry (asserted above; notebook 1, Inline Question 1). Then
$m = (1-\beta_1)\cdot 0 = 0$ and $v = 0$ exactly, and the step is $\eta\cdot 0/(\sqrt{0} + \epsilon) = 0$: a zero
numerator, not a small one, so there is nothing for the division to amplify; $\epsilon > 0$ keeps it from being
$0/0$. Subtracting an exact 0 leaves $A$ bit for bit. $B$'s gradient $s\,g\,(Ax)^\top$ was nonzero in every entry, so
every entry of $B$ moved by about $\eta$. At step 2, $B \ne 0$, $A$ has a gradient, and $A$ moves.

With `weight_decay=0.1`, AdamW first shrinks every matrix by $1 - \eta\lambda$, whatever its gradient [AdamW], so $A$
changes at step 1 by that factor alone (checked above): $A_1 = (1 - \eta\lambda)A_0$. $\Delta W$ is still
$s\,B_1A_1$, so the model after step 1 differs only through $B_1$ and that small rescaling of $A$.
### END SOLUTION
"""
    ),
    md(
        r"""
## 4. What $\alpha/r$ buys (Section 4.1)

The paper scales the update by $\alpha/r$, "where $\alpha$ is a constant in $r$. When optimizing with Adam, tuning
$\alpha$ is roughly the same as tuning the learning rate if we scale the initialization appropriately. As a result, we
simply set $\alpha$ to the first $r$ we try and do not tune it. This scaling helps to reduce the need to retune
hyperparameters when we vary $r$" [LoRA, 4.1].

Two measurements with your `AdamW`, of $\Delta W_1 = s\,B_1A_0$ after one step from fresh adapters:

1. $r = 4$ fixed: $(\alpha, \eta)$, $(2\alpha, \eta)$ and $(\alpha, 2\eta)$;
2. the rank varied with $\alpha = 4$ fixed ($s = \alpha/r$), and, for contrast, with $s = 4$ fixed (no division by $r$).
"""
    ),
    code(
        r"""
        def first_update(r, alpha, lr):
            # ΔW after one AdamW step from fresh adapters, for every adapted weight
            lo = LoraConfig(r=r, alpha=alpha, targets=("W_q", "W_v"))
            ad = init_lora(cfg, lo, seed=1)
            names = trainable_names(params, ad, lo)
            AdamW({n: ad[n] for n in names}, lr=lr).step(loss_and_grads(params, x, y, ad, lo, names)[1])
            return {w: lo.scaling * ad[w + ".B"] @ ad[w + ".A"] for w in (n[:-2] for n in ad if n.endswith(".A"))}


        def norm(dw):
            return np.sqrt(sum(np.sum(d**2) for d in dw.values()))


        def rel_diff(dw1, dw2):
            return np.sqrt(sum(np.sum((dw1[w] - dw2[w]) ** 2) for w in dw1)) / norm(dw1)


        ref, two_alpha, two_lr = first_update(4, 4.0, LR), first_update(4, 8.0, LR), first_update(4, 4.0, 2 * LR)
        print(f"‖ΔW1‖: (α=4, η={LR}) {norm(ref):.5f};  (α=8, η={LR}) {norm(two_alpha):.5f};  "
              f"(α=4, η={2 * LR}) {norm(two_lr):.5f}")
        print(f"(2α, η) against (α, 2η): relative difference of ΔW1 {rel_diff(two_alpha, two_lr):.1e}")
        assert rel_diff(two_alpha, two_lr) < 1e-2 and abs(norm(two_alpha) / norm(ref) - 2) < 1e-2

        # Why not closer: Adam's step is η·g/(|g| + ε), and this untrained model has some tiny gradients
        g0 = np.concatenate([grads[n].ravel() for n in B_names])  # ∂L/∂B at step 0, α = 4 (Section 3)
        print(f"|∂L/∂B| at step 0: median {np.median(np.abs(g0)):.1e}, smallest {np.abs(g0).min():.1e}; "
              f"Adam's ε = 1e-8; share of entries below 100·ε: {np.mean(np.abs(g0) < 1e-6):.0%}")
        """
    ),
    code(
        r"""
        RANKS = (1, 2, 4, 8, 16)
        alpha_over_r = [norm(first_update(r, 4.0, LR)) for r in RANKS]  # s = 4 / r
        s_fixed = [norm(first_update(r, 4.0 * r, LR)) for r in RANKS]  # α = 4r, so s = 4 at every r
        print(f"{'r':>18s}" + "".join(f"{r:>9d}" for r in RANKS))
        print(f"{'‖ΔW1‖, s = 4/r':>18s}" + "".join(f"{n:9.5f}" for n in alpha_over_r))
        print(f"{'‖ΔW1‖, s = 4':>18s}" + "".join(f"{n:9.5f}" for n in s_fixed))
        print(f"r = 16 against r = 1: {alpha_over_r[-1] / alpha_over_r[0]:.2f} with s = α/r, "
              f"{s_fixed[-1] / s_fixed[0]:.2f} with s fixed")
        assert np.all(np.diff(alpha_over_r) < 0) and alpha_over_r[-1] / alpha_over_r[0] < 0.5  # shrinks as r grows
        assert np.all(np.diff(s_fixed) > 0) and s_fixed[-1] / s_fixed[0] > 2  # without the 1/r it would grow with r
        assert s_fixed[-1] / s_fixed[0] > alpha_over_r[0] / alpha_over_r[-1]  # ... by more than it shrinks with 1/r
        """
    ),
    md(
        r"""
**Inline Question 2.** What does the scaling $\alpha/r$ buy, and what does it not? Use the paper's words and the two
measurements above.
"""
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
What it buys, in the paper's words: with Adam, "tuning $\alpha$ is roughly the same as tuning the learning rate", so
the authors fix $\alpha$ to the first $r$ they try and do not tune it, and the scaling "helps to reduce the need to
retune hyperparameters when we vary $r$" [LoRA, 4.1].

The first measurement shows the mechanism at step 1: Adam's step on $B$ is about $\eta$ per entry whatever the
gradient's scale, so $\Delta W_1 = s\,B_1A_0$ is proportional to $s\,\eta$; doubling $\alpha$ and doubling $\eta$ give
the same $\Delta W_1$, up to Adam's $\epsilon$: the step is $\eta\,g/(|g| + \epsilon)$, and doubling $\alpha$ doubles
$g$, which changes that factor where $|g|$ is not much larger than $\epsilon$ (the printed relative difference; this
untrained model has such small gradients, printed too). Over many steps the two are only
"roughly" the same: an exact equivalence needs $A$'s initialization rescaled as well, which is the paper's "if we
scale the initialization appropriately" (notebook `02_zero_init`, 7d, shows both).

What it does not buy: it does not make the other hyperparameters independent of $r$. The paper claims only that it
*helps to reduce* the need to retune. In the second measurement, with $\alpha$ fixed, the first update still changes
with $r$: it shrinks as $r$ grows. Without the division (the $s$-fixed row) it would grow with $r$, and by more (compare
the two printed ratios), so $1/r$ reduces the dependence but over-corrects here: each entry of $B_1A_0$ is a sum of
$r$ terms of size about $\eta\,|A_0|$, and such a sum grows more slowly than $r$ (like $\sqrt r$ if the signs were
unrelated). After changing $r$ with $\alpha$ fixed, the learning rate may still need retuning. rsLoRA proposes
$\alpha/\sqrt r$ for this reason [rsLoRA].
### END SOLUTION
"""
    ),
    md(
        r"""
## Summary

- `trainable_names`: the adapters (plus chosen biases) for LoRA, everything for full fine-tuning.
- `AdamW.step`: Algorithm 1 with decoupled decay, in place, dtype kept.
- One LoRA step: base weights bit for bit unchanged and no $W_0$ gradient formed; $B$ moves, $A$ does not (its
  gradient is exactly 0 at $B = 0$, and so is Adam's update), unless weight decay shrinks it.
- $\alpha/r$: tuning $\alpha$ is roughly tuning the learning rate; the $1/r$ reduces, but does not remove, the
  dependence of the update's size on $r$.

Next, the challenge: notebook 5, the backward passes of the rest of the transformer (E7).
"""
    ),
]
