"""Extend a byte-level BPE tokenizer (LLaMA-3, Qwen `tokenizer.json`) with Japanese tokens reached by real merges.

    ext = extend_byte_level_bpe(base / "tokenizer.json", japanese_texts, 16000, out_dir)

BPE training continues on the Japanese corpus from where the base tokenizer stopped: the corpus is tokenized by
the base tokenizer, new merges are learned on top of those tokens, and they are appended after the base merges,
each creating one new vocabulary entry (ids from `base_size`, after the added/special tokens). The new tokens
are thus produced by the ordinary BPE model inside words, not matched as `added_tokens` (which are cut out of
the raw text before pre-tokenization, wherever they occur, and never combine with neighbouring tokens).

Why appending is exact. The model applies the merges present in a pre-token in rank order. All base merges rank
before the new ones, so they first rebuild the base tokenization; the new merges then only create tokens absent
from the base vocabulary, which no base merge takes as input, so no base merge fires again. The new merges thus
act on the base tokens as during learning (lowest rank first, left to right), and a pre-token holding none of
their pairs keeps its base ids. On the training words (without morpheme cuts) the extended tokenizer gives
exactly the base token count minus the merges applied while learning, for Qwen and LLaMA-3 alike. LLaMA-3's
`ignore_merges` (a pre-token spelling a vocabulary entry becomes that token without merging) only adds a
shortcut for pre-tokens that spell a new entry, which are Japanese; every new token that is whole UTF-8 encodes
on its own to itself with or without it (`tests/test_extend_bpe.py`).

What is learned on (`training_pieces`): the base tokenizer's pre-tokens (the regex split: a run of letters with
an optional leading space or punctuation character, a run of punctuation, ...) that contain a Japanese
character; English text is not looked at. With `morpheme_boundaries`, a pre-token is further cut where a
base-token boundary coincides with a fugashi (MeCab, UniDic-lite) morpheme boundary, so no learned merge joins
two morphemes on the training text; a base token that already spans a boundary (Qwen's 'ですね') cannot be cut
and stays whole. At encoding time there are no morpheme cuts, so a merge may also fire across a boundary.

Which merges are allowed (`learn_merges`: greedy on pair frequency, at least `MIN_FREQUENCY`):
* the result must cover (part of) a Japanese character (`touches_japanese`): then it fires only where the text
  holds a Japanese character (or, for a token ending inside a character, one with the same leading bytes), and
  no budget goes to e.g. ASCII inside a mixed word ('Python' of 'Pythonで');
* the result must not be in the vocabulary yet: not a base token (it would feed base merges again and break the
  argument above), nor a new token that another pair already made (one merge per new token keeps `new_tokens`,
  `counts` and the merges aligned, and no pair is merged twice).
Rules applied while learning, not by dropping learned merges afterwards, leave no merge depending on a dropped
one. This is why the learner is a plain incremental pair-count BPE in Python (pair -> count, pair -> pieces
holding it, a lazy max-heap) rather than `tokenizers`' BpeTrainer, which cannot be told to skip pairs; it learns
16,000 tokens on the 1 MB bundled Japanese corpus in about 3 s on 2 cores, encoding and tagging included
(10-12 s without morpheme cuts, whose pieces are longer).

The written tokenizer.json is the base file with the new vocabulary entries and merges appended (merges in the
base's format: LLaMA-3 "a b", Qwen ["a", "b"]); the added tokens are also listed in `model.vocab` under their
own ids, which `tokenizers` needs to keep those ids (`write_extended`). Nothing else changes.
"""

from __future__ import annotations

import heapq
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer
from tqdm import tqdm

from pipeline.errors import JpadaptError
from tokenizer.analysis import JAPANESE_SCRIPTS, SCRIPT_TABLE, analyze, code_points, make_tagger
from tokenizer.load import _bytes_to_unicode

MIN_FREQUENCY = 2  # a pair seen once is noise, not a token worth an embedding row

_BATCH_CHARS = 1 << 20  # texts are encoded (on all cores) and tagged in batches of about this many characters

_BYTE_OF_CHAR: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}

Pair = tuple[int, int]


@dataclass(frozen=True)
class BpeExtension:
    """What `extend_byte_level_bpe` added."""

    base_size: int  # ids in the base tokenizer incl. added/special tokens; first new id
    new_ids: list[int]  # ids of new vocabulary entries, ascending, contiguous from base_size
    new_tokens: list[bytes]  # the bytes each new token stands for, same order
    counts: list[int]  # how often each new merge applied on the training words (for "examples by frequency")
    seconds: float  # wall time of learning: reading the base, encoding and tagging the texts, BPE (not writing)


