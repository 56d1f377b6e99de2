"""Serving many adapters in one batch, unmerged: the way around Section 4.2's limitation.

The paper (Section 4.2, "Practical Benefits and Limitations"): "it is not straightforward to
batch inputs to different tasks with different A and B in a single forward pass, if one chooses
to absorb A and B into W to eliminate additional inference latency. Though it is possible to not
merge the weights and dynamically choose the LoRA modules to use for samples in a batch for
scenarios where latency is not critical."

This module does the second: one frozen base W0, K adapters, and a batch whose row i uses
adapter k_i. For every adapted weight, in column form,

    h_i = W0·x_i + b + s_{k_i}·B_{k_i}·A_{k_i}·x_i

The frozen path W0·x is ONE product for the whole batch, whatever the tasks (the point of
serving many adapters on one base); only the r-wide LoRA path differs from row to row. Two ways
to batch that path, both here (`strategy`):

- "group" (the default): sort the rows by adapter and run each adapter once on its rows,
  (n_k·T, d_in) @ (d_in, r) then (n_k·T, r) @ (r, d_out). K pairs of products, no copy of any
  adapter. This is what PEFT's mixed-batch inference does (`adapter_names=` in its forward).
- "gather": copy each row's own A and B out of a stacked bank, (B, r, d_in) and (B, d_out, r),
  and run one batched product for all rows. On a GPU this becomes one kernel launch (the Punica
  paper's SGMV, segmented gather matrix-vector multiplication; S-LoRA has kernels of its own);
  in NumPy the gather copies B·r·(d_in + d_out) numbers per adapted weight per forward and the
  batched product loops over rows, so it is kept for comparison, not as the default.

A merged model cannot do this: W0 + s·B_k·A_k is one task's weight, so a mixed batch needs one
forward per task, each on its own rows, and one merged copy of the adapted weights per task
(`merged_forward`). `bench_serving` measures both.

Adapters may differ in rank and scaling (α, rsLoRA), as in S-LoRA's heterogeneous adapters: the
bank pads every A, B to the largest rank with zeros, which adds exactly nothing. They must share
targets (one layout for every adapter), be plain LoRA (DoRA's and VeRA's forward differ), and be
trained on W0 itself: PiSSA adapters belong to a residual base and QLoRA adapters to a 4-bit one.

Forward only: inference has no backward, no dropout and no cache.

Dimension legend: B batch (rows), T time, D model width, V vocabulary, K adapters in the bank,
n_k rows that use adapter k, r rank (r_max the bank's largest), d_in / d_out a weight's widths.

References
- Hu et al. 2021, "LoRA", arXiv:2106.09685v2, Section 4.2.
- Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv:2311.03285.
- Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547 (the SGMV kernel, the
  one the paper describes; the BGMV kernel exists only in Punica's code).
"""


import numpy as np

from ..core.config import LoraConfig
from ..core.layers import attention_forward, embedding_forward, gelu_forward, layernorm_forward, linear_forward
from ..core.lora import check_adapters
from ..core.model import check_tokens
from ..core.params import Params, check_params, is_quantized

STRATEGIES = ("group", "gather")


# ----------------------------------------------------------------------------
# the bank: K adapters, checked once and stacked


