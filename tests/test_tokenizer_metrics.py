"""tokenizer/analysis.py and tokenizer/metrics.py: every metric against values worked out by hand on tiny texts.

The tokenizer is a fake whose vocabulary is written out below; the tokens of each text (ids and character
spans, as a real backend would return them) are written out too, so each expected number can be checked
with pencil and paper. The morphemes are what fugashi + unidic-lite actually return (asserted first).
"""

from __future__ import annotations

import json
import lzma
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from data import assets
from pipeline.errors import JpadaptError
from tokenizer.analysis import SCRIPTS, analyze, classify, make_tagger
from tokenizer.backend import EncodedText
from tokenizer.metrics import JOYO_KANJI, Accumulator, add_costs, renyi_efficiency, token_tables

# SentencePiece-style vocabulary: controls, byte-fallback pieces, '▁' for a space.
PIECES = [
    "<s>", "</s>", "<0x0A>", "<0xE8>", "<0xBC>", "<0xA9>",
    "▁", "吾", "吾輩", "▁吾", "は", "猫", "で", "であ", "ある", "る", "。",
    "ab", "▁c", "1", "カタ", "ナ", "漢字", "名", "前", "叱",
]


def _piece_bytes(piece: str) -> bytes:
    if piece in ("<s>", "</s>"):
        return b""
    if piece.startswith("<0x"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()


@dataclass
class FakeBackend:
    """The vocabulary side of tokenizer.backend.TokenizerBackend, with pieces written out by hand."""

    pieces: list[str] = field(default_factory=lambda: list(PIECES))
    name: str = "fake"
    source: str = "test"
    kind: str = "sentencepiece"

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def token_bytes(self) -> list[bytes]:
        return [_piece_bytes(p) for p in self.pieces]

    @property
    def byte_fallback(self) -> np.ndarray:
        return np.array([p.startswith("<0x") for p in self.pieces])

    @property
    def special(self) -> np.ndarray:
        return np.array([p in ("<s>", "</s>") for p in self.pieces])


def encoded(tokens: list[tuple[str, int, int]], pieces: list[str] = PIECES) -> EncodedText:
    """(piece, start, end) per token -> EncodedText."""
    return EncodedText(
        ids=np.array([pieces.index(p) for p, _, _ in tokens], dtype=np.int64),
        spans=np.array([(s, e) for _, s, e in tokens], dtype=np.int64).reshape(-1, 2),
    )


@pytest.fixture(scope="module")
def tagger():
    return make_tagger()


@pytest.fixture(scope="module")
def tables():
    return token_tables(FakeBackend())


# 吾輩は猫である。 — 輩 (U+8F29, UTF-8 E8 BC A9) has no piece and falls back to three byte pieces; the
# dummy-prefix '▁' covers no character; 'であ' straddles the morphemes で|ある.
CAT = "吾輩は猫である。"
CAT_TOKENS = [
    ("▁", 0, 0), ("吾", 0, 1), ("<0xE8>", 1, 2), ("<0xBC>", 1, 2), ("<0xA9>", 1, 2),
    ("は", 2, 3), ("猫", 3, 4), ("であ", 4, 6), ("る", 6, 7), ("。", 7, 8),
]


def cat_result(tagger, tables, roundtrip_ok=True) -> dict:
    acc = Accumulator(tables)
    acc.add(analyze(tagger, CAT), encoded(CAT_TOKENS), roundtrip_ok)
    return acc.result()


def test_fugashi_segments_the_test_sentences_as_hard_coded(tagger):
    a = analyze(tagger, CAT)
    assert [CAT[s:e] for s, e in a.morphemes] == ["吾輩", "は", "猫", "で", "ある", "。"]
    assert a.morpheme_boundaries.tolist() == [2, 3, 4, 5, 7]
    b = analyze(tagger, "ab c1カタナ\n")
    assert b.morphemes.tolist() == [[0, 2], [3, 4], [4, 5], [5, 8]]  # ab | c | 1 | カタナ


def test_token_tables(tables):
    # partial: the three byte pieces of a 3-byte character; <0x0A> is a whole character, <s> (b'') counts whole
    assert [PIECES[i] for i in np.flatnonzero(tables.partial)] == ["<0xE8>", "<0xBC>", "<0xA9>"]
    assert [PIECES[i] for i in np.flatnonzero(tables.byte_fallback)] == ["<0x0A>", "<0xE8>", "<0xBC>", "<0xA9>"]
    japanese = [
        "吾", "吾輩", "▁吾", "は", "猫", "で", "であ", "ある", "る", "カタ", "ナ", "漢字", "名", "前", "叱",
    ]
    assert [PIECES[i] for i in np.flatnonzero(tables.japanese)] == japanese
    kana = ["は", "で", "であ", "ある", "る", "カタ", "ナ"]
    assert [PIECES[i] for i in np.flatnonzero(tables.kana)] == kana
    # exact bytes only: '吾輩' is two kanji, '▁吾' is b' \xe5\x90\xbe'
    assert tables.single_token_kanji == frozenset("吾猫名前叱")
    assert tables.vocab_size == 26


def test_counts_and_compression(tagger, tables):
    r = cat_result(tagger, tables)
    assert (r["documents"], r["chars"], r["bytes"], r["morphemes"], r["tokens"]) == (1, 8, 24, 6, 10)
    assert r["chars_per_token"] == pytest.approx(0.8)
    assert r["bytes_per_token"] == pytest.approx(2.4)
    assert r["tokens_per_morpheme"] == pytest.approx(10 / 6)
    assert r["byte_fallback_rate"] == pytest.approx(0.3)
    assert r["partial_char_rate"] == pytest.approx(0.3)


def test_morpheme_boundaries_and_continued_morphemes(tagger, tables):
    r = cat_result(tagger, tables)
    # T = {1, 2, 3, 4, 6, 7}: 0 (after the empty '▁') is the edge, and the byte pieces inside 輩 touch no
    # boundary (each ends at 2 but the next starts at 1). M = {2, 3, 4, 5, 7}. T ∩ M = {2, 3, 4, 7}.
    assert r["boundary_precision"] == pytest.approx(4 / 6)
    assert r["boundary_recall"] == pytest.approx(4 / 5)
    assert r["boundary_f1"] == pytest.approx(8 / 11)
    # 吾輩 is overlapped by 吾 + 3 byte pieces, ある by であ + る; the rest by one token each
    assert r["continued_morpheme_rate"] == pytest.approx(2 / 6)
    assert r["morpheme_token_histogram"] == {"1": 4, "2": 1, "3": 0, "4": 1, "5": 0, "6": 0, "7": 0, "8+": 0}
    assert r["uncovered_morphemes"] == 0


def test_empty_span_token_overlaps_no_morpheme(tagger, tables):
    # a '▁' with an empty span between 吾 and 輩 (inside the morpheme 吾輩) is not one of its tokens
    tokens = [("吾", 0, 1), ("▁", 1, 1)] + CAT_TOKENS[2:]
    acc = Accumulator(tables)
    acc.add(analyze(tagger, CAT), encoded(tokens), True)
    r = acc.result()
    assert r["morpheme_token_histogram"]["4"] == 1 and r["morpheme_token_histogram"]["5"] == 0
    assert r["boundary_precision"] == pytest.approx(4 / 6)  # 1 is a boundary once, not twice


def test_boundaries_ignore_where_the_space_goes(tagger, tables):
    text = "吾輩は 猫"  # morphemes 吾輩 | は | 猫: M = {2, 3} in whitespace-free positions
    pieces = PIECES + [" ", "は▁", "▁猫"]
    backend = FakeBackend(pieces=pieces)
    t = token_tables(backend)
    variants = [
        [("吾輩", 0, 2), ("は", 2, 3), ("▁猫", 3, 5)],
        [("吾輩", 0, 2), ("は▁", 2, 4), ("猫", 4, 5)],
        [("吾輩", 0, 2), ("は", 2, 3), (" ", 3, 4), ("猫", 4, 5)],  # 3 and 4 both map to 3: one boundary
    ]
    for tokens in variants:
        acc = Accumulator(t)
        acc.add(analyze(tagger, text), encoded(tokens, pieces), True)
        r = acc.result()
        assert (r["boundary_precision"], r["boundary_recall"], r["boundary_f1"]) == (1.0, 1.0, 1.0), tokens


def test_scripts_per_token(tagger, tables):
    text = "ab c1カタナ\n"
    tokens = [("ab", 0, 2), ("▁c", 2, 4), ("1", 4, 5), ("カタ", 5, 7), ("ナ", 7, 8), ("<0x0A>", 8, 9)]
    acc = Accumulator(tables)
    acc.add(analyze(tagger, text), encoded(tokens), True)
    r = acc.result()
    # '▁c' starts at the space but counts for 'c'; '<0x0A>' holds only whitespace: "other"
    assert r["script_chars"] == {"hiragana": 0, "katakana": 3, "kanji": 0, "latin": 3, "digit": 1, "other": 2}
    assert r["script_tokens"] == {"hiragana": 0, "katakana": 2, "kanji": 0, "latin": 2, "digit": 1, "other": 1}
    assert r["tokens_per_char"] == {
        "hiragana": None, "katakana": pytest.approx(2 / 3), "kanji": None,
        "latin": pytest.approx(2 / 3), "digit": 1.0, "other": 0.5,
    }
    # T = {2, 3, 4, 6} (8 -> 7 is the end of the text), M = {2, 3, 4}; カタナ is split in two
    assert r["boundary_precision"] == pytest.approx(3 / 4)
    assert r["boundary_recall"] == 1.0
    assert r["continued_morpheme_rate"] == pytest.approx(1 / 4)

    cat = cat_result(tagger, tables)
    # the empty '▁' and '。' are "other"; the three byte pieces of 輩 count for kanji
    assert cat["script_tokens"] == {"hiragana": 3, "katakana": 0, "kanji": 5, "latin": 0, "digit": 0, "other": 2}
    assert cat["tokens_per_char"]["kanji"] == pytest.approx(5 / 3)
    assert cat["tokens_per_char"]["hiragana"] == pytest.approx(3 / 4)


def test_kanji_coverage_and_vocabulary(tagger, tables):
    acc = Accumulator(tables)
    acc.add(analyze(tagger, CAT), encoded(CAT_TOKENS), True)
    acc.add(analyze(tagger, "猫。"), encoded([("猫", 0, 1), ("。", 1, 2)]), True)
    r = acc.result()
    # kanji 吾 輩 猫 猫: distinct {吾, 輩, 猫}, single tokens 吾 and 猫 -> 2/3 distinct, 3/4 occurrences
    assert r["kanji_distinct"] == 3
    assert r["kanji_single_token_distinct_rate"] == pytest.approx(2 / 3)
    assert r["kanji_single_token_occurrence_rate"] == pytest.approx(3 / 4)
    # Jōyō among 吾猫名前叱: 猫 名 前, and 𠮟 through its JIS form 叱 (吾 is not Jōyō)
    assert r["joyo_coverage"] == pytest.approx(4 / 2136)
    assert r["vocab_size"] == 26
    assert r["vocab_japanese_share"] == pytest.approx(15 / 26)
    assert r["vocab_kana_share"] == pytest.approx(7 / 26)


def test_renyi_efficiency():
    # p = (1/2, 1/2) over |V| = 4: H_2.5 = log(2 · 2^-2.5) / (1 - 2.5) = log 2, efficiency log 2 / log 4
    assert renyi_efficiency(np.array([3, 3, 0, 0]), 4) == pytest.approx(0.5)
    assert renyi_efficiency(np.array([5, 5, 5, 5]), 4) == pytest.approx(1.0)
    assert renyi_efficiency(np.array([7, 0, 0, 0]), 4) == pytest.approx(0.0)
    assert renyi_efficiency(np.zeros(4, dtype=np.int64), 4) is None
    # p = (1/2, 1/4, 1/4), |V| = 8: log(2^-2.5 + 2 · 4^-2.5) / -1.5 / log 8 = log2(1/(2^-2.5 + 2^-4)) / 4.5
    assert renyi_efficiency(np.array([2, 1, 1, 0, 0, 0, 0, 0]), 8) == pytest.approx(0.4584996, abs=1e-6)


def test_renyi_in_result_uses_the_vocabulary_size(tagger, tables):
    # CAT's ten tokens are ten different ids: uniform over 10 -> H = log 10, |V| = 26
    assert cat_result(tagger, tables)["renyi_efficiency"] == pytest.approx(math.log(10) / math.log(26))
    assert cat_result(tagger, tables)["token_types"] == 10


def test_roundtrip_failures_and_plain_json(tagger, tables):
    acc = Accumulator(tables)
    a = analyze(tagger, CAT)
    acc.add(a, encoded(CAT_TOKENS), True)
    acc.add(a, encoded(CAT_TOKENS), False)
    acc.add(a, encoded(CAT_TOKENS), False)
    r = acc.result()
    assert r["roundtrip_failures"] == 2
    assert r["documents"] == 3 and r["tokens"] == 30

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return value is None or type(value) in (int, float)

    assert plain(r), r
    assert json.loads(json.dumps(r)) == r


def test_byte_level_vocabulary_has_no_byte_fallback(tagger):
    @dataclass
    class ByteLevel:
        name: str = "bytes"
        source: str = "test"
        kind: str = "byte-level-bpe"
        vocab_size: int = 4
        token_bytes: list = field(default_factory=lambda: [b"\xe5\x90", b"\xbe", "猫".encode(), b"\xe3\x80\x82"])
        byte_fallback: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=bool))
        special: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=bool))

    t = token_tables(ByteLevel())
    assert t.partial.tolist() == [True, True, False, False]
    assert t.single_token_kanji == frozenset("猫")
    acc = Accumulator(t)
    # 吾猫。: 吾 (E5 90 BE) is two byte-level tokens sharing its span
    tokens = EncodedText(np.array([0, 1, 2, 3]), np.array([[0, 1], [0, 1], [1, 2], [2, 3]]))
    acc.add(analyze(tagger, "吾猫。"), tokens, True)
    r = acc.result()
    assert r["byte_fallback_rate"] == 0.0
    assert r["partial_char_rate"] == 0.5


