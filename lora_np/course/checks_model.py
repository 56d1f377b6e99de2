"""The checks of E3, E4 (adapters on the tiny GPT), E5 (counting) and E6 (one fine-tuning step)."""

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from ..core import lora as ref
from ..core.config import LORA_TARGETS, LoraConfig, ModelConfig
from ..core.model import model_backward, model_forward
from ..core.params import Params, init_params
from ..training import counting, optim, train
from ..training.counting import block_shapes, count_arrays
from .checking import check, close, drawn
from .student import Failure

# ----------------------------------------------------------------------------
# E3, E4: adapters on the tiny GPT


def tiny(n_layers=2, d_model=8, d_mlp=12, n_heads=2):
    return ModelConfig(vocab_size=11, context_length=8, d_model=d_model, n_heads=n_heads,
                       n_layers=n_layers, d_mlp=d_mlp)  # fmt: skip


LORAS = (
    LoraConfig(r=2, alpha=4.0, targets=("W_q", "W_v")),
    LoraConfig(r=1, alpha=2.0, targets=("W_1", "W_2", "W_o")),  # non-square weights, r = 1
    LoraConfig(r=4, alpha=8.0, targets=LORA_TARGETS, rslora=True, init="kaiming"),  # s = α/√r
)


def _adapters(student, cfg, lora, seed):
    adapters = student.fn("init_lora")(cfg, lora, seed)
    if not isinstance(adapters, dict):
        raise Failure(f"init_lora must return a dict name -> array, got {type(adapters).__name__}")
    return adapters


@check("E3", 2, "adapter names, shapes and dtype (float64), for every block and target; r too large refused")
def e3_names(student):
    too_wide = LoraConfig(r=9, alpha=9.0, targets=("W_q",))  # W_q is 8 × 8 in tiny()
    got = student.raised("init_lora", tiny(), too_wide, 0)
    if got != "ValueError":
        raise Failure(f"init_lora with r = 9 on an 8 × 8 target must raise ValueError (check_rank does it), "
                      f"{'raised ' + got if got else 'returned'}")  # fmt: skip
    for lora in LORAS:
        cfg = tiny()
        got, want = _adapters(student, cfg, lora, 0), ref.adapter_names(cfg, lora)
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise Failure(f"for targets {lora.targets}, n_layers {cfg.n_layers}: missing {missing[:3]}, "
                          f"unexpected {extra[:3]} (names look like 'blocks.0.W_q.A')")  # fmt: skip
        for name, shape in want.items():
            a = got[name]
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != np.float64:
                have = (a.shape, str(a.dtype)) if isinstance(a, np.ndarray) else type(a).__name__
                raise Failure(f"{name} must be a float64 array of shape {shape} at r = {lora.r}, got {have}")


@check("E3", 2, "B is exactly zero and A is random (paper Section 4.1)")
def e3_zero_B(student):
    for lora in LORAS:
        adapters = _adapters(student, tiny(), lora, 0)
        for name, a in sorted(adapters.items(), key=lambda kv: not kv[0].endswith(".B")):  # B first
            if name.endswith(".B") and np.any(a != 0):
                raise Failure(f"{name} must start at exactly 0 so that ΔW = B·A = 0 and training starts from the "
                              f"pretrained model; it has {np.count_nonzero(a)} non-zero entries")  # fmt: skip
            if name.endswith(".A") and (a.size > 1 and np.std(a) == 0 or not np.any(a)):
                raise Failure(f"{name} must be random, not constant: with both factors fixed, B·A has no direction "
                              f"to grow in")  # fmt: skip


