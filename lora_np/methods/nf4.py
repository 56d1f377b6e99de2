"""QLoRA's frozen base weight in 4-bit NormalFloat (NF4), with optional Double Quantization.

QLoRA (Dettmers et al., 2023) trains LoRA adapters on a base model whose frozen weights are stored
in 4 bits and dequantized to a compute dtype whenever they are used (Section 3, eqs. 5 and 6):

    Y = X · doubleDequant(c1, c2, W_NF4) + X · L1 · L2

Only the storage changes; LoRA itself does not. This module is the storage: quantize a weight to
NF4, dequantize it back, and count the bytes it really takes. Blocks run over the weight flattened
in C order, so for a lora_np W (d_out, d_in) a block is 64 consecutive numbers of one row, as for
a PyTorch nn.Linear weight (out, in) in bitsandbytes.

Dimension legend: N numbers in the weight (W.size), Bk the block size (the paper's B, 64),
nb = ceil(N / Bk) blocks, Bk2 the second-level block size (256), nb2 = ceil(nb / Bk2).

1. Block-wise absmax quantization (Section 2, "Block-wise k-bit Quantization", eq. 1). Flatten W,
   slice it into nb contiguous blocks of Bk numbers (the last one padded with zeros), and divide
   each block by its absolute maximum, so every number lands in [-1, 1]. The paper writes the
   constant as c = 127 / absmax for Int8; like bitsandbytes we store the absmax itself, as float32
   (the paper's c2^FP32).
2. The NF4 codebook (Section 3, "4-bit NormalFloat Quantization", eq. 4). Weights are roughly
   N(0, σ²), so after step 1 every block follows (nearly) the same distribution, and a fixed data
   type can give each of its 16 values an equal share of probability: quantiles of N(0, 1).
   To hold an exact zero and still use all 16 codes, the type is asymmetric: 2^{k-1} = 8 quantile
   levels for the negative half and 2^{k-1} + 1 = 9 for the positive half, each set including
   0, merged with one of the two zeros removed (7 negative + 0 + 8 positive), normalized to [-1, 1].
   Each number is then stored as the 4-bit index of its NEAREST codebook value.
3. Double Quantization (Section 3, "Double Quantization"). The nb float32 absmax values cost
   32/64 = 0.5 bits per parameter; quantizing them to 8 bits in blocks of 256, after subtracting
   their mean (they are all positive; centred, a symmetric 8-bit type fits them), costs
   8/64 + 32/(64·256) = 0.127 bits (the paper's numbers, checked by nf4_bits_per_parameter).

Where the offset comes from. Eq. (4) reads q_i = ½(Q_X(i/(2^k+1)) + Q_X((i+1)/(2^k+1))) for
i = 0 ... 2^k - 1: with k = 4 the probabilities run from 0/17 to 16/17. The bottom one gives
Q_X(0) = -∞, so q_0 = -∞ (the point of artidoro/qlora issue #94); the top one, Q_X(16/17) ≈ 1.565,
is finite. So the formula cannot give all 16 values as written. The reference implementation,
bitsandbytes' create_normal_map (bitsandbytes/functional.py), instead takes Q_X at evenly spaced
probabilities from 0.5 up to an `offset` < 1 (9 points for the positive half, 8 for the negative,
the point at 0.5 being the zero) and normalizes by the largest. Its default offset is 0.9677083.
For years the source gave no reason for it (bitsandbytes issues #440, #938 and #968 asked); its
docstring now says the default "was empirically optimized to minimize quantization error", and
gives no derivation. The number equals, to the 7 digits written there, the mean of 1 - 1/(2·15)
and 1 - 1/(2·16): the outermost level at the centre of the last of n equal-probability bins,
1 - 1/(2n), averaged over n = 15 (the nonzero values) and n = 16 (all values). (bitsandbytes'
estimate_quantiles, removed in bitsandbytes PR #1669 in 2025, used that centre-of-bin convention:
its default offset was 1/(2·num_quantiles).) That reading is ours, not the authors'. We derive it
and round it to those 7 digits, because the published values were computed with the rounded
number: with it our float64 codebook matches NF4_PUBLISHED to 1.1e-7 (the rest is bitsandbytes
computing the probabilities in float32), with the unrounded 0.96770833... to 1.9e-7.

Rounding to the nearest value: ties (a number exactly halfway between two codebook values) go to
the LOWER of the two, as bitsandbytes' CUDA kernel dQuantizeNF4 does (it tests x > midpoint).

Packing: two 4-bit codes per byte, the first of each pair in the high nibble, as bitsandbytes'
kernels pack them. Bk is even, so a byte never straddles two blocks.

The second-level (Double Quantization) type. The paper and bitsandbytes quantize the centred
absmax values with bitsandbytes' 8-bit dynamic (tree) float map, blockwise with 256 per block.
We use a simpler 8-bit type instead: the paper's own eq. (1), symmetric Int8 absmax quantization,
q = round(127 · (c2 - mean) / c1) with c1 = max |c2 - mean| over the 256-block. torchao's
NF4Tensor.double_quantize_scalers is close but not the same: it scales by 256 / (2·c1) = 128 / c1
and clamps to [-128, 127] (a centred scale of +c1 would be 128, and is clamped to 127). Why ours:
it is one line the reader already knows from eq. (1), the centred scales are confined to a
narrow range where a uniform grid is adequate, and the storage is the same 8 bits. Its cost,
measured in tests/test_nf4.py on a (768, 768) N(0, 0.02²) matrix: the relative Frobenius error
goes from 0.09193 (NF4) to 0.09194 (NF4 + DQ), +0.01%; each scale is off by at most half an Int8
step, c1 / 254. (For comparison, 16 evenly spaced levels in [-1, 1] on the same
blocks give 0.1007: NF4's levels, dense near 0, suit normal weights better, the paper's argument.)

References
- Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
  arXiv:2305.14314: Section 2 (eq. 1, block-wise quantization), Section 3 ("4-bit NormalFloat
  Quantization", eq. 4; "Double Quantization"; eqs. 5 and 6), Appendix E (the NF4 values).
- bitsandbytes, bitsandbytes/functional.py: create_normal_map (the construction and its offset),
  get_4bit_type("nf4") (the published values), quantize_4bit (mean subtracted before the second
  quantization, blocksize 256); csrc/kernels.cu: dQuantizeNF4 (midpoint thresholds, ties to the
  lower value) and the nibble order.
- bitsandbytes issues #440, #938, #968 (the offset asked about); PR #1669 (2025, removed
  estimate_quantiles). artidoro/qlora issue #94 (q_0 = -∞ in eq. 4).
- torchao, torchao/dtypes/nf4tensor.py, NF4Tensor.double_quantize_scalers: Int8 for the second
  level, scaled by 256 / (2·absmax) and clamped to [-128, 127].
"""