def adapter_bank(params, adapter_sets, loras):
    """Check K adapter sets against the base and stack them, once, as a server loads them.

    Inputs:
    - params: the base Params (W0), float, not quantized
    - adapter_sets: list of K adapter dicts (from init_lora, trained), names "blocks.{l}.{t}.A" / ".B"
    - loras: one LoraConfig for all, or a list of K, one per set (ranks and scalings may differ)

    Returns:
    - bank: dict with
        "config": the ModelConfig; "targets": tuple; "K": int
        "ranks": [r_k]; "scalings": np.ndarray (K,) of s_k in the params' dtype
        "A": {weight name: (K, r_max, d_in)}, "B": {weight name: (K, d_out, r_max)}, zero beyond r_k
    """
    check_params(params)
    if is_quantized(params):
        raise ValueError("params must hold float weights W0; a 4-bit (NF4) base is not served here")
    if not isinstance(adapter_sets, (list, tuple)) or not adapter_sets:
        raise ValueError(f"adapter_sets must be a non-empty list of adapter dicts, got {adapter_sets!r:.60}")
    K = len(adapter_sets)
    if isinstance(loras, LoraConfig):
        loras = [loras] * K
    if not isinstance(loras, (list, tuple)) or len(loras) != K:
        got = f"{len(loras)} configs" if isinstance(loras, (list, tuple)) else type(loras).__name__
        raise ValueError(f"loras must be one LoraConfig or a list of {K}, one per adapter set, got {got}")
    targets = loras[0].targets if isinstance(loras[0], LoraConfig) else None
    for k, (adapters, lora) in enumerate(zip(adapter_sets, loras, strict=True)):
        if not isinstance(lora, LoraConfig):
            raise TypeError(f"loras[{k}] must be a LoraConfig, got {type(lora).__name__}")
        if lora.method != "lora" or lora.init == "pissa" or lora.base_quant is not None:
            raise ValueError(f"loras[{k}] must be plain LoRA on the float base W0 (method 'lora', init 'gaussian' or "
                             f"'kaiming', no base_quant), got method={lora.method!r}, init={lora.init!r}, "
                             f"base_quant={lora.base_quant!r}")  # fmt: skip
        if lora.targets != targets:
            raise ValueError(f"every adapter set must adapt the same weights: loras[0] has targets {targets}, "
                             f"loras[{k}] has {lora.targets}")  # fmt: skip
        try:
            check_adapters(params, adapters, lora)
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapter_sets[{k}]: {e}") from None
    dtype, r_max = params["W_e"].dtype, max(lora.r for lora in loras)
    bank = {"config": params.config, "targets": targets, "K": K, "ranks": [lora.r for lora in loras],
            "scalings": np.array([lora.scaling for lora in loras], dtype=dtype), "A": {}, "B": {}}  # fmt: skip
    for l in range(params.config.n_layers):
        for t in targets:
            name = f"blocks.{l}.{t}"
            d_out, d_in = params[name].shape
            A = np.zeros((K, r_max, d_in), dtype=dtype)
            B = np.zeros((K, d_out, r_max), dtype=dtype)
            for k, (adapters, lora) in enumerate(zip(adapter_sets, loras, strict=True)):
                A[k, : lora.r] = adapters[name + ".A"]  # rows beyond r_k stay 0: they add exactly nothing
                B[k, :, : lora.r] = adapters[name + ".B"]
            bank["A"][name], bank["B"][name] = A, B
    return bank


def check_index(index, batch, K, name="index"):
    """The adapter of each row as an int64 array (B,), or a clear error."""
    if not isinstance(index, np.ndarray) or not np.issubdtype(index.dtype, np.integer):
        got = f"dtype {index.dtype}" if isinstance(index, np.ndarray) else type(index).__name__
        raise TypeError(f"{name} must be a numpy integer array, one adapter number a row, got {got}")
    if index.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one adapter a row of tokens, got {index.shape}")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= K:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds adapter {bad}; the bank has K={K} adapters, so entries must be in [0, {K})")
    return index.astype(np.int64)


# ----------------------------------------------------------------------------
# one adapted linear layer, every row its own adapter


def multi_lora_linear(x, W, b, A, B, scalings, index, groups=None, strategy="group"):
    """h_i = W0·x_i + b + s_{k_i}·B_{k_i}·A_{k_i}·x_i for every row i of a batch.

    Inputs:
    - x: (B, T, d_in)
    - W: (d_out, d_in), the frozen W0; b: (d_out,) or None
    - A: (K, r, d_in), B: (K, d_out, r), the bank's stacked adapters of this weight
    - scalings: (K,) s_k; index: (B,) ints in [0, K), the adapter of each row
    - groups: [(k, rows)] as `row_groups` makes them (computed once per forward); "group" only
    - strategy: "group" or "gather" (module docstring)

    Returns:
    - h: (B, T, d_out)
    """
    h, _ = linear_forward(x, W, b)  # (B, T, d_out)   W0·x + b: one product for the whole batch
    if strategy == "group":
        for k, rows in groups if groups is not None else row_groups(index):
            xk = x[rows]  # (n_k, T, d_in), a copy of the rows of this adapter
            xA = xk @ A[k].T  # (n_k, T, r)   A_k·x, only r wide
            h[rows] += (scalings[k] * xA) @ B[k].T  # (n_k, T, d_out)   s_k·B_k·(A_k·x)
    elif strategy == "gather":
        A_rows, B_rows = A[index], B[index]  # (B, r, d_in), (B, d_out, r): copies, one a row
        xA = x @ A_rows.transpose(0, 2, 1)  # (B, T, r)   batched over rows: row i with its own A
        xA *= scalings[index][:, None, None]  # s_{k_i}, (B, 1, 1)
        h += xA @ B_rows.transpose(0, 2, 1)  # (B, T, d_out)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return h


