"""What the autograder checks, exercise by exercise, and for how many points.

Each check is a function of the student's module (a Student) that returns quietly or raises
Failure with a hint: the tensor, the shapes, the error and the property that failed, never the
fix. The checks compare the student's code with things it cannot influence:

- finite differences in float64 of lora_np's reference forward (the student's backward gets the
  reference forward's cache, whose layout the docstring fixes, so a bug in E1 costs points in E1
  and nowhere else);
- lora_np's reference functions, on shapes hypothesis draws (square and non-square, r = 1,
  dropout on and off, float32 and float64), derandomized so every run grades alike;
- the invariants of LoRA: B = 0 is the base model exactly, unmerge∘merge is the identity to
  round-off, a frozen factor's gradient is never formed (lora_np.course.student.Spy).

The points of an exercise are split over its checks; CHECKS lists them in order.
"""

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, Verbosity, example, given, settings
from hypothesis import strategies as st

from .. import layers, optim, train
from .. import lora as ref
from ..config import LORA_TARGETS, LoraConfig, ModelConfig
from ..counting import block_shapes, count_arrays
from ..gradcheck import numerical_vjp, rel_error
from ..model import model_backward, model_forward
from ..params import Params, init_params
from .student import Failure, Spy, formed, spying

CHECKS = {}  # exercise id -> [(check id, title, points, function)]


def check(ex_id, points, title):
    def register(fn):
        checks = CHECKS.setdefault(ex_id, [])
        checks.append((f"{ex_id}.{len(checks) + 1}", title, points, fn))
        return fn

    return register


def drawn(max_examples=10):
    """Hypothesis settings for a grader: the same examples every run, no database, quiet, and one
    (shrunk, so small) failing example reported rather than several."""
    return settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None, print_blob=False,
        suppress_health_check=list(HealthCheck), report_multiple_bugs=False, verbosity=Verbosity.quiet,
    )  # fmt: skip


def close(name, got, want, tol, where=""):
    """Fail unless `got` has want's shape and dtype and agrees to relative error tol."""
    if not isinstance(got, np.ndarray):
        raise Failure(f"{name} must be an array of shape {want.shape}, got {type(got).__name__}{where}")
    if got.shape != want.shape:
        raise Failure(f"{name} must have shape {want.shape}, got {got.shape}{where}")
    if got.dtype != want.dtype:
        raise Failure(f"{name} must be {want.dtype} like the inputs, got {got.dtype}{where}")
    err = rel_error(got, want)
    if not err < tol:  # written so that NaN fails
        ratio = _ratio(got, want)
        hint = f"; it is {ratio:.4g} times the right value" if ratio is not None else ""
        raise Failure(f"{name} {got.shape}: max relative error {err:.1e} (needs < {tol:.0e}){hint}{where}")


def _ratio(got, want):
    """The factor c when got = c·want (a scaling missing or applied twice), else None."""
    g, w = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    if not (np.all(np.isfinite(g)) and np.abs(w).max(initial=0) > 0):
        return None
    c = g @ w / (w @ w)
    return c if abs(c - 1) > 1e-3 and rel_error(g, c * w) < 1e-8 else None


# ----------------------------------------------------------------------------
# E1, E2: the LoRA layer


@dataclass(frozen=True)
class Layer:
    """One LoRA layer's sizes and values, drawn by hypothesis."""

    lead: tuple  # leading shape of x: (N,) or (B, T)
    d_in: int
    d_out: int
    r: int
    scaling: float
    bias: bool
    seed: int

    def arrays(self, dtype=np.float64):
        rng = np.random.default_rng(self.seed)
        x = rng.normal(size=(*self.lead, self.d_in))
        W = rng.normal(size=(self.d_out, self.d_in))
        b = rng.normal(size=self.d_out) if self.bias else None
        A = rng.normal(size=(self.r, self.d_in))
        B = rng.normal(size=(self.d_out, self.r))  # B ≠ 0: at B = 0 the check of dA passes vacuously
        dout = rng.normal(size=(*self.lead, self.d_out))
        return [None if a is None else a.astype(dtype) for a in (x, W, b, A, B, dout)]

    def __str__(self):
        return (f" (x {(*self.lead, self.d_in)}, W {(self.d_out, self.d_in)}, r = {self.r}, "
                f"scaling {self.scaling}, {'with' if self.bias else 'no'} bias)")  # fmt: skip


