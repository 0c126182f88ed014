"""Tokenizer metrics for Japanese: compression, fertility, morpheme alignment, scripts, kanji, Rényi efficiency.

Per tokenizer: `token_tables(backend)` once (vocabulary properties). Per tokenizer x corpus x group: one
`Accumulator`; for every record, `add(analysis, encoded, roundtrip_ok)` with the record's `TextAnalysis`
(computed once per text by `tokenizer.analysis.analyze`, shared by all tokenizers) and the tokenizer's
`EncodedText` of the whole text (no BOS/EOS/special tokens). `result()` gives the numbers; `add_costs` adds
the compute comparison between tokenizers for one corpus.

All rates are micro-averages: counts are summed over the corpus and divided once, so long documents weigh
by their size, not by one vote each. Definitions are in `Accumulator.result`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import JpadaptError
from tokenizer.analysis import (
    HIRAGANA,
    JAPANESE_SCRIPTS,
    KANJI,
    KATAKANA,
    OTHER,
    SCRIPT_TABLE,
    SCRIPTS,
    TextAnalysis,
    code_points,
)
from tokenizer.backend import EncodedText, TokenizerBackend

RENYI_ALPHA = 2.5  # Zouhar et al. (2023): the order whose efficiency correlated best with BLEU
HISTOGRAM_KEYS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6", "7", "8+")

_JOYO_PATH = Path(__file__).resolve().parent / "data" / "joyo_kanji.txt"


def _load_joyo() -> tuple[str, ...]:
    kanji = tuple(_JOYO_PATH.read_text(encoding="utf-8").split())
    if len(kanji) != 2136 or len(set(kanji)) != 2136:
        raise JpadaptError(f"{_JOYO_PATH}: expected the 2,136 distinct Jōyō kanji, found {len(kanji)} lines")
    return kanji


# The 2,136 Jōyō kanji (常用漢字表, 2010) in the table's order and forms; see tokenizer/data/SOURCES.md.
JOYO_KANJI: tuple[str, ...] = _load_joyo()
# The four Jōyō kanji whose official form is outside JIS X 0208; text almost always has the JIS form instead.
JOYO_VARIANTS: dict[str, str] = {"𠮟": "叱", "塡": "填", "剝": "剥", "頰": "頬"}


@dataclass(frozen=True, eq=False)
class TokenTables:
    """Per-id properties of one tokenizer's vocabulary, computed once by `token_tables`.

    vocab_size: number of ids (special and added tokens included).
    partial: bool per id; the token's bytes are not valid UTF-8 on their own (a byte-fallback piece of a
        multi-byte character, a byte-level BPE fragment); empty bytes (special tokens) count as whole.
    byte_fallback: bool per id; SentencePiece byte pieces '<0x00>'..'<0xFF>' (all False for byte-level BPE).
    japanese: bool per id; the bytes are valid UTF-8 and contain a hiragana, katakana or kanji character.
    kana: bool per id; the same with hiragana or katakana only (kanji-only tokens are often Chinese words).
    single_token_kanji: the kanji c whose UTF-8 is exactly some token's bytes (SentencePiece '吾' counts, '▁吾'
        — bytes b' \\xe5\\x90\\xbe' — does not). A vocabulary property: whether the tokenizer actually emits that
        token for c in context is not checked.
    single_token_kanji_codes: the same as sorted uint32 code points.
    """

    vocab_size: int
    partial: np.ndarray
    byte_fallback: np.ndarray
    japanese: np.ndarray
    kana: np.ndarray
    single_token_kanji: frozenset[str]
    single_token_kanji_codes: np.ndarray
    joyo_covered: int


def token_tables(backend: TokenizerBackend) -> TokenTables:
    """The vocabulary tables of `backend` (one pass over its token bytes)."""
    size = int(backend.vocab_size)
    pieces = backend.token_bytes
    byte_fallback = np.asarray(backend.byte_fallback, dtype=bool)
    if len(pieces) != size or byte_fallback.shape != (size,):
        raise ValueError(
            f"tokenizer {backend.name!r}: vocab_size is {size} but token_bytes has {len(pieces)} entries and "
            f"byte_fallback shape {byte_fallback.shape}"
        )
    texts: list[str] = []
    partial = np.zeros(size, dtype=bool)
    for i, piece in enumerate(pieces):
        try:
            texts.append(piece.decode("utf-8"))
        except UnicodeDecodeError:
            partial[i] = True
            texts.append("")
    # All token texts joined, classified at once; token i is joined[ends[i] - lengths[i]:ends[i]].
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=size)
    ends = np.cumsum(lengths)
    cps = code_points("".join(texts))
    scripts = SCRIPT_TABLE[cps]

    def any_per_token(flags: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0], np.cumsum(flags)])
        return (cum[ends] - cum[ends - lengths]) > 0

    japanese = any_per_token(np.isin(scripts, JAPANESE_SCRIPTS))
    kana = any_per_token((scripts == HIRAGANA) | (scripts == KATAKANA))
    single_char = np.flatnonzero(lengths == 1)
    last_cp = cps[ends[single_char] - 1]
    kanji_codes = np.unique(last_cp[scripts[ends[single_char] - 1] == KANJI])
    single = frozenset(map(chr, kanji_codes.tolist()))
    return TokenTables(
        vocab_size=size,
        partial=partial,
        byte_fallback=byte_fallback.copy(),
        japanese=japanese,
        kana=kana,
        single_token_kanji=single,
        single_token_kanji_codes=kanji_codes.astype(np.uint32),
        joyo_covered=sum(1 for k in JOYO_KANJI if k in single or JOYO_VARIANTS.get(k, k) in single),
    )


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


@dataclass(frozen=True)
class TextCounts:
    """What one text contributes to one tokenizer's metrics; see `Accumulator.result` for the definitions."""

    chars: int
    bytes: int
    morphemes: int
    tokens: int
    roundtrip_ok: bool
    id_values: np.ndarray  # distinct token ids of the text
    id_counts: np.ndarray  # their counts
    byte_fallback_tokens: int
    partial_tokens: int
    token_boundaries: int
    morpheme_boundaries: int
    boundary_hits: int
    continued_morphemes: int
    uncovered_morphemes: int
    histogram: np.ndarray
    script_chars: np.ndarray
    script_tokens: np.ndarray
    kanji_codes: np.ndarray
    kanji_counts: np.ndarray


