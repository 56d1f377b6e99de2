"""Bad input raises ValueError/TypeError naming the argument, the value given and what is allowed."""

import numpy as np
import pytest
from lora_np.layers import lora_linear_forward

from lora_np import LoraConfig, ModelConfig, Params, init_lora, init_params, merge, model_backward, model_forward

CFG = ModelConfig(vocab_size=10, context_length=8, d_model=8, n_heads=2, n_layers=1, d_mlp=16)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, 0)


@pytest.mark.parametrize("r", [0, -1])
def test_rank_below_one(r):
    with pytest.raises(ValueError, match=rf"r must be an int >= 1, got {r}"):
        LoraConfig(r=r)


def test_rank_not_an_int():
    with pytest.raises(TypeError, match=r"r must be an int, got 2\.5"):
        LoraConfig(r=2.5)


def test_rank_above_min_dimension():
    # W_q is (8, 8): r = 9 cannot be reached by B·A
    with pytest.raises(ValueError, match=r"r must be between 1 and min\(d_out, d_in\) = 8 for target W_q.*got r=9"):
        init_lora(CFG, LoraConfig(r=9), 0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_not_positive(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got"):
        LoraConfig(alpha=alpha)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown LoRA target 'W_qq'.*'W_q', 'W_k', 'W_v', 'W_o', 'W_1', 'W_2'"):
        LoraConfig(targets=("W_qq", "W_v"))


def test_target_as_a_bare_string_is_not_split_into_letters():
    with pytest.raises(TypeError, match=r"targets must be a tuple or list of names.*got 'W_q'"):
        LoraConfig(targets="W_q")


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval(dropout):
    with pytest.raises(ValueError, match=rf"dropout must be a number in \[0, 1\), got {dropout}"):
        LoraConfig(dropout=dropout)
    x, W = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        lora_linear_forward(x, W, None, np.ones((1, 3)), np.zeros((4, 1)), 1.0, dropout=dropout)


def test_unknown_init():
    with pytest.raises(ValueError, match=r"init must be one of \('gaussian', 'kaiming', 'pissa'\), got 'xavier'"):
        LoraConfig(init="xavier")


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_model must be divisible by n_heads, got d_model=10, n_heads=3"):
        ModelConfig(vocab_size=5, context_length=4, d_model=10, n_heads=3, n_layers=1, d_mlp=8)


def test_model_dimension_not_positive():
    with pytest.raises(ValueError, match=r"n_layers must be an int >= 1, got 0"):
        ModelConfig(vocab_size=5, context_length=4, d_model=8, n_heads=2, n_layers=0, d_mlp=8)


@pytest.mark.parametrize("bad", [10, -1])
def test_token_id_out_of_range(params, bad):
    tokens = np.array([[1, 2, bad]])
    with pytest.raises(ValueError, match=rf"tokens contains id {bad}; ids must be in \[0, vocab_size\) = \[0, 10\)"):
        model_forward(params, tokens)


def test_tokens_not_integers(params):
    with pytest.raises(TypeError, match=r"tokens must hold integer ids, got dtype float64"):
        model_forward(params, np.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match=r"tokens must be a numpy array of integer ids, got list"):
        model_forward(params, [[1, 2]])


def test_tokens_wrong_rank(params):
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\).*got \(3,\)"):
        model_forward(params, np.array([1, 2, 3]))


def test_sequence_longer_than_context(params):
    with pytest.raises(ValueError, match=r"tokens has T=9 positions, longer than context_length=8"):
        model_forward(params, np.zeros((1, 9), dtype=np.int64))


def test_adapter_shapes_do_not_fit(params):
    lora = LoraConfig(r=2)
    adapters = init_lora(CFG, lora, 0)
    adapters["blocks.0.W_q.A"] = np.zeros((3, 8))
    with pytest.raises(ValueError, match=r"adapter blocks\.0\.W_q\.A must have shape \(2, 8\) for r=2, got \(3, 8\)"):
        model_forward(params, np.zeros((1, 3), dtype=np.int64), adapters, lora)
    with pytest.raises(ValueError, match=r"adapter blocks\.0\.W_q\.A must have shape"):
        merge(params, adapters, lora)


def test_adapters_for_other_targets(params):
    adapters = init_lora(CFG, LoraConfig(r=2, targets=("W_k",)), 0)
    with pytest.raises(ValueError, match=r"adapters do not fit targets=\('W_q', 'W_v'\).*missing.*unexpected"):
        model_forward(params, np.zeros((1, 3), dtype=np.int64), adapters, LoraConfig(r=2))


def test_adapters_without_config_and_vice_versa(params):
    tokens = np.zeros((1, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"adapters were given without lora"):
        model_forward(params, tokens, init_lora(CFG, LoraConfig(), 0))
    with pytest.raises(ValueError, match=r"lora was given without adapters"):
        model_forward(params, tokens, None, LoraConfig())


def test_dropout_in_training_needs_an_rng(params):
    lora = LoraConfig(r=2, dropout=0.1)
    with pytest.raises(ValueError, match=r"rng must be a np\.random\.Generator for LoRA dropout 0\.1"):
        model_forward(params, np.zeros((1, 3), dtype=np.int64), init_lora(CFG, lora, 0), lora, train=True)


def test_plain_dict_params_explain_themselves(params):
    plain = dict(params)
    with pytest.raises(TypeError, match=r"params must be a lora_np Params.*got dict.*Params\(cfg, arrays\)"):
        model_forward(plain, np.zeros((1, 3), dtype=np.int64))
    model_forward(Params(CFG, plain), np.zeros((1, 3), dtype=np.int64))  # wrapped again, it works


def test_params_with_a_wrong_shape(params):
    bad = params.copy()
    bad["blocks.0.W_1"] = np.zeros((16, 9))
    with pytest.raises(ValueError, match=r"params\['blocks\.0\.W_1'\] must be an array of shape \(16, 8\)"):
        model_forward(bad, np.zeros((1, 3), dtype=np.int64))


def test_trainable_names_checked(params):
    lora = LoraConfig(r=2)
    tokens = np.zeros((1, 3), dtype=np.int64)
    logits, cache = model_forward(params, tokens, init_lora(CFG, lora, 0), lora)
    with pytest.raises(ValueError, match=r"unknown trainable names \['blocks\.0\.W_qq\.A'\]: neither"):
        model_backward(logits, cache, ["blocks.0.W_qq.A"])
    with pytest.raises(
        ValueError, match=r"trainable includes \['blocks\.0\.W_q'\], frozen weights that carry LoRA adapters"
    ):
        model_backward(logits, cache, ["blocks.0.W_q", "blocks.0.W_q.A"])
    with pytest.raises(TypeError, match=r"trainable must be a collection of names, got the string"):
        model_backward(logits, cache, "blocks.0.W_q.A")


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), ("0", TypeError), (True, TypeError)])
def test_bad_seed(seed, error):
    with pytest.raises(error, match=r"seed must be an int >= 0, got"):
        init_params(CFG, seed)


def test_bad_dlogits(params):
    logits, cache = model_forward(params, np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"dlogits must be an array of shape \(1, 3, 10\) and dtype float64"):
        model_backward(logits[:, :2], cache)
    with pytest.raises(ValueError, match=r"dlogits must be an array of shape .* dtype float64.*float32"):
        model_backward(logits.astype(np.float32), cache)


def test_cross_entropy_targets_checked():
    from lora_np.layers import cross_entropy_forward

    with pytest.raises(ValueError, match=r"targets must be integer ids in \[0, V\) = \[0, 3\), got int64 in \[-1, 0\]"):
        cross_entropy_forward(np.zeros((1, 2, 3)), np.array([[0, -1]]))
    with pytest.raises(ValueError, match=r"targets must have shape \(1, 2\)"):
        cross_entropy_forward(np.zeros((1, 2, 3)), np.array([0, 1]))