@check("E3", 2, "A's scale: N(0, 1/d_in) for init='gaussian', U(±1/√d_in) for 'kaiming'")
def e3_scale(student):
    cfg = tiny(d_model=64, d_mlp=96)
    for init in ("gaussian", "kaiming"):
        lora = LoraConfig(r=8, targets=LORA_TARGETS, init=init)
        adapters = _adapters(student, cfg, lora, 0)
        # A·sqrt(d_in) pooled over every adapter: N(0, 1), or U(-1, 1) with std 1/√3
        z = np.concatenate([adapters[n].ravel() * np.sqrt(s[1]) for n, s in ref.adapter_names(cfg, lora).items()
                            if n.endswith(".A")])  # fmt: skip
        std, top, mean = float(np.std(z)), float(np.abs(z).max()), float(np.mean(z))  # in units of 1/√d_in
        want = 1.0 if init == "gaussian" else 3**-0.5
        asked = "N(0, 1/d_in)" if init == "gaussian" else "U(-1/√d_in, 1/√d_in)"
        if not abs(std / want - 1) < 0.05:
            raise Failure(f"init={init!r}: A's entries have standard deviation {std:.3g}/√d_in, where {asked} has "
                          f"{want:.3g}/√d_in")  # fmt: skip
        if not abs(mean) < 0.05 * want:
            raise Failure(f"init={init!r}: A's entries have mean {mean:.3g}/√d_in, where {asked} has mean 0")
        if init == "kaiming" and not 0.95 < top <= 1.0:
            raise Failure(f"init='kaiming': A's largest |entry| is {top:.3g}/√d_in; U(-1/√d_in, 1/√d_in) reaches "
                          f"nearly 1/√d_in and never beyond")  # fmt: skip


@check("E3", 2, "the same seed gives the same adapters, another seed others, every A its own draw")
def e3_seeds(student):
    cfg, lora = tiny(), LORAS[0]
    a, b, c = (_adapters(student, cfg, lora, s) for s in (3, 3, 4))
    for name in a:
        if not np.array_equal(a[name], b.get(name)):
            raise Failure(f"init_lora(cfg, lora, seed=3) twice gave two different {name}: draw from a generator "
                          f"seeded with `seed` (np.random.default_rng(seed))")  # fmt: skip
    As = [n for n in a if n.endswith(".A")]
    if all(np.array_equal(a[n], c[n]) for n in As):
        raise Failure("seeds 3 and 4 gave the same A matrices: the seed must choose the draw")
    first = a[As[0]]
    twins = [n for n in As[1:] if a[n].shape == first.shape and np.array_equal(a[n], first)]
    if twins:
        raise Failure(f"{As[0]} and {twins[0]} are identical: draw every A from one generator, one after the "
                      f"other, not from a generator made afresh for each")  # fmt: skip


@check("E3", 2, "zero init: the adapted model is the base bit for bit; ∂L/∂A = 0 exactly, ∂L/∂B ≠ 0")
def e3_zero_init(student):
    cfg = tiny()
    params = init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 6))
    base, _ = model_forward(params, tokens)
    for lora in LORAS:
        adapters = _adapters(student, cfg, lora, 1)
        try:
            logits, cache = model_forward(params, tokens, adapters, lora)
        except (TypeError, ValueError) as e:
            raise Failure(f"the model refused your adapters: {e}") from None
        if not np.array_equal(logits, base):
            raise Failure(f"with your adapters the logits differ from the base model's (max |Δ| "
                          f"{np.abs(logits - base).max():.2e}); B = 0 must make ΔW exactly 0")  # fmt: skip
        dlogits = np.random.default_rng(1).normal(size=logits.shape)
        grads = model_backward(dlogits, cache)
        for name, g in grads.items():
            if name.endswith(".A") and np.any(g != 0):
                raise Failure(f"∂L/∂{name} must be exactly 0 at B = 0 (it carries a factor Bᵀ), got max "
                              f"|{np.abs(g).max():.2e}|")  # fmt: skip
        if not any(np.any(g != 0) for n, g in grads.items() if n.endswith(".B")):
            raise Failure("∂L/∂B is zero for every adapter: A must be random so that A·x ≠ 0")


def _trained(cfg, lora, seed):
    """Adapters as after training: A and B both non-zero."""
    adapters = ref.init_lora(cfg, lora, seed)
    rng = np.random.default_rng(seed)
    return {k: v + 0.3 * rng.normal(size=v.shape) for k, v in adapters.items()}


