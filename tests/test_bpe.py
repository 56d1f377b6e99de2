"""GPT-2's byte-level BPE tokenizer (lora_np.bpe), on vocabularies built here.

The published GPT-2 files are not used (nothing is downloaded): the tests build a tiny vocabulary
whose merges are worked by hand, and a larger one learned from generated text by `train_merges`,
a small BPE learner (Sennrich et al., 2016) that lives here, not in the package.
"""

import functools
import json
import random
from collections import Counter
from itertools import pairwise

import lora_np.bpe
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_np.bpe import GPT2Tokenizer, bpe, bytes_to_unicode, pretokenize
from lora_np.checkpoint import CheckpointError

BYTE = bytes_to_unicode()  # byte -> character


def byte_vocab():
    """The 256 single-byte tokens, each with its byte value as id. (GPT-2's vocab.json lists the
    printable bytes first; any order is a valid vocabulary.)"""
    return {BYTE[b]: b for b in range(256)}


def make_tokenizer(merges, extra=()):
    """A tokenizer over the 256 bytes, the results of `merges` (ids 256, 257, ... in merge
    order) and the `extra` tokens after them."""
    encoder = byte_vocab()
    for a, b in merges:
        encoder.setdefault(a + b, len(encoder))
    for token in extra:
        encoder[token] = len(encoder)
    return GPT2Tokenizer(encoder, merges)


# Hand-worked vocabulary: rank, merge, and the id of its result.
HAND_MERGES = [
    ("h", "e"),  # 0: "he"    256
    ("l", "l"),  # 1: "ll"    257
    ("he", "ll"),  # 2: "hell"  258
    ("Ġ", "w"),  # 3: "Ġw"    259  (Ġ is the space byte)
    ("o", "r"),  # 4: "or"    260
    ("Ġw", "or"),  # 5: "Ġwor"  261
    ("'", "s"),  # 6: "'s"    262
    ("1", "2"),  # 7: "12"    263
    ("Ġ", "Ġ"),  # 8: "ĠĠ"    264
    ("Ã", "©"),  # 9: "Ã©"    265  (é is UTF-8 C3 A9, printable bytes that stand for themselves)
]


@functools.cache
def hand():
    return make_tokenizer(HAND_MERGES, extra=["<|endoftext|>"])  # "<|endoftext|>" is 266


def tokens(tok, text):
    return [tok.decoder[i] for i in tok.encode(text)]


# ---------------------------------------------------------------- bytes_to_unicode


def test_bytes_to_unicode_is_gpt2s_table():
    assert len(BYTE) == 256 and len(set(BYTE.values())) == 256
    for b in [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]:
        assert BYTE[b] == chr(b)  # printable bytes stand for themselves
    # the other 68 bytes take 256, 257, ... in byte order
    assert (BYTE[0], BYTE[10], BYTE[32], BYTE[127], BYTE[0xA0], BYTE[0xAD]) == ("Ā", "Ċ", "Ġ", "ġ", "ł", "Ń")
    assert all(c.isprintable() and not c.isspace() for c in BYTE.values())


# ---------------------------------------------------------------- hand-worked merges

HAND_CASES = [
    # hello: h e l l o -> he l l o -> he ll o -> hell o;  " world": Ġ w o r l d -> Ġw o r l d
    # -> Ġw or l d -> Ġwor l d  (Ġw, rank 3, goes before or, rank 4)
    ("hello world", ["hell", "o", "Ġwor", "l", "d"]),
    # "Hello": no merge starts with "H"; l l -> ll, then (e, ll) is not a merge
    ("Hello, world!", ["H", "e", "ll", "o", ",", "Ġwor", "l", "d", "!"]),
    ("she's", ["s", "he", "'s"]),  # "'s" is a pre-token of its own
    ("x 123!", ["x", "Ġ", "12", "3", "!"]),  # " 123": Ġ 1 2 3 -> Ġ 12 3
    ("1212", ["12", "12"]),
    # three spaces: "  " goes alone, the last space joins the word; four: Ġ Ġ Ġ -> ĠĠ Ġ (left to right)
    ("a   b", ["a", "ĠĠ", "Ġ", "b"]),
    ("a    b", ["a", "ĠĠ", "Ġ", "Ġ", "b"]),
    ("hi\nthere", ["h", "i", "Ċ", "t", "he", "r", "e"]),  # Ċ is the newline byte
    ("a\n\nb", ["a", "Ċ", "Ċ", "b"]),
    ("café", ["c", "a", "f", "Ã©"]),  # é: bytes C3 A9, merged by rank 9
    ("naïve", ["n", "a", "Ã", "¯", "v", "e"]),  # ï: C3 AF, no merge
    ("ok 😀", ["o", "k", "Ġ", "ð", "Ł", "ĺ", "Ģ"]),  # 😀: F0 9F 98 80, no merges
    ("<|endoftext|>", ["<", "|", "e", "n", "d", "o", "f", "t", "e", "x", "t", "|", ">"]),  # text, not special
    ("", []),
]


