"""The generated domains, the tokenizer and the batch sampler."""

import numpy as np
import pytest
from lora_np.data import (
    OBJECTS,
    SUBJECTS,
    VOCAB,
    decode,
    encode,
    eval_windows,
    in_validation,
    make_splits,
    sample_batch,
)


def test_encode_decode_round_trip():
    text = "the quick fox chases a red ball.\n"
    ids = encode(text)
    assert ids.dtype == np.int64 and decode(ids) == text


def test_unknown_character_is_named_with_its_position():
    with pytest.raises(ValueError, match=r"text contains 'Q' at position 4, which is not in the vocabulary"):
        encode("the Quick fox")
    with pytest.raises(ValueError, match=rf"ids must be integers in \[0, {len(VOCAB)}\)"):
        decode([0, len(VOCAB)])


def test_splits_never_overlap_and_are_deterministic():
    for domain in ("pretrain", "finetune"):
        tr, va = make_splits(domain, 2000, 0)
        train_lines = set(decode(tr).splitlines())
        val_lines = set(decode(va).splitlines())
        assert train_lines and val_lines and not train_lines & val_lines
        assert all(in_validation(line + "\n") for line in val_lines)
        tr2, va2 = make_splits(domain, 2000, 0)
        assert np.array_equal(tr, tr2) and np.array_equal(va, va2)


def test_the_shift_is_word_order():
    """Pretraining opens with a subject (an animal or person); fine-tuning with an object (a thing)."""
    pre = decode(make_splits("pretrain", 300, 0)[0]).splitlines()
    new = decode(make_splits("finetune", 300, 0)[0]).splitlines()

    def first_noun(line):
        return next(w for w in line.replace(",", " ").replace(".", " ").split() if w in SUBJECTS + OBJECTS)

    assert all(first_noun(line) in SUBJECTS for line in pre)
    assert all(first_noun(line) in OBJECTS for line in new)
    # every character of the new domain was seen in pretraining
    assert set("".join(new)) <= set("".join(pre))


def test_sampler_is_seeded_and_targets_are_shifted():
    ids = make_splits("pretrain", 200, 0)[0]
    x1, y1 = sample_batch(ids, 4, 10, np.random.default_rng(7))
    x2, y2 = sample_batch(ids, 4, 10, np.random.default_rng(7))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and x1.shape == (4, 10)
    assert np.array_equal(x1[:, 1:], y1[:, :-1])
    x, y = eval_windows(ids, 10, 3)
    assert x.shape == (3, 10) and np.array_equal(x.ravel()[1:], y.ravel()[:-1])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"domain must be one of \('pretrain', 'finetune'\), got 'poetry'"):
        make_splits("poetry", 100, 0)
    with pytest.raises(ValueError, match=r"n_lines must be an int >= 20"):
        make_splits("pretrain", 5, 0)
