"""The two configurations: the model's shape (ModelConfig) and the adapter's (LoraConfig).

Both are frozen dataclasses that validate themselves on construction, so a bad value fails
at the line that wrote it, with a message naming the field, the value and what is allowed.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

# The linear weights LoRA can adapt. The paper studies the attention weights and leaves the
# MLP to future work (Section 4.2); W_1 and W_2 are offered as that extension. W_e, W_p
# (lookups) and W_u (the output head) are not offered.
LORA_TARGETS = ("W_q", "W_k", "W_v", "W_o", "W_1", "W_2")
DEFAULT_TARGETS = ("W_q", "W_v")  # LoraConfig's default, the paper's choice for GPT-3 (Section 7.1)


# ----------------------------------------------------------------------------
# The seam, on the configuration's side. LoRA's own choices are these: method "lora", A drawn
# "gaussian" (the paper) or "kaiming" (loralib's and PEFT's), a base kept as it is. A method that
# came later widens them from its own module (lora_np/methods/) with core.lora.register, which
# adds its Extension here.


@dataclass(frozen=True)
class Extension:
    """What a later method adds to LoraConfig.

    - methods: new values of `method`
    - layer_methods: those of them that insert layers of their own and adapt no weight (their
      targets are ())
    - inits: new values of `init`; base_quants: new values of `base_quant`
    - check: check(lora), run on every LoraConfig once its fields are valid; raises ValueError on a
      combination of fields that would not mean what it says (e.g. the method's own option set
      under another method)
    - start: start(params, lora, seed) -> (params, adapters), for a config it owns whose start needs
      the base weights (an SVD of W0, its norms, a quantized copy); None: init_lora's start
    """

    methods: tuple = ()
    layer_methods: tuple = ()
    inits: tuple = ()
    base_quants: tuple = ()
    check: Callable = None
    start: Callable = None

    def owns(self, lora):
        """True when `lora` chooses one of the values this extension adds."""
        return lora.method in self.methods or lora.init in self.inits or lora.base_quant in self.base_quants


EXTENSIONS = {}  # name -> Extension, one for each later method (lora_np/methods/ fills it)


def allowed(field):
    """The values LoraConfig accepts for "method", "init", "base_quant" or the layer methods."""
    own = {"method": ("lora",), "init": ("gaussian", "kaiming"), "base_quant": (None,), "layer_method": ()}
    key = {"method": "methods", "init": "inits", "base_quant": "base_quants", "layer_method": "layer_methods"}[field]
    return own[field] + tuple(v for e in EXTENSIONS.values() for v in getattr(e, key))


_COMPUTED = {"LORA_METHODS": "method", "LORA_INITS": "init", "BASE_QUANTS": "base_quant",
             "ADAPTER_METHODS": "layer_method"}  # fmt: skip


def __dir__():
    return sorted([*globals(), *_COMPUTED])


def __getattr__(name):
    # The tuples earlier versions kept here, now read from the extensions registered
    if name in _COMPUTED:
        return allowed(_COMPUTED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_int(name, value, minimum=1):
    """The value as a Python int (a NumPy integer becomes one), or a clear error: TypeError for
    a value that is not an integer, ValueError for one below `minimum`. Used across the package."""
    # bool is an Integral in Python; True as a layer count is a bug, not a 1.
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the tiny GPT (decoder-only, pre-LayerNorm, GPT-2 style)."""

    vocab_size: int  # V: rows of W_e and W_u
    context_length: int  # rows of W_p: the longest sequence the model accepts
    d_model: int  # D: width of the residual stream
    n_heads: int  # H: must divide D; each head is D/H wide
    n_layers: int  # transformer blocks
    d_mlp: int  # M: hidden width of the MLP (GPT-2 uses 4·D)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers", "d_mlp"):
            # Python ints, so that equal configs are equal, hash alike and serialize to JSON
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        if self.d_model % self.n_heads != 0:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, "
                f"n_heads={self.n_heads}; allowed n_heads include {divisors}"
            )

    def linear_shape(self, target):
        """(d_out, d_in) of a block's linear weight, e.g. linear_shape("W_1") == (M, D)."""
        D, M = self.d_model, self.d_mlp
        shapes = {"W_q": (D, D), "W_k": (D, D), "W_v": (D, D), "W_o": (D, D), "W_1": (M, D), "W_2": (D, M)}
        if target not in shapes:
            raise ValueError(f"target must be one of {LORA_TARGETS}, got {target!r}")
        return shapes[target]