def extend_byte_level_bpe(
    base_json: Path,
    texts: Iterable[str],
    new_tokens: int,
    out_dir: Path,
    *,
    morpheme_boundaries: bool = True,
    progress: bool = False,
) -> BpeExtension:
    """Learn `new_tokens` Japanese merges on `texts` on top of `base_json`; write `out_dir/tokenizer.json`.

    Raises JpadaptError if the base is not a byte-level BPE tokenizer.json, or if the corpus has fewer than
    `new_tokens` allowed pairs seen `MIN_FREQUENCY` times or more.
    """
    start = time.perf_counter()
    data, tokenizer = read_base(base_json)
    vocab: dict[str, int] = data["model"]["vocab"]
    base_size = 1 + max([*vocab.values(), *(t["id"] for t in data.get("added_tokens") or [])])

    pieces = training_pieces(tokenizer, texts, morpheme_boundaries, progress)
    token_bytes = {i: _bytes_of(vocab_string) for vocab_string, i in vocab.items()}
    merges = learn_merges(pieces, token_bytes, set(token_bytes.values()), base_size, new_tokens, progress)
    if len(merges) < new_tokens:
        raise JpadaptError(
            f"the Japanese corpus supports only {len(merges)} new tokens (asked for {new_tokens}); "
            "lower extend_vocab.new_tokens or add text"
        )
    seconds = time.perf_counter() - start

    new_ids = list(range(base_size, base_size + len(merges)))
    write_extended(data, merges, base_size, out_dir / "tokenizer.json")
    check_ids(out_dir / "tokenizer.json", data, base_json)
    return BpeExtension(
        base_size=base_size,
        new_ids=new_ids,
        new_tokens=[token_bytes[i] for i in new_ids],
        counts=[count for _, _, count in merges],
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------------------------
# The base tokenizer


def read_base(path: Path) -> tuple[dict, Tokenizer]:
    """The base tokenizer.json as parsed JSON (to be extended and written back) and as a `Tokenizer`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JpadaptError(f"tokenizer file {path}: cannot read it as JSON ({exc})") from exc
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not all(_has_byte_level(data.get(key)) for key in ("pre_tokenizer", "decoder")):
        raise JpadaptError(
            f"tokenizer file {path}: not a byte-level BPE tokenizer (model {model.get('type')!r}; the pre-tokenizer "
            "and the decoder need a ByteLevel step); SentencePiece-style tokenizers are extended differently"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        # A merge's result would then not be the plain concatenation of its two strings.
        raise JpadaptError(
            f"tokenizer file {path}: BPE with a continuing_subword_prefix or end_of_word_suffix is not supported"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot deserialize
        raise JpadaptError(f"tokenizer file {path}: not a valid tokenizer.json ({exc})") from exc
    return data, tokenizer


def _has_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    steps = component.get("pretokenizers") or component.get("decoders") or [component]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _bytes_of(vocab_string: str) -> bytes:
    """The bytes a byte-level vocabulary string stands for (GPT-2 map: one character per byte)."""
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in vocab_string)
    except KeyError:
        return vocab_string.encode("utf-8")  # outside the map (a special token listed in the vocab): as the decoder


# ---------------------------------------------------------------------------------------------------------------
# Japanese characters


def _japanese_table() -> np.ndarray:
    """Code point -> Japanese: hiragana, katakana, kanji (as in tokenizer/analysis.py), CJK symbols and
    punctuation (U+3000–U+303F: 、。「」 and the ideographic space) and halfwidth/fullwidth forms (U+FF00–U+FFEF)."""
    table = np.isin(SCRIPT_TABLE, JAPANESE_SCRIPTS)
    table[0x3000:0x3040] = True
    table[0x30A0:0x3100] = True  # the katakana block's punctuation too: ゠ and the middle dot ・
    table[0xFF00:0xFFF0] = True
    return table


_JAPANESE: np.ndarray = _japanese_table()
_JAPANESE_BEFORE: np.ndarray = np.concatenate(([0], np.cumsum(_JAPANESE, dtype=np.int32)))

# UTF-8 lead byte -> (sequence length, bits of the code point it carries).
_LEAD: dict[int, tuple[int, int]] = {
    **{b: (2, b & 0x1F) for b in range(0xC2, 0xE0)},
    **{b: (3, b & 0x0F) for b in range(0xE0, 0xF0)},
    **{b: (4, b & 0x07) for b in range(0xF0, 0xF5)},
}


def touches_japanese(raw: bytes) -> bool:
    """True if a token with these bytes covers (part of) a Japanese character.

    Byte-level tokens may cut characters: leading continuation bytes end a character begun in the token before
    (unknown, ignored); an incomplete last character is judged by the code points it could still become
    (E6 97 can only be U+65C0–U+65FF, kanji), so the merges that assemble a kanji from fragments are allowed.
    """
    start = 0
    while start < len(raw) and raw[start] & 0xC0 == 0x80:
        start += 1
    text = raw[start:].decode("utf-8", errors="ignore")
    if text and _JAPANESE[code_points(text)].any():
        return True
    tail = _incomplete_tail(raw[start:])
    if not tail or tail[0] not in _LEAD:
        return False
    length, value = _LEAD[tail[0]]
    for byte in tail[1:]:
        value = value << 6 | byte & 0x3F
    missing = 6 * (length - len(tail))
    low, high = value << missing, min((value + 1) << missing, len(_JAPANESE))
    return bool(_JAPANESE_BEFORE[high] > _JAPANESE_BEFORE[low])


def _incomplete_tail(raw: bytes) -> bytes:
    """The bytes after the last lead byte if they are too few for its character, else b''."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte & 0xC0 != 0x80:
            length = _LEAD.get(byte, (1, 0))[0]
            return raw[-back:] if back < length else b""
    return b""


# ---------------------------------------------------------------------------------------------------------------
# Training pieces


def training_pieces(
    tokenizer: Tokenizer, texts: Iterable[str], morpheme_boundaries: bool, progress: bool
) -> Counter[tuple[int, ...]]:
    """Distinct base-token sequences to learn merges on, with how often each occurs in `texts`.

    A piece is a pre-token holding a Japanese character, cut at morpheme boundaries if asked; one-token pieces
    hold no pair and are left out.
    """
    tagger = make_tagger() if morpheme_boundaries else None
    pieces: Counter[tuple[int, ...]] = Counter()
    for batch in tqdm(_batches(texts), desc="tokenize", unit="batch", disable=not progress):
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        for text, encoding in zip(batch, encodings):
            pieces.update(_text_pieces(text, encoding, tagger))
    return pieces


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _text_pieces(text: str, encoding: Encoding, tagger) -> Iterator[tuple[int, ...]]:
    """The pieces of one text: its base tokens cut at pre-token (word) boundaries and, with a tagger, at morpheme
    boundaries that fall between two tokens; kept if at least two tokens long and touching a Japanese character."""
    ids = encoding.ids
    n = len(ids)
    if n < 2:
        return
    # Added tokens are split off before pre-tokenization, so they are words of their own and never in a piece.
    words = np.fromiter((-1 if w is None else w for w in encoding.word_ids), dtype=np.int64, count=n)
    offsets = np.asarray(encoding.offsets, dtype=np.int64)  # characters of the original text, (n, 2)
    cut_before = np.empty(n, dtype=bool)  # a piece starts at token i
    cut_before[0] = True
    cut_before[1:] = words[1:] != words[:-1]
    if tagger is not None:
        analysis = analyze(tagger, text)
        # Fragments of one character share its span, so "touching" means both tokens end/start on a character
        # boundary; morpheme boundaries are in whitespace-free coordinates, like `nonspace_before`.
        touching = offsets[:-1, 1] == offsets[1:, 0]
        at_morpheme = np.isin(analysis.nonspace_before[offsets[1:, 0]], analysis.morpheme_boundaries)
        cut_before[1:] |= touching & at_morpheme
    starts = np.flatnonzero(cut_before)
    ends = np.append(starts[1:], n)
    japanese_before = np.concatenate(([0], np.cumsum(_JAPANESE[code_points(text)])))
    japanese = japanese_before[offsets[ends - 1, 1]] > japanese_before[offsets[starts, 0]]
    keep = japanese & (ends - starts > 1)
    for start, end in zip(starts[keep].tolist(), ends[keep].tolist()):
        yield tuple(ids[start:end])


# ---------------------------------------------------------------------------------------------------------------
# Learning


def learn_merges(
    pieces: Counter[tuple[int, ...]],
    token_bytes: dict[int, bytes],
    base_tokens: set[bytes],
    first_id: int,
    budget: int,
    progress: bool,
) -> list[tuple[int, int, int]]:
    """Greedy BPE on `pieces`: up to `budget` merges (left id, right id, times applied), in learned order.

    Merge k creates id `first_id + k`, whose bytes are added to `token_bytes`. Ties go to the smaller ids.
    """
    words = [list(piece) for piece in pieces]
    freqs = list(pieces.values())
    counts: defaultdict[Pair, int] = defaultdict(int)
    where: defaultdict[Pair, set[int]] = defaultdict(set)  # may name pieces that lost the pair since
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in pairwise(word):
            counts[pair] += freq
            where[pair].add(i)

    known = set(base_tokens)
    japanese: dict[Pair, bool] = {}

    def allowed(pair: Pair) -> bool:
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if pair not in japanese:
            japanese[pair] = touches_japanese(merged)
        return japanese[pair] and merged not in known

    # Max-heap with lazy updates: an entry may hold an outdated count; popping it re-queues the current one.
    heap = [(-count, pair) for pair, count in counts.items() if allowed(pair)]
    heapq.heapify(heap)
    merges: list[tuple[int, int, int]] = []
    bar = tqdm(total=budget, desc="learn merges", unit="token", disable=not progress)
    while heap and len(merges) < budget:
        negative, pair = heapq.heappop(heap)
        count = counts[pair]
        if not allowed(pair):  # another pair made this token meanwhile
            continue
        if count != -negative:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < MIN_FREQUENCY:
            break
        new_id = first_id + len(merges)
        token_bytes[new_id] = token_bytes[pair[0]] + token_bytes[pair[1]]
        known.add(token_bytes[new_id])
        applied, grown = _apply_merge(pair, new_id, words, freqs, counts, where)
        merges.append((pair[0], pair[1], applied))
        for other in grown:
            if allowed(other):
                heapq.heappush(heap, (-counts[other], other))
        bar.update()
    bar.close()
    return merges


def _apply_merge(
    pair: Pair,
    new_id: int,
    words: list[list[int]],
    freqs: list[int],
    counts: defaultdict[Pair, int],
    where: defaultdict[Pair, set[int]],
) -> tuple[int, set[Pair]]:
    """Replace `pair` by `new_id` in every piece; update the pair counts. Returns (times applied, pairs whose
    count grew)."""
    applied = 0
    delta: defaultdict[Pair, int] = defaultdict(int)
    for i in where.pop(pair):
        word = words[i]
        merged = _merge_word(word, pair, new_id)
        if len(merged) == len(word):
            continue
        freq = freqs[i]
        applied += (len(word) - len(merged)) * freq
        for old in pairwise(word):
            delta[old] -= freq
        for new in pairwise(merged):
            delta[new] += freq
            where[new].add(i)
        words[i] = merged
    grown = set()
    for changed, change in delta.items():
        if change:
            counts[changed] += change
            if change > 0:
                grown.add(changed)
    return applied, grown


def _merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """`word` with every occurrence of `pair`, left to right without overlap (as the BPE model does), merged."""
    left, right = pair
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == left and i + 1 < n and word[i + 1] == right:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_extended(data: dict, merges: list[tuple[int, int, int]], first_id: int, path: Path) -> None:
    """Write `data` (the base tokenizer.json) with the new entries and merges appended, all else unchanged.

    One addition is needed besides: `tokenizers` ignores the ids of `added_tokens` when it loads a file and
    numbers them from the model's vocabulary size (its number of entries) on. With the new entries after them,
    the added tokens would move onto new ids (Qwen's '<tool_call>' onto a new token). Listed in the model
    vocabulary under their ids as well, they keep them; the model never produces them, since they are split
    off the text before pre-tokenization and no merge makes them.
    """
    model = data["model"]
    for token in data.get("added_tokens") or []:
        model["vocab"].setdefault(token["content"], token["id"])
    strings = {i: s for s, i in model["vocab"].items()}
    as_text = bool(model["merges"]) and isinstance(model["merges"][0], str)  # LLaMA-3: "a b"; Qwen: ["a", "b"]
    for new_id, (left, right, _) in enumerate(merges, start=first_id):
        strings[new_id] = strings[left] + strings[right]
        model["vocab"][strings[new_id]] = new_id
        # Byte-level strings never hold a space (it is 'Ġ'), so "a b" is unambiguous.
        model["merges"].append(f"{strings[left]} {strings[right]}" if as_text else [strings[left], strings[right]])
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def check_ids(path: Path, data: dict, base_json: Path) -> None:
    """Load the written file as `tokenizers` does and check that every token, old and new, has its id in `data`.

    `write_extended` relies on how `tokenizers` numbers added tokens; a base whose ids have gaps (ids that
    neither the vocabulary nor the added tokens use) would still be renumbered, silently shifting ids.
    """
    loaded = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    expected = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens") or []}}
    moved = [(token, i, loaded.get(token)) for token, i in expected.items() if loaded.get(token) != i]
    if moved:
        token, i, got = moved[0]
        raise JpadaptError(
            f"tokenizer file {base_json}: its ids have gaps, so the extended tokenizer would renumber "
            f"{len(moved)} tokens ({token!r}: {i} -> {got}); extending it is not supported"
        )