@st.composite
def layers_(draw):
    d_in = draw(st.integers(1, 6))
    d_out = d_in if draw(st.booleans()) else draw(st.integers(1, 6))
    r = draw(st.integers(1, min(d_in, d_out)))
    lead = draw(st.sampled_from([(3,), (2, 3), (1,)]))
    scaling = draw(st.sampled_from([2.0, 0.5, 1.5]))
    return Layer(lead, d_in, d_out, r, scaling, draw(st.booleans()), draw(st.integers(0, 2**16)))


# Always among the examples: square, non-square both ways, r = 1.
SQUARE = Layer((2, 3), 4, 4, 2, 2.0, True, 1)
WIDE = Layer((3,), 5, 3, 1, 0.5, True, 2)
TALL = Layer((4,), 2, 5, 1, 2.0, False, 3)
DISTINCT = Layer((5,), 7, 6, 2, 2.0, True, 4)  # N, d_in, d_out, r all different, so a shape tells a product apart


def _forward(student, layer, dtype=np.float64, dropout=0.0):
    x, W, b, A, B, _ = layer.arrays(dtype)
    kw = {"dropout": dropout, "rng": np.random.default_rng(layer.seed)} if dropout else {}
    return student.fn("lora_linear_forward")(x, W, b, A, B, layer.scaling, **kw)


def _unpack(out, name, n):
    if not (isinstance(out, tuple) and len(out) == n):
        raise Failure(f"{name} must return a tuple of {n}, got {type(out).__name__}"
                      f"{f' of {len(out)}' if isinstance(out, tuple) else ''}")  # fmt: skip
    return out


@check("E1", 4, "lora_linear_forward agrees with eq. 3 (reference, float64; square, non-square, r = 1)")
def e1_values(student):
    @drawn()
    @given(layers_())
    @example(SQUARE)
    @example(WIDE)
    @example(TALL)
    def run(layer):
        out, _ = _unpack(_forward(student, layer), "lora_linear_forward", 2)
        x, W, b, A, B, _ = layer.arrays()
        want, _ = layers.lora_linear_forward(x, W, b, A, B, layer.scaling)
        if isinstance(out, np.ndarray) and out.shape == want.shape and rel_error(out, want) >= 1e-10:
            base = x @ W.T + (0 if b is None else b)  # where the error is: the frozen path or the LoRA path
            c = _ratio(out - base, want - base)
            if rel_error(out, base) < 1e-10:
                raise Failure(f"out equals the frozen path W0·x + b alone: the low-rank term is missing{layer}")
            if c is not None:
                raise Failure(f"the low-rank term of out is {c:.4g} times s·B·A·x{layer}")
        close("out", out, want, 1e-10, str(layer))

    run()


@check("E1", 1, "float32 in, float32 out (no silent upcast)")
def e1_float32(student):
    @drawn()
    @given(layers_())
    @example(WIDE)
    def run(layer):
        out, _ = _unpack(_forward(student, layer, np.float32), "lora_linear_forward", 2)
        x, W, b, A, B, _ = layer.arrays(np.float32)
        want = layers.lora_linear_forward(x, W, b, A, B, layer.scaling)[0]
        close("out", out, want, 1e-5, f" for float32 inputs{layer}")

    run()


@check("E1", 1, "B = 0 gives the frozen layer W0·x + b exactly (the zero-init property)")
def e1_zero_init(student):
    for layer in (SQUARE, WIDE, TALL, DISTINCT):
        x, W, b, A, B, _ = layer.arrays()
        x = x.reshape(-1, layer.d_in)  # 2-D, so that W0·x is one product whichever way it is written
        out, _ = _unpack(student.fn("lora_linear_forward")(x, W, b, A, np.zeros_like(B), layer.scaling),
                         "lora_linear_forward", 2)  # fmt: skip
        base = x @ W.T + (0 if b is None else b)
        if not (isinstance(out, np.ndarray) and out.shape == base.shape and np.array_equal(out, base)):
            err = rel_error(out, base) if isinstance(out, np.ndarray) and out.shape == base.shape else "n/a"
            raise Failure(f"with B = 0, out must equal W0·x + b bit for bit (relative error {err}){layer}")


