"""GPT-2's tokenizer in pure Python: byte-level byte-pair encoding (BPE).

Text becomes token ids in four steps, each a function below:

1. pre-tokenize: a regular expression cuts the text into words, numbers, punctuation runs
   and whitespace, each usually with one leading space (`pretokenize`);
2. bytes: each piece is encoded as UTF-8 and every byte is written as one printable
   character, so a piece is a plain string over a 256-character alphabet
   (`bytes_to_unicode`: the space byte is "Ġ", the newline "Ċ");
3. merge: starting from single bytes, the learned merges are applied, lowest rank
   (earliest learned) first, until none applies (`bpe`);
4. look up: every resulting token is an entry of the vocabulary, and its id is the output.

Decoding runs steps 4 and 2 backwards: ids to token strings, characters to bytes, bytes to
text with UTF-8 errors replaced by U+FFFD. Any byte string has a spelling in the 256 single-byte
tokens, so there is no unknown token and decode(encode(s)) == s for every valid str s.

Files, as published with GPT-2 and read by `GPT2Tokenizer.from_files`:
- vocab.json (GPT-2's encoder.json): a JSON object, token string -> id. GPT-2's has 50,257
  entries: the 256 bytes, 50,000 merge results and "<|endoftext|>".
- merges.txt (GPT-2's vocab.bpe): a "#version: 0.2" header, then one merge a line, two tokens
  separated by a space, in the order they were learned; the line order is the rank.

Where this differs from GPT-2's encoder.py, on purpose:
- Every file and argument is validated first, and refused with an error that names the file
  and line (CheckpointError) or the argument (ValueError, TypeError): vocabulary ids must be
  exactly 0 .. V-1; the 256 byte tokens must all be present; every token must be spelled in the
  256-character alphabet (else it could not be decoded); a merge whose two pieces or whose
  result is not in the vocabulary, or that repeats an earlier merge, is refused. (GPT-2 would
  fail later, with a KeyError, on the first text that needs the missing token.)
- The merge loop (`bpe`) keeps a heap of adjacent pairs instead of rescanning the piece after
  every merge: O(n log n) per piece of n bytes instead of O(n²), the same tokens. (encoder.py's
  loop took seconds on 40,000 letters without whitespace; tests/test_bpe.py keeps it as the
  reference.)
- encode refuses a str holding a lone surrogate (U+D800..U+DFFF, not valid Unicode and not
  encodable as UTF-8) with a ValueError naming its position.
- "<|endoftext|>" in the text is encoded as ordinary text, exactly as encoder.py does: special
  tokens are never read out of text. Append `eot_id` yourself between documents.
- Pre-tokenization uses the standard library's `re`, not the third-party `regex` module, which
  has no \\p{L} (letter) or \\p{N} (number). The classes are built here from `unicodedata`
  (general categories L* and N*), and whitespace is the Unicode White_Space set, which is what
  `regex`'s \\s matches. Compared over all 1,114,112 code points, on Python 3.11 (unicodedata
  14.0.0) against regex 2026.11.19 (Unicode 18.0.0): whitespace agrees exactly, and every code
  point assigned in Unicode 14.0 is classified exactly as `regex` does; the only differences are
  26,416 letters and 456 numbers (26,872 code points) that were assigned after Unicode 14.0 and
  are unassigned (category Cn) here, e.g. the CJK Extension H ideographs from U+31350, the
  Egyptian hieroglyphs from U+13460, the Garay digits U+10D40..U+10D49. Here they count as
  neither letters nor numbers, so they join the punctuation run ` ?[^\\s\\p{L}\\p{N}]+` and split
  off from the letters and digits around them. Text without them is cut exactly as GPT-2 cuts it.
  The count depends on the Python version (its Unicode version: 3.10 has 13.0, 3.12 15.0, 3.13
  15.1), and GPT-2's own encoder.py likewise gives version-dependent results for such text.
  The shorter stdlib spelling, letters as [^\\W\\d_], numbers as \\d and `re`'s own \\s, would be
  further off: it counts 1,131 numbers of categories Nl and No (², ½, Ⅻ) as letters, and
  U+001C..U+001F as whitespace.

References:
- Radford, Wu, Child, Luan, Amodei, Sutskever, 2019. Language Models are Unsupervised Multitask
  Learners. Section 2.2, Input Representation: byte-level BPE, and no merges across character
  categories except for a leading space.
- OpenAI, gpt-2 repository, src/encoder.py: bytes_to_unicode, the pre-tokenization pattern, the
  merge loop and its cache, and decoding with errors="replace".
- Sennrich, Haddow, Birch, 2016. Neural Machine Translation of Rare Words with Subword Units.
  ACL. BPE: merges learned by frequency, applied in the order learned.
- Hugging Face Transformers, GPT2Tokenizer documentation: the file names vocab.json and
  merges.txt and the "#version" header line.

Legend: V vocabulary size (number of token ids).
"""