@check("E4", 3, "merge: W' = W0 + s·B·A on every target (s = lora.scaling, rsLoRA too), the rest untouched")
def e4_merge(student):
    cfg = tiny()
    for lora in LORAS:
        params, adapters = init_params(cfg, seed=0), _trained(cfg, lora, 1)
        merged = student.fn("merge")(params, adapters, lora)
        if not isinstance(merged, Params) or merged.config != cfg:
            raise Failure(f"merge must return a Params carrying the model's config (params.copy() keeps it), got "
                          f"{type(merged).__name__}")  # fmt: skip
        want = ref.merge(params, adapters, lora)
        for name in want:
            if name not in merged:
                raise Failure(f"merge's result has no {name}")
            if name.rsplit(".", 1)[-1] in lora.targets:
                close(name, merged[name], want[name], 1e-12, f" (W' = W0 + s·B·A, s = {lora.scaling:.4g}, "
                      f"r = {lora.r}, rslora={lora.rslora})")  # fmt: skip
            elif not np.array_equal(merged[name], params[name]):
                raise Failure(f"merge changed {name}, which carries no adapter for targets {lora.targets}")


@check("E4", 2, "the merged model's logits equal the unmerged adapted model's (float64)")
def e4_logits(student):
    cfg = tiny()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 6))
    for lora in LORAS:
        params, adapters = init_params(cfg, seed=0), _trained(cfg, lora, 1)
        merged = student.fn("merge")(params, adapters, lora)
        try:
            got, _ = model_forward(merged, tokens)
        except (TypeError, ValueError) as e:
            raise Failure(f"the model cannot run merge's result: {e}") from None
        close("merged logits", got, model_forward(params, tokens, adapters, lora)[0], 1e-12,
              f" against the unmerged model with adapters, targets {lora.targets}")  # fmt: skip


@check("E4", 3, "unmerge∘merge is the identity to round-off: W0 comes back")
def e4_unmerge(student):
    cfg = tiny()
    for lora in LORAS:
        params, adapters = init_params(cfg, seed=0), _trained(cfg, lora, 1)
        # lora_np's merge only: a wrong merge costs in the checks of merge, not here too
        for merge_name, merge in (("lora_np's merge", ref.merge),):
            merged = merge(params, adapters, lora)
            back = student.fn("unmerge")(merged, adapters, lora)
            if not isinstance(back, Params):
                raise Failure(f"unmerge must return a Params, got {type(back).__name__}")
            for name in params:
                w0 = params[name]
                got = back.get(name)
                if not isinstance(got, np.ndarray) or got.shape != w0.shape or np.abs(got - w0).max() > 1e-12:
                    err = np.abs(got - w0).max() if isinstance(got, np.ndarray) and got.shape == w0.shape else "n/a"
                    raise Failure(f"unmerge({merge_name}(params)) does not give back {name}: max |W - W0| = {err} "
                                  f"(needs < 1e-12), targets {lora.targets}")  # fmt: skip


@check("E4", 2, "pure: a new Params is returned, params and adapters are left as they were")
def e4_pure(student):
    cfg, lora = tiny(), LORAS[0]
    params, adapters = init_params(cfg, seed=0), _trained(cfg, lora, 1)
    for fn in ("merge", "unmerge"):
        given = params if fn == "merge" else ref.merge(params, adapters, lora)  # unmerge refuses a base never merged
        student.fn(fn)(given, adapters, lora)  # a Failure if an input was changed in place
        shared = student.last.get("aliases", [])  # the parts of the result that are (parts of) an input
        if "" in shared:
            raise Failure(f"{fn} returned its input params itself: return a new Params (params.copy())")
        adapted = {f"[{n!r}]" for n in params if n.rsplit(".", 1)[-1] in lora.targets}
        if adapted & set(shared):
            raise Failure(f"{fn}'s result shares an adapted weight's array with params: it must hold a new array")


# ----------------------------------------------------------------------------
# E5: counting


def _int(name, got, want, where):
    # any integer type will do (np.int64 counts as well as int); a float or a bool does not
    if not isinstance(got, (int, np.integer)) or isinstance(got, bool):
        raise Failure(f"{name} must return an int, got {type(got).__name__}{where}")
    if got != want:
        raise Failure(f"{name} returned {got:,}, which is {got / want:.4g} times the count{where}")


