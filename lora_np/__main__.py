"""python -m lora_np: a first look. Parameter arithmetic of a small config and a gradient check."""

import numpy as np

from . import LoraConfig, ModelConfig, init_lora, init_params, model_backward, model_forward
from .gradcheck import numerical_vjp, rel_error
from .lora import adapter_names


def main():
    cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_heads=4, n_layers=2, d_mlp=128)
    lora = LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v"))
    params = init_params(cfg, seed=0)
    n_full = sum(a.size for a in params.values())
    n_lora = sum(r * c for r, c in adapter_names(cfg, lora).values())
    print(f"{cfg}\n{lora}")
    print(f"full fine-tuning trains {n_full:,} parameters; LoRA trains {n_lora:,} ({n_full / n_lora:.1f}x fewer)")

    rng = np.random.default_rng(0)
    adapters = init_lora(cfg, lora, seed=1)
    for k in adapters:  # a non-zero B, so that dA is not trivially zero
        adapters[k] = adapters[k] + 0.1 * rng.normal(size=adapters[k].shape)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 8))
    logits, cache = model_forward(params, tokens, adapters, lora)
    dlogits = rng.normal(size=logits.shape)
    grads = model_backward(dlogits, cache)
    print("gradient check, hand-written backward against centered finite differences (float64):")
    for name in ("blocks.0.W_q.A", "blocks.0.W_q.B", "blocks.1.W_v.A", "blocks.1.W_v.B"):
        num = numerical_vjp(lambda: model_forward(params, tokens, adapters, lora)[0], adapters[name], dlogits)
        print(f"  {name:16s} {str(grads[name].shape):9s} relative error {rel_error(grads[name], num):.1e}")


if __name__ == "__main__":
    main()