import functools
import heapq
import json
import re
import sys
import unicodedata
from itertools import pairwise
from numbers import Integral
from pathlib import Path

from ..training.checkpoint import CheckpointError

EOT = "<|endoftext|>"  # GPT-2's end-of-text token, the last id (50256) of its vocabulary

# GPT-2's pattern, as written in encoder.py for the `regex` module; `pretokenize` uses the
# standard-library translation of it built in `_pattern` below.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Unicode's White_Space property (PropList.txt), which is exactly what `regex`'s \s matches.
# `re`'s \s would also match U+001C..U+001F, the file, group, record and unit separators.
_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

CACHE_SIZE = 100_000  # distinct pieces remembered per tokenizer; far more than a book's words


def bytes_to_unicode():
    """GPT-2's byte -> character table: a dict of 256 entries, byte value -> one-character str.

    The 188 printable bytes ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves; the other 68
    (control characters, space, DEL, NBSP, soft hyphen) get the code points 256, 257, ... in
    byte order, so that no token contains whitespace or control characters: byte 32 (space)
    becomes "Ġ" (U+0120), byte 10 (newline) "Ċ" (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


@functools.cache
def _pattern():
    """GPT2_PATTERN for `re`: \\p{L} and \\p{N} become explicit ranges of code points, read
    from this Python's unicodedata; \\s becomes _SPACE. Built once per process (the scan of all
    1,114,112 code points takes a few tenths of a second) and compiled."""
    ranges = {"L": [], "N": []}  # major category -> list of [first, last] code points
    for cp in range(sys.maxunicode + 1):
        major = unicodedata.category(chr(cp))[0]
        if major in ranges:
            runs = ranges[major]
            if runs and runs[-1][1] == cp - 1:
                runs[-1][1] = cp
            else:
                runs.append([cp, cp])
    L, N = ("".join(rf"\U{a:08x}-\U{b:08x}" for a, b in ranges[m]) for m in "LN")
    S = _SPACE
    # Side by side with GPT2_PATTERN: \p{L} -> [L], \p{N} -> [N], \s -> [S], \S -> [^S].
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


def pretokenize(text):
    """Cut text into GPT-2's pre-tokens (list of str; joined, they give back `text`).

    Letters, numbers and other non-space characters form separate runs, each taking at most
    one leading space; the contractions 's 't 're 've 'm 'll 'd (lower case only, as in
    GPT-2) stand alone; a run of whitespace before a word leaves its last space to the word.
        pretokenize("It's 2 o'clock!  ") == ["It", "'s", " 2", " o", "'", "clock", "!", "  "]
    Merges never cross the cuts, so "dog." and "dog!" share the token for "dog".
    """
    return _pattern().findall(text)


def bpe(word, ranks):
    """Apply merges to one pre-token: GPT-2's merge loop, in O(n log n) for n characters.

    Inputs:
    - word: non-empty str over the bytes_to_unicode alphabet, one character a byte
    - ranks: dict (a, b) -> rank; rank 0 was learned first and is applied first

    Returns: list of tokens (str) whose concatenation is `word`.

    What it computes is GPT-2's loop: each round finds the adjacent pair with the lowest rank
    and merges every occurrence of it, left to right (so "aaa" with a merge ("a", "a") gives
    ["aa", "a"]); it stops when no adjacent pair has a rank.

    How: GPT-2's loop rescans the whole piece after each round, which is quadratic on a long
    piece without whitespace (40,000 random letters: seconds). Here the tokens form a linked
    list and a heap holds every adjacent pair that has a rank, as (rank, start), where start is
    the index in `word` of the pair's first character; a token keeps the start of its first
    character, so starts increase along the list. A merge pushes the (at most two) new pairs it
    forms with its neighbours. Entries are never removed from the heap: one whose pair is no
    longer in the list (a neighbour merged first) is skipped when it comes up (lazy
    invalidation). Each merge costs O(log n) and there are at most n - 1 of them.

    One round is one rank: all entries of the lowest rank are taken off the heap before any is
    merged, then merged in order of start, so that a new pair of lower rank formed by the
    first merge waits for the round to end, as in GPT-2's loop. (A round never forms its own
    pair again: a new pair holds the merged token a+b, which is neither a nor b.)
    """
    n = len(word)
    token = list(word)  # token[i]: the token that starts at character i, or None once merged away
    after = list(range(1, n + 1))  # after[i]: start of the next token (n: none)
    before = list(range(-1, n - 1))  # before[i]: start of the previous token (-1: none)
    heap = [(ranks[pair], i) for i, pair in enumerate(pairwise(word)) if pair in ranks]
    heapq.heapify(heap)

    def pair_at(i):  # the adjacent pair that starts at i, or None
        j = after[i]
        return (token[i], token[j]) if token[i] is not None and j < n else None

    while heap:
        # 1. the pair learned earliest among those present: every entry of its rank, by start
        rank = heap[0][0]
        starts = []
        while heap and heap[0][0] == rank:
            starts.append(heapq.heappop(heap)[1])
        # 2. merge every occurrence still present, left to right
        formed = []
        for i in starts:
            pair = pair_at(i)
            if pair is None or ranks.get(pair) != rank:
                continue  # stale: a neighbour merged since this entry was pushed
            j = after[i]
            token[i], token[j] = pair[0] + pair[1], None  # token j joins token i
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
            formed += [before[i], i]  # the new pairs (previous, merged) and (merged, next)
        # 3. push the new pairs that have a rank (those of a later round are checked then)
        for i in dict.fromkeys(formed):  # once each: two merges side by side both name the pair between them
            pair = pair_at(i) if i >= 0 else None
            if pair in ranks:
                heapq.heappush(heap, (ranks[pair], i))
    return [t for t in token if t is not None]


class GPT2Tokenizer:
    """GPT-2's byte-level BPE tokenizer.

    Inputs:
    - encoder: dict token str -> id, as in vocab.json; ids exactly 0 .. V-1
    - merges: list of (a, b) pairs of token strs, in priority order, as in merges.txt

    encode(text) -> list of V-range ints; decode(ids) -> str. Both are pure functions of the
    vocabulary; the only state is a cache of pieces already encoded (see `encode`).
    """

    def __init__(self, encoder, merges):
        if not isinstance(encoder, dict):
            raise TypeError(f"encoder must be a dict token str -> id (as in vocab.json), got {type(encoder).__name__}")
        for token, i in encoder.items():
            if not isinstance(token, str):
                raise TypeError(f"encoder keys must be token strs, got {token!r} ({type(token).__name__})")
            if not isinstance(i, Integral) or isinstance(i, bool):
                raise TypeError(f"encoder[{token!r}] must be an int id, got {i!r} ({type(i).__name__})")
        problem = _vocab_problem(encoder)
        if problem:
            raise ValueError(f"encoder {problem}")
        if not isinstance(merges, (list, tuple)):
            raise TypeError(f"merges must be a list of (a, b) pairs (as in merges.txt), got {type(merges).__name__}")
        ranks = {}  # (a, b) -> its index in merges: its rank
        for k, pair in enumerate(merges):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise TypeError(f"merges[{k}] must be a pair of token strs (a, b), got {pair!r}")
            pair = tuple(pair)
            problem = _merge_problem(encoder, pair) or (f"repeats merges[{ranks[pair]}]" if pair in ranks else None)
            if problem:
                raise ValueError(f"merges[{k}] = {pair!r} {problem}")
            ranks[pair] = k

        self.encoder = {token: int(i) for token, i in encoder.items()}  # a copy: the cache relies on it
        self.decoder = sorted(self.encoder, key=self.encoder.get)  # id -> token str
        self.bpe_ranks = ranks  # (a, b) -> rank
        self.byte_encoder = bytes_to_unicode()  # byte -> character
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}  # character -> byte
        # Pre-token (as it appears in the text) -> its ids. Words repeat (Zipf), so most pieces of
        # a long text are found here and skip steps 2-4; GPT-2 caches the same way. Cleared when
        # full, so memory stays bounded on text that never repeats.
        self._cache = {}

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        """A tokenizer from a vocab.json and a merges.txt (formats in the module docstring).

        Raises CheckpointError (a ValueError) naming the file, and the line where there is one,
        for a file that is missing, not UTF-8, or does not fit the format.
        """
        encoder = _read_vocab(Path(vocab_path))
        merges, lines = _read_merges(Path(merges_path))
        seen = {}
        for pair, line in zip(merges, lines, strict=True):
            problem = _merge_problem(encoder, pair) or (f"repeats line {seen[pair]}" if pair in seen else None)
            if problem:
                raise CheckpointError(f"{merges_path}, line {line}: the merge {' '.join(pair)!r} {problem}")
            seen[pair] = line
        return cls(encoder, merges)

    @property
    def vocab_size(self):
        """V: the number of token ids, the rows of an embedding matrix for this vocabulary."""
        return len(self.decoder)

    @property
    def eot_id(self):
        """The id of "<|endoftext|>", or None if the vocabulary has no such token."""
        return self.encoder.get(EOT)

    def encode(self, text):
        """Token ids of a str, as a list of ints in [0, V). Raises TypeError for a non-str and
        ValueError for a str holding a lone surrogate, which is not valid Unicode."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text holds a lone surrogate {text[e.start]!r} at position {e.start}; "
                "only valid Unicode (no code points U+D800..U+DFFF) can be encoded as UTF-8 bytes"
            ) from None
        ids = []
        for piece in pretokenize(text):  # 1. pre-tokenize
            piece_ids = self._cache.get(piece)
            if piece_ids is None:
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))  # 2. bytes
                tokens = bpe(word, self.bpe_ranks)  # 3. merge
                piece_ids = [self.encoder[t] for t in tokens]  # 4. look up
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
                self._cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def decode(self, ids):
        """Text of a sequence of token ids (a list, tuple or 1-D integer array).

        Bytes that do not form valid UTF-8 (a sequence cut in the middle of a character) become
        U+FFFD, as in GPT-2. Raises TypeError for a non-integer id, ValueError for one outside
        [0, V).
        """
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a sequence of int token ids, got {type(ids).__name__}")
        ids = list(ids)
        for k, i in enumerate(ids):
            if not isinstance(i, Integral) or isinstance(i, bool):
                raise TypeError(f"ids[{k}] must be an int token id, got {i!r} ({type(i).__name__})")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids[{k}] = {i} is not a token id; allowed: 0 <= id < vocab_size = {self.vocab_size}")
        text = "".join(self.decoder[i] for i in ids)  # 4. ids -> token strings
        data = bytes(self.byte_decoder[c] for c in text)  # 2. characters -> bytes
        return data.decode("utf-8", errors="replace")

    def __repr__(self):
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, merges={len(self.bpe_ranks)}, eot_id={self.eot_id})"


