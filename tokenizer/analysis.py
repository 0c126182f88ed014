"""What the tokenizer metrics need to know about a text, computed once and shared by every tokenizer.

`analyze(tagger, text)` returns a `TextAnalysis`: the script of every character, where the non-whitespace
characters are, and the morphemes of the text as segmented by MeCab through fugashi with the UniDic-lite
dictionary (`make_tagger()`). The metrics in `tokenizer/metrics.py` compare each tokenizer's tokens with it.

Scripts (`SCRIPTS`, one uint8 code per character, looked up in a table over all code points):

* hiragana — U+3041–U+309F (the Hiragana block: letters, the iteration marks ゝ ゞ, ゟ and the combining and
  spacing (semi-)voiced sound marks U+3099–U+309C) and the hiragana/hentaigana of U+1B001–U+1B11F.
* katakana — U+30A1–U+30FA and U+30FC–U+30FF (letters, the prolonged sound mark ー, ヽ ヾ ヿ; the middle dot
  ・ U+30FB and ゠ U+30A0 are punctuation, "other"), U+31F0–U+31FF (small letters for Ainu), halfwidth
  U+FF66–U+FF9F (incl. ｰ and the halfwidth sound marks; the halfwidth middle dot ･ U+FF65 is "other"),
  U+1B000 and U+1B120–U+1B122, U+1B164–U+1B167.
* kanji — CJK unified ideographs with all extensions (U+3400–U+4DBF, U+4E00–U+9FFF, U+20000–U+2FFFF which
  includes the compatibility supplement U+2F800–U+2FA1F, U+30000–U+323AF), the compatibility ideographs
  U+F900–U+FAFF, and the iteration mark 々 U+3005. Not 〆 U+3006, 〇 U+3007 or the radicals U+2E80–U+2FDF.
* latin — ASCII letters, fullwidth letters Ａ–Ｚ ａ–ｚ, the Latin-1 letters U+00C0–U+00FF except × and ÷,
  Latin Extended-A/B U+0100–U+024F, Latin Extended Additional U+1E00–U+1EFF.
* digit — ASCII 0–9 and fullwidth ０–９.
* other — everything else: punctuation, symbols, whitespace, other scripts.

Whitespace is what `str.isspace()` says (the ASCII whitespace, U+001C–U+001F, U+0085, U+00A0, U+1680,
U+2000–U+200A, U+2028, U+2029, U+202F, U+205F, U+3000; not U+200B or U+FEFF). Morpheme/token boundaries are
compared in non-whitespace coordinates (`nonspace_before`), so where the spaces went does not matter.

Morphemes are the tokens of `fugashi.Tagger()` over the whole text (one MeCab call per text), less their
whitespace. MeCab skips ASCII space, tab, newline and VT between tokens, but returns U+3000, U+00A0, '\r',
'\f' and the other Unicode spaces as tokens of their own (U+3000 with POS 空白), and can even fold U+3000
into an unknown-word token ('〓‥‥‥\u3000\u3000）' is one token in an Aozora text). Whitespace-only tokens
are dropped and a token holding whitespace is cut into its non-whitespace runs, so the morphemes cover every
non-whitespace character exactly once (checked for every text).

Replacing U+3000 by ' ' before tagging would be simpler but changes the segmentation next to it: MeCab then
connects the words on both sides as if they were adjacent (「三　羽毛皮」 becomes 三|羽|毛皮 instead of
三|羽毛|皮; 28 differences on the held-out). So the text is tagged as it is; only NUL, which ends MeCab's C
string, is passed as U+FFFD. MeCab (fugashi's lattice API) takes a whole document in one call: a 99,000-
character line without a break and the whole 1.3 MB held-out corpus as one string come back complete; there
is no input-buffer limit outside the `mecab` command-line tool. Tagging line by line instead (MeCab's CLI
treats each line as a sentence) is about as fast (0.28 instead of 0.33 s on the held-out) and differs in 9
of its 291,239 morphemes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import JpadaptError

SCRIPTS: tuple[str, ...] = ("hiragana", "katakana", "kanji", "latin", "digit", "other")
HIRAGANA, KATAKANA, KANJI, LATIN, DIGIT, OTHER = range(len(SCRIPTS))
JAPANESE_SCRIPTS: tuple[int, ...] = (HIRAGANA, KATAKANA, KANJI)

_MAX_CODE_POINT = 0x10FFFF

# Inclusive code-point ranges per script; later entries win where ranges touch (none overlap here).
_RANGES: dict[int, tuple[tuple[int, int], ...]] = {
    HIRAGANA: ((0x3041, 0x309F), (0x1B001, 0x1B11F)),
    KATAKANA: (
        (0x30A1, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F),
        (0x1B000, 0x1B000), (0x1B120, 0x1B122), (0x1B164, 0x1B167),
    ),
    KANJI: (
        (0x3005, 0x3005), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
        (0x20000, 0x2FFFF), (0x30000, 0x323AF),
    ),
    LATIN: (
        (0x41, 0x5A), (0x61, 0x7A), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A),
        (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF),
    ),
    DIGIT: ((0x30, 0x39), (0xFF10, 0xFF19)),
}


def _script_table() -> np.ndarray:
    table = np.full(_MAX_CODE_POINT + 1, OTHER, dtype=np.uint8)
    for code, ranges in _RANGES.items():
        for lo, hi in ranges:
            table[lo:hi + 1] = code
    return table


SCRIPT_TABLE: np.ndarray = _script_table()  # code point -> script code, 1.1 MB

# Every character with str.isspace() lies below U+3001 (U+3000 IDEOGRAPHIC SPACE is the last one).
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)
_SPACE_TABLE = np.zeros(_MAX_CODE_POINT + 1, dtype=bool)
_SPACE_TABLE[_WHITESPACE] = True


def code_points(text: str) -> np.ndarray:
    """The code points of `text` as uint32, one per character."""
    try:
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text contains a lone surrogate at character {exc.start} ({text[exc.start]!r}); it is not "
            "encodable as UTF-8 and cannot be tokenized or measured"
        ) from exc


def classify(text: str) -> np.ndarray:
    """The script code (index into SCRIPTS) of every character of `text`, uint8."""
    return SCRIPT_TABLE[code_points(text)]


def make_tagger():
    """A fugashi (MeCab) tagger with the UniDic-lite dictionary, in wakati (space-separated surfaces) output.

    Wakati output gives the same segmentation as `fugashi.Tagger()` — `-O` only changes how MeCab prints the
    result — and saves building a Python node per morpheme: MeCab takes 0.21 instead of 0.30 s/MB on the
    held-out corpus.
    """
    try:
        import fugashi
        import unidic_lite  # noqa: F401  (fugashi.Tagger() finds it; fail here with a clear message)
    except ImportError as exc:
        raise JpadaptError(
            f"the tokenizer report segments Japanese with fugashi + unidic-lite, which are not installed ({exc}); "
            "pip install 'fugashi>=1.3' 'unidic-lite>=1.0.8'"
        ) from exc
    return fugashi.Tagger("-Owakati")


@dataclass(frozen=True, eq=False)
class TextAnalysis:
    """The tokenizer-independent facts about one text.

    text: the text. chars: len(text). bytes: len(text.encode('utf-8')).
    scripts: uint8 (chars,), index into SCRIPTS per character.
    nonspace_before: int64 (chars + 1,), number of non-whitespace characters before each position; position p
        of the text maps to nonspace_before[p] in whitespace-free coordinates, nonspace_before[-1] is their total.
    nonspace_positions: int64 (nonspace,), position in the text of each non-whitespace character.
    morphemes: int64 (m, 2), [start, end) character spans of the fugashi morphemes in the text, in order,
        never containing whitespace; together they cover every non-whitespace character exactly once.
    morpheme_boundaries: int64, sorted distinct morpheme starts and ends in whitespace-free coordinates,
        without 0 and the total (the text's own edges are not boundaries).
    script_chars: int64 (len(SCRIPTS),), characters per script (whitespace counts as "other").
    kanji_codes / kanji_counts: the distinct kanji code points of the text (sorted uint32) and how often each
        occurs (int64).
    """

    text: str
    chars: int
    bytes: int
    scripts: np.ndarray
    nonspace_before: np.ndarray
    nonspace_positions: np.ndarray
    morphemes: np.ndarray
    morpheme_boundaries: np.ndarray
    script_chars: np.ndarray
    kanji_codes: np.ndarray
    kanji_counts: np.ndarray

    @property
    def nonspace(self) -> int:
        return int(self.nonspace_before[-1])


def analyze(tagger, text: str) -> TextAnalysis:
    """Analyse `text` with `tagger` (from `make_tagger()`, wakati output): scripts, whitespace, morphemes, kanji.

    One MeCab pass over the whole text; everything else is numpy over the code points.
    """
    cps = code_points(text)
    space = _SPACE_TABLE[cps]
    nonspace_positions = np.flatnonzero(~space).astype(np.int64)
    nonspace_before = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(~space, out=nonspace_before[1:])

    # NUL would end MeCab's input string; U+FFFD takes its place (same length, so nothing moves).
    tagged = text.replace("\x00", "\ufffd") if "\x00" in text else text
    output = tagger.parse(tagged)
    if "\t" in output:  # MeCab's default format: surface TAB features per line
        raise ValueError("analyze() reads MeCab's wakati output; pass the tagger from make_tagger()")
    # Wakati output is the surfaces separated by ' '; split() also drops whitespace-only surfaces (U+3000,
    # '\r', ...) and cuts the rare surface that holds whitespace into its non-whitespace runs.
    surfaces = output.split()
    lengths = np.fromiter(map(len, surfaces), dtype=np.int64, count=len(surfaces))

    # Surfaces follow each other in the whitespace-free text: their cumulative lengths are their spans there.
    ends_ns = np.cumsum(lengths)
    starts_ns = ends_ns - lengths
    expected = _nonspace_text(cps, space)
    if "".join(surfaces) != expected:
        raise ValueError(_coverage_error(surfaces, expected))
    morphemes = np.empty((lengths.size, 2), dtype=np.int64)
    morphemes[:, 0] = nonspace_positions[starts_ns]
    morphemes[:, 1] = nonspace_positions[ends_ns - 1] + 1

    # The morphemes tile the whitespace-free text, so each end but the last is the next one's start.
    bounds = ends_ns[:-1]

    scripts = SCRIPT_TABLE[cps]
    kanji_codes, kanji_counts = np.unique(cps[scripts == KANJI], return_counts=True)
    return TextAnalysis(
        text=text,
        chars=len(text),
        bytes=len(text.encode("utf-8")),
        scripts=scripts,
        nonspace_before=nonspace_before,
        nonspace_positions=nonspace_positions,
        morphemes=morphemes,
        morpheme_boundaries=bounds.astype(np.int64),
        script_chars=np.bincount(scripts, minlength=len(SCRIPTS)).astype(np.int64),
        kanji_codes=kanji_codes.astype(np.uint32),
        kanji_counts=kanji_counts.astype(np.int64),
    )


def _nonspace_text(cps: np.ndarray, space: np.ndarray) -> str:
    kept = cps[~space]
    # NUL was tagged as U+FFFD; compare against what MeCab saw.
    kept = np.where(kept == 0, np.uint32(0xFFFD), kept).astype(np.uint32)
    return kept.tobytes().decode("utf-32-le")


def _coverage_error(surfaces: list[str], expected: str) -> str:
    got = "".join(surfaces)
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return (
        f"fugashi morphemes do not cover the text's non-whitespace characters exactly once: they spell "
        f"{len(got)} characters, the text has {len(expected)}; first difference at non-space offset {at}: "
        f"morphemes {got[at:at + 20]!r}, text {expected[at:at + 20]!r}"
    )