@check("E1", 2, "dropout: a mask of 0 and 1/(1-p) on the input of A only, at rate p")
def e1_dropout(student):
    N, p = 4000, 0.25
    layer = Layer((N,), 5, 3, 2, 2.0, True, 5)
    x, W, b, A, B, _ = layer.arrays()
    out, cache = _unpack(_forward(student, layer, dropout=p), "lora_linear_forward", 2)
    cache = _unpack(cache, "lora_linear_forward's cache", 8)
    mask = cache[3]
    if not isinstance(mask, np.ndarray) or mask.shape != (N, layer.d_in):
        raise Failure(f"with dropout, cache[3] must be the mask of shape {(N, layer.d_in)}, got "
                      f"{getattr(mask, 'shape', type(mask).__name__)}")  # fmt: skip
    values = set(np.unique(mask).tolist())
    if not values <= {0.0, 1.0 / (1.0 - p)}:
        raise Failure(f"the mask must hold 0 and 1/(1 - p) = {1 / (1 - p):.4g} (inverted dropout), got values "
                      f"{sorted(values)[:4]}")  # fmt: skip
    rate, sigma = float(np.mean(mask == 0)), (p * (1 - p) / mask.size) ** 0.5
    if abs(rate - p) > 6 * sigma:
        raise Failure(f"the mask drops {rate:.3f} of the inputs; dropout={p} should drop {p} of them")
    want = x @ W.T + b + layer.scaling * ((x * mask) @ A.T) @ B.T  # h = W0·x + b + s·B·A·(m⊙x)
    close("out with dropout", out, want, 1e-10, ": it must be W0·x + b + s·B·A·(m⊙x) with your own mask m (the "
          "frozen path sees the clean x)")  # fmt: skip
    _, cache0 = _unpack(_forward(student, layer, dropout=0.0), "lora_linear_forward", 2)
    if _unpack(cache0, "lora_linear_forward's cache", 8)[3] is not None:
        raise Failure("with dropout = 0, cache[3] (the mask) must be None, as the docstring says")


@check("E1", 1, "the cache has the documented layout (x, W, xd, mask, xA, A, B, scaling)")
def e1_cache(student):
    for layer in (SQUARE, WIDE):
        for p in (0.0, 0.5):
            x, W, b, A, B, dout = layer.arrays()
            _, cache = _unpack(_forward(student, layer, dropout=p), "lora_linear_forward", 2)
            cache = _unpack(cache, "lora_linear_forward's cache", 8)
            kw = {"dropout": p, "rng": np.random.default_rng(layer.seed)} if p else {}
            _, mine = layers.lora_linear_forward(x, W, b, A, B, layer.scaling, **kw)
            if p and isinstance(cache[3], np.ndarray) and cache[3].shape == mine[3].shape:
                # the student's mask may come from other draws: rebuild the reference cache with it
                mask = cache[3]
                xd = x.reshape(-1, layer.d_in) * mask
                mine = (x, W, xd, mask, xd @ A.T, A, B, layer.scaling)
            try:  # the contract: the reference backward reads the student's cache as its own
                got = layers.lora_linear_backward(dout, tuple(cache))
            except Exception as e:
                raise Failure(f"lora_linear_backward cannot read your cache ({type(e).__name__}: {e}); keep the "
                              f"documented layout (x, W, xd, mask, xA, A, B, scaling){layer}") from None  # fmt: skip
            for name, g, w in zip(("dx", "dA", "dB"), got, layers.lora_linear_backward(dout, mine), strict=True):
                close(name, g, w, 1e-10, f" from your cache, dropout {p}: the cache must hold (x, W, xd, mask, xA, "
                      f"A, B, scaling) as documented{layer}")  # fmt: skip


@check("E1", 1, "B·A is never formed: the scaling goes on the r-wide factor")
def e1_no_BA(student):
    x, W, b, A, B, _ = DISTINCT.arrays()
    with spying() as shapes:
        student.fn("lora_linear_forward")(*(a.view(Spy) for a in (x, W)), b, A.view(Spy), B.view(Spy), DISTINCT.scaling)
    if formed(shapes, {(DISTINCT.d_out, DISTINCT.d_in), (DISTINCT.d_in, DISTINCT.d_out)}):
        raise Failure(f"the forward formed a d_out × d_in = {DISTINCT.d_out} × {DISTINCT.d_in} product (B·A): "
                      f"apply A, then B, to the rows of x{DISTINCT}")  # fmt: skip


def _backward(student, layer, dtype=np.float64, dropout=0.0, **flags):
    """The student's backward on the reference forward's cache, and that forward as a function."""
    x, W, b, A, B, dout = layer.arrays(dtype)

    def forward():  # the same mask every call: a fresh Generator with the same seed
        kw = {"dropout": dropout, "rng": np.random.default_rng(layer.seed)} if dropout else {}
        return layers.lora_linear_forward(x, W, b, A, B, layer.scaling, **kw)

    got = _unpack(student.fn("lora_linear_backward")(dout, forward()[1], **flags), "lora_linear_backward", 3)
    return got, (x, A, B), forward, dout