def measure(tables: TokenTables, analysis: TextAnalysis, encoded: EncodedText, roundtrip_ok: bool) -> TextCounts:
    """Measure one text's tokens against its analysis, vectorised over tokens and morphemes."""
    ids = np.asarray(encoded.ids, dtype=np.int64)
    spans = np.asarray(encoded.spans, dtype=np.int64).reshape(-1, 2)
    _check_tokens(ids, spans, analysis.chars, tables.vocab_size)
    starts, ends = spans[:, 0], spans[:, 1]
    n = ids.size
    id_values, id_counts = np.unique(ids, return_counts=True)

    # Token boundaries: end_i where the next token starts exactly there (tokens sharing a character make
    # none inside it), in whitespace-free coordinates, without the text's edges, duplicates removed.
    nonspace_before = analysis.nonspace_before
    total = analysis.nonspace
    token_bounds = nonspace_before[ends[:-1][ends[:-1] == starts[1:]]]  # non-decreasing, like ends
    token_bounds = token_bounds[(token_bounds > 0) & (token_bounds < total)]
    token_bounds = token_bounds[np.diff(token_bounds, prepend=-1) != 0]
    hits = np.intersect1d(token_bounds, analysis.morpheme_boundaries, assume_unique=True).size

    # Tokens overlapping each morpheme [a, b): non-empty tokens with start < b and end > a. With starts and
    # ends each non-decreasing, that is #(start < b) - #(end <= a) (a token ending by a starts before b).
    nonempty = starts < ends
    token_starts, token_ends = starts[nonempty], ends[nonempty]
    m_starts, m_ends = analysis.morphemes[:, 0], analysis.morphemes[:, 1]
    overlap = np.searchsorted(token_starts, m_ends, side="left") - np.searchsorted(token_ends, m_starts, side="right")
    # Every non-space character is inside some token unless the tokenizer dropped it (a normalizer
    # removing e.g. U+200B); such morphemes are counted apart, not in the histogram.
    covered = overlap[overlap > 0]

    # Script of a token: that of the first non-whitespace character in its span; "other" if none.
    first = nonspace_before[starts]  # index of the first non-space character at or after start
    has = first < total
    first_pos = analysis.nonspace_positions[first[has]] if total else np.zeros(0, dtype=np.int64)
    token_script = np.full(n, OTHER, dtype=np.int64)
    inside = first_pos < ends[has]
    token_script[np.flatnonzero(has)[inside]] = analysis.scripts[first_pos[inside]]

    return TextCounts(
        chars=analysis.chars,
        bytes=analysis.bytes,
        morphemes=analysis.morphemes.shape[0],
        tokens=n,
        roundtrip_ok=roundtrip_ok,
        id_values=id_values,
        id_counts=id_counts,
        byte_fallback_tokens=int(tables.byte_fallback[ids].sum()),
        partial_tokens=int(tables.partial[ids].sum()),
        token_boundaries=token_bounds.size,
        morpheme_boundaries=analysis.morpheme_boundaries.size,
        boundary_hits=hits,
        continued_morphemes=int((overlap >= 2).sum()),
        uncovered_morphemes=int((overlap == 0).sum()),
        histogram=np.bincount(np.minimum(covered, 8) - 1, minlength=len(HISTOGRAM_KEYS)),
        script_chars=analysis.script_chars,
        script_tokens=np.bincount(token_script, minlength=len(SCRIPTS)),
        kanji_codes=analysis.kanji_codes,
        kanji_counts=analysis.kanji_counts,
    )