@pytest.mark.parametrize("text, expected", HAND_CASES)
def test_hand_worked_merges(text, expected):
    tok = hand()
    assert tokens(tok, text) == expected
    assert tok.decode(tok.encode(text)) == text


def test_ids_are_the_vocabulary_ids():
    tok = hand()
    assert tok.encode("hello world") == [258, ord("o"), 261, ord("l"), ord("d")]
    assert tok.vocab_size == 267 and tok.eot_id == 266
    assert tok.decode([266]) == "<|endoftext|>"
    assert tok.decode(np.array([258, 111], dtype=np.int64)) == "hello"
    assert make_tokenizer([]).eot_id is None


def test_decode_replaces_broken_utf8_as_gpt2_does():
    tok = hand()
    assert tok.decode([0xC3]) == "\ufffd"  # the first byte of é alone
    assert tok.decode([0xC3, 0xA9]) == tok.decode([265]) == "é"
    # so ids are decoded as a whole: 😀 cut in two pieces decodes to three U+FFFD, not 😀
    assert tok.decode([0xF0, 0x9F]) + tok.decode([0x98, 0x80]) == "\ufffd" * 3
    assert tok.decode([0xF0, 0x9F, 0x98, 0x80]) == "😀"


# ---------------------------------------------------------------- merge priority


def test_lower_rank_wins_and_order_changes_the_result():
    assert bpe("abc", {("a", "b"): 0, ("b", "c"): 1}) == ["ab", "c"]
    assert bpe("abc", {("b", "c"): 0, ("a", "b"): 1}) == ["a", "bc"]
    # the rank is the position in merges, not the id of the result: here "bc" has the lower id
    encoder = {**byte_vocab(), "bc": 256, "ab": 257}
    assert [encoder.get(t, t) for t in ("ab", "bc")] == [257, 256]
    tok = GPT2Tokenizer(encoder, [("a", "b"), ("b", "c")])
    assert tokens(tok, "abc") == ["ab", "c"]
    assert tokens(GPT2Tokenizer(encoder, [("b", "c"), ("a", "b")]), "abc") == ["a", "bc"]


def test_a_merge_applies_left_to_right_and_later_merges_build_on_it():
    ranks = {("a", "a"): 0, ("aa", "aa"): 1}
    assert bpe("aaa", ranks) == ["aa", "a"]
    assert bpe("aaaaa", ranks) == ["aaaa", "a"]
    assert bpe("x", ranks) == ["x"]


# ---------------------------------------------------------------- pre-tokenization