def test_uncovered_morpheme_is_counted_apart(tagger, tables):
    acc = Accumulator(tables)
    acc.add(analyze(tagger, "猫。"), encoded([("猫", 0, 1)]), False)  # a tokenizer that dropped '。'
    r = acc.result()
    assert r["uncovered_morphemes"] == 1
    assert r["morpheme_token_histogram"]["1"] == 1 and sum(r["morpheme_token_histogram"].values()) == 1
    assert r["continued_morpheme_rate"] == 0.0


def test_encoded_text_contract_is_checked(tagger, tables):
    acc = Accumulator(tables)
    a = analyze(tagger, "猫。")
    with pytest.raises(ValueError, match="non-decreasing"):
        acc.add(a, EncodedText(np.array([11, 16]), np.array([[1, 2], [0, 1]])), True)
    with pytest.raises(ValueError, match="out of range"):
        acc.add(a, EncodedText(np.array([11, 99]), np.array([[0, 1], [1, 2]])), True)
    with pytest.raises(ValueError, match="start <= end"):
        acc.add(a, EncodedText(np.array([11, 16]), np.array([[0, 1], [1, 3]])), True)
    assert acc.result()["documents"] == 0


def test_add_costs():
    results = {"base": {"tokens": 200, "chars_per_token": 1.5}, "ja": {"tokens": 150, "chars_per_token": 2.0}}
    add_costs(results, baseline="base", compute_params=1_000_000_000, context_length=4096)
    assert results["ja"]["relative_tokens"] == pytest.approx(0.75)
    assert results["ja"]["relative_compute"] == pytest.approx(0.75)
    assert results["base"]["relative_tokens"] == 1.0
    assert results["ja"]["training_flops"] == 6 * 1_000_000_000 * 150 == 900_000_000_000
    assert results["ja"]["chars_per_context"] == pytest.approx(8192.0)
    with pytest.raises(JpadaptError, match="baseline tokenizer 'llama'"):
        add_costs(results, baseline="llama", compute_params=1, context_length=1)