@check("E5", 3, "lora_params: A and B of one weight, the 1000 × 1000 example included; bad arguments refused")
def e5_one(student):
    @drawn(20)
    @given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 64))
    @example(1000, 1000, 4)
    @example(3, 7, 1)
    def run(d_out, d_in, r):
        r = min(r, d_out, d_in)
        want = r * d_in + d_out * r  # A (r, d_in) and B (d_out, r), entry by entry
        _int("lora_params", student.fn("lora_params")(d_out, d_in, r), want, f" for d_out {d_out}, d_in {d_in}, r {r}")

    run()
    for args, error in (((4096, 1024, 1025), "ValueError"), ((10, 10, 0), "ValueError"), ((10, 10, 2.0), "TypeError"),
                        ((10, True, 2), "TypeError")):  # fmt: skip  (the notebook's cases)
        got = student.raised("lora_params", *args)
        if got != error:
            raise Failure(f"lora_params{args} must raise {error}, as its docstring says, "
                          f"{'raised ' + got if got else 'returned'}")  # fmt: skip


@check("E5", 4, "lora_transformer_params: every block, every adapted matrix, its own rank; GPT-3 included")
def e5_transformer(student):
    gpt3 = (96, {"W_q": 8, "W_v": 8}, block_shapes(12288, 4 * 12288))  # Table 4's GPT-3 175B with r = 8

    @drawn(15)
    @given(st.integers(1, 4), st.dictionaries(st.sampled_from(LORA_TARGETS), st.integers(1, 8), min_size=1),
           st.integers(8, 32), st.integers(8, 64))  # fmt: skip
    @example(*gpt3[:2], 12288, 4 * 12288)
    def run(n_layers, ranks, D, M):
        shapes = block_shapes(D, M)
        want = 0
        for name, r in ranks.items():  # layer by layer, as arrays would be allocated
            d_out, d_in = shapes[name]
            want += n_layers * (r * d_in + d_out * r)
        # lora_np's lora_params lent in place of the student's, so that a wrong one costs in E5.1 only
        got = student.fn("lora_transformer_params", refs={"lora_params": counting.lora_params})(n_layers, ranks, shapes)
        _int("lora_transformer_params", got, want, f" for n_layers {n_layers}, ranks {ranks}, d_model {D}, d_mlp {M}")

    run()


@check("E5", 3, "config_lora_params equals the numbers init_lora's adapters actually hold")
def e5_config(student):
    @drawn(15)
    @given(st.integers(1, 3), st.sampled_from([8, 12, 16]), st.integers(1, 4),
           st.lists(st.sampled_from(LORA_TARGETS), min_size=1, max_size=6, unique=True))  # fmt: skip
    def run(n_layers, D, r, targets):
        cfg, lora = tiny(n_layers, D, 2 * D, 2), LoraConfig(r=r, targets=tuple(targets))
        want = count_arrays(ref.init_lora(cfg, lora, 0))  # arrays counted, not a formula
        lent = {"lora_params": counting.lora_params, "lora_transformer_params": counting.lora_transformer_params}
        _int("config_lora_params", student.fn("config_lora_params", refs=lent)(cfg, lora), want, f" for {cfg}, {lora}")

    run()


# ----------------------------------------------------------------------------
# E6: one fine-tuning step


@check("E6", 6, "trainable_names: every parameter without adapters; the adapters (and the biases asked for) with; "
                "a bias option refused")
def e6_names(student):
    cfg = tiny()
    params = init_params(cfg, seed=0)
    cases = [(None, None, "none")] + [(ref.init_lora(cfg, lo, 0), lo, bias) for lo in LORAS[:2]
                                      for bias in train.BIAS_OPTIONS]  # fmt: skip
    for adapters, lora, bias in cases:
        got = student.fn("trainable_names")(params, adapters, lora, bias)
        want = train.trainable_names(params, adapters, lora, bias)
        where = "without adapters" if adapters is None else f"with adapters on {lora.targets}, bias={bias!r}"
        if not isinstance(got, (list, tuple)) or len(set(got)) != len(got):
            raise Failure(f"trainable_names must return a list of distinct names, got {str(got)[:80]} {where}")
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise Failure(f"{where}: missing {missing[:3]}, unexpected {extra[:3]}")
    adapters, lora = ref.init_lora(cfg, LORAS[0], 0), LORAS[0]
    for args, kwargs in (((params,), {"bias": "all"}), ((params, adapters, lora), {"bias": "some"})):
        got = student.raised("trainable_names", *args, **kwargs)
        if got != "ValueError":
            where = "without adapters" if len(args) == 1 else "with adapters"
            raise Failure(f"trainable_names {where}, bias={kwargs['bias']!r} must raise ValueError, as its docstring "
                          f"says, {'raised ' + got if got else 'returned'}")  # fmt: skip