def _finite_differences(student, layer, dropout):
    (dx, dA, dB), inputs, forward, dout = _backward(student, layer, dropout=dropout)
    where = f", dropout {dropout}{layer}"
    for name, got, arr in zip(("dx", "dA", "dB"), (dx, dA, dB), inputs, strict=True):
        num = numerical_vjp(lambda: forward()[0], arr, dout)
        close(name, got, num, 1e-7, f" against finite differences of the forward{where}")


@check("E2", 6, "dx, dA, dB match finite differences (float64, B ≠ 0, no dropout)")
def e2_fd(student):
    @drawn()
    @given(layers_())
    @example(SQUARE)
    @example(WIDE)
    @example(TALL)
    def run(layer):
        _finite_differences(student, layer, 0.0)

    run()


@check("E2", 4, "dx, dA, dB match finite differences with dropout on the input of A")
def e2_fd_dropout(student):
    @drawn(8)
    @given(layers_(), st.sampled_from([0.25, 0.5]))
    @example(SQUARE, 0.5)
    @example(WIDE, 0.25)
    def run(layer, p):
        _finite_differences(student, layer, p)

    run()


@check("E2", 3, "agrees with the reference in float32 and float64, dropout on and off, dtype kept")
def e2_reference(student):
    @drawn()
    @given(layers_(), st.sampled_from([np.float64, np.float32]), st.sampled_from([0.0, 0.5]))
    @example(SQUARE, np.float32, 0.0)
    @example(WIDE, np.float64, 0.5)
    def run(layer, dtype, p):
        got, _, forward, dout = _backward(student, layer, dtype, dropout=p)
        tol = 1e-10 if dtype == np.float64 else 1e-5
        want = layers.lora_linear_backward(dout, forward()[1])
        for name, g, w in zip(("dx", "dA", "dB"), got, want, strict=True):
            close(name, g, w, tol, f" in {np.dtype(dtype).name}, dropout {p}{layer}")

    run()


@check("E2", 4, "need_dA / need_dB: a frozen factor's gradient is None and never formed")
def e2_frozen(student):
    L = DISTINCT
    x, W, b, A, B, dout = L.arrays()
    _, cache = layers.lora_linear_forward(x, W, b, A, B, L.scaling)
    want = layers.lora_linear_backward(dout, cache)
    spied = tuple(a.view(Spy) if isinstance(a, np.ndarray) else a for a in cache)
    shape_of = {"dA": (L.r, L.d_in), "dB": (L.d_out, L.r)}
    for need_dA, need_dB in ((False, True), (True, False), (False, False)):
        with spying() as shapes:
            got = student.fn("lora_linear_backward")(dout.view(Spy), spied, need_dA=need_dA, need_dB=need_dB)
        got = _unpack(got, "lora_linear_backward", 3)
        flags = f" with need_dA={need_dA}, need_dB={need_dB}"
        for name, need, g, w in zip(("dx", "dA", "dB"), (True, need_dA, need_dB), got, want, strict=True):
            if not need:
                if g is not None:
                    raise Failure(f"{name} must be None{flags}: that factor is frozen")
                if formed(shapes, {shape_of[name], shape_of[name][::-1]}):
                    raise Failure(f"{name} was computed{flags} (a product of its shape {shape_of[name]} was "
                                  f"formed): a frozen gradient must not be formed at all{L}")  # fmt: skip
            else:
                g = g.view(np.ndarray) if isinstance(g, np.ndarray) else g  # a Spy compares as an array
                close(name, g, w, 1e-10, flags + str(L))


@check("E2", 3, "no d_out × d_in product (B·A, or W0's gradient g·xᵀ) is formed")
def e2_no_full(student):
    L = DISTINCT
    for p in (0.0, 0.5):
        x, W, b, A, B, dout = L.arrays()
        kw = {"dropout": p, "rng": np.random.default_rng(0)} if p else {}
        _, cache = layers.lora_linear_forward(x, W, b, A, B, L.scaling, **kw)
        spied = tuple(a.view(Spy) if isinstance(a, np.ndarray) else a for a in cache)
        with spying() as shapes:
            student.fn("lora_linear_backward")(dout.view(Spy), spied)
        if formed(shapes, {(L.d_out, L.d_in), (L.d_in, L.d_out)}):
            raise Failure(f"the backward formed a d_out × d_in = {L.d_out} × {L.d_in} product, dropout {p}: "
                          f"order the products so that only r-wide ones appear{L}")  # fmt: skip


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