_KANJI_MERGE_EVERY = 64


class Accumulator:
    """Sums, over the texts of one corpus (or one genre/source group), what one tokenizer's metrics need.

    `add` is vectorised per text (numpy over tokens and morphemes); memory is O(vocab_size + distinct kanji).
    """

    def __init__(self, tables: TokenTables):
        self.tables = tables
        self.documents = 0
        self.chars = 0
        self.bytes = 0
        self.morphemes = 0
        self.tokens = 0
        self.byte_fallback_tokens = 0
        self.partial_tokens = 0
        self.continued_morphemes = 0
        self.uncovered_morphemes = 0
        self.histogram = np.zeros(len(HISTOGRAM_KEYS), dtype=np.int64)
        self.boundary_hits = 0  # |T ∩ M|
        self.token_boundaries = 0  # |T|
        self.morpheme_boundaries = 0  # |M|
        self.script_chars = np.zeros(len(SCRIPTS), dtype=np.int64)
        self.script_tokens = np.zeros(len(SCRIPTS), dtype=np.int64)
        self.id_counts = np.zeros(tables.vocab_size, dtype=np.int64)
        self.kanji_codes = np.zeros(0, dtype=np.uint32)
        self.kanji_counts = np.zeros(0, dtype=np.int64)
        self._kanji_pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.roundtrip_failures = 0

    def add(self, analysis: TextAnalysis, encoded: EncodedText, roundtrip_ok: bool) -> None:
        """Count one text: its analysis, its tokens, and whether decode(encode(text)) == text."""
        self.add_counts(measure(self.tables, analysis, encoded, roundtrip_ok))

    def add_counts(self, counts: TextCounts) -> None:
        """Add one text's measured counts (measured once, added to the corpus and to each of its groups)."""
        self.documents += 1
        self.chars += counts.chars
        self.bytes += counts.bytes
        self.morphemes += counts.morphemes
        self.tokens += counts.tokens
        self.roundtrip_failures += 0 if counts.roundtrip_ok else 1
        self.id_counts[counts.id_values] += counts.id_counts  # id_values are unique: fancy += is exact
        self.byte_fallback_tokens += counts.byte_fallback_tokens
        self.partial_tokens += counts.partial_tokens
        self.token_boundaries += counts.token_boundaries
        self.morpheme_boundaries += counts.morpheme_boundaries
        self.boundary_hits += counts.boundary_hits
        self.continued_morphemes += counts.continued_morphemes
        self.uncovered_morphemes += counts.uncovered_morphemes
        self.histogram += counts.histogram
        self.script_chars += counts.script_chars
        self.script_tokens += counts.script_tokens
        if counts.kanji_codes.size:
            self._kanji_pending.append((counts.kanji_codes, counts.kanji_counts))
            if len(self._kanji_pending) >= _KANJI_MERGE_EVERY:
                self._merge_kanji()

    def _merge_kanji(self) -> None:
        """Fold the pending per-text kanji counts into the sorted totals (batched: one np.unique per
        _KANJI_MERGE_EVERY texts instead of one per text; memory stays bounded)."""
        if not self._kanji_pending:
            return
        codes = np.concatenate([self.kanji_codes, *(c for c, _ in self._kanji_pending)])
        weights = np.concatenate([self.kanji_counts, *(w for _, w in self._kanji_pending)])
        self.kanji_codes, inverse = np.unique(codes, return_inverse=True)
        self.kanji_counts = np.bincount(inverse, weights=weights).astype(np.int64)
        self._kanji_pending = []

    def result(self) -> dict:
        """The metrics (plain int/float/None/dict; None where the denominator is 0). Not rounded.

        documents, chars (len(text)), bytes (UTF-8), morphemes (fugashi/UniDic-lite), tokens: sums.
        chars_per_token, bytes_per_token: chars / tokens, bytes / tokens (compression; higher = fewer tokens).
        tokens_per_morpheme: tokens / morphemes (fertility).
        byte_fallback_rate: share of tokens that are SentencePiece byte pieces (0 for byte-level BPE).
        partial_char_rate: share of tokens whose bytes are not whole UTF-8 characters (byte pieces, byte-level
            BPE fragments of a character).
        continued_morpheme_rate: share of morphemes overlapped by >= 2 tokens (split by the tokenizer).
        morpheme_token_histogram: morphemes by the number of tokens overlapping them, "1".."7", "8+";
            uncovered_morphemes: morphemes no token overlaps (characters the tokenizer dropped), not in it.
        boundary_precision, boundary_recall, boundary_f1: token boundaries T against morpheme boundaries M
            (starts and ends of morphemes), both as positions in the text without whitespace, without the
            text's edges: precision |T∩M|/|T|, recall |T∩M|/|M|, counts summed over the corpus.
        tokens_per_char[script]: tokens attributed to the script (by the first non-space character of the
            token's span; whitespace-only and empty tokens are "other") / characters of that script (None when
            the corpus has none). script_chars, script_tokens: the two counts.
        kanji_distinct: distinct kanji in the corpus; kanji_single_token_distinct_rate: share of them that are a
            single vocabulary token (`TokenTables.single_token_kanji`); kanji_single_token_occurrence_rate: the
            same weighted by occurrences.
        joyo_coverage: share of the 2,136 Jōyō kanji that are a single token (the official form or, for 𠮟 塡 剝
            頰, the JIS X 0208 form 叱 填 剥 頬); a vocabulary property, the same for every corpus.
        vocab_size; vocab_japanese_share: share of the ids whose text contains hiragana, katakana or kanji
            (kanji-only tokens include Chinese words: Qwen's 151,669 ids are 18% "Japanese" by this count);
            vocab_kana_share: share of the ids whose text contains hiragana or katakana.
        renyi_efficiency: H_α(p) / log|V| with H_α(p) = log(Σ p_i^α) / (1 - α), α = 2.5, p the unigram
            distribution of token ids in the corpus, |V| = vocab_size (Zouhar et al. 2023, "Tokenization and
            the Noiseless Channel"; equal to tokenization-scorer's `score(..., power=2.5, vocab=vocab_size)`,
            whose default |V| would be the number of distinct ids seen, `token_types`).
        roundtrip_failures: texts with decode(encode(text)) != text.
        """
        t = self.tables
        precision = _ratio(self.boundary_hits, self.token_boundaries)
        recall = _ratio(self.boundary_hits, self.morpheme_boundaries)
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        self._merge_kanji()
        single = np.isin(self.kanji_codes, t.single_token_kanji_codes)
        return {
            "documents": self.documents,
            "chars": self.chars,
            "bytes": self.bytes,
            "morphemes": self.morphemes,
            "tokens": self.tokens,
            "chars_per_token": _ratio(self.chars, self.tokens),
            "bytes_per_token": _ratio(self.bytes, self.tokens),
            "tokens_per_morpheme": _ratio(self.tokens, self.morphemes),
            "byte_fallback_rate": _ratio(self.byte_fallback_tokens, self.tokens),
            "partial_char_rate": _ratio(self.partial_tokens, self.tokens),
            "continued_morpheme_rate": _ratio(self.continued_morphemes, self.morphemes),
            "boundary_precision": precision,
            "boundary_recall": recall,
            "boundary_f1": f1,
            "tokens_per_char": {
                s: _ratio(self.script_tokens[i], self.script_chars[i]) for i, s in enumerate(SCRIPTS)
            },
            "script_chars": {s: int(self.script_chars[i]) for i, s in enumerate(SCRIPTS)},
            "script_tokens": {s: int(self.script_tokens[i]) for i, s in enumerate(SCRIPTS)},
            "kanji_distinct": int(self.kanji_codes.size),
            "kanji_single_token_distinct_rate": _ratio(int(single.sum()), self.kanji_codes.size),
            "kanji_single_token_occurrence_rate": _ratio(
                int(self.kanji_counts[single].sum()), int(self.kanji_counts.sum())
            ),
            "joyo_coverage": t.joyo_covered / len(JOYO_KANJI),
            "vocab_size": t.vocab_size,
            "vocab_japanese_share": _ratio(int(t.japanese.sum()), t.vocab_size),
            "vocab_kana_share": _ratio(int(t.kana.sum()), t.vocab_size),
            "renyi_efficiency": renyi_efficiency(self.id_counts, t.vocab_size),
            "token_types": int(np.count_nonzero(self.id_counts)),
            "roundtrip_failures": self.roundtrip_failures,
            "morpheme_token_histogram": {k: int(v) for k, v in zip(HISTOGRAM_KEYS, self.histogram)},
            "uncovered_morphemes": self.uncovered_morphemes,
        }