@dataclass(frozen=True)
class LoraConfig:
    """What LoRA adapts and how (paper Section 4.1).

    h = W0·x + s·B·A·x with A (r, d_in) random and B (d_out, r) zero at init, and
    s = alpha / r (the paper) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023).
    """

    r: int = 4  # rank of ΔW = B·A
    alpha: float = 4.0  # the paper's α; dividing by r "helps to reduce the need to retune" the lr when r
    #                     changes (Section 4.1), it does not remove it: notebook 02 (7d) measures the rest
    targets: tuple = DEFAULT_TARGETS  # the paper's choice for GPT-3 (Section 7.1)
    dropout: float = 0.0  # inverted dropout on the input of A, training only
    init: str = "gaussian"  # "gaussian": the paper's; "kaiming": loralib's and PEFT's default; "pissa" (pissa.py)
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    # What came after LoRA, each a choice of which the paper's LoRA is the default. This class checks their
    # types and values; what each means, and which combinations it allows, is its own module's (lora_np/methods/,
    # registered in EXTENSIONS above):
    method: str = "lora"  # "dora" (dora.py), "vera" (vera.py); "adapter_h", "adapter_l": not LoRA but the paper's
    #                       adapter baselines, with r the bottleneck width (adapters.py)
    lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B's learning rate over A's (variants.py: which λ)
    dora_exact_norm: bool = False  # DoRA: differentiate through ‖W0 + s·B·A‖ instead of treating it as a constant
    base_quant: str = None  # "nf4": the blocks' linear weights stored as 4-bit NormalFloat (QLoRA's base, nf4.py)
    double_quant: bool = False  # with nf4: quantize the per-block scales too (QLoRA's double quantization)

    def __post_init__(self):
        object.__setattr__(self, "r", check_int("r", self.r, 1))
        if not isinstance(self.alpha, Real) or isinstance(self.alpha, bool):
            raise TypeError(f"alpha must be a real number, got {self.alpha!r}")
        try:
            alpha = float(self.alpha)
        except OverflowError:  # a Python int too large for a float
            alpha = math.inf
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        if not isinstance(self.targets, (tuple, list)):
            raise TypeError(
                f"targets must be a tuple or list of names such as ('W_q', 'W_v'), got {self.targets!r:.60}"
            )
        targets = tuple(self.targets)
        adds_layers = isinstance(self.method, str) and self.method in allowed("layer_method")
        if adds_layers:
            # A method that inserts layers adapts no weight: its targets are (). The default is accepted and
            # dropped, as a frozen dataclass cannot tell it from one not given; any other choice would not mean
            # what it says.
            if targets not in ((), DEFAULT_TARGETS):
                raise ValueError(
                    f"method={self.method!r} inserts layers of its own and adapts no weight: targets must be () "
                    f"or left at its default, got {targets}"
                )
            targets = ()
        for t in targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {t!r} in targets; valid targets are {LORA_TARGETS}")
        if not targets and not adds_layers:
            raise ValueError(f"targets must name at least one of {LORA_TARGETS}, got an empty sequence")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets must not repeat a name, got {targets}")
        object.__setattr__(self, "targets", targets)  # a list given becomes a tuple
        if not isinstance(self.dropout, Real) or isinstance(self.dropout, bool):
            raise TypeError(f"dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.init not in allowed("init"):
            raise ValueError(f"init must be one of {allowed('init')}, got {self.init!r}")
        if not isinstance(self.rslora, bool):
            raise TypeError(f"rslora must be True or False, got {self.rslora!r}")
        if self.method not in allowed("method"):
            raise ValueError(f"method must be one of {allowed('method')}, got {self.method!r}")
        ratio = self.lr_ratio
        if not (isinstance(ratio, Real) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"lr_ratio must be a finite number > 0 (B's learning rate over A's), got {ratio!r}")
        object.__setattr__(self, "lr_ratio", float(ratio))
        if self.base_quant not in allowed("base_quant"):
            raise ValueError(f"base_quant must be one of {allowed('base_quant')}, got {self.base_quant!r}")
        # Each later method checks the combinations of its own options; the chosen method's check first, so that
        # its message is the one given when several apply
        for extension in sorted(EXTENSIONS.values(), key=lambda e: self.method not in e.methods):
            if extension.check is not None:
                extension.check(self)

    @property
    def scaling(self):
        """s in h = W0·x + s·B·A·x: alpha/r (paper), or alpha/sqrt(r) with rslora. (VeRA and the adapters have no s.)"""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