# Written by hand; each is what GPT-2's own pattern (the `regex` module) gives.
PRETOKEN_CASES = [
    ("Hello, world! It's 2024.", ["Hello", ",", " world", "!", " It", "'s", " 2024", "."]),
    ("It's 2 o'clock!  ", ["It", "'s", " 2", " o", "'", "clock", "!", "  "]),
    ("they'll've  done", ["they", "'ll", "'ve", " ", " done"]),
    ("IT'S", ["IT", "'", "S"]),  # the contractions are lower case only
    ("x=1.5e-3;", ["x", "=", "1", ".", "5", "e", "-", "3", ";"]),
    ("a \t\n  b", ["a", " \t\n ", " b"]),  # a whitespace run leaves its last space to the word
    ("end  \n", ["end", "  \n"]),
    ("a\xa0b", ["a", "\xa0", "b"]),  # only U+0020 may lead a word
    ("Ça coûte 3,50 €.", ["Ça", " coûte", " 3", ",", "50", " €."]),
    ("Straße über Åland", ["Straße", " über", " Åland"]),
    ("Καλημέρα κόσμε!", ["Καλημέρα", " κόσμε", "!"]),
    ("Ἀθῆναι", ["Ἀθῆναι"]),
    ("你好，世界。", ["你好", "，", "世界", "。"]),
    ("東京タワーは333m", ["東京タワーは", "333", "m"]),
    ("안녕하세요 세계", ["안녕하세요", " 세계"]),
    ("x² ½ Ⅻ", ["x", "²", " ½", " Ⅻ"]),  # categories No and Nl are numbers, not letters
    ("e\u0301t\u00e9", ["e", "\u0301", "té"]),  # a combining accent (Mn) is not a letter
    ("ok 👍🏽!", ["ok", " 👍🏽!"]),
    ("a\x1c!", ["a", "\x1c!"]),  # U+001C is not whitespace for GPT-2 (it is for re's \s)
]


@pytest.mark.parametrize("text, expected", PRETOKEN_CASES)
def test_pretokenize_matches_gpt2s_pattern(text, expected):
    assert pretokenize(text) == expected


@given(st.text())
def test_pretokens_cover_the_text(text):
    pieces = pretokenize(text)
    assert "".join(pieces) == text and all(pieces)


# ---------------------------------------------------------------- round trips


@given(st.text())
def test_decode_inverts_encode(text):
    tok = hand()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # the tokens spell the text's bytes, one character a byte
    assert "".join(tok.decoder[i] for i in ids) == "".join(BYTE[b] for b in text.encode("utf-8"))


ENGLISH_CHARS = "abcdefghijklmnopqrstuvwxyzTIA      ,.'!?\n0123456789éü😀"


@given(st.text(alphabet=st.sampled_from(ENGLISH_CHARS) | st.characters()))
def test_decode_inverts_encode_with_learned_merges(text):
    tok = trained()
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- a learned vocabulary

COMMON = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down"
).split()
SYLLABLES = "ka to ri mon sel dar vin lo pa the qu ix ber nal cor ut fen gra sho lim".split()


def english_text(n_chars, seed, n_rare=500):
    """English-like text: sentences of common words (Zipf-weighted) with some rare made-up words,
    numbers, contractions, punctuation and newlines. Deterministic in seed."""
    rng = random.Random(seed)
    rare = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n_rare)]
    common_w = [1 / (k + 1) for k in range(len(COMMON))]
    rare_w = [1 / (k + 1) for k in range(len(rare))]
    out, size = [], 0
    while size < n_chars:
        words = []
        for _ in range(rng.randint(4, 14)):
            r = rng.random()
            if r < 0.8:
                words.append(rng.choices(COMMON, common_w)[0])
            elif r < 0.95:
                words.append(rng.choices(rare, rare_w)[0])
            elif r < 0.98:
                words.append(str(rng.randint(0, 2025)))
            else:
                words.append(rng.choice(["it's", "don't", "they'll", "we've", "I'm"]))
            if rng.random() < 0.08:
                words[-1] += ","
        words[0] = words[0].capitalize()
        sentence = " ".join(words) + rng.choice([".", ".", ".", "?", "!"]) + rng.choice([" ", " ", "\n", "\n\n"])
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