def renyi_efficiency(counts: np.ndarray, vocab_size: int, alpha: float = RENYI_ALPHA) -> float | None:
    """Rényi efficiency H_α(p) / log(vocab_size) of the unigram distribution given by `counts` (α != 1)."""
    total = counts.sum()
    if total == 0 or vocab_size < 2:
        return None
    p = counts[counts > 0] / total
    return float(np.log(np.sum(p**alpha)) / (1.0 - alpha) / np.log(vocab_size))


def add_costs(per_tokenizer: dict[str, dict], baseline: str, compute_params: int, context_length: int) -> None:
    """Add, in place, the cost of each tokenizer relative to `baseline` on ONE corpus.

    per_tokenizer: tokenizer name -> `Accumulator.result()` for the same corpus (or group).
    relative_tokens: tokens / baseline tokens.
    relative_compute: training FLOPs for the same text relative to the baseline, with the 6·N·D estimate
        (N = compute_params, D = tokens): 6·N·D / 6·N·D_baseline = relative_tokens, since N is the same.
        Equal N is the assumption: a larger vocabulary adds embedding parameters, which this ignores.
    training_flops: 6 · compute_params · tokens, the FLOPs of one epoch over this text.
    chars_per_context: chars_per_token · context_length, how much text one context window holds.
    """
    if baseline not in per_tokenizer:
        raise JpadaptError(
            f"baseline tokenizer {baseline!r} is not among the compared tokenizers ({', '.join(per_tokenizer)})"
        )
    if compute_params <= 0 or context_length <= 0:
        raise JpadaptError(
            f"compute_params and context_length must be positive, got {compute_params} and {context_length}"
        )
    base_tokens = per_tokenizer[baseline]["tokens"]
    for result in per_tokenizer.values():
        relative = _ratio(result["tokens"], base_tokens)
        result["relative_tokens"] = relative
        result["relative_compute"] = relative
        result["training_flops"] = 6 * int(compute_params) * int(result["tokens"])
        cpt = result["chars_per_token"]
        result["chars_per_context"] = None if cpt is None else cpt * context_length


def _check_tokens(ids: np.ndarray, spans: np.ndarray, chars: int, vocab_size: int) -> None:
    """The EncodedText contract (tokenizer/backend.py); a violation is a backend bug."""
    if spans.shape != (ids.size, 2):
        raise ValueError(f"EncodedText: {ids.size} ids but spans of shape {spans.shape}")
    if ids.size == 0:
        return
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"EncodedText: token id out of range [0, {vocab_size}): min {ids.min()}, max {ids.max()}")
    starts, ends = spans[:, 0], spans[:, 1]
    if starts.min() < 0 or ends.max() > chars or (starts > ends).any():
        raise ValueError(f"EncodedText: spans must satisfy 0 <= start <= end <= {chars} (the text's length)")
    if (np.diff(starts) < 0).any() or (np.diff(ends) < 0).any():
        i = int(np.flatnonzero((np.diff(starts) < 0) | (np.diff(ends) < 0))[0])
        raise ValueError(
            f"EncodedText: spans must be non-decreasing; token {i} {spans[i].tolist()} is followed by "
            f"{spans[i + 1].tolist()}"
        )
