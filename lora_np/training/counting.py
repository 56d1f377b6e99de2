"""Counting parameters and bytes: formulas, and the arrays of a real lora_np model to check them by.

Dimension legend: L layers, D model width (the paper's d_model), M MLP width (the paper's d_ffn),
V vocabulary, T context length, r rank, d_in / d_out a weight's input / output width.

The one equation behind all of LoRA's savings (paper Section 4.1): a weight W0 of shape
(d_out, d_in) has d_out·d_in numbers; its update ΔW = B·A with B (d_out, r) and A (r, d_in) has

    r·d_in + d_out·r = r·(d_in + d_out)

Summed over L layers and the adapted matrices, this is the paper's |Θ| = 2·L̂_LoRA·d_model·r
(Section 5.1) when every adapted matrix is square (D, D). The same section counts its adapter
baselines as |Θ| = L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model (adapter_params).

Three kinds of function live here:
- formulas from shapes alone: weight_params, lora_params, block_shapes, lora_transformer_params,
  adapter_params (the paper's adapter baselines), gpt_params, and config_params /
  config_lora_params for a lora_np ModelConfig / LoraConfig;
- count_arrays, which counts the numbers actually held by a Params or adapter dict, so the
  formulas can be checked against a real model (tests/test_counting.py does, over many configs);
- memory: checkpoint_bytes at a dtype's width, adam_state_numbers (Adam keeps two moments, m and v,
  for every trainable number) and adam_state_bytes.

Everything returns a Python int, which cannot overflow: GPT-3's counts pass 2**32.
"""

import os
from collections.abc import Mapping

import numpy as np

from ..core.config import LoraConfig, ModelConfig, check_int
from ..methods.nf4 import nf4_bits_per_parameter

# Published shapes of the models the paper adapts: only what the counts need. d_mlp is 4·d_model
# for all of them (the paper's convention d_ffn = 4 × d_model, Section 1, which each model's own
# config also has). Sources, also cited in notebooks/01_parameter_counts.ipynb:
#   GPT-2: Radford et al. 2019, Table 2 (layers, d_model) and Section 2.3 (V = 50,257, T = 1024).
#   GPT-3 175B: Brown et al. 2020, Table 2.1 (96 layers, d_model = 12,288) and Section 2.1
#   (d_ff = 4·d_model, n_ctx = 2048, GPT-2's architecture and tokenizer).
#   RoBERTa: Liu et al. 2019; the released configs (roberta-base 12 x 768, roberta-large 24 x 1024).
#   DeBERTa XXL: He et al. 2021, Section 5.3 ("48 layers with a hidden size of 1,536"); the released
#   deberta-v2-xxlarge config (intermediate_size 6144).
PAPER_MODELS = {
    "GPT-2 Medium": {"n_layers": 24, "d_model": 1024, "d_mlp": 4096, "vocab_size": 50257, "context_length": 1024},
    "GPT-2 Large": {"n_layers": 36, "d_model": 1280, "d_mlp": 5120, "vocab_size": 50257, "context_length": 1024},
    "GPT-3 175B": {"n_layers": 96, "d_model": 12288, "d_mlp": 49152, "vocab_size": 50257, "context_length": 2048},
    "RoBERTa base": {"n_layers": 12, "d_model": 768, "d_mlp": 3072},
    "RoBERTa large": {"n_layers": 24, "d_model": 1024, "d_mlp": 4096},
    "DeBERTa XXL": {"n_layers": 48, "d_model": 1536, "d_mlp": 6144},
}


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def weight_params(d_out, d_in, bias=False):
    """Numbers in a linear layer's weight W (d_out, d_in), plus its bias b (d_out,) if bias=True.

        N = d_out·d_in  [+ d_out]

    Inputs:
    - d_out, d_in: int >= 1, the weight's output and input widths (the paper's d × k)
    - bias: bool

    Returns:
    - int
    """
    d_out, d_in = check_int("d_out", d_out), check_int("d_in", d_in)
    _check_bool("bias", bias)
    return d_out * d_in + (d_out if bias else 0)


def lora_params(d_out, d_in, r):
    """Numbers in one LoRA adapter on a weight (d_out, d_in): A (r, d_in) plus B (d_out, r).

        N = r·d_in + d_out·r = r·(d_in + d_out)

    Compared with the weight's d_out·d_in this is a fraction r·(d_in + d_out) / (d_out·d_in),
    which is 2r/d for a square (d, d) weight.

    Inputs:
    - d_out, d_in: int >= 1
    - r: int, 1 <= r <= min(d_out, d_in) (beyond that B·A cannot gain rank; lora_np refuses it too)

    Returns:
    - int
    """
    d_out, d_in, r = check_int("d_out", d_out), check_int("d_in", d_in), check_int("r", r)
    if r > min(d_out, d_in):
        raise ValueError(
            f"r must be between 1 and min(d_out, d_in) = {min(d_out, d_in)} for a weight of shape "
            f"(d_out, d_in) = {(d_out, d_in)}, got r={r}"
        )
    return r * (d_in + d_out)