def _adam_arrays(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {"W": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=4).astype(dtype)}


@check("E6", 8, "AdamW.step: Adam with bias correction, weight decay decoupled and on matrices only")
def e6_adamw(student):
    AdamW = student.cls("AdamW")
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        for wd in (0.0, 0.1):
            mine, theirs = _adam_arrays(dtype), _adam_arrays(dtype)
            try:
                opt = AdamW(theirs, lr=0.01, betas=(0.8, 0.99), weight_decay=wd)
            except Exception as e:
                raise Failure(f"AdamW(...) failed: {type(e).__name__}: {e}; its __init__ is given, keep it") from None
            ref_opt = optim.AdamW(mine, lr=0.01, betas=(0.8, 0.99), weight_decay=wd)
            rng = np.random.default_rng(1)
            for t in range(1, 4):
                grads = {k: rng.normal(size=v.shape).astype(dtype) for k, v in mine.items()}
                before = {k: v.copy() for k, v in theirs.items()}
                ref_opt.step(grads)
                opt.step(grads)  # the arrays given to AdamW(...) come back as the step left them
                for name in mine:
                    if np.array_equal(theirs[name], before[name]):  # rebinding self.arrays[name] moves nothing
                        raise Failure(f"AdamW.step did not change the array {name!r} it was given (step {t}); the "
                                      f"model holds that array: update each array in place (p -= ...)")  # fmt: skip
                    kind = "a matrix (decays)" if mine[name].ndim >= 2 else "a vector (never decays)"
                    close(name, theirs[name], mine[name], tol, f", {kind}, after step {t}, weight_decay {wd}, "
                          f"{np.dtype(dtype).name}")  # fmt: skip


@check("E6", 6, "one LoRA step on the tiny GPT: W0 untouched bit for bit, A still, B moved; as the reference")
def e6_step(student):
    cfg = tiny()
    lora = LoraConfig(r=2, alpha=4.0, targets=("W_q", "W_v"))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, cfg.vocab_size, size=(2, 2, 6))  # (B, T) inputs and targets
    params = init_params(cfg, seed=0)
    frozen = {k: v.copy() for k, v in params.items()}
    runs = {}
    for who in ("student", "reference"):
        adapters = ref.init_lora(cfg, lora, 1)
        start = {k: v.copy() for k, v in adapters.items()}
        # lora_np's trainable_names for both: a wrong one costs in E6.1, not here too
        names = train.trainable_names(params, adapters, lora)
        if who == "student":
            opt = student.cls("AdamW")({n: adapters[n] for n in names}, lr=0.01)
        else:
            opt = optim.AdamW({n: adapters[n] for n in names}, lr=0.01)
        try:
            _, grads = train.loss_and_grads(params, x, y, adapters, lora, names, train=False)
        except (TypeError, ValueError) as e:
            raise Failure(f"the model's backward refused your trainable names: {e}") from None
        opt.step(grads)
        runs[who] = (adapters, start)
    for name, w0 in frozen.items():
        if not np.array_equal(params[name], w0):
            raise Failure(f"the step changed the frozen base weight {name}: only the adapters may move")
    adapters, start = runs["student"]
    for name in adapters:
        if name.endswith(".A") and not np.array_equal(adapters[name], start[name]):
            raise Failure(f"{name} moved at step 1, where ∂L/∂A = 0 exactly (B = 0): Adam's update of A must be 0")
        if name.endswith(".B") and np.array_equal(adapters[name], start[name]):
            raise Failure(f"{name} did not move at step 1: ∂L/∂B ≠ 0 there")
        close(name, adapters[name], runs["reference"][0][name], 1e-12, " after one AdamW step (lr 0.01)")