def test_joyo_kanji_list():
    assert len(JOYO_KANJI) == 2136 == len(set(JOYO_KANJI))
    assert (classify("".join(JOYO_KANJI)) == SCRIPTS.index("kanji")).all()
    assert JOYO_KANJI[:5] == tuple("亜哀挨愛曖") and JOYO_KANJI[-1] == "腕"
    for added_2010 in "曖挨俺藍鬱𠮟塡剝頰":
        assert added_2010 in JOYO_KANJI
    for removed_2010 in "勺錘銑脹匁":
        assert removed_2010 not in JOYO_KANJI
    for jis_form in "叱填剥頬":  # the table's forms are kept
        assert jis_form not in JOYO_KANJI


def test_classify_scripts():
    text = "あゝーｶｰ・･々〇ＡéÀ×５9𠮟漢﨑ア゠ 　"
    expected = [
        "hiragana", "hiragana", "katakana", "katakana", "katakana", "other", "other", "kanji", "other",
        "latin", "latin", "latin", "other", "digit", "digit", "kanji", "kanji", "kanji", "katakana", "other",
        "other", "other",
    ]
    assert [SCRIPTS[c] for c in classify(text)] == expected


def test_analyze_whitespace_and_nul(tagger):
    text = "吾輩は\u3000猫\r\nで\x00ある"  # MeCab returns U+3000 and '\r' as tokens and would stop at NUL
    a = analyze(tagger, text)
    assert [text[s:e] for s, e in a.morphemes] == ["吾輩", "は", "猫", "で", "\x00", "ある"]
    assert a.nonspace_before.tolist() == [0, 1, 2, 3, 3, 4, 4, 4, 5, 6, 7, 8]
    assert a.morpheme_boundaries.tolist() == [2, 3, 4, 5, 6]
    assert a.kanji_codes.tolist() == sorted(map(ord, "吾輩猫")) and a.kanji_counts.tolist() == [1, 1, 1]
    empty = analyze(tagger, " \n")
    assert empty.morphemes.shape == (0, 2) and empty.nonspace == 0