def block_shapes(d_model, d_mlp):
    """(d_out, d_in) of the six linear weights of one transformer block, by lora_np's names.

    W_q, W_k, W_v, W_o: (D, D)   W_1: (M, D)   W_2: (D, M)

    These are the shapes for GPT-2/3, RoBERTa and DeBERTa alike (the paper treats each of W_q,
    W_k, W_v as one d_model × d_model matrix, Section 4.2). Pass a dict of your own to
    lora_transformer_params for anything else.
    """
    D, M = check_int("d_model", d_model), check_int("d_mlp", d_mlp)
    return {"W_q": (D, D), "W_k": (D, D), "W_v": (D, D), "W_o": (D, D), "W_1": (M, D), "W_2": (D, M)}


def check_shapes(shapes):
    """TypeError or ValueError unless `shapes` is a non-empty {name: (d_out, d_in)} of positive ints."""
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must be a dict name -> (d_out, d_in), got {type(shapes).__name__}")
    if not shapes:
        raise ValueError("shapes must hold at least one name -> (d_out, d_in), got an empty dict")
    for name, shape in shapes.items():
        if not (isinstance(shape, tuple) and len(shape) == 2):
            raise ValueError(f"shapes[{name!r}] must be a tuple (d_out, d_in), got {shape!r}")
        check_int(f"shapes[{name!r}][0] (d_out)", shape[0])
        check_int(f"shapes[{name!r}][1] (d_in)", shape[1])


def lora_transformer_params(n_layers, ranks, shapes):
    """Trainable numbers of LoRA on a whole transformer: every block adapts the same matrices.

        N = L · Σ_{name in ranks} r_name·(d_in + d_out)

    With one rank r on n square (D, D) matrices this is the paper's |Θ| = 2·L̂·D·r, L̂ = n·L.
    Different ranks per matrix express the paper's tables directly, e.g. GPT-3 175B with
    r_q = r_v = 8 (Table 4):

        lora_transformer_params(96, {"W_q": 8, "W_v": 8}, block_shapes(12288, 4 * 12288))

    Inputs:
    - n_layers: int >= 1, the L blocks each carrying the same adapters
    - ranks: non-empty dict name -> r, the adapted matrices and their ranks
    - shapes: dict name -> (d_out, d_in) holding at least every name in ranks (see block_shapes)

    Returns:
    - int
    """
    n_layers = check_int("n_layers", n_layers)
    check_shapes(shapes)
    if not isinstance(ranks, Mapping):
        raise TypeError(f"ranks must be a dict name -> rank, such as {{'W_q': 4, 'W_v': 4}}, got {ranks!r}")
    if not ranks:
        raise ValueError("ranks must name at least one adapted matrix, such as {'W_q': 4, 'W_v': 4}, got {}")
    per_block = 0
    for name, r in ranks.items():
        if name not in shapes:
            raise ValueError(f"ranks names {name!r}, which is not in shapes; shapes has {sorted(shapes)}")
        try:
            per_block += lora_params(*shapes[name], r)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ranks[{name!r}]: {e}") from None  # say which matrix the bad rank was for
    return n_layers * per_block


def adapter_params(n_adapter_layers, d_model, r, n_trainable_layernorms=0):
    """Trainable numbers of bottleneck adapters, by the LoRA paper's formula (Section 5.1):

        |Θ| = L̂_Adpt × (2·d_model·r + r + d_model) + 2·L̂_LN·d_model

    One adapter layer is two fully connected layers with biases and a nonlinearity between them,
    added to the residual stream: a down-projection W_down (r, D) with b_down (r,), then an
    up-projection W_up (D, r) with b_up (D,), so 2·D·r + r + D numbers; r is the bottleneck width.
    A trainable LayerNorm adds its gain and bias, 2·D.

    The paper's variants differ in L̂_Adpt (adapter layers) and L̂_LN (trained LayerNorms):
        AdapterH (Houlsby et al. 2019): two per block, after attention and after the MLP:
                  L̂_Adpt = 2·L. The paper counts no LayerNorm for it (its GPT-3 rows, Tables 4
                  and 15, come out exactly with L̂_LN = 0), although Houlsby et al. train them too.
        AdapterL (Lin et al. 2020): one per block, after the MLP and a LayerNorm: L̂_Adpt = L,
                  and its LayerNorms are the paper's example of L̂_LN.
        AdapterP (Pfeiffer et al. 2021): "very similar" to AdapterL.
        AdapterD (Rücklé et al. 2020, AdapterDrop): drops some adapter layers, so fewer than 2·L.

    Inputs:
    - n_adapter_layers: int >= 1, L̂_Adpt
    - d_model: int >= 1, D, the width each adapter reads and writes
    - r: int >= 1, the bottleneck width
    - n_trainable_layernorms: int >= 0, L̂_LN

    Returns:
    - int
    """
    n_adapter_layers, d_model = check_int("n_adapter_layers", n_adapter_layers), check_int("d_model", d_model)
    r = check_int("r", r)
    n_trainable_layernorms = check_int("n_trainable_layernorms", n_trainable_layernorms, minimum=0)
    return n_adapter_layers * (2 * d_model * r + r + d_model) + 2 * n_trainable_layernorms * d_model