def merge_pair(parts, pair):
    """parts with every occurrence of the adjacent pair joined, left to right."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def train_merges(text, n_merges):
    """Learn up to n_merges merges from text: Sennrich et al.'s BPE learner, on GPT-2's pre-tokens.

    Counts the distinct pre-tokens (spelled in bytes_to_unicode characters), then n_merges times
    joins the most frequent adjacent pair (ties go to the smallest pair, so the result is
    deterministic) in every pre-token. Returns (encoder, merges) for GPT2Tokenizer.
    """
    counts = Counter("".join(BYTE[b] for b in piece.encode("utf-8")) for piece in pretokenize(text))
    words = [(list(w), n) for w, n in counts.items()]
    encoder, merges = byte_vocab(), []
    for _ in range(n_merges):
        pairs = Counter()
        for parts, n in words:
            for pair in pairwise(parts):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        encoder.setdefault(best[0] + best[1], len(encoder))
        words = [(merge_pair(parts, best) if best[0] in parts else parts, n) for parts, n in words]
    encoder["<|endoftext|>"] = len(encoder)
    return encoder, merges


@functools.cache
def trained():
    return GPT2Tokenizer(*train_merges(english_text(20_000, seed=0), 300))


def sequential_bpe(word, merges):
    """An independent reference: apply each merge once, in rank order, to the whole word. For
    merges learned by a trainer (every merge's pieces exist before it) this equals GPT-2's loop."""
    parts = list(word)
    for pair in merges:
        parts = merge_pair(parts, pair)
    return parts


def test_learned_vocabulary_compresses_and_round_trips():
    tok = trained()
    assert len(tok.bpe_ranks) == 300 and tok.vocab_size <= 256 + 300 + 1  # fewer if two merges give one token
    text = english_text(5_000, seed=1)  # unseen text from the same source
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2.5  # common words are single tokens
    assert tokens(tok, " the") == ["Ġthe"]


@given(st.lists(st.sampled_from(ENGLISH_CHARS[:40]), min_size=1, max_size=20).map("".join))
def test_merge_loop_agrees_with_the_sequential_reference(piece):
    tok = trained()
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    word = "".join(BYTE[b] for b in piece.encode("utf-8"))
    assert bpe(word, tok.bpe_ranks) == sequential_bpe(word, merges)


def gpt2_merge_loop(word, ranks):
    """GPT-2's encoder.py merge loop, as lora_np.bpe.bpe was written before it used a heap: each
    round finds the lowest-ranked adjacent pair and merges every occurrence, left to right. The
    reference the heap must agree with, id for id (it is quadratic on long pieces)."""
    parts = list(word)
    while len(parts) > 1:
        pair = min(pairwise(parts), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        parts = merge_pair(parts, pair)
    return parts


@given(st.lists(st.sampled_from(ENGLISH_CHARS[:40]), min_size=1, max_size=60).map("".join))
def test_heap_merge_loop_agrees_with_gpt2s_loop_on_a_learned_vocabulary(piece):
    ranks = trained().bpe_ranks
    word = "".join(BYTE[b] for b in piece.encode("utf-8"))
    assert bpe(word, ranks) == gpt2_merge_loop(word, ranks)


@st.composite
def merge_tables(draw):
    """Any merge table the tokenizer accepts over a 3-letter alphabet, in any order: unlike a
    trainer's, a merge may rank before the merges that make its pieces, so a merge can form a
    pair of lower rank than its own (the case where one round must finish before the next)."""
    tokens, pairs = ["a", "b", "c"], []
    for _ in range(draw(st.integers(0, 10))):
        pair = (draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens)))
        if pair not in pairs:
            pairs.append(pair)
            tokens.append(pair[0] + pair[1])
    order = draw(st.permutations(pairs))
    return {pair: k for k, pair in enumerate(order)}


@settings(max_examples=500)  # microseconds each; 1 in 20 random tables meets a round that must finish first
@given(merge_tables(), st.text(alphabet="abc", min_size=1, max_size=40))
def test_heap_merge_loop_agrees_with_gpt2s_loop_on_any_merge_table(ranks, word):
    assert bpe(word, ranks) == gpt2_merge_loop(word, ranks)


def test_a_round_finishes_before_a_lower_rank_pair_it_formed():
    # ("ab", "a") ranks before ("a", "b"): GPT-2 merges both a-b first, and no "ab a" is left
    ranks = {("ab", "a"): 0, ("a", "b"): 1}
    assert bpe("abab", ranks) == gpt2_merge_loop("abab", ranks) == ["ab", "ab"]
    # ("x", "ab") ranks first but exists only after the a-b round
    ranks = {("x", "ab"): 0, ("a", "b"): 1}
    assert bpe("xabab", ranks) == gpt2_merge_loop("xabab", ranks) == ["xab", "ab"]


@pytest.mark.parametrize("seed", range(3))
def test_heap_merge_loop_agrees_with_gpt2s_loop_on_long_text_without_whitespace(seed):
    """A few thousand letters in one piece: many rounds, long chains of merges and stale heap
    entries. (The speed is measured by hand, not here: no timing in tests.)"""
    rng = random.Random(seed)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzeeetttaaa") for _ in range(3_000))
    text = english_text(3_000, seed=seed).replace(" ", "").replace("\n", "")  # English words, run together
    tok = trained()
    for piece in (letters, text[:3_000]):
        word = "".join(BYTE[b] for b in piece.encode("utf-8"))
        expected = gpt2_merge_loop(word, tok.bpe_ranks)
        assert bpe(word, tok.bpe_ranks) == expected and len(expected) < len(word)
    word = "".join(BYTE[b] for b in letters.encode("utf-8"))
    assert tok.encode(letters) == [tok.encoder[t] for t in gpt2_merge_loop(word, tok.bpe_ranks)]  # one piece


def test_bounded_cache_does_not_change_the_ids(monkeypatch):
    text = english_text(3_000, seed=2)
    expected = trained().encode(text)
    monkeypatch.setattr(lora_np.bpe, "CACHE_SIZE", 3)
    tok = GPT2Tokenizer(trained().encoder, list(trained().bpe_ranks))
    assert tok.encode(text) == expected and len(tok._cache) <= 3


# ---------------------------------------------------------------- files


def write_files(tmp_path, encoder, merges_text):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps(encoder), encoding="utf-8")  # ASCII-escaped, like GPT-2's
    merges.write_bytes(merges_text if isinstance(merges_text, bytes) else merges_text.encode("utf-8"))
    return vocab, merges


def merges_file(merges, newline="\n"):
    return newline.join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]) + newline


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_from_files_reads_what_the_constructor_takes(tmp_path, newline):
    tok = hand()
    paths = write_files(tmp_path, tok.encoder, merges_file(HAND_MERGES, newline))
    loaded = GPT2Tokenizer.from_files(*paths)
    assert loaded.encoder == tok.encoder and loaded.bpe_ranks == tok.bpe_ranks
    assert loaded.eot_id == 266 and loaded.vocab_size == 267
    text = "hello world, she's 12 €!\n"
    assert loaded.encode(text) == tok.encode(text)


def test_a_merges_file_without_header_is_read_too(tmp_path):
    paths = write_files(tmp_path, hand().encoder, "h e\nl l\n\nhe ll\n")
    assert GPT2Tokenizer.from_files(*paths).bpe_ranks == {("h", "e"): 0, ("l", "l"): 1, ("he", "ll"): 2}


BAD_MERGES = [
    ("#version: 0.2\nh e\nl l l\n", r"merges\.txt, line 3: expected two tokens separated by one space, got 'l l l'"),
    ("h e\nh  e\n", r"merges\.txt, line 2: expected two tokens"),
    ("h e\nhe\n", r"merges\.txt, line 2: expected two tokens"),
    ("#version: 0.2\nh e\n\nq z\n", r"merges\.txt, line 4: the merge 'q z' has the result 'qz', which is not in"),
    ("h e\nh ☃\n", r"merges\.txt, line 2: the merge 'h ☃' has the second piece '☃', which is not in"),
    ("h e\n#version: 0.2\n", r"merges\.txt, line 2: the merge '#version: 0.2' has the first piece '#version:'"),
    ("h e\nl l\nh e\n", r"merges\.txt, line 3: the merge 'h e' repeats line 1"),
    (b"h e\n\xff\xfe\n", r"merges\.txt, line 2: not UTF-8 text"),
]


@pytest.mark.parametrize("text, message", BAD_MERGES)
def test_a_malformed_merges_file_is_refused_with_its_line(tmp_path, text, message):
    paths = write_files(tmp_path, hand().encoder, text)
    with pytest.raises(CheckpointError, match=message):
        GPT2Tokenizer.from_files(*paths)


def vocab_with(**changes):
    """The hand vocabulary as JSON text, with entries changed (a value None removes the entry)."""
    encoder = dict(hand().encoder)
    for token, i in changes.items():
        if i is None:
            del encoder[token]
        else:
            encoder[token] = i
    return json.dumps(encoder)


BAD_VOCABS = [
    ("{", r"vocab\.json, line 1, column 2: not valid JSON"),
    ("[0, 1]", r"vocab\.json: must hold a JSON object token -> id, got a list"),
    (vocab_with(he=1.0), r"vocab\.json: the token 'he' has the id 1\.0; ids must be integers"),
    (vocab_with(he=True), r"the token 'he' has the id True"),
    (vocab_with(he="256"), r"the token 'he' has the id '256'"),
    (vocab_with(he=257), r"vocab\.json: the vocabulary gives the id 257 to both"),
    (vocab_with(zz=1000), r"gives 'zz' the id 1000; the ids of 268 tokens must be 0 \.\. 267"),
    ('{"a": 0, "a": 1}', r"vocab\.json: the token 'a' appears twice"),
    (vocab_with(a=None, zz=97), r"has no token for the byte 97 \('a'\), nor for 0 other bytes"),
    (vocab_with(**{"<|endoftext|>": None, "a b": 266}), r"the token 'a b', whose character ' ' is not one of the 256"),
]


@pytest.mark.parametrize("text, message", BAD_VOCABS)
def test_a_malformed_vocab_file_is_refused(tmp_path, text, message):
    vocab, merges = write_files(tmp_path, {}, merges_file(HAND_MERGES[:1]))
    vocab.write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match=message):
        GPT2Tokenizer.from_files(vocab, merges)


def test_missing_files_are_named(tmp_path):
    vocab, merges = write_files(tmp_path, hand().encoder, "h e\n")
    with pytest.raises(CheckpointError, match=r"nope\.json: no such file"):
        GPT2Tokenizer.from_files(tmp_path / "nope.json", merges)
    with pytest.raises(CheckpointError, match=r"nope\.txt: no such file"):
        GPT2Tokenizer.from_files(vocab, tmp_path / "nope.txt")


# ---------------------------------------------------------------- arguments

BAD_ARGUMENTS = [
    ([], HAND_MERGES, TypeError, r"encoder must be a dict token str -> id \(as in vocab\.json\), got list"),
    ({**byte_vocab(), 5: 256}, [], TypeError, r"encoder keys must be token strs, got 5 \(int\)"),
    ({**byte_vocab(), "he": "256"}, [], TypeError, r"encoder\['he'\] must be an int id, got '256' \(str\)"),
    ({**byte_vocab(), "he": 300}, [], ValueError, r"encoder gives 'he' the id 300; the ids of 257 tokens must be"),
    (byte_vocab(), {"h": "e"}, TypeError, r"merges must be a list of \(a, b\) pairs"),
    (byte_vocab(), [("h", "e", "x")], TypeError, r"merges\[0\] must be a pair of token strs \(a, b\), got \('h', 'e',"),
    (byte_vocab(), [("h", "e")], ValueError, r"merges\[0\] = \('h', 'e'\) has the result 'he', which is not in"),
    ({**byte_vocab(), "he": 256}, [("h", "e"), ["h", "e"]], ValueError, r"merges\[1\] = \('h', 'e'\) repeats"),
]


@pytest.mark.parametrize("encoder, merges, error, message", BAD_ARGUMENTS)
def test_bad_constructor_arguments_are_named(encoder, merges, error, message):
    with pytest.raises(error, match=message):
        GPT2Tokenizer(encoder, merges)


@pytest.mark.parametrize(
    "ids, error, message",
    [
        ([1, -1], ValueError, r"ids\[1\] = -1 is not a token id; allowed: 0 <= id < vocab_size = 267"),
        ([267], ValueError, r"ids\[0\] = 267 is not a token id"),
        (np.array([3, 2**40]), ValueError, r"ids\[1\] = 1099511627776 is not a token id"),
        ([1.0], TypeError, r"ids\[0\] must be an int token id, got 1\.0 \(float\)"),
        ([True], TypeError, r"ids\[0\] must be an int token id, got True \(bool\)"),
        ("abc", TypeError, r"ids must be a sequence of int token ids, got str"),
        (None, TypeError, r"ids must be a sequence of int token ids, got NoneType"),
    ],
)
def test_bad_ids_are_named(ids, error, message):
    with pytest.raises(error, match=message):
        hand().decode(ids)


def test_encode_refuses_a_non_str_and_a_lone_surrogate():
    with pytest.raises(TypeError, match=r"text must be a str, got bytes"):
        hand().encode(b"hello")
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at position 2"):
        hand().encode("ab\ud800c")