import math
from statistics import NormalDist

import numpy as np

from ..core.config import Extension, check_int
from ..core.lora import init_lora, register
from ..core.params import QUANTIZABLE

K_BITS = 4  # k in the paper: NF4 is NFk with k = 4, 2^k = 16 values

# bitsandbytes' create_normal_map(offset=0.9677083): the probability of the outermost level.
# Derived (see the module docstring) as the mean of 1 - 1/(2·15) and 1 - 1/(2·16) = 0.96770833...,
# rounded to the 7 decimals bitsandbytes writes, because its published values were computed with those.
NF4_OFFSET = round(((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2, 7)

# The 16 NF4 values as published: typed from bitsandbytes/functional.py, get_4bit_type("nf4"), the
# values the QLoRA paper lists in Appendix E (Section 3: "The exact values ... in Appendix E"). float32 numbers.
NF4_PUBLISHED = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_INT8_MAX = 127  # the symmetric Int8 grid of the second level: -127..127, as eq. (1)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def nf4_codebook():
    """The 16 NF4 values, computed from their definition (QLoRA Section 3; bitsandbytes create_normal_map).

        positive half:  Q_X(p) at 2^{k-1} + 1 = 9 evenly spaced p from 0.5 to NF4_OFFSET (0, then 8 values)
        negative half: -Q_X(p) at 2^{k-1}     = 8 evenly spaced p from 0.5 to NF4_OFFSET (0, then 7 values)
        merge, drop one of the two zeros, sort, divide by the largest value

    Q_X is the quantile function of N(0, 1), statistics.NormalDist().inv_cdf. Both halves end at
    ±Q_X(NF4_OFFSET), so the normalized values run from exactly -1 to exactly 1.

    Returns:
    - (16,) float64, sorted ascending, with exactly one 0
    """
    Q = NormalDist().inv_cdf  # Q_X, the quantile function of the standard normal
    p_pos = np.linspace(0.5, NF4_OFFSET, 2 ** (K_BITS - 1) + 1)  # (9,) p = 0.5 gives Q_X = 0
    p_neg = np.linspace(0.5, NF4_OFFSET, 2 ** (K_BITS - 1))  # (8,)
    positive = [Q(p) for p in p_pos]  # 0 and 8 positive levels
    negative = [-Q(p) for p in p_neg[1:]]  # 7 negative levels: its zero is the one removed
    values = np.sort(np.array(negative + positive))  # (16,)
    return values / values[-1]  # normalize into [-1, 1]


# The table the tensors use: float32, as bitsandbytes stores the data type. Codes index into it.
_TABLE = nf4_codebook().astype(np.float32)  # (16,)
# Decision thresholds: midpoints between neighbours, in float64. Code = number of midpoints strictly
# below x, so x exactly on a midpoint gets the lower value (bitsandbytes' dQuantizeNF4 tests x > t).
_MIDPOINTS = (_TABLE[:-1].astype(np.float64) + _TABLE[1:].astype(np.float64)) / 2  # (15,)


# ----------------------------------------------------------------------------
# argument checks


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _check_block_size(value, name="block_size"):
    value = check_int(name, value, minimum=1)
    if value % 2 != 0:
        raise ValueError(
            f"{name} must be a positive even int (two 4-bit codes share a byte, and a byte must not "
            f"straddle two blocks), such as 64, got {value}"
        )
    return value


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f":
        raise TypeError(f"dtype must be a floating-point dtype such as 'float32' or 'float64', got {dtype!r}")
    return dt


def _check_weight(W):
    if not isinstance(W, np.ndarray):
        raise TypeError(f"W must be a np.ndarray of floats, got {type(W).__name__}")
    if W.dtype.kind != "f":
        raise TypeError(f"W must be a floating-point np.ndarray (float16, float32 or float64), got dtype {W.dtype}")
    if W.size == 0:
        raise ValueError(f"W must hold at least one number, got an empty array of shape {W.shape}")
    finite = np.isfinite(W)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"W must be finite, got {int((~finite).sum())} NaN/inf value(s) in shape {W.shape}, "
            f"the first at index {where}: {float(W[where])!r}"
        )
    largest = float(np.abs(W).max())
    if largest > _FLOAT32_MAX:
        raise ValueError(
            f"W's largest magnitude {largest!r} does not fit the float32 block scales (at most {_FLOAT32_MAX!r})"
        )


# ----------------------------------------------------------------------------
# packing: two 4-bit codes per byte


def pack_4bit(codes):
    """Pack 4-bit codes two to a byte: the first of each pair in the high nibble (bitsandbytes' order).

    Inputs:
    - codes: (2·M,) integers in [0, 15]

    Returns:
    - (M,) uint8, byte j = codes[2j] << 4 | codes[2j + 1]
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.size % 2 != 0:
        raise ValueError(f"codes must be a 1-D array of even length, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"codes must lie in [0, 15], got values from {codes.min()} to {codes.max()}")
    pairs = codes.astype(np.uint8).reshape(-1, 2)  # (M, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed):
    """Inverse of pack_4bit.

    Inputs:
    - packed: (M,) uint8

    Returns:
    - (2·M,) uint8 codes in [0, 15]
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 array, got dtype {packed.dtype} and shape {packed.shape}")
    codes = np.empty((packed.size, 2), dtype=np.uint8)  # (M, 2)
    codes[:, 0] = packed >> 4  # high nibble: the first of the pair
    codes[:, 1] = packed & 0x0F
    return codes.reshape(-1)


# ----------------------------------------------------------------------------
# the quantized tensor


class NF4Tensor:
    """A weight stored as NF4: packed 4-bit codes and one scale per block of Bk numbers.

    Build one with quantize_nf4. Arrays are stored read-only: a frozen weight stays frozen.

    Attributes (the storage, all counted by nbytes):
    - codes: (nb·Bk / 2,) uint8, two codes a byte; the last block is padded with zeros (code of 0.0)
    - absmax: the first-level scales c2, one a block:
        double_quant=False: (nb,) float32, each block's max |w|
        double_quant=True:  (nb,) int8, round(127 · (c2 - absmax_mean) / absmax_scale)
    - absmax_scale: (nb2,) float32, the second-level constants c1 (max |c2 - mean| per Bk2 block), or None
    - absmax_mean: float32, the mean of c2 subtracted before the second quantization, or None
    And the description:
    - shape: tuple, the weight's shape; dtype: np.dtype, the compute dtype dequantize returns
    - block_size (Bk), double_quant, dq_block_size (Bk2)
    """

    def __init__(self, codes, absmax, shape, dtype, block_size, double_quant=False, absmax_scale=None,
                 absmax_mean=None, dq_block_size=256):
        self.codes = codes
        self.absmax = absmax
        self.absmax_scale = absmax_scale
        self.absmax_mean = absmax_mean
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.double_quant = double_quant
        self.dq_block_size = dq_block_size
        for a in (codes, absmax, absmax_scale):
            if a is not None:
                a.setflags(write=False)

    @property
    def size(self):
        """N, the numbers in the weight (padding excluded)."""
        return math.prod(self.shape)

    @property
    def n_blocks(self):
        """nb = ceil(N / Bk)."""
        return self.absmax.size

    @property
    def nbytes(self):
        """Bytes the quantized storage takes: codes + scales (+ second-level scales and the mean).

            no DQ:  nb·Bk/2 + 4·nb                   = nb·Bk · (4 + 32/Bk) / 8
            DQ:     nb·Bk/2 + nb + 4·nb2 + 4         ≈ nb·Bk · (4 + 8/Bk + 32/(Bk·Bk2)) / 8 + 4

        The paper's per-parameter formula (nf4_bits_per_parameter) leaves out the padding of the last
        block, the padding of the last 256-block of scales, and the one float32 mean per tensor.
        """
        total = self.codes.nbytes + self.absmax.nbytes
        if self.double_quant:
            total += self.absmax_scale.nbytes + np.dtype(np.float32).itemsize  # c1, and the mean
        return int(total)

    def block_scales(self):
        """The per-block scales dequantize multiplies by: c2, or c2 rebuilt from its 8-bit form.

            double_quant=False: c2 (stored as is)
            double_quant=True:  ĉ2 = mean + q · c1 / 127    (eq. 1's dequantization, plus the mean back)

        Returns:
        - (nb,) float32
        """
        if not self.double_quant:
            return self.absmax
        nb, Bk2 = self.absmax.size, self.dq_block_size
        c1 = np.repeat(self.absmax_scale.astype(np.float64), Bk2)[:nb]  # (nb,) each scale's c1
        c2 = float(self.absmax_mean) + self.absmax.astype(np.float64) * c1 / _INT8_MAX  # (nb,)
        return c2.astype(np.float32)

    def dequantize(self):
        """The weight back in the compute dtype: w = q_code · c2 per block (the paper's doubleDequant, eq. 6).

        Returns:
        - ndarray of shape self.shape and dtype self.dtype
        """
        Bk = self.block_size
        codes = unpack_4bit(self.codes).reshape(-1, Bk)  # (nb, Bk)
        # float32 at least: the table and scales are float32; a float16 result is rounded only at the end
        ct = np.result_type(self.dtype, np.float32)
        w = _TABLE[codes].astype(ct) * self.block_scales().astype(ct)[:, None]  # (nb, Bk)
        return w.reshape(-1)[: self.size].reshape(self.shape).astype(self.dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        """np.asarray(weight): the dequantized weight. This is all the model's layers ask of a weight
        (lora_np.core.params.is_stored_weight), so they run on a 4-bit base without knowing its format."""
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype, copy=False)

    def __repr__(self):
        dq = f", dq_block_size={self.dq_block_size}" if self.double_quant else ""
        return (
            f"NF4Tensor(shape={self.shape}, dtype={self.dtype}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}{dq}, nbytes={self.nbytes})"
        )


def _double_quantize(c2, Bk2):
    """Quantize the positive scales c2 (nb,) to Int8 in blocks of Bk2, after subtracting their mean.

    Returns:
    - q: (nb,) int8;  c1: (nb2,) float32;  mean: float32
    """
    nb = c2.size
    mean = np.float32(c2.mean(dtype=np.float64))  # centre them: symmetric quantization (Section 3, DQ)
    centred = np.zeros(-(-nb // Bk2) * Bk2)  # (nb2·Bk2,) zero padded, like the first level
    centred[:nb] = c2.astype(np.float64) - float(mean)
    blocks = centred.reshape(-1, Bk2)  # (nb2, Bk2)
    c1 = np.abs(blocks).max(axis=1).astype(np.float32)  # (nb2,) the second-level constants
    divisor = np.where(c1 > 0, c1, 1).astype(np.float64)[:, None]  # equal scales: c1 = 0, q = 0, no 0/0
    # eq. (1): round(127 · x / absmax(x)); np.round sends exact halves to the even integer
    q = np.clip(np.round(_INT8_MAX * blocks / divisor), -_INT8_MAX, _INT8_MAX)  # (nb2, Bk2)
    return q.astype(np.int8).reshape(-1)[:nb], c1, mean


def quantize_nf4(W, block_size=64, double_quant=False, *, dq_block_size=256, dtype=np.float32):
    """Store W as NF4: per block of block_size numbers, w / absmax rounded to the nearest NF4 value.

        c2_b   = max_{i in block b} |w_i|                      (float32; an all-zero block keeps c2 = 0)
        code_i = argmin_j |w_i / c2_b - q_j|                    (q the NF4 codebook; ties to the lower q_j)
        ŵ_i    = q_{code_i} · c2_b                               (NF4Tensor.dequantize)

    An all-zero block is divided by 1 instead of 0: its numbers get the code of 0.0 and come back as
    exactly 0. With double_quant=True the c2 are then quantized to Int8 in blocks of dq_block_size
    after subtracting their mean (see the module docstring for why Int8 and not bitsandbytes' 8-bit
    dynamic float); the codes are those computed with the exact c2, as in bitsandbytes.

    Inputs:
    - W: floating-point np.ndarray of any shape, finite, |w| within float32's range
    - block_size: positive even int, 64 in QLoRA
    - double_quant: bool
    - dq_block_size: int >= 1, 256 in QLoRA (keyword only)
    - dtype: the compute dtype dequantize returns, float32 by default (keyword only; QLoRA uses bfloat16,
      which NumPy lacks)

    Returns:
    - NF4Tensor
    """
    _check_weight(W)
    Bk = _check_block_size(block_size)
    _check_bool("double_quant", double_quant)
    Bk2 = check_int("dq_block_size", dq_block_size, minimum=1)
    dt = _check_dtype(dtype)

    N = W.size
    nb = -(-N // Bk)  # ceil(N / Bk)
    w = np.zeros(nb * Bk)  # (nb·Bk,) float64; the padding is 0, which NF4 holds exactly
    w[:N] = W.reshape(-1)
    blocks = w.reshape(nb, Bk)  # (nb, Bk)
    c2 = np.abs(blocks).max(axis=1).astype(np.float32)  # (nb,) stored as float32, the paper's c2^FP32
    # Divide by the stored float32 scale, the one dequantize multiplies by; 1 for an all-zero block.
    divisor = np.where(c2 > 0, c2, 1).astype(np.float64)[:, None]  # (nb, 1)
    x = blocks / divisor  # (nb, Bk) in [-1, 1] (a hair beyond when float32 rounded c2 down)
    codes = np.searchsorted(_MIDPOINTS, x, side="left").astype(np.uint8)  # (nb, Bk) nearest value
    packed = pack_4bit(codes.reshape(-1))  # (nb·Bk/2,)

    if not double_quant:
        return NF4Tensor(packed, c2, W.shape, dt, Bk, dq_block_size=Bk2)
    q, c1, mean = _double_quantize(c2, Bk2)
    return NF4Tensor(packed, q, W.shape, dt, Bk, double_quant=True, absmax_scale=c1, absmax_mean=mean,
                     dq_block_size=Bk2)


def nf4_bits_per_parameter(block_size=64, double_quant=False, dq_block_size=256):
    """Storage bits per weight number, the paper's Section 3 count (padding and the mean left out).

        no DQ:  4 + 32/Bk                   = 4.5     for Bk = 64
        DQ:     4 + 8/Bk + 32/(Bk·Bk2)      ≈ 4.127   for Bk = 64, Bk2 = 256

    (QLoRA Section 3: the constants cost 32/64 = 0.5 bits without, 8/64 + 32/(64·256) = 0.127 with
    Double Quantization, a saving of 0.373 bits per parameter.)

    Inputs:
    - block_size: positive even int (Bk)
    - double_quant: bool
    - dq_block_size: int >= 1 (Bk2), used only with double_quant

    Returns:
    - float
    """
    Bk = _check_block_size(block_size)
    _check_bool("double_quant", double_quant)
    Bk2 = check_int("dq_block_size", dq_block_size, minimum=1)
    if not double_quant:
        return K_BITS + 32 / Bk
    return K_BITS + 8 / Bk + 32 / (Bk * Bk2)


# ----------------------------------------------------------------------------
# QLoRA's base in LoraConfig (base_quant="nf4"): the core's seam on the configuration's side


def quantize_base(params, lora):
    """A Params whose blocks' linear weights are NF4Tensors (QLoRA's base); everything else shared."""
    out = params.copy()
    for name in params:
        if name.rsplit(".", 1)[-1] in QUANTIZABLE:
            out[name] = quantize_nf4(params[name], double_quant=lora.double_quant, dtype=params[name].dtype)
    return out


def nf4_start(params, lora, seed):
    """QLoRA's start: LoRA's A and B = 0, on a 4-bit copy of the base."""
    adapters = {k: v.astype(params["W_e"].dtype) for k, v in init_lora(params.config, lora, seed).items()}
    return quantize_base(params, lora), adapters


def _check_config(cfg):
    if not isinstance(cfg.double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {cfg.double_quant!r}")
    if cfg.base_quant is not None and (cfg.method != "lora" or cfg.init == "pissa"):
        raise ValueError("base_quant='nf4' (QLoRA) quantizes the base under plain LoRA: method='lora', init "
                         f"'gaussian' or 'kaiming'; got method={cfg.method!r}, init={cfg.init!r}")  # fmt: skip
    if cfg.double_quant and cfg.base_quant is None:
        raise ValueError("double_quant quantizes the scales of an nf4 base: set base_quant='nf4' too")


register("nf4", Extension(base_quants=("nf4",), check=_check_config, start=nf4_start))