def gpt_params(n_layers, d_model, d_mlp, vocab_size, context_length, tied_head=True):
    """Every parameter of a GPT-2 style decoder (learned positions, biases everywhere, LayerNorm).

        N = V·D + T·D                           token and position embeddings W_e, W_p
          + L·(4·D² + 4·D                       W_q, W_k, W_v, W_o and their biases
               + 2·D·M + M + D                  W_1 (M, D), W_2 (D, M) and their biases
               + 4·D)                           two LayerNorms, gamma and beta each
          + 2·D                                 final LayerNorm
          [+ V·D]                               the output head W_u, unless tied to W_e

    GPT-2 ties the head to the embedding (tied_head=True); lora_np's tiny GPT does not.

    Inputs:
    - n_layers, d_model, d_mlp, vocab_size, context_length: int >= 1 (L, D, M, V, T)
    - tied_head: bool

    Returns:
    - int
    """
    L, D = check_int("n_layers", n_layers), check_int("d_model", d_model)
    M, V = check_int("d_mlp", d_mlp), check_int("vocab_size", vocab_size)
    T = check_int("context_length", context_length)
    _check_bool("tied_head", tied_head)
    block = 4 * D * D + 4 * D + 2 * D * M + M + D + 4 * D
    return V * D + T * D + L * block + 2 * D + (0 if tied_head else V * D)


