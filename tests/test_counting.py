"""Parameter and byte counts, checked against the arrays of real lora_np models and against
arithmetic done another way (sizes of real NumPy arrays, hand sums, published checkpoint sizes)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lora_np.counting import (
    PAPER_MODELS,
    adam_state_bytes,
    adam_state_numbers,
    adapter_params,
    block_shapes,
    checkpoint_bytes,
    config_lora_params,
    config_params,
    count_arrays,
    gpt_params,
    lora_params,
    lora_transformer_params,
    weight_params,
)

from lora_np import LORA_TARGETS, LoraConfig, ModelConfig, init_lora, init_params

dims = st.integers(1, 40)


@st.composite
def model_and_lora(draw):
    """A small ModelConfig and a LoraConfig whose rank fits every target it adapts."""
    n_heads = draw(st.sampled_from([1, 2]))
    cfg = ModelConfig(
        vocab_size=draw(st.integers(2, 12)),
        context_length=draw(st.integers(1, 9)),
        d_model=n_heads * draw(st.integers(1, 6)),
        n_heads=n_heads,
        n_layers=draw(st.integers(1, 3)),
        d_mlp=draw(st.integers(1, 20)),
    )
    targets = tuple(draw(st.lists(st.sampled_from(LORA_TARGETS), min_size=1, max_size=6, unique=True)))
    r_max = min(min(cfg.linear_shape(t)) for t in targets)
    lora = LoraConfig(r=draw(st.integers(1, r_max)), targets=targets)
    return cfg, lora


# ----- one matrix -------------------------------------------------------------------------------


@given(dims, dims, st.booleans())
def test_weight_params_is_the_size_of_a_real_weight_and_bias(d_out, d_in, bias):
    arrays = [np.empty((d_out, d_in))] + ([np.empty(d_out)] if bias else [])
    assert weight_params(d_out, d_in, bias=bias) == sum(a.size for a in arrays)


@given(dims, dims, st.data())
def test_lora_params_is_the_size_of_A_plus_B(d_out, d_in, data):
    r = data.draw(st.integers(1, min(d_out, d_in)))
    A, B = np.empty((r, d_in)), np.empty((d_out, r))  # the paper's A ∈ R^{r×k}, B ∈ R^{d×r}
    assert lora_params(d_out, d_in, r) == A.size + B.size


@pytest.mark.parametrize(
    "d_out, d_in, r, expected",
    [
        (1, 1, 1, 2),  # A (1, 1) and B (1, 1)
        (3, 2, 1, 5),  # A (1, 2): 2 numbers, B (3, 1): 3 numbers
        (3, 2, 2, 10),  # r = min(d_out, d_in) = 2: already more than the 6 numbers of W
        (1000, 1000, 4, 8_000),
        (1000, 1000, 2, 4_000),
        (12288, 12288, 4, 98_304),  # one GPT-3 attention matrix
    ],
)
def test_lora_params_known_cases(d_out, d_in, r, expected):
    assert lora_params(d_out, d_in, r) == expected


def test_weight_params_known_cases():
    assert weight_params(3, 2) == 6
    assert weight_params(3, 2, bias=True) == 9
    assert weight_params(12288, 12288) == 150_994_944


# ----- a whole transformer ----------------------------------------------------------------------


@given(st.integers(1, 5), dims, dims, st.data())
def test_lora_transformer_params_is_a_hand_sum_over_layers_and_matrices(n_layers, D, M, data):
    shapes = block_shapes(D, M)
    names = data.draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, unique=True))
    ranks = {n: data.draw(st.integers(1, min(shapes[n]))) for n in names}
    total = 0
    for _ in range(n_layers):  # layer by layer, matrix by matrix, as np.prod of A's and B's shapes
        for n, r in ranks.items():
            d_out, d_in = shapes[n]
            total += int(np.prod((r, d_in))) + int(np.prod((d_out, r)))
    assert lora_transformer_params(n_layers, ranks, shapes) == total


@given(st.integers(1, 100), st.integers(1, 4096), st.integers(1, 64), st.data())
def test_square_matrices_give_the_papers_formula(n_layers, D, r, data):
    # Section 5.1: |Θ| = 2 × L̂_LoRA × d_model × r, with L̂_LoRA the number of adapted matrices
    names = data.draw(st.lists(st.sampled_from(["W_q", "W_k", "W_v", "W_o"]), min_size=1, unique=True))
    r = min(r, D)
    n_matrices = n_layers * len(names)
    assert lora_transformer_params(n_layers, dict.fromkeys(names, r), block_shapes(D, 4 * D)) == 2 * n_matrices * D * r


def test_block_shapes_are_lora_np_shapes():
    cfg = ModelConfig(vocab_size=5, context_length=3, d_model=6, n_heads=2, n_layers=1, d_mlp=10)
    assert block_shapes(6, 10) == {t: cfg.linear_shape(t) for t in LORA_TARGETS}


def test_gpt3_qv_rank4_by_hand():
    # 96 layers x 2 matrices x (A: 4 x 12288 + B: 12288 x 4), Section 4.2's "r = 4, query and value"
    by_hand = 96 * 2 * (4 * 12288 + 12288 * 4)
    assert by_hand == 18_874_368
    gpt3 = PAPER_MODELS["GPT-3 175B"]
    shapes = block_shapes(gpt3["d_model"], gpt3["d_mlp"])
    assert lora_transformer_params(96, {"W_q": 4, "W_v": 4}, shapes) == by_hand


# ----- adapter baselines (the paper's Section 5.1) -----------------------------------------------


def bottleneck_arrays(d_model, r, rng):
    """One adapter layer written out: down-projection and its bias, up-projection and its bias."""
    return {
        "W_down": rng.normal(size=(r, d_model)),  # (r, D)
        "b_down": rng.normal(size=r),  # (r,)
        "W_up": rng.normal(size=(d_model, r)),  # (D, r)
        "b_up": rng.normal(size=d_model),  # (D,)
    }


def bottleneck_forward(h, p):
    """h + W_up·relu(W_down·h + b_down) + b_up, tokens in rows: the function those arrays are for."""
    return h + np.maximum(h @ p["W_down"].T + p["b_down"], 0.0) @ p["W_up"].T + p["b_up"]


@given(st.integers(1, 6), st.integers(1, 24), st.integers(1, 24), st.integers(0, 6), st.integers(0, 2**16))
def test_adapter_params_counts_the_arrays_of_written_out_bottlenecks(n_layers, d_model, r, n_ln, seed):
    rng = np.random.default_rng(seed)
    layers = [bottleneck_arrays(d_model, r, rng) for _ in range(n_layers)]
    layernorms = [{"gamma": np.ones(d_model), "beta": np.zeros(d_model)} for _ in range(n_ln)]
    h = rng.normal(size=(3, d_model))  # (N, D): the arrays have the shapes the forward needs
    for p in layers:
        h = bottleneck_forward(h, p)
    assert h.shape == (3, d_model)
    counted = sum(a.size for arrays in layers + layernorms for a in arrays.values())
    assert adapter_params(n_layers, d_model, r, n_trainable_layernorms=n_ln) == counted


@pytest.mark.parametrize(
    "r, printed",
    [(1, "7.1"), (4, "21.2"), (8, "40.1"), (16, "77.9"), (64, "304.4")],  # LoRA paper, Tables 4 and 15, AdapterH
)
def test_adapter_params_reproduces_the_papers_gpt3_adapterH_rows(r, printed):
    # AdapterH: two adapter layers in each of GPT-3's 96 blocks, d_model = 12,288, no LayerNorm counted
    by_hand = 2 * 96 * ((12288 * r + r) + (r * 12288 + 12288))  # W_down and b_down, then W_up and b_up
    assert adapter_params(2 * 96, 12288, r) == by_hand
    assert f"{by_hand / 1e6:.1f}" == printed


def test_adapter_params_known_cases():
    assert adapter_params(1, 1, 1) == 4  # W_down (1, 1), b_down (1,), W_up (1, 1), b_up (1,)
    assert adapter_params(1, 4, 2) == 8 + 2 + 8 + 4
    assert adapter_params(1, 4, 2, n_trainable_layernorms=1) == 22 + 8  # gamma and beta, 4 each
    assert adapter_params(2 * 96, 12288, 1) == 7_078_080


# ----- formulas against the arrays of real lora_np models ---------------------------------------


@given(model_and_lora(), st.integers(0, 2**16))
def test_config_params_counts_the_arrays_of_init_params(setup, seed):
    cfg, _ = setup
    params = init_params(cfg, seed)
    assert config_params(cfg) == sum(a.size for a in params.values())


@given(model_and_lora(), st.integers(0, 2**16))
def test_config_lora_params_counts_the_arrays_of_init_lora(setup, seed):
    cfg, lora = setup
    adapters = init_lora(cfg, lora, seed)
    assert config_lora_params(cfg, lora) == sum(a.size for a in adapters.values())


@given(model_and_lora(), st.integers(0, 2**16))
def test_count_arrays_counts_every_number_once(setup, seed):
    cfg, lora = setup
    params, adapters = init_params(cfg, seed), init_lora(cfg, lora, seed)
    for arrays in (params, adapters):
        flat = np.concatenate([a.ravel() for a in arrays.values()])  # every number laid end to end
        assert count_arrays(arrays) == flat.size


def test_count_arrays_of_an_empty_dict_is_zero():
    assert count_arrays({}) == 0


# ----- whole GPT-2 style models -----------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layers, d_model, released",
    [
        # numbers of the released GPT-2 checkpoints (HuggingFace gpt2, gpt2-medium, gpt2-large, gpt2-xl),
        # whose head is tied to the token embedding; V = 50257, T = 1024, M = 4·D (Radford et al. 2019)
        (12, 768, 124_439_808),
        (24, 1024, 354_823_168),
        (36, 1280, 774_030_080),
        (48, 1600, 1_557_611_200),
    ],
)
def test_gpt_params_reproduces_the_released_gpt2_checkpoints(n_layers, d_model, released):
    assert gpt_params(n_layers, d_model, 4 * d_model, 50257, 1024, tied_head=True) == released


@given(st.integers(1, 4), dims, dims, st.integers(1, 50), st.integers(1, 20))
def test_an_untied_head_adds_one_vocabulary_matrix(L, D, M, V, T):
    assert gpt_params(L, D, M, V, T, tied_head=False) - gpt_params(L, D, M, V, T) == V * D


# ----- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", np.float32])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_checkpoint_bytes_is_nbytes_of_a_real_array(n, dtype):
    assert checkpoint_bytes(n, dtype) == np.zeros(n, dtype=dtype).nbytes


def test_checkpoint_bytes_known_cases():
    assert checkpoint_bytes(18_874_368, "float16") == 37_748_736  # GPT-3, r = 4 on W_q, W_v: 37.7 MB
    assert checkpoint_bytes(10) == 20  # fp16 is the default, as in the paper


@given(model_and_lora(), st.integers(0, 2**16))
def test_adam_state_is_two_moments_per_trainable_number(setup, seed):
    cfg, lora = setup
    adapters = init_lora(cfg, lora, seed)
    m = {k: np.zeros_like(a, dtype=np.float32) for k, a in adapters.items()}  # Adam's first moment
    v = {k: np.zeros_like(a, dtype=np.float32) for k, a in adapters.items()}  # and its second
    n = sum(a.size for a in adapters.values())
    assert adam_state_numbers(n) == sum(a.size for a in m.values()) + sum(a.size for a in v.values())
    assert adam_state_bytes(n, "float32") == sum(a.nbytes for a in m.values()) + sum(a.nbytes for a in v.values())


# ----- bad input --------------------------------------------------------------------------------

SHAPES = block_shapes(8, 16)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: weight_params(0, 4), ValueError, r"d_out must be an int >= 1, got 0"),
        (lambda: weight_params(4, 2.0), TypeError, r"d_in must be an int, got 2\.0 \(float\)"),
        (lambda: weight_params(4, True), TypeError, r"d_in must be an int, got True \(bool\)"),
        (lambda: weight_params(4, 4, bias=1), TypeError, r"bias must be True or False, got 1"),
        (lambda: lora_params(8, 4, 0), ValueError, r"r must be an int >= 1, got 0"),
        (lambda: lora_params(8, 4, 5), ValueError, r"r must be between 1 and min\(d_out, d_in\) = 4 .* got r=5"),
        (lambda: lora_params(8, 4, "4"), TypeError, r"r must be an int, got '4' \(str\)"),
        (lambda: block_shapes(8, -1), ValueError, r"d_mlp must be an int >= 1, got -1"),
        (lambda: lora_transformer_params(0, {"W_q": 1}, SHAPES), ValueError, r"n_layers must be an int >= 1, got 0"),
        (lambda: lora_transformer_params(2, ("W_q", "W_v"), SHAPES), TypeError, r"ranks must be a dict name -> rank"),
        (lambda: lora_transformer_params(2, {}, SHAPES), ValueError, r"ranks must name at least one adapted matrix"),
        (
            lambda: lora_transformer_params(2, {"W_x": 1}, SHAPES),
            ValueError,
            r"ranks names 'W_x', which is not in shapes; shapes has \['W_1', 'W_2'",
        ),
        (
            lambda: lora_transformer_params(2, {"W_q": 9}, SHAPES),
            ValueError,
            r"ranks\['W_q'\]: r must be between 1 and min\(d_out, d_in\) = 8 .* got r=9",
        ),
        (lambda: lora_transformer_params(2, {"W_q": 1.5}, SHAPES), TypeError, r"ranks\['W_q'\]: r must be an int"),
        (lambda: lora_transformer_params(2, {"W_q": 1}, [(8, 8)]), TypeError, r"shapes must be a dict"),
        (lambda: lora_transformer_params(2, {"W_q": 1}, {}), ValueError, r"shapes must hold at least one name"),
        (
            lambda: lora_transformer_params(2, {"W_q": 1}, {"W_q": (8, 8, 8)}),
            ValueError,
            r"shapes\['W_q'\] must be a tuple \(d_out, d_in\), got \(8, 8, 8\)",
        ),
        (lambda: lora_transformer_params(2, {"W_q": 1}, {"W_q": (8, 0)}), ValueError, r"\(d_in\) must be an int >= 1"),
        (lambda: gpt_params(2, 8, 16, 0, 4), ValueError, r"vocab_size must be an int >= 1, got 0"),
        (lambda: gpt_params(2, 8, 16, 10, 4, tied_head="no"), TypeError, r"tied_head must be True or False"),
        (lambda: config_params({"d_model": 8}), TypeError, r"cfg must be a ModelConfig, got dict"),
        (
            lambda: config_lora_params(ModelConfig(4, 2, 4, 1, 1, 4), {"r": 2}),
            TypeError,
            r"lora must be a LoraConfig, got dict",
        ),
        (lambda: count_arrays([np.zeros(3)]), TypeError, r"arrays must be a dict name -> np.ndarray.*got list"),
        (lambda: count_arrays({"W": [1.0, 2.0]}), TypeError, r"arrays\['W'\] must be a np.ndarray, got list"),
        (lambda: checkpoint_bytes(-1), ValueError, r"n_numbers must be an int >= 0, got -1"),
        (lambda: checkpoint_bytes(10, "int8"), ValueError, r"dtype must be a floating-point dtype .* got 'int8'"),
        (lambda: checkpoint_bytes(10, "fp16"), ValueError, r"dtype must be a floating-point dtype .* got 'fp16'"),
        (lambda: adam_state_numbers(2.5), TypeError, r"n_trainable must be an int, got 2\.5"),
        (lambda: adapter_params(0, 8, 2), ValueError, r"n_adapter_layers must be an int >= 1, got 0"),
        (lambda: adapter_params(2, 8.0, 2), TypeError, r"d_model must be an int, got 8\.0 \(float\)"),
        (lambda: adapter_params(2, 8, 0), ValueError, r"r must be an int >= 1, got 0"),
        (lambda: adapter_params(2, 8, True), TypeError, r"r must be an int, got True \(bool\)"),
        (
            lambda: adapter_params(2, 8, 2, n_trainable_layernorms=-1),
            ValueError,
            r"n_trainable_layernorms must be an int >= 0, got -1",
        ),
    ],
)
def test_bad_input_names_the_argument_the_value_and_what_is_allowed(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "D, H, L, M, V, T, B",
    [(32, 4, 2, 128, 300, 16, 8), (64, 4, 2, 256, 500, 32, 16), (32, 2, 1, 128, 1000, 64, 4),
     (48, 4, 3, 192, 64, 48, 32)],  # fmt: skip
)
def test_train_step_bytes_is_the_measured_peak_within_a_third(D, H, L, M, V, T, B):
    """The formula against tracemalloc (NumPy reports its allocations to it) over one LoRA step: forward,
    backward, AdamW update. The stated factor: the measured peak lies within [0.75, 1.33] of the estimate."""
    import tracemalloc

    from lora_np.optim import AdamW
    from lora_np.train import train

    from lora_np.training.counting import train_step_bytes

    cfg = ModelConfig(vocab_size=V, context_length=T, d_model=D, n_heads=H, n_layers=L, d_mlp=M)
    params, lora = init_params(cfg, 0), LoraConfig(r=4, alpha=4.0, targets=("W_q", "W_v"))
    adapters = init_lora(cfg, lora, 1)
    ids = np.random.default_rng(0).integers(0, V, 5000)
    optimizer = AdamW(adapters, lr=1e-3)
    step = dict(adapters=adapters, lora=lora, steps=1, batch_size=B, block_size=T, seed=0, log_every=0)
    train(params, ids, optimizer, **step)  # a first step: the optimizer's moments exist before the measured one
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        train(params, ids, optimizer, **step)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    estimate = train_step_bytes(cfg, count_arrays(adapters), B, T, np.float64)
    assert 0.75 <= peak / estimate <= 1.33, (peak, estimate)


def test_available_bytes_is_a_positive_figure_on_linux():
    from lora_np.training.counting import available_bytes

    got = available_bytes()
    assert got is None or got > 0