def _vocab_problem(encoder):
    """What makes a token -> id table (str keys, int values) unusable, as the end of a sentence
    that starts with its name; or None. Shared by __init__ and from_files."""
    alphabet = bytes_to_unicode()
    characters = set(alphabet.values())
    owner = {}  # id -> token
    for token, i in encoder.items():
        if i in owner:
            return f"gives the id {i} to both {owner[i]!r} and {token!r}; ids must be unique"
        owner[i] = token
        if not 0 <= i < len(encoder):
            return f"gives {token!r} the id {i}; the ids of {len(encoder)} tokens must be 0 .. {len(encoder) - 1}"
        if not token:
            return "has an empty token ''"
        bad = next((c for c in token if c not in characters), None)
        if bad is not None:
            return (
                f"has the token {token!r}, whose character {bad!r} is not one of the 256 byte characters "
                "of bytes_to_unicode(), so it could not be decoded"
            )
    missing = [b for b, c in alphabet.items() if c not in encoder]
    if missing:
        b = missing[0]
        return (
            f"has no token for the byte {b} ({alphabet[b]!r}), nor for {len(missing) - 1} other bytes; "
            "all 256 single-byte tokens are needed to encode any text"
        )
    return None


def _merge_problem(encoder, pair):
    """Why a merge (a, b) cannot be used with this vocabulary, or None."""
    a, b = pair
    for what, token in (("first piece", a), ("second piece", b), ("result", a + b)):
        if token not in encoder:
            return f"has the {what} {token!r}, which is not in the vocabulary"
    return None


