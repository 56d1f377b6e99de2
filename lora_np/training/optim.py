"""Optimizers written by hand: SGD (with momentum) and AdamW.

An optimizer is given the arrays it trains, {name: array}, and updates them in place. It
holds state only for those: with LoRA that is the adapters alone, which is where LoRA's
memory saving in the optimizer comes from (Adam keeps two numbers per trainable parameter;
paper Section 4.2).

References
- Kingma & Ba 2015, "Adam" (Algorithm 1, bias correction).
- Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (AdamW).
"""

import math
from numbers import Real

import numpy as np


def check_positive(name, value, allow_zero=False):
    """The value as a Python float (a NumPy float64 scalar would upcast float32 updates), or an error."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


class Optimizer:
    """What SGD and AdamW share: the arrays they train (updated in place), the learning rate, and the
    check that a step's gradients name exactly those arrays (_check_grads, for subclasses)."""

    def __init__(self, arrays, lr):
        if not isinstance(arrays, dict) or not arrays:
            raise ValueError(f"arrays must be a non-empty dict of name -> array to train, got {arrays!r:.60}")
        self.arrays = arrays  # the very arrays of params/adapters: updated in place
        self.lr = check_positive("lr", lr)

    def _check_grads(self, grads):
        if set(grads) != set(self.arrays):
            missing, extra = sorted(set(self.arrays) - set(grads)), sorted(set(grads) - set(self.arrays))
            raise ValueError(f"grads must have exactly the trained names: missing {missing[:4]}, extra {extra[:4]}")
        for name, p in self.arrays.items():
            g = grads[name]
            if g.shape != p.shape or g.dtype != p.dtype:  # a broadcast gradient would update silently
                raise ValueError(
                    f"grads[{name!r}] must have shape {p.shape} and dtype {p.dtype}, got {g.shape} {g.dtype}"
                )

    def state_bytes(self):
        """Bytes held by the optimizer's state (not counting the parameters or gradients)."""
        return sum(a.nbytes for state in self.state.values() for a in state.values())


class SGD(Optimizer):
    """p ← p - lr·v with v ← momentum·v + g (v = g when momentum is 0: no state at all)."""

    def __init__(self, arrays, lr, momentum=0.0):
        super().__init__(arrays, lr)
        if not isinstance(momentum, Real) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.state = {name: {"v": np.zeros_like(a)} for name, a in arrays.items()} if momentum else {}

    def step(self, grads):
        self._check_grads(grads)
        for name, p in self.arrays.items():
            g = grads[name]
            if self.momentum:
                v = self.state[name]["v"]
                v *= self.momentum
                v += g
                g = v
            p -= self.lr * g


class AdamW(Optimizer):
    """Adam with bias correction and decoupled weight decay.

    For each trained array p with gradient g, at step t = 1, 2, ...:

        p ← p - lr·wd·p                       (decay, decoupled from the gradient; ndim >= 2 only)
        m ← β1·m + (1 - β1)·g                 first moment
        v ← β2·v + (1 - β2)·g²                second moment
        p ← p - lr · (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + eps)

    Weight decay skips vectors (biases, LayerNorm gains): shrinking a gain towards 0 is not
    regularization, it changes the function (as in GPT-2 and nanoGPT).

    lr_scale: {name: k} multiplies one array's learning rate by k (every other array: 1). LoRA+
    trains B at λ times A's rate this way (lora_np.variants.lr_scales).
    """

    def __init__(self, arrays, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, lr_scale=None):
        super().__init__(arrays, lr)
        lr_scale = {} if lr_scale is None else lr_scale
        if not isinstance(lr_scale, dict) or not set(lr_scale) <= set(arrays):
            raise ValueError(f"lr_scale must be a dict of trained names -> multiplier, got {str(lr_scale)[:80]}")
        self.lr_scale = {name: check_positive(f"lr_scale[{name!r}]", k) for name, k in lr_scale.items()}
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = betas
        for name, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not isinstance(b, Real) or isinstance(b, bool) or not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {b!r}")
        self.b1, self.b2 = float(b1), float(b2)
        self.eps = check_positive("eps", eps)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.t = 0
        self.state = {name: {"m": np.zeros_like(a), "v": np.zeros_like(a)} for name, a in arrays.items()}

    def step(self, grads):
        """One AdamW update of every trained array, in place, by the formulas above.

        Inputs:
        - grads: dict name -> gradient, exactly the trained names, each shaped and typed like its array
        """
        self._check_grads(grads)
        self.t += 1
        # Python floats throughout, so float32 parameters stay float32
        c1, c2 = 1.0 - self.b1**self.t, 1.0 - self.b2**self.t  # bias corrections
        for name, p in self.arrays.items():
            g, m, v = grads[name], self.state[name]["m"], self.state[name]["v"]
            lr = self.lr * self.lr_scale.get(name, 1.0)
            if self.weight_decay and p.ndim >= 2:
                p *= 1.0 - lr * self.weight_decay
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