def _assert_exact_cover(a) -> None:
    """Every non-whitespace character is inside exactly one morpheme, every whitespace character in none."""
    depth = np.zeros(a.chars + 1, dtype=np.int64)
    np.add.at(depth, a.morphemes[:, 0], 1)
    np.add.at(depth, a.morphemes[:, 1], -1)
    nonspace = np.diff(a.nonspace_before)
    assert np.array_equal(np.cumsum(depth)[:-1], nonspace)


def test_analyze_long_single_line(tagger):
    sentence = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"  # 33 characters
    text = sentence * 3000  # 99,000 characters on one line
    a = analyze(tagger, text)
    _assert_exact_cover(a)
    assert a.morphemes.shape[0] == 3000 * analyze(tagger, sentence).morphemes.shape[0]


def test_analyze_heldout_covers_every_character_once(tagger):
    with lzma.open(assets.stored_path("corpus/ja_heldout.jsonl"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) == 99
    start = time.perf_counter()
    analyses = [analyze(tagger, t) for t in texts]
    seconds = time.perf_counter() - start
    megabytes = sum(a.bytes for a in analyses) / 1e6
    print(f"analyze: {len(texts)} docs, {megabytes:.2f} MB in {seconds:.2f} s ({seconds / megabytes:.2f} s/MB)")
    for a in analyses:
        _assert_exact_cover(a)
    # the morphemes are fugashi.Tagger()'s tokens over the whole text, cut at whitespace
    import fugashi

    nodes = fugashi.Tagger()
    for a in analyses:
        assert [a.text[s:e] for s, e in a.morphemes] == [p for w in nodes(a.text) for p in w.surface.split()]