def _read_text(path):
    """A file's text as UTF-8, or a CheckpointError naming the file (and the line of a bad byte)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CheckpointError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_vocab(path):
    """vocab.json as a dict token -> id. A problem with one entry is named by its token: GPT-2's
    vocab.json is a single line, so a line number would not help."""

    def refuse_repeats(pairs):  # json.loads keeps the last of two equal keys, silently
        keys = set()
        for key, _ in pairs:
            if key in keys:
                raise CheckpointError(f"{path}: the token {key!r} appears twice")
            keys.add(key)
        return dict(pairs)

    try:
        encoder = json.loads(_read_text(path), object_pairs_hook=refuse_repeats)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(encoder, dict):
        raise CheckpointError(f"{path}: must hold a JSON object token -> id, got a {type(encoder).__name__}")
    for token, i in encoder.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise CheckpointError(f"{path}: the token {token!r} has the id {i!r}; ids must be integers")
    problem = _vocab_problem(encoder)
    if problem:
        raise CheckpointError(f"{path}: the vocabulary {problem}")
    return encoder


def _read_merges(path):
    """merges.txt as (list of (a, b) pairs, list of their 1-based line numbers)."""
    merges, lines = [], []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")  # a file saved with Windows line ends
        if (number == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{path}, line {number}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
        lines.append(number)
    return merges, lines