@check("E3", 2, "adapter names, shapes and dtype (float64), for every block and target")
def e3_names(student):
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
        std, top = float(np.std(z)), float(np.abs(z).max())
        want = 1.0 if init == "gaussian" else 3**-0.5
        if not (abs(std / want - 1) < 0.05 and abs(np.mean(z)) < 0.05 * want):
            raise Failure(f"init={init!r}: A's entries have mean {np.mean(z) / np.sqrt(64):.3g} and standard "
                          f"deviation {std:.3g}/√d_in; the docstring asks for "
                          f"{'N(0, 1/d_in)' if init == 'gaussian' else 'U(-1/√d_in, 1/√d_in)'}")  # fmt: skip
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
        # lora_np's merge first, so that a wrong unmerge is told apart from a wrong merge
        for merge_name, merge in (("lora_np's merge", ref.merge), ("your merge", student.fn("merge"))):
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
        out = student.fn(fn)(params, adapters, lora)  # Student.call fails on an input changed in place
        if out is params:
            raise Failure(f"{fn} returned its input params itself: return a new Params (params.copy())")
        adapted = [n for n in params if n.rsplit(".", 1)[-1] in lora.targets]
        if isinstance(out, dict) and any(out.get(n) is params[n] for n in adapted):
            raise Failure(f"{fn}'s result shares an adapted weight's array with params: it must hold a new array")


# ----------------------------------------------------------------------------
# E5: counting


def _int(name, got, want, where):
    if not isinstance(got, int) or isinstance(got, bool):
        raise Failure(f"{name} must return a Python int, got {type(got).__name__}{where}")
    if got != want:
        raise Failure(f"{name} returned {got:,}, which is {got / want:.4g} times the count{where}")


@check("E5", 3, "lora_params: A and B of one weight, the 1000 × 1000 example included")
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
        got = student.fn("lora_transformer_params")(n_layers, ranks, shapes)
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
        _int("config_lora_params", student.fn("config_lora_params")(cfg, lora), want, f" for {cfg}, {lora}")

    run()


# ----------------------------------------------------------------------------
# E6: one fine-tuning step


@check("E6", 6, "trainable_names: every parameter without adapters; the adapters (and the biases asked for) with")
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


def _adam_arrays(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {"W": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=4).astype(dtype)}


@check("E6", 8, "AdamW.step: Adam with bias correction, weight decay decoupled and on matrices only")
def e6_adamw(student):
    AdamW = student.cls("AdamW")
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        for wd in (0.0, 0.1):
            mine, theirs = _adam_arrays(dtype), _adam_arrays(dtype)
            trained = dict(theirs)  # the very arrays: a model holds them, so the step must update them in place
            try:
                opt = AdamW(theirs, lr=0.01, betas=(0.8, 0.99), weight_decay=wd)
            except Exception as e:
                raise Failure(f"AdamW(...) failed: {type(e).__name__}: {e}; its __init__ is given, keep it") from None
            ref_opt = optim.AdamW(mine, lr=0.01, betas=(0.8, 0.99), weight_decay=wd)
            rng = np.random.default_rng(1)
            for t in range(1, 4):
                grads = {k: rng.normal(size=v.shape).astype(dtype) for k, v in mine.items()}
                ref_opt.step(grads)
                student.call("AdamW.step", opt.step, (grads,), {})
                for name in mine:
                    if theirs[name] is not trained[name]:
                        raise Failure(f"AdamW.step replaced the array {name!r} by a new one; the model holds the "
                                      f"old one, which never moved: update each array in place (p -= ...)")  # fmt: skip
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
        if who == "student":
            names = student.fn("trainable_names")(params, adapters, lora)
            opt = student.cls("AdamW")({n: adapters[n] for n in names}, lr=0.01)
        else:
            names = train.trainable_names(params, adapters, lora)
            opt = optim.AdamW({n: adapters[n] for n in names}, lr=0.01)
        try:
            _, grads = train.loss_and_grads(params, x, y, adapters, lora, names, train=False)
        except (TypeError, ValueError) as e:
            raise Failure(f"the model's backward refused your trainable names: {e}") from None
        student.call("AdamW.step", opt.step, (grads,), {}) if who == "student" else opt.step(grads)
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


