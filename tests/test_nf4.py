"""NF4 storage (QLoRA): the codebook against its published values and its definition, the quantize /
dequantize round trip against error bounds and a brute-force nearest-value reference, packing, padding,
all-zero blocks, bytes against the paper's bits per parameter, and NF4 against a uniform 4-bit grid."""

import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from lora_np.nf4 import (
    NF4_OFFSET,
    NF4_PUBLISHED,
    NF4Tensor,
    nf4_bits_per_parameter,
    nf4_codebook,
    pack_4bit,
    quantize_nf4,
    unpack_4bit,
)

TABLE = nf4_codebook().astype(np.float32)  # the values a tensor's codes index, as it stores them
HALF_MAX_GAP = float(np.diff(TABLE.astype(np.float64)).max()) / 2  # 0.1385: between 0.7230 and 1
REL = 1e-6  # float32 rounding of a product (2^-24) and of the scales, with room to spare
TINY = 1e-44  # a few float32 subnormal steps, for products that land below float32's normal range

shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)  # any rank, 0-d included
block_sizes = st.sampled_from([2, 4, 6, 10, 64])
# float32-representable values: W's largest magnitude is then exactly its float32 block scale
elements = st.floats(-1e4, 1e4, width=32)


@st.composite
def weights(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return draw(hnp.arrays(dtype, draw(shapes), elements=elements))


def block_absmax(W, Bk):
    """Each block's max |w| in float64 (the last block padded with zeros): an independent c2."""
    w = np.zeros(-(-W.size // Bk) * Bk)
    w[: W.size] = W.reshape(-1)
    return np.abs(w.reshape(-1, Bk)).max(axis=1)  # (nb,)


def per_number(v, Bk, n):
    """A per-block quantity repeated over its block's numbers, cut to the weight's n numbers."""
    return np.repeat(v, Bk)[:n]


def rel_frobenius(W_hat, W):
    return float(np.linalg.norm(W_hat - W) / np.linalg.norm(W))


# ----- the codebook --------------------------------------------------------------------------------


def test_codebook_matches_the_published_values():
    # The published values are float32 and bitsandbytes computed its probabilities in float32
    # (torch.linspace); from the definition in float64 we land within 1.1e-7 of every one.
    computed, published = nf4_codebook(), np.array(NF4_PUBLISHED)
    err = np.abs(computed - published)
    assert err.max() < 1.5e-7, f"nf4_codebook() vs NF4_PUBLISHED: max |diff| {err.max():.3g} at index {err.argmax()}"


def test_published_values_are_float32_numbers():
    assert all(float(np.float32(v)) == v for v in NF4_PUBLISHED)


def test_codebook_is_sorted_with_one_zero_and_ends_at_minus_one_and_one():
    q = nf4_codebook()
    assert q.shape == (16,) and q.dtype == np.float64
    assert np.all(np.diff(q) > 0)
    assert np.count_nonzero(q == 0) == 1
    assert q[0] == -1.0 and q[-1] == 1.0
    assert (np.count_nonzero(q < 0), np.count_nonzero(q > 0)) == (7, 8)  # the asymmetric type


def test_codebook_levels_sit_at_evenly_spaced_probabilities_of_the_standard_normal():
    # Undo the normalization and map each level through the normal CDF: the 8 positive levels sit at
    # 0.5 + j·(offset - 0.5)/8 and the 7 negative ones at 0.5 - j·(offset - 0.5)/7, j = 1, 2, ...
    nd = NormalDist()
    q = nf4_codebook() * nd.inv_cdf(NF4_OFFSET)
    p = np.array([nd.cdf(v) for v in q])
    step = NF4_OFFSET - 0.5
    np.testing.assert_allclose(p[8:], 0.5 + step * np.arange(1, 9) / 8, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p[:7], 0.5 - step * np.arange(7, 0, -1) / 7, rtol=0, atol=1e-12)


def test_offset_is_bitsandbytes_literal_and_the_mean_of_the_two_bin_centres():
    assert NF4_OFFSET == 0.9677083  # bitsandbytes' create_normal_map(offset=0.9677083)
    assert abs(NF4_OFFSET - ((1 - 1 / 30) + (1 - 1 / 32)) / 2) < 5e-8


def test_bitsandbytes_kernel_thresholds_are_midpoints_of_the_published_values():
    # Typed from bitsandbytes csrc/kernels.cu, dQuantizeNF4: it tests x > threshold, so our
    # nearest-value rule with ties to the lower value is the kernel's rule.
    thresholds = [0.03979014977812767, 0.3893125355243683, 0.6427869200706482, 0.8614784181118011,
                  0.5016634166240692, 0.2035212516784668, 0.2920137718319893, 0.1202552504837513,
                  -0.33967943489551544, -0.13791173323988914, -0.045525018125772476, -0.23460740596055984,
                  -0.6106329262256622]
    p = np.array(NF4_PUBLISHED)
    midpoints = (p[:-1] + p[1:]) / 2
    for t in thresholds:
        assert np.abs(midpoints - t).min() == 0.0, t


# ----- quantize -> dequantize ----------------------------------------------------------------------


@given(weights(), block_sizes)
def test_round_trip_error_is_at_most_half_the_largest_gap_times_the_block_absmax(W, Bk):
    t = quantize_nf4(W, block_size=Bk)
    W_hat = t.dequantize()
    assert W_hat.shape == W.shape and W_hat.dtype == np.float32
    c = per_number(block_absmax(W, Bk), Bk, W.size)
    err = np.abs(W_hat.astype(np.float64).reshape(-1) - W.reshape(-1))
    bound = HALF_MAX_GAP * c * (1 + REL) + TINY
    assert np.all(err <= bound), f"max err / bound {np.max(err / bound):.6g} at flat index {np.argmax(err - bound)}"


@given(weights(), block_sizes, st.integers(1, 5))
def test_double_quant_error_adds_at_most_the_scale_error(W, Bk, Bk2):
    #   |w - q·ĉ| <= |w - q·c| + |q|·|c - ĉ| <= half_gap·c + |c - ĉ|,   and   |c - ĉ| <= c1 / 254
    t = quantize_nf4(W, block_size=Bk, double_quant=True, dq_block_size=Bk2)
    c = block_absmax(W, Bk)  # (nb,) the exact first-level scales
    c_hat = t.block_scales().astype(np.float64)  # (nb,) rebuilt from 8 bits
    c1 = per_number(t.absmax_scale.astype(np.float64), Bk2, c.size)  # (nb,) each scale's second-level constant
    scale_err = np.abs(c_hat - c)
    assert np.all(scale_err <= c1 / 254 * (1 + REL) + REL * np.abs(c) + TINY), f"max scale err {scale_err.max():.3g}"
    err = np.abs(t.dequantize().astype(np.float64).reshape(-1) - W.reshape(-1))
    bound = per_number(HALF_MAX_GAP * c + scale_err + REL * (c + np.abs(c_hat)), Bk, W.size) + TINY
    assert np.all(err <= bound), f"max err / bound {np.max(err / bound):.6g}"


@given(weights(), block_sizes)
def test_codes_are_the_nearest_codebook_values_by_brute_force(W, Bk):
    # An independent reference: argmin over all 16 distances, against the stored float32 scale.
    t = quantize_nf4(W, block_size=Bk)
    c = per_number(block_absmax(W, Bk).astype(np.float32).astype(np.float64), Bk, W.size)
    x = W.reshape(-1) / np.where(c > 0, c, 1)  # (N,)
    dist = np.abs(x[:, None] - TABLE.astype(np.float64))  # (N, 16)
    codes = unpack_4bit(t.codes)[: W.size]
    # compare distances, not indices, so an exact tie cannot fail the check
    np.testing.assert_array_equal(dist[np.arange(W.size), codes], dist.min(axis=1))


def test_a_tie_goes_to_the_lower_value():
    lo, hi = TABLE[9].astype(np.float64), TABLE[10].astype(np.float64)
    W = np.array([1.0, (lo + hi) / 2, -1.0, -(lo + hi) / 2])  # absmax 1: the midpoints are met exactly
    codes = unpack_4bit(quantize_nf4(W, block_size=4).codes)
    assert list(codes) == [15, 9, 0, 5]  # 0.5·(q9 + q10) -> q9;  its negative, between q5 and q6 -> q5


@given(shapes, block_sizes, st.data())
def test_codebook_values_times_a_block_scale_round_trip_exactly(shape, Bk, data):
    N = math.prod(shape)
    nb = -(-N // Bk)
    idx = data.draw(hnp.arrays(np.int64, N, elements=st.integers(0, 15)))
    idx[::Bk] = data.draw(hnp.arrays(np.int64, nb, elements=st.sampled_from([0, 15])))  # a ±1 in every block
    s = data.draw(hnp.arrays(np.float32, nb, elements=st.floats(2**-10, 2**10, width=32)))  # the block scales
    W = (TABLE[idx] * per_number(s, Bk, N)).reshape(shape)  # float32: code value · its block's scale
    t = quantize_nf4(W, block_size=Bk)
    np.testing.assert_array_equal(unpack_4bit(t.codes)[:N], idx)
    np.testing.assert_array_equal(t.absmax, s)
    assert np.array_equal(t.dequantize(), W)  # bit for bit


# ----- packing, padding, zeros, dtypes ---------------------------------------------------------------


@given(hnp.arrays(np.uint8, st.integers(0, 40).map(lambda m: 2 * m), elements=st.integers(0, 15)))
def test_packing_round_trips(codes):
    packed = pack_4bit(codes)
    assert packed.dtype == np.uint8 and packed.shape == (codes.size // 2,)
    np.testing.assert_array_equal(unpack_4bit(packed), codes)


def test_packing_puts_the_first_code_in_the_high_nibble():
    assert list(pack_4bit(np.array([1, 2, 15, 0]))) == [0x12, 0xF0]


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (7, 13), (65,), (2, 3, 11), (4, 4, 4, 2)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_shapes_not_divisible_by_the_block_size(shape, double_quant):
    W = np.random.default_rng(0).normal(0, 0.02, shape)
    t = quantize_nf4(W, double_quant=double_quant)
    nb = -(-W.size // 64)
    assert t.shape == shape and t.size == W.size and t.n_blocks == nb
    assert t.codes.shape == (nb * 32,)  # padded to whole blocks, two codes a byte
    W_hat = t.dequantize()
    assert W_hat.shape == shape and W_hat.dtype == np.float32
    assert np.max(np.abs(W_hat - W)) <= HALF_MAX_GAP * np.abs(W).max() * 1.01


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_come_back_exactly_zero_without_dividing_by_zero(double_quant):
    W = np.random.default_rng(1).normal(0, 1.0, (10, 64))
    W[[0, 3, 4, 9]] = 0.0  # four whole blocks of zeros among six others
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn
        t = quantize_nf4(W, block_size=64, double_quant=double_quant, dq_block_size=4)
        W_hat = t.dequantize()
        zeros = quantize_nf4(np.zeros((3, 7)), double_quant=double_quant).dequantize()
    assert np.all(W_hat[[0, 3, 4, 9]] == 0.0)
    assert np.all(np.count_nonzero(W_hat[[1, 2, 5, 6, 7, 8]], axis=1) > 0)
    assert np.all(zeros == 0.0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dequantize_returns_the_compute_dtype(dtype):
    W = np.random.default_rng(2).normal(0, 0.02, (5, 70)).astype(np.float16)  # a float16 weight is fine too
    t = quantize_nf4(W, dtype=dtype)
    assert t.dtype == np.dtype(dtype) and t.dequantize().dtype == np.dtype(dtype)
    assert quantize_nf4(W).dequantize().dtype == np.float32  # float32 by default


def test_a_single_block_double_quantizes_exactly():
    # one scale: it is its own mean, so c2 - mean = 0 and ĉ2 = mean = c2
    W = np.random.default_rng(3).normal(0, 0.02, 64)
    np.testing.assert_array_equal(quantize_nf4(W, double_quant=True).dequantize(), quantize_nf4(W).dequantize())


def test_storage_is_read_only():
    t = quantize_nf4(np.ones((4, 64)), double_quant=True)
    for a in (t.codes, t.absmax, t.absmax_scale):
        assert not a.flags.writeable


# ----- bytes ---------------------------------------------------------------------------------------


def test_bits_per_parameter_are_the_papers_numbers():
    # QLoRA Section 3: constants cost 32/64 = 0.5 bits, or 8/64 + 32/(64·256) = 0.127 with DQ: 0.373 saved
    assert nf4_bits_per_parameter() == 4.5
    assert nf4_bits_per_parameter(double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert round(nf4_bits_per_parameter(double_quant=True) - 4, 3) == 0.127
    assert round(nf4_bits_per_parameter() - nf4_bits_per_parameter(double_quant=True), 3) == 0.373
    assert nf4_bits_per_parameter(block_size=128, double_quant=True, dq_block_size=64) == 4 + 8 / 128 + 32 / 8192


@given(weights(), block_sizes, st.booleans(), st.integers(1, 5))
def test_nbytes_is_the_storage_and_matches_bits_per_parameter_up_to_padding(W, Bk, double_quant, Bk2):
    t = quantize_nf4(W, block_size=Bk, double_quant=double_quant, dq_block_size=Bk2)
    nb = -(-W.size // Bk)
    n_padded = nb * Bk  # the formula counts the padded numbers
    bits = nf4_bits_per_parameter(Bk, double_quant, Bk2)
    if not double_quant:
        assert t.nbytes == t.codes.nbytes + t.absmax.nbytes
        assert 8 * t.nbytes == pytest.approx(bits * n_padded, rel=1e-12)
    else:
        assert t.absmax.dtype == np.int8 and t.absmax_scale.dtype == np.float32
        assert t.nbytes == t.codes.nbytes + t.absmax.nbytes + t.absmax_scale.nbytes + 4  # + the float32 mean
        nb2 = -(-nb // Bk2)
        # exact, once the last 256-block of scales is counted whole and the mean is added
        assert 8 * t.nbytes == pytest.approx((4 + 8 / Bk) * n_padded + 32 * nb2 + 32, rel=1e-12)
        if nb % Bk2 == 0:
            assert 8 * t.nbytes == pytest.approx(bits * n_padded + 32, rel=1e-12)


def test_nbytes_of_a_gpt2_sized_matrix():
    t, tq = quantize_nf4(np.zeros((768, 768))), quantize_nf4(np.zeros((768, 768)), double_quant=True)
    assert t.nbytes == 768 * 768 * 4.5 / 8 == 331776  # vs 1,179,648 bytes in fp16
    assert tq.nbytes == 768 * 768 // 2 + 9216 + 4 * 36 + 4 == 304276


def test_quantization_is_deterministic_and_leaves_W_alone():
    W = np.random.default_rng(4).normal(0, 0.02, (33, 77))
    W_copy = W.copy()
    a, b = quantize_nf4(W, double_quant=True), quantize_nf4(W, double_quant=True)
    assert np.array_equal(W, W_copy)
    for name in ("codes", "absmax", "absmax_scale"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.absmax_mean == b.absmax_mean
    assert a.dequantize().tobytes() == b.dequantize().tobytes()


def test_repr_names_the_layout():
    r = repr(quantize_nf4(np.ones((2, 64)), double_quant=True))
    assert r.startswith("NF4Tensor(shape=(2, 64), dtype=float32, block_size=64, double_quant=True")
    assert isinstance(quantize_nf4(np.ones(2), block_size=2), NF4Tensor)


# ----- NF4 against a uniform 4-bit grid, on a normal weight ------------------------------------------


def uniform_blockwise(W, levels, Bk=64):
    """Block-wise absmax quantization to `levels`, evenly spaced in [-1, 1]: nearest by rounding."""
    w = W.reshape(-1, Bk)  # (nb, Bk)
    c = np.abs(w).max(axis=1, keepdims=True)  # (nb, 1)
    step = 2 / (len(levels) - 1)
    idx = np.clip(np.round((w / c + 1) / step), 0, len(levels) - 1).astype(int)
    return (levels[idx] * c).reshape(W.shape)


def test_nf4_beats_a_uniform_4bit_grid_on_normal_weights():
    # The paper's argument: weights are ~N(0, σ²), so levels placed at normal quantiles, dense near 0,
    # waste less than evenly spaced ones. A GPT-2 sized matrix with GPT-2's init σ = 0.02.
    W = np.random.default_rng(0).normal(0, 0.02, (768, 768))
    e_nf4 = rel_frobenius(quantize_nf4(W).dequantize(), W)
    e_dq = rel_frobenius(quantize_nf4(W, double_quant=True).dequantize(), W)
    e_uniform = rel_frobenius(uniform_blockwise(W, np.linspace(-1, 1, 16)), W)  # 16 levels, no exact 0
    e_int4 = rel_frobenius(uniform_blockwise(W, np.arange(-7, 8) / 7), W)  # 15 levels, eq. (1) with 7
    print(f"\nrelative Frobenius error, (768, 768) N(0, 0.02²), blocks of 64: NF4 {e_nf4:.5f}, "
          f"NF4+DQ {e_dq:.5f}, uniform 16 levels {e_uniform:.5f}, Int4 (15 levels) {e_int4:.5f}")
    assert e_nf4 < e_uniform < e_int4
    assert e_nf4 <= e_dq < 1.001 * e_nf4  # Int8 second level: +0.01% here, well under 0.1%
    # the numbers quoted in lora_np/nf4.py's docstring
    assert abs(e_nf4 - 0.09193) < 5e-5 and abs(e_dq - 0.09194) < 5e-5 and abs(e_uniform - 0.1007) < 5e-5


# ----- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"W": [[0.1, 0.2]]}, TypeError, r"W must be a np\.ndarray of floats, got list"),
        ({"W": np.arange(4)}, TypeError, r"W must be a floating-point np\.ndarray .* got dtype int64"),
        ({"W": np.zeros((0, 3))}, ValueError, r"W must hold at least one number, got an empty array of shape \(0, 3\)"),
        ({"W": np.array([[0.0, 1.0, np.nan]])}, ValueError, r"W must be finite, got 1 NaN/inf .* index \(0, 2\): nan"),
        ({"W": np.array([np.inf, -np.inf])}, ValueError, r"W must be finite, got 2 NaN/inf"),
        ({"W": np.array([1e39])}, ValueError, r"W's largest magnitude 1e\+39 does not fit the float32 block scales"),
        ({"block_size": 0}, ValueError, r"block_size must be an int >= 1, got 0"),
        ({"block_size": -64}, ValueError, r"block_size must be an int >= 1, got -64"),
        ({"block_size": 63}, ValueError, r"block_size must be a positive even int .* such as 64, got 63"),
        ({"block_size": 64.0}, TypeError, r"block_size must be an int, got 64\.0"),
        ({"block_size": True}, TypeError, r"block_size must be an int, got True"),
        ({"double_quant": 1}, TypeError, r"double_quant must be True or False, got 1 \(int\)"),
        ({"double_quant": True, "dq_block_size": 0}, ValueError, r"dq_block_size must be an int >= 1, got 0"),
        ({"dtype": "int32"}, TypeError, r"dtype must be a floating-point dtype .* got 'int32'"),
        ({"dtype": "bfloat16"}, TypeError, r"dtype must be a floating-point dtype .* got 'bfloat16'"),
    ],
)
def test_quantize_refuses_bad_arguments(kwargs, error, match):
    kwargs = {"W": np.ones((2, 64)), **kwargs}
    with pytest.raises(error, match=match):
        quantize_nf4(**kwargs)


def test_bits_per_parameter_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"block_size must be a positive even int .* got 3"):
        nf4_bits_per_parameter(3)
    with pytest.raises(TypeError, match=r"double_quant must be True or False, got None"):
        nf4_bits_per_parameter(64, None)
    with pytest.raises(ValueError, match=r"dq_block_size must be an int >= 1, got 0"):
        nf4_bits_per_parameter(64, True, 0)


def test_packing_refuses_bad_codes():
    with pytest.raises(ValueError, match=r"codes must be a 1-D array of even length, got shape \(3,\)"):
        pack_4bit(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\], got values from 0 to 16"):
        pack_4bit(np.array([0, 16]))
    with pytest.raises(ValueError, match=r"packed must be a 1-D uint8 array, got dtype int64"):
        unpack_4bit(np.array([1, 2]))
