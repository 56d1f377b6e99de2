"""LoRA's successors on the whole model: initialization, merging, and QLoRA's quantized base.

Each method is a layer pair of its own (dora.py, vera.py; LoRA itself in layers.py), which its
module plugs into the core's table (lora_np.core.lora.METHODS) for model.py, merge and unmerge to
find. This module does what needs the whole model or the base weights:

- init_adapters(params, lora, seed) -> (params, adapters): every method's starting point (the
  core's, lora_np.core.lora.init_adapters, which each method's module extends with its own start),
  which for each is exactly (or, with an SVD, to round-off) the base model:
    LoRA       A random, B = 0                                 (Hu et al. 2021, Section 4.1)
    PiSSA      A, B from W0's top-r singular triplets, W0 replaced by the residual W0 - s·B·A
               (Meng et al. 2024)
    DoRA       LoRA's A, B and the magnitude m = the row norms of W0 (Liu et al. 2024)
    VeRA       one frozen random pair (A, B) per weight shape shared by every layer, lambda_b = 0
               and lambda_d = 0.1 (Kopiczko et al. 2024)
    QLoRA      LoRA on a base whose blocks' linear weights are stored as 4-bit NormalFloat
               (Dettmers et al. 2023); the forward dequantizes each weight for its product
- merge_variant / unmerge_variant: lora_np.merge and unmerge under their earlier names;
- lr_scales(adapters, lora): LoRA+'s learning rates (Hayou et al. 2024), B's λ times A's.

The paper's adapter baselines (method "adapter_h", "adapter_l": lora_np.adapters) start here too,
as the identity (W_up = 0), and merge refuses them: they are layers, not a ΔW.

LoRA+'s argument in two lines: at large width, with one learning rate for A and B, either B's
update is too small to learn features or A's is so large it is unstable; with η_B = λ·η_A
(λ ≫ 1) both move the output at the same order (Section 3). The best λ is model and task
dependent; λ = 16 here is the `loraplus_lr_ratio` of PEFT's LoRA+ example.
"""

from ..core.lora import init_adapters, merge, trainable_adapters, unmerge
from .dora import dora_weight_norm
from .nf4 import quantize_base
from .vera import init_vera

# init_adapters is the core's, quantize_base nf4's and init_vera vera's: kept importable from here, where they were
__all__ = ["dora_norms", "init_adapters", "init_vera", "lr_scales", "merge_variant", "quantize_base", "unmerge_variant"]


def _adapted(cfg, lora):
    return [(f"blocks.{l}.{t}", t) for l in range(cfg.n_layers) for t in lora.targets]


def lr_scales(adapters, lora):
    """LoRA+: {name: λ} for every B, so AdamW's learning rate for B is λ times A's (λ = lora.lr_ratio)."""
    if lora.lr_ratio == 1.0:
        return {}
    return {name: lora.lr_ratio for name in trainable_adapters(adapters) if name.endswith(".B")}


def dora_norms(params, adapters, lora):
    """{name: ‖W0 + s·B·A‖ per row} for DoRA's adapted weights: what unmerge needs and a merged
    weight has lost. W' = m ⊙ V/‖V‖ keeps only V's direction row by row; any positive multiple of
    that direction, minus s·B·A, is a W0 that merges to the same W'."""
    return {name: dora_weight_norm(params[name], adapters[name + ".A"], adapters[name + ".B"], lora.scaling)
            for name, _ in _adapted(params.config, lora)}  # fmt: skip


def merge_variant(params, adapters, lora):
    """W' for any method: lora_np.merge, which looks the method up in the core's table (kept for earlier callers)."""
    return merge(params, adapters, lora)


def unmerge_variant(merged, adapters, lora, norms=None):
    """The inverse of merge_variant: lora_np.unmerge (kept for earlier callers)."""
    return unmerge(merged, adapters, lora, norms)
