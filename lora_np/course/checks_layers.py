"""The checks of E1, E2 (the LoRA layer) and E7 (LayerNorm, attention and embedding backward)."""

from dataclasses import dataclass

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from ..core import layers
from ..core.gradcheck import numerical_vjp, rel_error
from .checking import check, close, drawn, ratio, unpack
from .student import Failure

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




def _diagnose(out, want, base, tol, where):
    """Say which path is wrong, when out has the right shape but not the right values: the
    low-rank term missing, or c times what it should be (the scaling missing, or applied twice)."""
    if not (isinstance(out, np.ndarray) and out.shape == want.shape and out.dtype == want.dtype):
        return
    if rel_error(out, want) < tol:
        return
    if rel_error(out, base) < tol:
        raise Failure(f"out equals the frozen path W0·x + b alone: the low-rank term is missing{where}")
    c = ratio(out - base, want - base, 1e-3 if out.dtype == np.float32 else 1e-8)  # float32: round-off in out - base
    if c is not None:
        raise Failure(f"the low-rank term of out is {c:.4g} times s·B·A·x (the frozen path W0·x + b is right){where}")


@check("E1", 4, "lora_linear_forward agrees with eq. 3 (reference, float64; square, non-square, r = 1)")
def e1_values(student):
    @drawn()
    @given(layers_())
    @example(SQUARE)
    @example(WIDE)
    @example(TALL)
    def run(layer):
        out, _ = unpack(_forward(student, layer), "lora_linear_forward", 2)
        x, W, b, A, B, _ = layer.arrays()
        want, _ = layers.lora_linear_forward(x, W, b, A, B, layer.scaling)
        _diagnose(out, want, x @ W.T + (0 if b is None else b), 1e-10, str(layer))
        close("out", out, want, 1e-10, str(layer))

    run()


@check("E1", 1, "float32 in, float32 out (no silent upcast)")
def e1_float32(student):
    @drawn()
    @given(layers_())
    @example(WIDE)
    def run(layer):
        out, _ = unpack(_forward(student, layer, np.float32), "lora_linear_forward", 2)
        x, W, b, A, B, _ = layer.arrays(np.float32)
        want = layers.lora_linear_forward(x, W, b, A, B, layer.scaling)[0]
        base = x @ W.T + (0 if b is None else b)
        _diagnose(out, want, base, 1e-5, f" for float32 inputs{layer}")
        close("out", out, want, 1e-5, f" for float32 inputs{layer}")

    run()


