"""Text cleaning and the Japanese-script measure used by the `prepare` filters.

Both functions run once per document over the whole corpus, so they avoid per-character Python work:
`normalize` is C-level str methods, `japanese_ratio` one table lookup over the code points with numpy.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

import numpy as np

NormalizationForm = Literal["NFKC", "NFC", "NFKD", "NFD", "none"]

# Code point ranges (inclusive) counted as Japanese script by `japanese_ratio`.
JAPANESE_RANGES: tuple[tuple[int, int], ...] = (
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。「」『』〜, iteration marks 々〆〇
    (0x3040, 0x309F),  # hiragana
    (0x30A0, 0x30FF),  # katakana, incl. the prolonged sound mark ー and ヽヾ
    (0x31F0, 0x31FF),  # katakana phonetic extensions (small ㇰㇱ... used for Ainu)
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF61, 0xFF9F),  # halfwidth katakana and halfwidth CJK punctuation ｡｢｣､ (NFKC maps them to fullwidth)
)

# One byte per code point (1.1 MB): 0 = whitespace, 1 = Japanese script, 2 = anything else.
_WHITESPACE, _JAPANESE, _OTHER = 0, 1, 2


def _build_classes() -> np.ndarray:
    classes = np.full(0x110000, _OTHER, dtype=np.uint8)
    for first, last in JAPANESE_RANGES:
        classes[first : last + 1] = _JAPANESE
    # Every code point with str.isspace() lies in the BMP, so scanning 65,536 of them finds them all (~5 ms).
    classes[[cp for cp in range(0x10000) if chr(cp).isspace()]] = _WHITESPACE
    return classes


_CLASSES = _build_classes()


def normalize(text: str, form: NormalizationForm) -> str:
    """Unicode-normalize `text` (`form`, or "none" to keep it), turn CRLF and lone CR into LF, strip the ends.

    Nothing else changes: inner whitespace, blank lines and markup stay as they were.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if form != "none":
        text = unicodedata.normalize(form, text)
    return text.strip()


def japanese_ratio(text: str) -> float:
    """Share of Japanese-script characters among the non-whitespace characters of `text`.

    Japanese script = hiragana; katakana, including halfwidth katakana, the katakana phonetic extensions and
    the prolonged sound mark ー; CJK unified ideographs, including extension A and the compatibility
    ideographs; and the CJK symbols and punctuation block U+3000-U+303F (、。「」, iteration marks 々〆〇).
    `JAPANESE_RANGES` lists the exact code points. Whitespace is `str.isspace()` (so the ideographic space
    U+3000 counts on neither side). A text with no non-whitespace character has ratio 0.0.

    >>> japanese_ratio("あいう abc")
    0.5
    """
    if not text:
        return 0.0
    # UTF-32 gives one uint32 per code point, which indexes the class table directly.
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    counts = np.bincount(_CLASSES[code_points], minlength=3)
    visible = int(counts[_JAPANESE] + counts[_OTHER])
    return int(counts[_JAPANESE]) / visible if visible else 0.0