def row_groups(index):
    """[(k, rows)] for every adapter k that occurs in index, rows its row numbers (in order)."""
    return [(int(k), np.flatnonzero(index == k)) for k in np.unique(index)]


# ----------------------------------------------------------------------------
# the whole model


def multi_lora_forward(params, tokens, bank, index, strategy="group"):
    """Logits of the tiny GPT where row i of the batch runs with adapter index[i], unmerged.

    The same model as lora_np.model.model_forward (pre-LN blocks, GPT-2 style), forward only; every
    weight in bank["targets"] goes through multi_lora_linear, every other one through linear_forward.
    It keeps no cache (model_forward keeps every layer's for the backward), so each layer's arrays
    are freed as it ends; with bank=None it is the plain model, base or merged, by the same code,
    which is what bench_serving times it against: like with like.

    Inputs:
    - params: the base Params (W0) the bank was built on
    - tokens: (B, T) integer ids
    - bank: from adapter_bank(params, ...), or None for the plain model (then index must be None)
    - index: (B,) integer array, entries in [0, bank["K"])
    - strategy: "group" (default) or "gather"

    Returns:
    - logits: (B, T, V)
    """
    check_params(params)
    cfg = params.config
    check_tokens(tokens, cfg)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if bank is None:
        if index is not None:
            raise ValueError("index was given without a bank; pass both (bank from adapter_bank) or neither")
        targets = ()
    else:
        if not isinstance(bank, dict) or not {"config", "targets", "K", "scalings", "A", "B"} <= set(bank):
            raise TypeError(f"bank must be the dict adapter_bank returns, or None, got {type(bank).__name__}")
        if bank["config"] != cfg:
            raise ValueError(f"bank was built for {bank['config']}, but params are {cfg}")
        index = check_index(index, tokens.shape[0], bank["K"])
        targets = bank["targets"]
    groups = row_groups(index) if targets and strategy == "group" else None  # once, shared by every adapted weight

    def proj(inp, l, w):
        name = f"blocks.{l}.{w}"
        W, b = params[name], params[f"blocks.{l}.b_{w[2:]}"]
        if w not in targets:
            return linear_forward(inp, W, b)[0]
        return multi_lora_linear(inp, W, b, bank["A"][name], bank["B"][name], bank["scalings"], index, groups,
                                 strategy)  # fmt: skip

    T = tokens.shape[1]
    x = embedding_forward(tokens, params["W_e"])[0] + embedding_forward(np.arange(T), params["W_p"])[0]  # (B, T, D)
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        a = layernorm_forward(x, params[p + "ln1.gamma"], params[p + "ln1.beta"])[0]  # 1
        y = attention_forward(proj(a, l, "W_q"), proj(a, l, "W_k"), proj(a, l, "W_v"), cfg.n_heads)[0]  # 2, 3
        x = x + proj(y, l, "W_o")  # 4
        m = layernorm_forward(x, params[p + "ln2.gamma"], params[p + "ln2.beta"])[0]  # 5
        x = x + proj(gelu_forward(proj(m, l, "W_1"))[0], l, "W_2")  # 6, 7, 8
    xf = layernorm_forward(x, params["ln_f.gamma"], params["ln_f.beta"])[0]
    return linear_forward(xf, params["W_u"], None)[0]  # (B, T, V)


def merged_forward(merged_models, tokens, index):
    """What a merged deployment does with a mixed batch: one forward a task, each on its own rows.

    Inputs:
    - merged_models: list of K Params, merged_models[k] = merge(base, adapters_k, lora_k)
    - tokens: (B, T) ids; index: (B,) ints in [0, K)

    Returns:
    - logits: (B, T, V), row i from merged_models[index[i]]
    """
    if not isinstance(merged_models, (list, tuple)) or not merged_models:
        raise ValueError(f"merged_models must be a non-empty list of Params, got {merged_models!r:.60}")
    if not all(isinstance(m, Params) for m in merged_models) or len({m.config for m in merged_models}) != 1:
        raise ValueError("merged_models must all be Params of one ModelConfig")
    check_tokens(tokens, merged_models[0].config)
    index = check_index(index, tokens.shape[0], len(merged_models))
    out = None
    for k, rows in row_groups(index):
        logits = multi_lora_forward(merged_models[k], tokens[rows], None, None)  # (n_k, T, V), the plain model
        if out is None:
            out = np.empty((tokens.shape[0], *logits.shape[1:]), dtype=logits.dtype)
        out[rows] = logits
    return out