@check("E1", 1, "B = 0 gives the frozen layer W0·x + b exactly (the zero-init property)")
def e1_zero_init(student):
    for layer in (SQUARE, WIDE, TALL, DISTINCT):
        x, W, b, A, B, _ = layer.arrays()
        x = x.reshape(-1, layer.d_in)  # 2-D, so that W0·x is one product whichever way it is written
        out, _ = unpack(student.fn("lora_linear_forward")(x, W, b, A, np.zeros_like(B), layer.scaling),
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
    out, cache = unpack(_forward(student, layer, dropout=p), "lora_linear_forward", 2)
    cache = unpack(cache, "lora_linear_forward's cache", 8)
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
    _diagnose(out, want, x @ W.T + b, 1e-10, " with dropout, your own mask m")
    close("out with dropout", out, want, 1e-10, ": it must be W0·x + b + s·B·A·(m⊙x) with your own mask m (the "
          "frozen path sees the clean x)")  # fmt: skip
    _, cache0 = unpack(_forward(student, layer, dropout=0.0), "lora_linear_forward", 2)
    if unpack(cache0, "lora_linear_forward's cache", 8)[3] is not None:
        raise Failure("with dropout = 0, cache[3] (the mask) must be None, as the docstring says")
    for bad in ({"dropout": 1.0, "rng": np.random.default_rng(0)}, {"dropout": -0.1, "rng": np.random.default_rng(0)},
                {"dropout": 0.5}):  # fmt: skip
        got = student.raised("lora_linear_forward", x, W, b, A, B, layer.scaling, **bad)
        if got != "ValueError":
            shown = f"dropout={bad['dropout']!r}" + ("" if "rng" in bad else ", no rng")
            raise Failure(f"lora_linear_forward with {shown} must raise ValueError (the file's docstring says so), "
                          f"{'raised ' + got if got else 'returned'}")  # fmt: skip


@check("E1", 1, "the cache has the documented layout (x, W, xd, mask, xA, A, B, scaling)")
def e1_cache(student):
    for layer in (SQUARE, WIDE):
        for p in (0.0, 0.5):
            x, W, b, A, B, dout = layer.arrays()
            _, cache = unpack(_forward(student, layer, dropout=p), "lora_linear_forward", 2)
            cache = unpack(cache, "lora_linear_forward's cache", 8)
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


# Wide layers for the checks of what is formed: a d_out × d_in product is 2.4 MB here, while every
# array a correct forward or backward allocates is at most N·d_in wide, 24 kB.
WIDEST = Layer((5,), 600, 500, 2, 2.0, True, 6)


def _formed(student, nbytes):
    """True when the last measured call allocated at least half of `nbytes` at its peak.

    The student's process measures with tracemalloc, which sees every array NumPy allocates,
    however it was made (B @ A, np.dot(np.asarray(B), A), einsum, a copy): what is formed, not
    how it is spelled."""
    return student.last.get("peak", 0) >= nbytes // 2


@check("E1", 1, "B·A is never formed: the scaling goes on the r-wide factor")
def e1_no_BA(student):
    L = WIDEST
    x, W, b, A, B, _ = L.arrays()
    out, _ = unpack(student.fn("lora_linear_forward", measure=True)(x, W, b, A, B, L.scaling),
                     "lora_linear_forward", 2)  # fmt: skip
    # how the answer is computed is graded once the answer is right (so returning zeros earns nothing)
    close("out", out, layers.lora_linear_forward(x, W, b, A, B, L.scaling)[0], 1e-8, f" on a wide layer{L}")
    if _formed(student, L.d_out * L.d_in * 8):
        raise Failure(f"the forward allocated {student.last['peak'] / 1e6:.1f} MB, as much as a d_out × d_in = "
                      f"{L.d_out} × {L.d_in} product (B·A, 2.4 MB): apply A, then B, to the rows of x{L}")  # fmt: skip


def _backward(student, layer, dtype=np.float64, dropout=0.0, **flags):
    """The student's backward on the reference forward's cache, and that forward as a function."""
    x, W, b, A, B, dout = layer.arrays(dtype)

    def forward():  # the same mask every call: a fresh Generator with the same seed
        kw = {"dropout": dropout, "rng": np.random.default_rng(layer.seed)} if dropout else {}
        return layers.lora_linear_forward(x, W, b, A, B, layer.scaling, **kw)

    got = unpack(student.fn("lora_linear_backward")(dout, forward()[1], **flags), "lora_linear_backward", 3)
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


# Shapes where the frozen factor's gradient is by far the largest array the backward could form:
# dA (r, d_in) = 40 × 3000 when A is frozen, dB (d_out, r) = 3000 × 40 when B is; 960 kB either way.
FROZEN_A = Layer((2,), 3000, 40, 40, 2.0, True, 7)
FROZEN_B = Layer((2,), 40, 3000, 40, 2.0, True, 8)


@check("E2", 4, "need_dA / need_dB: a frozen factor's gradient is None and never formed")
def e2_frozen(student):
    for L, need_dA, need_dB in ((FROZEN_A, False, True), (FROZEN_B, True, False), (FROZEN_A, False, False),
                                (FROZEN_B, False, False)):  # fmt: skip
        x, W, b, A, B, dout = L.arrays()
        _, cache = layers.lora_linear_forward(x, W, b, A, B, L.scaling)
        want = layers.lora_linear_backward(dout, cache)
        got = student.fn("lora_linear_backward", measure=True)(dout, cache, need_dA=need_dA, need_dB=need_dB)
        got = unpack(got, "lora_linear_backward", 3)
        flags = f" with need_dA={need_dA}, need_dB={need_dB}"
        big = "dA" if L is FROZEN_A else "dB"
        for name, need, g, w in zip(("dx", "dA", "dB"), (True, need_dA, need_dB), got, want, strict=True):
            if not need:
                if g is not None:
                    raise Failure(f"{name} must be None{flags}: that factor is frozen")
                if name == big and _formed(student, L.r * max(L.d_in, L.d_out) * 8):
                    raise Failure(f"{name} was computed{flags}: the backward allocated "
                                  f"{student.last['peak'] / 1e3:.0f} kB, as much as {name} of shape "
                                  f"{w.shape} (960 kB); a frozen gradient must not be formed at all{L}")  # fmt: skip
            else:
                close(name, g, w, 1e-10, flags + str(L))


@check("E2", 3, "no d_out × d_in product (B·A, or W0's gradient g·xᵀ) is formed")
def e2_no_full(student):
    L = WIDEST
    for p in (0.0, 0.5):
        x, W, b, A, B, dout = L.arrays()
        kw = {"dropout": p, "rng": np.random.default_rng(0)} if p else {}
        _, cache = layers.lora_linear_forward(x, W, b, A, B, L.scaling, **kw)
        got = unpack(student.fn("lora_linear_backward", measure=True)(dout, cache), "lora_linear_backward", 3)
        for name, g, w in zip(("dx", "dA", "dB"), got, layers.lora_linear_backward(dout, cache), strict=True):
            close(name, g, w, 1e-8, f" on a wide layer, dropout {p}{L}")  # graded once the answer is right
        if _formed(student, L.d_out * L.d_in * 8):
            raise Failure(f"the backward allocated {student.last['peak'] / 1e6:.1f} MB, as much as a d_out × d_in "
                          f"= {L.d_out} × {L.d_in} product (2.4 MB), dropout {p}: order the products so that only "
                          f"r-wide ones appear{L}")  # fmt: skip


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
    got = unpack(student.fn("layernorm_backward")(dout, layers.layernorm_forward(x, gamma, beta)[1], **flags),
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
    return unpack(got, "attention_backward", 3), (q, k, v), dy


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