def config_params(cfg):
    """Every parameter of the lora_np model `cfg` describes, by formula (the head is untied)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    return gpt_params(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.context_length, tied_head=False)


def config_lora_params(cfg, lora):
    """Trainable numbers of the adapters `lora` puts on the lora_np model `cfg`, by formula
    (LoRA's A and B; method_params counts DoRA's and VeRA's too)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig, got {type(lora).__name__}")
    if lora.method != "lora":
        raise ValueError(f"config_lora_params counts LoRA's A and B; for method={lora.method!r} use method_params")
    ranks = dict.fromkeys(lora.targets, lora.r)
    return lora_transformer_params(cfg.n_layers, ranks, block_shapes(cfg.d_model, cfg.d_mlp))


def vera_params(d_out, d_in, r):
    """Trainable numbers of VeRA on one weight (d_out, d_in): the vectors lambda_d (r,) and lambda_b (d_out,).

        N = r + d_out          against LoRA's r·(d_in + d_out)

    The shared random A (r, d_in) and B (d_out, r) are frozen and, one pair per weight shape for
    the whole model, regenerated from a seed in VeRA's paper (Kopiczko et al. 2024, Section 3).
    """
    d_out, d_in, r = check_int("d_out", d_out), check_int("d_in", d_in), check_int("r", r)
    return r + d_out


def method_params(cfg, lora):
    """Trainable numbers of any method on the lora_np model `cfg`, by formula, per adapted weight:

        LoRA  r·(d_in + d_out)       DoRA  r·(d_in + d_out) + d_out (the magnitude m)
        VeRA  r + d_out              (PiSSA, LoRA+ and QLoRA train LoRA's A and B)
    """
    if not isinstance(cfg, ModelConfig) or not isinstance(lora, LoraConfig):
        raise TypeError("cfg must be a ModelConfig and lora a LoraConfig")
    total = 0
    for t in lora.targets:
        d_out, d_in = cfg.linear_shape(t)
        if lora.method == "vera":
            total += vera_params(d_out, d_in, lora.r)
        else:
            total += lora_params(d_out, d_in, lora.r) + (d_out if lora.method == "dora" else 0)
    return cfg.n_layers * total


def count_arrays(arrays):
    """The numbers a Params or adapter dict actually holds: Σ over its arrays of a.size.

    Inputs:
    - arrays: dict name -> np.ndarray (a Params, the dict init_lora returns, a gradient dict, ...)

    Returns:
    - int
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a dict name -> np.ndarray (a Params or adapters), got {type(arrays).__name__}")
    total = 0
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"arrays[{name!r}] must be a np.ndarray, got {type(a).__name__}")
        total += a.size
    return int(total)


def checkpoint_bytes(n_numbers, dtype="float16"):
    """Bytes needed to store n_numbers floats of `dtype`: n · itemsize (fp16: 2, fp32: 4, fp64: 8).

    Only the numbers: a real file adds names and headers, a few bytes per array.

    Inputs:
    - n_numbers: int >= 0
    - dtype: a floating-point dtype NumPy knows, e.g. "float16" (the paper's FP16), "float32", np.float64

    Returns:
    - int
    """
    n_numbers = check_int("n_numbers", n_numbers, minimum=0)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f":
        raise ValueError(
            f"dtype must be a floating-point dtype such as 'float16', 'float32' or 'float64', got {dtype!r}"
        )
    return n_numbers * dt.itemsize


def adam_state_numbers(n_trainable):
    """Numbers Adam (and AdamW) keeps besides the weights: two moments, m and v, per trainable number.

        N_state = 2 · n_trainable

    A frozen weight has no moments, which is where LoRA saves optimizer memory (Section 4.2).
    """
    return 2 * check_int("n_trainable", n_trainable, minimum=0)


def adam_state_bytes(n_trainable, dtype="float32"):
    """Bytes of Adam's two moments for n_trainable numbers, each stored as `dtype`."""
    return checkpoint_bytes(adam_state_numbers(n_trainable), dtype)


def nf4_base_bytes(cfg, double_quant=False, block_size=64):
    """Bytes of a lora_np model's base with its blocks' linear weights in NF4 (QLoRA), by formula:
    those weights at nf4_bits_per_parameter (4.5 bits, 4.127 with double quantization, Dettmers
    et al. 2023, Section 3), everything else (embeddings, head, biases, LayerNorms) in float32.
    Each weight is padded to whole blocks, as it is stored. With double quantization this is a
    lower bound by a few bytes a weight (a float32 mean, a last partial group of scales), which
    NF4Tensor.nbytes counts exactly."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    bits = nf4_bits_per_parameter(block_size, double_quant)
    linear = [d_out * d_in for d_out, d_in in block_shapes(cfg.d_model, cfg.d_mlp).values()]
    quantized = cfg.n_layers * sum(-(-n // block_size) * block_size for n in linear)  # padded to whole blocks
    rest = config_params(cfg) - cfg.n_layers * sum(linear)
    return int(round(quantized * bits / 8)) + 4 * rest


def train_step_bytes(cfg, n_trainable, batch_size, block_size, dtype="float32"):
    """Peak memory of one training step (forward, backward, AdamW update) beyond the frozen weights,
    by formula, to refuse a batch that cannot fit before it is tried. With N = B·T tokens in the batch
    and H heads, the numbers held at the peak (the end of the forward pass, when the cache is whole
    and the loss's three (N, V) arrays exist) are

        L·(N·(10·D + 3·M) + B·H·T²)     the cache of each block: the outputs of its two LayerNorms,
                                          q, k, v, attention's softmax (B, H, T, T), its output, the
                                          MLP's (N, M) input, tanh and GELU, the residual stream
      + 3·N·V                           logits, softmax probabilities, their gradient
      + 2·B·H·T² + N·(3·M + 6·D)        one block's backward temporaries
      + 3·n_trainable                   gradients, and AdamW's two moments

    times the dtype's width. LoRA's own activations (x·Aᵀ, r wide) are left out: r ≪ D. The formula
    is checked against tracemalloc on a small model (tests/test_counting.py) within a factor stated
    there; it is an estimate, meant to catch a batch 10 or 1000 times too large, not 10% too large.

    Inputs:
    - cfg: ModelConfig (D, M, L, H, V)
    - n_trainable: trained numbers (count_arrays of the adapters or the params)
    - batch_size, block_size: B and T
    - dtype: the compute dtype

    Returns:
    - int, bytes
    """
    B = check_int("batch_size", batch_size, minimum=1)
    T = check_int("block_size", block_size, minimum=1)
    D, M, L, H, V = cfg.d_model, cfg.d_mlp, cfg.n_layers, cfg.n_heads, cfg.vocab_size
    N = B * T
    numbers = L * (N * (10 * D + 3 * M) + B * H * T * T) + 3 * N * V
    numbers += 2 * B * H * T * T + N * (3 * M + 6 * D) + 3 * check_int("n_trainable", n_trainable, minimum=0)
    return numbers * np.dtype(dtype).itemsize


def available_bytes():
    """Memory the system can give without swapping: /proc/meminfo's MemAvailable (free memory plus
    the page cache it can reclaim), else free pages (os.sysconf SC_AVPHYS_PAGES); None if neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
