"""Notebook 2 of the course: creating adapters (E3), merging and unmerging them (E4)."""

from .nb_common import HOW_TO_WORK, code, md, setup_code

CELLS = [
    md(
        r"""
# 2 · Adapters: creating them, merging them (E3: 10 points, E4: 10 points)

Notebook 1 built one LoRA layer. A model carries one adapter, a pair $(A, B)$, for every weight it adapts in every
block. In **`lora_adapters.py`** you write:

- **E3** `init_lora(cfg, lora, seed)`: fresh adapters for a model, $A$ random and $B = 0$;
- **E4** `merge(params, adapters, lora)` and `unmerge(merged, adapters, lora)`: fold $s\,BA$ into $W_0$ for
  inference, and take it out again.

The model itself is given: `lora_np.model_forward(params, tokens, adapters, lora)` runs the tiny GPT with adapters
on the weights named in `lora.targets`, and `lora_np.train.loss_and_grads` adds the loss and the backward pass. Your
functions produce and transform the dicts of arrays that these functions take.

**Sources**, cited as [key, where]:

- **[LoRA]** E. J. Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685 (2021):
  Section 4.1 (initialization; "No Additional Inference Latency"), Section 4.2 ("Practical Benefits and Limitations").
- **[loralib]** github.com/microsoft/LoRA, `loralib/layers.py`: $A$ from `kaiming_uniform_(a=sqrt(5))`, $B$ zeros.
"""
    ),
    md(HOW_TO_WORK),
    setup_code(
        """
        from lora_np import LoraConfig, ModelConfig, Params, cast, init_params, model_forward
        from lora_np.counting import count_arrays
        from lora_np.lora import adapter_names
        from lora_np.optim import AdamW
        from lora_np.train import loss_and_grads
        from lora_adapters import init_lora, merge, unmerge
        """
    ),
    md(
        r"""
## 1. Creating adapters (E3)

For every block $l$ and every target $t$ in `lora.targets`, with the target's weight of shape
`(d_out, d_in) = cfg.linear_shape(t)`, an adapter is two arrays:

| name | shape | initial value |
|---|---|---|
| `blocks.{l}.{t}.A` | `(r, d_in)` | random |
| `blocks.{l}.{t}.B` | `(d_out, r)` | zero |

"We use a random Gaussian initialization for $A$ and zero for $B$, so $\Delta W = BA$ is zero at the beginning of
training" [LoRA, 4.1]. The paper gives no variance. `LoraConfig.init` chooses:

- `"gaussian"`: $A \sim \mathcal{N}(0, 1/d_{in})$, so each entry of $Ax$ has about the scale of one entry of $x$;
- `"kaiming"`: $A \sim U(-1/\sqrt{d_{in}}, 1/\sqrt{d_{in}})$, what loralib gets from PyTorch's
  `kaiming_uniform_(a=sqrt(5))` [loralib].

Draw every $A$ from one generator, `np.random.default_rng(seed)`, one after the other: the same seed must give the
same adapters, and a generator made afresh for each $A$ would give identical matrices. `B` is `np.zeros((d_out, r))`.
Arrays are float64, in a plain dict. The file imports `adapter_names(cfg, lora)`, which gives every name and shape in
the order lora_np uses (blocks, then `lora.targets`, `A` before `B`). Drawing in that order with
`rng.normal(0.0, 1 / np.sqrt(d_in), size=(r, d_in))`, or `rng.uniform(-bound, bound, size=(r, d_in))`, gives the very
arrays lora_np's `init_lora` gives for the same seed; that is not required.

Refuse what cannot be right, with an error that names the argument: a `cfg` that is not a `ModelConfig` or a `lora`
that is not a `LoraConfig` (`TypeError`), a seed that is not an int >= 0, and a rank $r > \min(d_{out}, d_{in})$ for
any target (`ValueError`: beyond that rank $BA$ cannot gain rank).
"""
    ),
    code(
        r"""
        cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
        lora = LoraConfig(r=4, alpha=8.0, targets=("W_q", "W_v", "W_1"))  # W_1 is (M, D) = (128, 32): not square
        adapters = init_lora(cfg, lora, seed=0)
        for name, a in list(adapters.items())[:6]:
            print(f"{name:16s} {str(a.shape):10s} {a.dtype}   mean |entry| {np.abs(a).mean():.3f}")
        print(f"... {len(adapters)} arrays in all")

        expected = {}
        for l in range(cfg.n_layers):
            for t in lora.targets:
                d_out, d_in = cfg.linear_shape(t)
                expected[f"blocks.{l}.{t}.A"] = (lora.r, d_in)
                expected[f"blocks.{l}.{t}.B"] = (d_out, lora.r)
        missing, extra = sorted(set(expected) - set(adapters)), sorted(set(adapters) - set(expected))
        assert not missing and not extra, f"missing {missing[:3]}, unexpected {extra[:3]}"
        assert all(adapters[n].shape == shape and adapters[n].dtype == np.float64 for n, shape in expected.items())
        assert all(not adapters[n].any() for n in expected if n.endswith(".B")), "every B must be zero"
        assert all(np.abs(adapters[n]).min() > 0 for n in expected if n.endswith(".A")), "A must be random"

        again, other = init_lora(cfg, lora, seed=0), init_lora(cfg, lora, seed=1)
        assert all(np.array_equal(adapters[n], again[n]) for n in adapters), "the same seed must give the same arrays"
        assert not np.array_equal(adapters["blocks.0.W_q.A"], other["blocks.0.W_q.A"]), "the seed must choose the draw"
        assert not np.array_equal(adapters["blocks.0.W_q.A"], adapters["blocks.1.W_q.A"]), "every A its own draw"
        """
    ),
    md(
        r"""
The distribution of $A$, measured on a wider model so that the standard deviation is pinned down (each $A$ of
$W_q$ below has $16 \times 256$ entries): $1/\sqrt{d_{in}}$ for the Gaussian, and $1/\sqrt{3 d_{in}}$ for the uniform
(a uniform variable on $[-c, c]$ has variance $c^2/3$).
"""
    ),
    code(
        r"""
        wide = ModelConfig(vocab_size=32, context_length=16, d_model=256, n_heads=4, n_layers=2, d_mlp=1024)
        for init, std_formula in (("gaussian", 1 / np.sqrt(256)), ("kaiming", 1 / np.sqrt(3 * 256))):
            ad = init_lora(wide, LoraConfig(r=16, targets=("W_q",), init=init), seed=0)
            As = np.concatenate([a.ravel() for n, a in ad.items() if n.endswith(".A")])
            print(f"{init:8s}: {As.size} entries of A, std {As.std():.5f}, formula {std_formula:.5f}, "
                  f"max |A| {np.abs(As).max():.4f}")
            assert abs(As.std() / std_formula - 1) < 0.05
        assert np.abs(As).max() <= 1 / np.sqrt(256)  # the uniform draw stays within its bound

        try:
            init_lora(cfg, LoraConfig(r=33, targets=("W_q",)), seed=0)  # W_q is 32 x 32: r = 33 is too large
        except ValueError as e:
            print("r = 33 on a 32 x 32 weight: ValueError:", e)
        else:
            raise AssertionError("init_lora must refuse r > min(d_out, d_in)")
        """
    ),
    md(
        r"""
**$B = 0$ is the pretrained model, exactly.** `model_forward` with your adapters must give the same logits as the
model without them, to the last bit: the LoRA branch adds exact zeros.
"""
    ),
    code(
        r"""
        params = init_params(cfg, seed=0)  # float64; stands in for a pretrained model
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 16))  # (B, T)
        base_logits, _ = model_forward(params, tokens)
        lora_logits, _ = model_forward(params, tokens, adapters, lora)
        assert np.array_equal(lora_logits, base_logits)
        print("fresh adapters: logits == the base model's, bit for bit:", np.array_equal(lora_logits, base_logits))
        """
    ),
    code('check("E3")'),
    md(
        r"""
**Inline Question 1.** The paper starts $B$ at zero and $A$ at random. Why not start *both* at zero, which would also
give $\Delta W = 0$? And would $A = 0$ with $B$ random work? Use the cell below, which computes the gradients at step 0
for the three choices and then takes three Adam steps from $A = B = 0$.
"""
    ),
    code(
        r"""
        x, y = tokens[:, :-1], tokens[:, 1:]
        zero_B = init_lora(cfg, lora, seed=0)  # the paper's choice
        both_zero = {n: np.zeros_like(a) for n, a in zero_B.items()}
        rng = np.random.default_rng(1)
        zero_A = {n: np.zeros_like(a) if n.endswith(".A") else rng.normal(0.0, 0.5, a.shape) for n, a in zero_B.items()}

        norms = {}
        print(f"{'init':22s}{'base model?':>12s}{'‖∂L/∂A‖':>12s}{'‖∂L/∂B‖':>12s}")
        for label, ad in (("A random, B = 0", zero_B), ("A = 0, B = 0", both_zero), ("A = 0, B random", zero_A)):
            same = np.array_equal(model_forward(params, tokens, ad, lora)[0], base_logits)
            _, grads = loss_and_grads(params, x, y, ad, lora)
            gA = np.sqrt(sum(np.sum(g**2) for n, g in grads.items() if n.endswith(".A")))
            gB = np.sqrt(sum(np.sum(g**2) for n, g in grads.items() if n.endswith(".B")))
            print(f"{label:22s}{str(same):>12s}{gA:12.3g}{gB:12.3g}")
            norms[label] = (gA, gB)
            assert same
        assert norms["A random, B = 0"][0] == 0 < norms["A random, B = 0"][1]  # only B has a gradient
        assert norms["A = 0, B = 0"] == (0, 0)  # neither has
        assert norms["A = 0, B random"][1] == 0 < norms["A = 0, B random"][0]  # only A has

        opt = AdamW(both_zero, lr=1e-2)  # lora_np's AdamW; you write your own in notebook 4
        for step in range(3):
            _, grads = loss_and_grads(params, x, y, both_zero, lora)
            opt.step(grads)
        still_zero = all(not a.any() for a in both_zero.values())
        print("A = B = 0 after three Adam steps: every entry still exactly 0:", still_zero)
        assert still_zero
        """
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
$B = 0$ makes $\Delta W = s\,BA = 0$, so the adapted model starts as exactly the pretrained model [LoRA, 4.1] (the
logits above are equal bit for bit) and fine-tuning starts from what pretraining learned.

Both zero gives the same start but never leaves it. The gradients are $\partial L/\partial A = s\,B^\top g\,x^\top$ and
$\partial L/\partial B = s\,g\,(Ax)^\top$: with $A = B = 0$ both vanish, so $(0, 0)$ is a stationary point, and SGD,
momentum and Adam all take a zero step from a zero gradient. The table shows both gradient norms at 0, and after three
Adam steps every entry is still exactly 0. Each factor's gradient goes through the other factor, so one of them must
start nonzero.

$A = 0$ with $B$ random also starts at exactly the pretrained model ($Ax = 0$), and it trains: it is the mirror image,
with $\partial L/\partial B = 0$ and $\partial L/\partial A \ne 0$ at step 0, so $A$ moves first. The zero start needs
one zero factor, and either will do; the paper's convention, followed by loralib, is $A$ random and $B = 0$.
### END SOLUTION
"""
    ),
    md(
        r"""
## 2. Merging and unmerging (E4)

"When deployed in production, we can explicitly compute and store $W = W_0 + BA$ and perform inference as usual"
[LoRA, 4.1]. With the scaling:

$$W' = W_0 + s\,BA \qquad \text{for every target of every block,}$$

and `unmerge` computes $W_0 = W' - s\,BA$. To switch tasks, the paper subtracts $BA$ and adds a different $B'A'$
[LoRA, 4.1].

- Return a **new** `Params` (`params.copy()` keeps the model's config) and never write into the inputs: the caller's
  $W_0$ must survive a merge. Arrays that are not adapted may be shared with the input.
- $BA$ is a full `(d_out, d_in)` matrix here, and that is fine: it is formed once, after training, per adapted weight.
- Check the adapters against the params first (`lora_np.lora.check_adapters(params, adapters, lora)` does that),
  so a wrong rank or a missing array fails with a clear message, not a broadcasting error.

Write `merge` and `unmerge`. The cell below makes adapters as they might look after training, with $A$ and $B$ both
nonzero (merging a zero $B$ would prove nothing); it does not use your `init_lora`, so you can do E4 first.
"""
    ),
    code(
        r"""
        rng = np.random.default_rng(2)
        trained = {n: rng.normal(0.0, 0.1, shape) for n, shape in adapter_names(cfg, lora).items()}  # A, B both nonzero
        params_before = {n: a.copy() for n, a in params.items()}
        trained_before = {n: a.copy() for n, a in trained.items()}

        merged = merge(params, trained, lora)
        assert isinstance(merged, Params) and merged.config == cfg and set(merged) == set(params)
        assert all(np.array_equal(params[n], params_before[n]) for n in params), "merge modified params"
        assert all(np.array_equal(trained[n], trained_before[n]) for n in trained), "merge modified the adapters"

        adapted = [f"blocks.{l}.{t}" for l in range(cfg.n_layers) for t in lora.targets]
        s = lora.alpha / lora.r
        for name in params:
            if name in adapted:  # W' - W0 = s·B·A, computed here on its own
                delta = s * trained[name + ".B"] @ trained[name + ".A"]
                assert np.allclose(merged[name] - params[name], delta, rtol=0, atol=1e-12), name
            else:
                assert np.array_equal(merged[name], params[name]), f"{name} is not adapted and must not change"

        # the merged model computes what the model with its adapters computes (float64: to round-off)
        unmerged_logits, _ = model_forward(params, tokens, trained, lora)
        merged_logits, _ = model_forward(merged, tokens)
        rel = np.abs(merged_logits - unmerged_logits).max() / np.abs(unmerged_logits).max()
        print(f"merged vs unmerged logits, float64: max relative difference {rel:.1e}")
        assert rel < 1e-12 and not np.allclose(merged_logits, base_logits)  # ... and the adapters do change the model
        """
    ),
    md(
        r"""
**Unmerging** gives $W_0$ back up to round-off: $W' = \mathrm{fl}(W_0 + \Delta)$ and $\mathrm{fl}(W' - \Delta)$ round
twice, each time by at most half a unit in the last place, so every entry comes back within a few
$\varepsilon\,(\max|W_0| + \max|\Delta|)$, where $\varepsilon$ is the dtype's machine epsilon (`np.finfo(dtype).eps`).
Checked in float64 and float32:
"""
    ),
    code(
        r"""
        for dtype in (np.float64, np.float32):
            p, a = cast(params, dtype), cast(trained, dtype)
            back = unmerge(merge(p, a, lora), a, lora)
            assert isinstance(back, Params) and all(back[n].dtype == dtype for n in back)
            eps = np.finfo(dtype).eps
            worst = 0.0
            for name in adapted:
                delta = s * a[name + ".B"].astype(np.float64) @ a[name + ".A"].astype(np.float64)
                bound = 4 * eps * (np.abs(p[name]).max() + np.abs(delta).max())
                err = np.abs(back[name].astype(np.float64) - p[name]).max()
                worst = max(worst, err / bound)
                assert err <= bound, f"{name}: unmerge(merge(W0)) is off by {err:.2e}, more than {bound:.2e}"
            assert all(np.array_equal(back[n], p[n]) for n in p if n not in adapted)
            print(f"{np.dtype(dtype).name}: unmerge(merge(W0)) within {worst:.2f} of the bound "
                  f"4·eps·(max|W0| + max|ΔW|)")
        """
    ),
    code('check("E4")'),
    md(
        r"""
**Inline Question 2.** What does a merged model cost at inference, compared with the base model and with the
unmerged adapter? And what does merging give up? Cite Section 4.1 and 4.2. The two cells below count the arrays and
the extra multiply-adds, and serve a batch that mixes two tasks.
"""
    ),
    code(
        r"""
        same_shapes = all(merged[n].shape == params[n].shape and merged[n].dtype == params[n].dtype for n in params)
        print(f"base: {count_arrays(params):,} numbers in {len(params)} arrays; merged: {count_arrays(merged):,} in "
              f"{len(merged)} arrays; same names, shapes, dtypes: {same_shapes}")
        assert same_shapes and set(merged) == set(params) and count_arrays(merged) == count_arrays(params)

        # Unmerged, each adapted weight adds two thin products per token: x·Aᵀ (r·d_in) and (·)·Bᵀ (d_out·r)
        D, M, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
        base_madds = cfg.n_layers * (4 * D * D + 2 * D * M) + V * D  # every linear weight entry once per token
        shapes = [cfg.linear_shape(t) for t in lora.targets]  # (d_out, d_in) of each adapted weight
        extra_madds = cfg.n_layers * sum(lora.r * (d_in + d_out) for d_out, d_in in shapes)
        print(f"multiply-adds per token in the linear layers: {base_madds:,}; the unmerged adapters add "
              f"{extra_madds:,} ({extra_madds / base_madds:.1%}) in {2 * len(adapted)} extra products; merged: 0 extra")
        assert extra_madds == count_arrays(trained)  # one multiply-add per adapter number
        """
    ),
    code(
        r"""
        # One layer, a batch of four tokens: rows 0-1 belong to task 1, rows 2-3 to task 2, each with its own adapter.
        rng = np.random.default_rng(3)
        W0, X = rng.normal(size=(6, 5)), rng.normal(size=(4, 5))  # (d_out, d_in), (N, d_in)
        (A1, B1), (A2, B2) = [(rng.normal(size=(2, 5)), rng.normal(size=(6, 2))) for _ in range(2)]
        s = lora.scaling
        W_task1, W_task2 = W0 + s * B1 @ A1, W0 + s * B2 @ A2  # two merged weights
        want = np.concatenate([X[:2] @ W_task1.T, X[2:] @ W_task2.T])  # what each task's model outputs

        one_merged = X @ W_task1.T  # a single merged weight serves one task only
        unmerged = X @ W0.T  # the shared frozen product, for the whole batch ...
        unmerged[:2] += s * (X[:2] @ A1.T) @ B1.T  # ... plus each row's own adapter
        unmerged[2:] += s * (X[2:] @ A2.T) @ B2.T
        print(f"task-1 merged weight on the mixed batch: task-2 rows off by {np.abs(one_merged - want)[2:].max():.2f}")
        print(f"shared W0 plus per-row adapters: off by {np.abs(unmerged - want).max():.1e}")
        assert np.abs(one_merged - want)[2:].max() > 0.1 and np.allclose(unmerged, want, rtol=0, atol=1e-12)
        """
    ),
    md(
        r"""
**Your answer:**

### BEGIN SOLUTION
A merged model costs exactly what the base model costs. $W' = W_0 + s\,BA$ has $W_0$'s shape, so the merged model
has the same names, shapes, dtypes and number of parameters as the base model (asserted above), and its forward pass is
the base model's forward pass with different numbers: "we do not introduce any additional latency during inference
compared to a fine-tuned model by construction" [LoRA, 4.1]. Merging itself costs one $(d_{out}\times r)(r\times
d_{in})$ product per adapted weight, once. Left unmerged, every adapted weight adds two thin products per token,
$xA^\top$ and then its product with $B^\top$ (the second needs the first), one multiply-add per adapter number
(printed above for our model), in addition to the frozen product.

What merging gives up is serving several tasks in one batch. A merged weight belongs to one task: "it is not
straightforward to batch inputs to different tasks with different $A$ and $B$ in a single forward pass, if one
chooses to absorb $A$ and $B$ into $W$" [LoRA, 4.2]. Above, the task-1 weight gets the task-2 rows wrong. The paper's
alternative is not to merge and to choose each sample's adapter dynamically, "for scenarios where latency is not
critical" [LoRA, 4.2]: one shared $XW_0^\top$ for the whole batch plus each row's own small product, which matched
both tasks above. To switch a merged deployment to another task, subtract $s\,BA$ and add $s'B'A'$ [LoRA, 4.1];
keeping the original $W_0$ and merging each new adapter into it avoids accumulating round-off (notebook
`04_finetune_and_merge`).
### END SOLUTION
"""
    ),
    md(
        r"""
## Summary

- `init_lora`: $A$ random, $B = 0$, so a fresh adapter is the pretrained model exactly; $A = B = 0$ would never train.
- `merge`: $W' = W_0 + s\,BA$, a new `Params` with the base model's shapes, so inference costs what the base model
  costs; `unmerge` returns $W_0$ up to round-off.
- The price of merging: one task per merged weight.

Next: notebook 3 counts what LoRA trains (E5).
"""
    ),
]