# ----------------------------------------------------------------------------
# E7 (challenge): LayerNorm, attention, embedding


@st.composite
def norms(draw):
    lead = draw(st.sampled_from([(3,), (2, 3)]))
    return lead, draw(st.integers(2, 6)), draw(st.integers(0, 2**16))


def _ln(student, lead, D, seed, dtype=np.float64, **flags):
    rng = np.random.default_rng(seed)
    x, dout = (rng.normal(size=(*lead, D)).astype(dtype) for _ in range(2))
    gamma, beta = (rng.normal(size=D).astype(dtype) for _ in range(2))
    got = _unpack(student.fn("layernorm_backward")(dout, layers.layernorm_forward(x, gamma, beta)[1], **flags),
                  "layernorm_backward", 3)  # fmt: skip
    return got, (x, gamma, beta), dout


@check("E7", 6, "layernorm_backward: dx, dgamma, dbeta match finite differences (float64)")
def e7_ln_fd(student):
    @drawn()
    @given(norms())
    @example(((2, 3), 4, 0))
    def run(case):
        got, inputs, dout = _ln(student, *case)
        for name, g, arr in zip(("dx", "dgamma", "dbeta"), got, inputs, strict=True):
            num = numerical_vjp(lambda: layers.layernorm_forward(*inputs)[0], arr, dout)
            close(name, g, num, 1e-7, f" against finite differences, x {(*case[0], case[1])}")

    run()


@check("E7", 2, "layernorm_backward in float32 as the reference; need_dgamma / need_dbeta give None")
def e7_ln_ref(student):
    got, (x, gamma, beta), dout = _ln(student, (2, 3), 5, 1, np.float32)
    want = layers.layernorm_backward(dout, layers.layernorm_forward(x, gamma, beta)[1])
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        close(name, g, w, 1e-5, " in float32")
    for flags in ({"need_dgamma": False}, {"need_dbeta": False}):
        got, _, _ = _ln(student, (2, 3), 5, 1, **flags)
        name = "dgamma" if "need_dgamma" in flags else "dbeta"
        if got[1 if name == "dgamma" else 2] is not None:
            raise Failure(f"{name} must be None with {flags}: that parameter is frozen")


@st.composite
def attentions(draw):
    H, hs = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return draw(st.integers(1, 2)), draw(st.integers(1, 4)), H, hs, draw(st.integers(0, 2**16))


def _att(student, Bsz, T, H, hs, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.normal(size=(Bsz, T, H * hs)).astype(dtype) for _ in range(4))
    got = student.fn("attention_backward")(dy, layers.attention_forward(q, k, v, H)[1])
    return _unpack(got, "attention_backward", 3), (q, k, v), dy


@check("E7", 8, "attention_backward: dq, dk, dv match finite differences (float64, causal, several heads)")
def e7_att_fd(student):
    @drawn()
    @given(attentions())
    @example((2, 4, 2, 3, 0))
    def run(case):
        Bsz, T, H, hs, _ = case
        got, inputs, dy = _att(student, *case)
        for name, g, arr in zip(("dq", "dk", "dv"), got, inputs, strict=True):
            num = numerical_vjp(lambda: layers.attention_forward(*inputs, H)[0], arr, dy)
            close(name, g, num, 1e-7, f" against finite differences, (B, T, D) = {(Bsz, T, H * hs)}, {H} heads")

    run()


@check("E7", 2, "attention_backward in float32 as the reference")
def e7_att_ref(student):
    got, (q, k, v), dy = _att(student, 2, 4, 2, 3, 1, np.float32)
    want = layers.attention_backward(dy, layers.attention_forward(q, k, v, 2)[1])
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        close(name, g, w, 1e-5, " in float32, (B, T, D) = (2, 4, 6), 2 heads")


@check("E7", 2, "embedding_backward: a row looked up several times gets the sum of its gradients")
def e7_embedding(student):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 3))
    ids = np.array([[1, 4, 1], [0, 1, 4]])  # row 1 three times, row 4 twice, rows 2, 3, 5 never
    dout = rng.normal(size=(2, 3, 3))
    got = student.fn("embedding_backward")(dout, layers.embedding_forward(ids, W)[1])
    close("dW", got, numerical_vjp(lambda: layers.embedding_forward(ids, W)[0], W, dout), 1e-7,
          f" for ids {ids.tolist()} (repeated ids) against finite differences")  # fmt: skip

