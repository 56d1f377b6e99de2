"""The arithmetic behind the benchmark: floating-point operations of a training step's matrix
products, counted from the shapes, and AdamW's memory traffic (lora_np.bench.cost measures the time
and sets it beside these).

Dimension legend: B batch, T time (= context_length), N = B·T positions, D model width, M MLP
width, V vocabulary, r LoRA rank, L layers.
"""

from ..core.config import LORA_TARGETS, LoraConfig, ModelConfig


def step_flops(cfg, batch, lora=None, *, backward=True):
    """Floating-point operations of the matrix products of one pass, counted from the shapes.

    A product (m, k) @ (k, n) costs 2·m·k·n flops. Elementwise work (LayerNorm, GELU, softmax,
    the residual adds, the optimizer) is not counted here; AdamW's share is `adamw_cost`.
    With N = B·T positions, per block and per linear weight W (d_out, d_in):

        forward   h = x·Wᵀ                      2·N·d_in·d_out
        backward  dx = g·W                      2·N·d_in·d_out   (always: lower layers need it)
                  dW = gᵀ·x                     2·N·d_in·d_out   (full fine-tuning only: frozen
                                                                  weights get no gradient)
        LoRA      x·Aᵀ, (x·Aᵀ)·Bᵀ               2·N·r·(d_in + d_out)
                  dB, g·B, dA, (s·Bᵀ·g)·A       4·N·r·(d_in + d_out)
        attention q·kᵀ, att·v                   2·2·B·T²·D       (every head, causal mask and all)
                  datt, dv, dq, dk              4·2·B·T²·D
    and once, the head logits = x·W_uᵀ: 2·N·D·V forward, 2·N·D·V for dx, 2·N·D·V for dW_u (full only).

    Inputs:
    - cfg: ModelConfig; T is its context_length
    - batch: B
    - lora: LoraConfig of the adapters (LoRA: only the adapters train), or None (no adapters:
      full fine-tuning when backward, the base or a merged model when not)
    - backward: count the backward pass too (a training step) or the forward only

    Returns:
    - dict with int "linear" (the six weights' frozen or trained paths), "lora" (the adapter
      branches), "attention", "head" and their "total"
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig or None, got {type(lora).__name__}")
    T, D, V = cfg.context_length, cfg.d_model, cfg.vocab_size
    N = batch * T
    # how many (d_in × d_out)-sized products a weight costs: the forward; then dx; then dW if it trains
    passes = 1
    if backward:
        passes += 1 if lora is not None else 2
    linear = adapter = 0
    for w in LORA_TARGETS:  # the six linear weights of a block
        d_out, d_in = cfg.linear_shape(w)
        linear += passes * 2 * N * d_in * d_out
        if lora is not None and w in lora.targets:
            adapter += (3 if backward else 1) * 2 * N * lora.r * (d_in + d_out)
    attention = (6 if backward else 2) * 2 * batch * T * T * D
    out = {
        "linear": cfg.n_layers * linear,
        "lora": cfg.n_layers * adapter,
        "attention": cfg.n_layers * attention,
        "head": passes * 2 * N * D * V,
    }
    out["total"] = sum(out.values())
    return out


def adamw_cost(arrays, weight_decay):
    """Elementwise operations and bytes moved by one AdamW.step over `arrays`.

    Counted from the lines of optim.AdamW.step, per trained number: m *= β1; (1-β1)·g; m += ·;
    v *= β2; g·g; (1-β2)·(g·g); v += ·; m/c1; v/c2; sqrt; + eps; divide; lr·; p -= ·: 14
    operations, 32 array passes (reads + writes) of `itemsize` bytes each; weight decay adds one
    operation and 2 passes for every number of a matrix (ndim >= 2). This is memory traffic, not
    arithmetic: it runs at the speed of memory, so it is converted to time with a measured bandwidth.

    Returns:
    - {"ops": int, "bytes": int}
    """
    n = sum(a.size for a in arrays.values())
    decayed = sum(a.size for a in arrays.values() if a.ndim >= 2) if weight_decay else 0
    itemsize = next(iter(arrays.values())).itemsize
    return {"ops": 14 * n + decayed, "bytes": itemsize * (32 * n + 2 * decayed)}
