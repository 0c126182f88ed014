"""Render a tokenizer comparison as metrics.csv, report.md and a self-contained report.html.

The question the report answers: on this text, how many tokens does each tokenizer spend, and what does that cost
in training compute and context length? Input is the metrics dict of the tokenizer-report stage:

    {"settings": {"baseline", "compute_params", "context_length", "renyi_alpha", "tokenizer_library_versions"},
     "corpora": {stem: {"documents", "chars", "bytes", "morphemes"}},
     "tokenizer_info": {name: {"source", "kind", "vocab_size"}},
     "tokenizers": {name: {stem: {<metric>: value, ..., "groups": {label: {<metric>: value}}}}},
     "notes": [str]}

Any metric may be null; it is written as an empty CSV cell and shown as "–". The three files are byte-identical for
the same metrics: no timestamps, PNGs without the matplotlib version stamp, fixed column order.

Outputs:
    metrics.csv  one row per tokenizer x corpus x group ('' = whole corpus), columns CSV_COLUMNS then any metric
                 not in the layout (sorted); floats as repr(), which float() reads back to the same number.
    report.md    summary, tables, definitions, notes.
    report.html  the same blocks plus four matplotlib plots as inline base64 PNGs; inline CSS, no URLs.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator, PercentFormatter, StrMethodFormatter

from pipeline import reportkit as kit
from pipeline.errors import JpadaptError
from pipeline.reportkit import Block, Bullets, Definitions, Heading, Paragraph, Plot, Section, SectionContext, Table

SCRIPTS = ("hiragana", "katakana", "kanji", "latin", "digit", "other")
HISTOGRAM_BINS = ("1", "2", "3", "4", "5", "6", "7", "8+")

# Per-record metrics in the order of the layout; a dict-valued metric lists its sub-keys and becomes one CSV column
# per sub-key, named "<metric>_<sub-key>" (tokens_per_char_kanji, morpheme_token_histogram_8+).
METRIC_LAYOUT: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("documents", None), ("chars", None), ("bytes", None), ("morphemes", None), ("tokens", None),
    ("chars_per_token", None), ("bytes_per_token", None), ("tokens_per_morpheme", None),
    ("byte_fallback_rate", None), ("partial_char_rate", None), ("continued_morpheme_rate", None),
    ("boundary_precision", None), ("boundary_recall", None), ("boundary_f1", None),
    ("tokens_per_char", SCRIPTS), ("script_chars", SCRIPTS), ("script_tokens", SCRIPTS),
    ("kanji_distinct", None), ("kanji_single_token_distinct_rate", None),
    ("kanji_single_token_occurrence_rate", None), ("joyo_coverage", None),
    ("vocab_size", None), ("vocab_japanese_share", None), ("vocab_kana_share", None), ("renyi_efficiency", None),
    ("token_types", None), ("roundtrip_failures", None),
    ("morpheme_token_histogram", HISTOGRAM_BINS), ("uncovered_morphemes", None),
    ("relative_tokens", None), ("relative_compute", None), ("training_flops", None), ("chars_per_context", None),
)
NESTED_METRICS = {name: subs for name, subs in METRIC_LAYOUT if subs}
KEY_COLUMNS = ("tokenizer", "corpus", "group")
CSV_COLUMNS: tuple[str, ...] = KEY_COLUMNS + tuple(
    f"{name}_{sub}" if subs else name for name, subs in METRIC_LAYOUT for sub in (subs or (None,))
)

TOKENIZER_COLORS = [matplotlib.colormaps["tab10"](i) for i in range(10)]
CORPUS_COLORS = ["#3b5b92", "#e08a2c", "#5a9e6f", "#9b59b6", "#7f7f7f"]


# ---------------------------------------------------------------------------------------------------------------
# Input: flat records
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportData:
    """The metrics dict as flat records, plus what the tables and plots need to know about it."""

    settings: dict[str, Any]
    tokenizers: list[str]
    corpora: list[str]
    records: list[dict[str, Any]]  # keys: tokenizer, corpus, group, then flattened metrics
    corpus_info: dict[str, dict[str, Any]]
    tokenizer_info: dict[str, dict[str, Any]]
    notes: list[str]

    @property
    def baseline(self) -> str:
        return self.settings["baseline"]

    @property
    def context_length(self) -> int:
        return int(self.settings["context_length"])  # YAML may hand over 4096.0

    @property
    def compute_params(self) -> int:
        return int(self.settings["compute_params"])

    def get(self, tokenizer: str, corpus: str, group: str = "") -> dict[str, Any] | None:
        for record in self.records:
            if (record["tokenizer"], record["corpus"], record["group"]) == (tokenizer, corpus, group):
                return record
        return None

    def rows(self, corpus: str, group: str = "") -> list[dict[str, Any]]:
        """Records of one corpus (and group), in tokenizer order."""
        return [r for r in self.records if r["corpus"] == corpus and r["group"] == group]

    def groups(self, corpus: str) -> list[str]:
        """Group labels of a corpus in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            if r["corpus"] == corpus and r["group"]:
                seen.setdefault(r["group"], None)
        return list(seen)


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """One record's metrics as {csv column: scalar}; dict-valued metrics become "<metric>_<sub-key>"."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        if name == "groups":
            continue
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                flat[f"{name}_{sub}"] = sub_value
        elif value is None and name in NESTED_METRICS:
            # A null dict-valued metric (no histogram for a corpus without morphemes) nulls all its columns.
            for sub in NESTED_METRICS[name]:
                flat[f"{name}_{sub}"] = None
        else:
            flat[name] = value
    return flat


def load_report_data(metrics: dict[str, Any]) -> ReportData:
    """Check the layout and flatten it; raises JpadaptError naming the first key that is missing or wrong."""
    settings = _require(metrics, "settings", dict, "metrics")
    tokenizers = _require(metrics, "tokenizers", dict, "metrics")
    if not tokenizers:
        raise JpadaptError("metrics['tokenizers'] is empty: nothing to report")
    _require(settings, "baseline", str, "metrics['settings']")
    for key in ("compute_params", "context_length"):
        _require(settings, key, (int, float), "metrics['settings']")
    if settings["baseline"] not in tokenizers:
        raise JpadaptError(f"metrics['settings']['baseline'] is {settings['baseline']!r}, which is not one of "
                           f"the tokenizers {sorted(tokenizers)}")
    records, corpora = [], {}
    for tokenizer, per_corpus in tokenizers.items():
        if not isinstance(per_corpus, dict):
            raise JpadaptError(f"metrics['tokenizers'][{tokenizer!r}] must map corpus name to metrics, "
                               f"got {type(per_corpus).__name__}")
        for corpus, record in per_corpus.items():
            if not isinstance(record, dict):
                raise JpadaptError(f"metrics['tokenizers'][{tokenizer!r}][{corpus!r}] must be a dict of metrics, "
                                   f"got {type(record).__name__}")
            corpora.setdefault(corpus, None)
            records.append({"tokenizer": tokenizer, "corpus": corpus, "group": "", **flatten_metrics(record)})
            for group, group_record in (record.get("groups") or {}).items():
                records.append({"tokenizer": tokenizer, "corpus": corpus, "group": group,
                                **flatten_metrics(group_record)})
    return ReportData(settings=settings, tokenizers=list(tokenizers), corpora=list(corpora), records=records,
                      corpus_info=metrics.get("corpora") or {}, tokenizer_info=metrics.get("tokenizer_info") or {},
                      notes=[str(n) for n in metrics.get("notes") or []])


def _require(mapping: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in mapping:
        raise JpadaptError(f"{where} has no {key!r} key (see stages/tokenizer_report/report.py for the layout)")
    if not isinstance(mapping[key], kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise JpadaptError(f"{where}[{key!r}] must be {names}, got {mapping[key]!r}")
    return mapping[key]


# ---------------------------------------------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------------------------------------------

def csv_columns(records: Iterable[dict[str, Any]]) -> list[str]:
    """CSV_COLUMNS, then any column a producer added that the layout does not know, sorted so the order is stable."""
    known = set(CSV_COLUMNS)
    extra = sorted({key for r in records for key in r} - known)
    return list(CSV_COLUMNS) + extra


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that float() turns back into the same double
    return str(value)


def render_csv(data: ReportData) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = csv_columns(data.records)
    writer.writerow(columns)
    for record in data.records:
        writer.writerow([_csv_cell(record.get(column)) for column in columns])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Tables (blocks of pipeline/reportkit.py)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    title: str
    key: str  # flat record key
    fmt: Callable[[Any], str] | None = None  # None: text, shown as is and left-aligned



def make_table(columns: list[Column], records: list[dict[str, Any]]) -> Table:
    rows = [[kit.cell(r.get(c.key), c.fmt or str) for c in columns] for r in records]
    return Table(header=[c.title for c in columns], rows=rows, numeric=[c.fmt is not None for c in columns])


def _label_baseline(data: ReportData, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the records whose tokenizer name says "(baseline)" for the baseline."""
    return [{**r, "tokenizer": f"{r['tokenizer']} (baseline)" if r["tokenizer"] == data.baseline else r["tokenizer"]}
            for r in records]


def headline_columns(data: ReportData) -> list[Column]:
    return [
        Column("tokenizer", "tokenizer"),
        Column("vocab", "vocab_size", kit.fmt_count),
        Column("tokens", "tokens", kit.fmt_count),
        Column("chars/token", "chars_per_token", kit.fmt_ratio),
        Column(f"tokens (and compute) vs {data.baseline}", "relative_tokens", kit.fmt_times),
        Column(f"chars per {data.context_length:,}-token context", "chars_per_context", kit.fmt_count),
        Column("byte fallback", "byte_fallback_rate", kit.fmt_percent),
        Column("partial chars", "partial_char_rate", kit.fmt_percent),
        Column("tokens/morpheme", "tokens_per_morpheme", kit.fmt_ratio),
        Column("boundary F1", "boundary_f1", kit.fmt_score),
        Column("round-trip failures", "roundtrip_failures", kit.fmt_count),
    ]


def cost_columns(data: ReportData) -> list[Column]:
    return [
        Column("tokenizer", "tokenizer"),
        Column("tokens", "tokens", kit.fmt_count),
        Column("bytes/token", "bytes_per_token", kit.fmt_ratio),
        Column(f"training FLOPs (6·N·D, N = {data.compute_params:,})", "training_flops", kit.fmt_flops),
        Column(f"compute vs {data.baseline}", "relative_compute", kit.fmt_times),
        Column(f"chars per {data.context_length:,}-token context", "chars_per_context", kit.fmt_count),
    ]


def script_columns(data: ReportData, corpus: str) -> list[Column]:
    """tokens/char per script, titled with the script's share of the corpus; scripts absent from the corpus dropped."""
    rows = data.rows(corpus)
    columns = [Column("tokenizer", "tokenizer")]
    for script in _scripts(data.records):
        if all(kit.is_missing(r.get(f"tokens_per_char_{script}")) for r in rows):
            continue
        share = _script_share(rows, script)
        title = script if share is None else f"{script} ({kit.fmt_percent(share)} of chars)"
        columns.append(Column(title, f"tokens_per_char_{script}", kit.fmt_ratio))
    return columns


def morpheme_columns() -> list[Column]:
    return [
        Column("tokenizer", "tokenizer"),
        Column("tokens/morpheme", "tokens_per_morpheme", kit.fmt_ratio),
        Column("morphemes split over 2+ tokens", "continued_morpheme_rate", kit.fmt_percent),
        Column("boundary precision", "boundary_precision", kit.fmt_score),
        Column("boundary recall", "boundary_recall", kit.fmt_score),
        Column("boundary F1", "boundary_f1", kit.fmt_score),
    ]


def vocabulary_columns(data: ReportData) -> list[Column]:
    return [
        Column("tokenizer", "tokenizer"),
        Column("vocab", "vocab_size", kit.fmt_count),
        Column("Japanese share of vocab", "vocab_japanese_share", kit.fmt_percent),
        Column("kana share of vocab", "vocab_kana_share", kit.fmt_percent),
        Column("distinct tokens used", "token_types", kit.fmt_count),
        Column("distinct kanji in text", "kanji_distinct", kit.fmt_count),
        Column("kanji as one token (distinct)", "kanji_single_token_distinct_rate", kit.fmt_percent),
        Column("kanji as one token (occurrences)", "kanji_single_token_occurrence_rate", kit.fmt_percent),
        Column("jōyō kanji as one token", "joyo_coverage", kit.fmt_percent),
        Column(f"Rényi efficiency (α = {_alpha(data)})", "renyi_efficiency", kit.fmt_score),
    ]


def group_columns(data: ReportData) -> list[Column]:
    return [
        Column("group", "group"),
        Column("tokenizer", "tokenizer"),
        Column("documents", "documents", kit.fmt_count),
        Column("chars", "chars", kit.fmt_count),
        Column("chars/token", "chars_per_token", kit.fmt_ratio),
        Column(f"tokens vs {data.baseline}", "relative_tokens", kit.fmt_times),
        Column("byte fallback", "byte_fallback_rate", kit.fmt_percent),
        Column("tokens/morpheme", "tokens_per_morpheme", kit.fmt_ratio),
        Column("boundary F1", "boundary_f1", kit.fmt_score),
    ]


def _alpha(data: ReportData) -> Any:
    return data.settings.get("renyi_alpha", 2.5)


def _scripts(records: list[dict[str, Any]]) -> list[str]:
    """SCRIPTS, then any other script a producer reported, sorted."""
    found = {key.removeprefix("tokens_per_char_") for r in records for key in r if key.startswith("tokens_per_char_")}
    return list(SCRIPTS) + sorted(found - set(SCRIPTS))


def _script_share(rows: list[dict[str, Any]], script: str) -> float | None:
    """Share of the corpus's characters in `script` (a property of the text, so any tokenizer's row will do)."""
    for r in rows:
        chars, script_chars = r.get("chars"), r.get(f"script_chars_{script}")
        if not kit.is_missing(chars) and not kit.is_missing(script_chars) and chars > 0:
            return script_chars / chars
    return None


def _value(data: ReportData, tokenizer: str, corpus: str, key: str, group: str = "") -> float:
    """A metric as a float for plotting; NaN when the record or the metric is missing."""
    record = data.get(tokenizer, corpus, group)
    value = None if record is None else record.get(key)
    return math.nan if kit.is_missing(value) else float(value)


def japanese_corpus(corpora: list[str]) -> str:
    """The corpus the Japanese-specific plots use: the first whose name starts with "ja", else the first."""
    return next((c for c in corpora if c.lower().startswith("ja")), corpora[0])


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

def build_blocks(data: ReportData, title: str) -> list[Block]:
    """The whole report, in reading order; report.md shows every block except the plots."""
    ja = japanese_corpus(data.corpora)
    return [
        Heading(title, 1),
        Paragraph(settings_sentence(data)),
        Heading("Summary", 2),
        Bullets(summary_lines(data)),
        *headline_section(data),
        *cost_section(data),
        *script_section(data, ja),
        *morpheme_section(data, ja),
        *vocabulary_section(data),
        *group_section(data),
        *tokenizer_section(data),
        Heading("Definitions", 2),
        Definitions(definitions(data)),
        Heading("Notes", 2),
        Bullets(data.notes or ["(none)"]),
    ]


def settings_sentence(data: ReportData) -> str:
    text = (f"Costs are relative to {data.baseline} (the baseline). Training compute is 6·N·D with "
            f"N = {data.compute_params:,} parameters and D = tokens; context length {data.context_length:,} "
            f"tokens; Rényi α = {_alpha(data)}. Each document is encoded whole, once, with no BOS/EOS or other "
            f"special tokens.")
    if data.settings.get("max_documents"):
        text += f" Only the first {data.settings['max_documents']:,} documents of each corpus are used."
    return text


def summary_lines(data: ReportData) -> list[str]:
    lines = [corpus_summary(data, corpus) for corpus in data.corpora]
    for r in data.records:
        if r["group"]:
            continue
        if not kit.is_missing(r.get("byte_fallback_rate")) and r["byte_fallback_rate"] >= 0.05:
            lines.append(f"{r['tokenizer']} spells {kit.fmt_percent(r['byte_fallback_rate'])} of its tokens on "
                         f"{r['corpus']} as single UTF-8 bytes (byte fallback): those characters are not in its "
                         f"vocabulary.")
        if not kit.is_missing(r.get("roundtrip_failures")) and r["roundtrip_failures"] > 0:
            lines.append(f"{r['tokenizer']}: {r['roundtrip_failures']:,} documents of {r['corpus']} do not "
                         f"round-trip (decode(encode(text)) != text); its counts describe normalized text.")
    return [line for line in lines if line]


def corpus_summary(data: ReportData, corpus: str) -> str:
    """One sentence: who spends the fewest tokens on this corpus and what that buys against the baseline."""
    rows = [r for r in data.rows(corpus) if not kit.is_missing(r.get("chars_per_token"))]
    if not rows:
        return f"{corpus}: no tokenizer has a chars/token figure."
    best = max(rows, key=lambda r: r["chars_per_token"])
    worst = min(rows, key=lambda r: r["chars_per_token"])
    base = data.get(data.baseline, corpus) or {}
    line = f"{corpus}: {best['tokenizer']} spends the fewest tokens ({kit.fmt_ratio(best['chars_per_token'])} chars/token"
    if best["tokenizer"] != data.baseline and not kit.is_missing(best.get("relative_compute")):
        line += (f", {kit.fmt_times(best['relative_compute'])} the tokens and training compute of {data.baseline}")
    line += ")"
    if not kit.is_missing(best.get("chars_per_context")) and not kit.is_missing(base.get("chars_per_context")) \
            and best["tokenizer"] != data.baseline:
        line += (f"; a {data.context_length:,}-token context holds {kit.fmt_count(best['chars_per_context'])} characters "
                 f"with it vs {kit.fmt_count(base['chars_per_context'])} with {data.baseline}")
    if worst is not best:
        line += f". Most tokens: {worst['tokenizer']} ({kit.fmt_ratio(worst['chars_per_token'])} chars/token)"
    return line + "."


def corpus_sentence(data: ReportData, corpus: str) -> str:
    info = data.corpus_info.get(corpus) or {}
    parts = [f"{kit.fmt_count(info[k])} {label}" if not kit.is_missing(info.get(k)) else f"{label}: n/a"
             for k, label in (("documents", "documents"), ("chars", "characters"), ("bytes", "UTF-8 bytes"),
                              ("morphemes", "morphemes"))]
    return ", ".join(parts) + "."


def headline_section(data: ReportData) -> list[Block]:
    blocks: list[Block] = [Heading("Tokens per corpus", 2), plot_chars_per_token(data)]
    for corpus in data.corpora:
        blocks += [Heading(corpus, 3), Paragraph(corpus_sentence(data, corpus)),
                   make_table(headline_columns(data), _label_baseline(data, data.rows(corpus)))]
    return blocks


def cost_section(data: ReportData) -> list[Block]:
    blocks: list[Block] = [
        Heading("Cost", 2),
        Paragraph(f"Fewer tokens for the same text means proportionally less training compute (6·N·D at fixed N) "
                  f"and more text per {data.context_length:,}-token context. Training FLOPs are for one pass over "
                  f"the corpus."),
        plot_cost(data),
    ]
    for corpus in data.corpora:
        blocks += [Heading(corpus, 3), make_table(cost_columns(data), _label_baseline(data, data.rows(corpus)))]
    return blocks


def script_section(data: ReportData, ja: str) -> list[Block]:
    blocks: list[Block] = [
        Heading("Tokens per character by script", 2),
        Paragraph("Above 1 a script's characters cost more than one token each (typically byte fallback or "
                  "byte-level fragments of kanji); column titles give the script's share of the corpus's characters."),
        plot_script_tokens(data, ja),
    ]
    for corpus in data.corpora:
        blocks += [Heading(corpus, 3), make_table(script_columns(data, corpus), data.rows(corpus))]
    return blocks


def morpheme_section(data: ReportData, ja: str) -> list[Block]:
    blocks: list[Block] = [
        Heading("Alignment with morphemes", 2),
        Paragraph("How tokens fall against fugashi (unidic-lite) morphemes: fewer tokens per morpheme and a higher "
                  "boundary F1 mean tokens that follow Japanese word structure."),
        plot_morpheme_histogram(data, ja),
    ]
    for corpus in data.corpora:
        rows = data.rows(corpus)
        if all(kit.is_missing(r.get("tokens_per_morpheme")) for r in rows):
            continue  # no morpheme counts for this corpus (e.g. English)
        blocks += [Heading(corpus, 3), make_table(morpheme_columns(), rows)]
    return blocks


def vocabulary_section(data: ReportData) -> list[Block]:
    blocks: list[Block] = [Heading("Kanji coverage and vocabulary", 2)]
    for corpus in data.corpora:
        rows = data.rows(corpus)
        if all(kit.is_missing(r.get("kanji_single_token_occurrence_rate")) for r in rows) and corpus != data.corpora[0]:
            continue  # a corpus without kanji adds nothing beyond the vocabulary columns already shown
        blocks += [Heading(corpus, 3), make_table(vocabulary_columns(data), rows)]
    return blocks


def group_section(data: ReportData) -> list[Block]:
    blocks: list[Block] = []
    for corpus in data.corpora:
        groups = data.groups(corpus)
        if not groups:
            continue
        rows = [r for g in groups for r in data.rows(corpus, g)]
        blocks += [Heading(corpus, 3), make_table(group_columns(data), rows)]
    if blocks:
        blocks = [Heading("By group", 2),
                  Paragraph(f"The same metrics on each group of documents; 'tokens vs {data.baseline}' compares "
                            f"within the group.")] + blocks
    return blocks


def tokenizer_section(data: ReportData) -> list[Block]:
    columns = [Column("tokenizer", "tokenizer"), Column("source", "source"), Column("kind", "kind"),
               Column("vocab", "vocab_size", kit.fmt_count)]
    rows = [{"tokenizer": t, **(data.tokenizer_info.get(t) or {})} for t in data.tokenizers]
    # tokenizer.compare writes "library_versions"; the documented layout names it "tokenizer_library_versions".
    versions = data.settings.get("tokenizer_library_versions") or data.settings.get("library_versions") or {}
    blocks: list[Block] = [Heading("Tokenizers", 2), make_table(columns, rows)]
    if versions:
        blocks.append(Paragraph("Libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."))
    return blocks


def definitions(data: ReportData) -> list[tuple[str, str, str]]:
    """Every metric's definition; the wording is the contract with tokenizer/metrics.py."""
    alpha, n, ctx = _alpha(data), data.compute_params, data.context_length
    return [
        ("counting", "", ("Each record's whole text is encoded once, with no BOS/EOS or other special tokens; every "
                         "count is a sum over the corpus's records (or a group's).")),
        ("group", "group", ("A label such as genre:fiction restricts every metric to the records with that field "
                           "value; an empty group is the whole corpus.")),
        ("documents", "documents", "Number of records."),
        ("characters", "chars", "len(text): Unicode code points."),
        ("bytes", "bytes", "Length of the text's UTF-8 encoding."),
        ("morphemes", "morphemes", ("Number of fugashi (unidic-lite) tokens; n/a when the corpus was not analysed "
                                   "into morphemes.")),
        ("morphemes no token covers", "uncovered_morphemes",
         "Morphemes that no token overlaps (characters the tokenizer dropped); not in the histogram."),
        ("tokens", "tokens", "Number of tokens the tokenizer produces."),
        ("chars/token", "chars_per_token", "characters / tokens; higher means fewer tokens for the same text."),
        ("bytes/token", "bytes_per_token", "bytes / tokens."),
        ("tokens/morpheme", "tokens_per_morpheme", "tokens / morphemes."),
        ("byte fallback", "byte_fallback_rate", ("Share of tokens that are SentencePiece byte-fallback pieces "
                                                "(<0x00>…<0xFF>); 0 for byte-level BPE, which has none.")),
        ("partial chars", "partial_char_rate", ("Share of tokens whose bytes are not whole UTF-8 characters "
                                               "(byte-fallback pieces, byte-level BPE fragments of a character).")),
        ("morphemes split over 2+ tokens", "continued_morpheme_rate",
         "Share of morphemes overlapped by two or more tokens."),
        ("boundary precision / recall / F1", "boundary_precision, boundary_recall, boundary_f1",
         ("Token boundaries T against morpheme boundaries M (starts and ends of morphemes), compared without "
         "whitespace: both are positions in the text with whitespace removed, the text's own edges excluded. "
         "Precision = |T∩M| / |T|, recall = |T∩M| / |M|, counts summed over the corpus; F1 = their harmonic mean.")),
        ("tokens/char by script", "tokens_per_char_<script>",
         f"script_tokens / script_chars for {', '.join(SCRIPTS)}; n/a when the corpus has no such character."),
        ("characters by script", "script_chars_<script>", "Characters of that script."),
        ("tokens by script", "script_tokens_<script>",
         ("Tokens attributed to the script of the first non-space character of the token's span; whitespace-only "
         "and empty tokens count as other.")),
        ("distinct kanji in text", "kanji_distinct", "Number of different kanji in the corpus."),
        ("kanji as one token (distinct)", "kanji_single_token_distinct_rate",
         "Share of those distinct kanji that are a single vocabulary token."),
        ("kanji as one token (occurrences)", "kanji_single_token_occurrence_rate",
         "The same, weighted by how often each kanji occurs in the corpus."),
        ("jōyō kanji as one token", "joyo_coverage",
         ("Share of the 2,136 jōyō kanji that are a single token (the official form or, for 𠮟 塡 剝 頰, the JIS X "
         "0208 form 叱 填 剥 頬); a vocabulary property, the same for every corpus.")),
        ("vocab", "vocab_size", "Number of token ids, special and added tokens included."),
        ("Japanese share of vocab", "vocab_japanese_share",
         ("Share of the ids whose text contains hiragana, katakana or kanji (kanji-only tokens include Chinese "
         "words).")),
        ("kana share of vocab", "vocab_kana_share", "Share of the ids whose text contains hiragana or katakana."),
        ("Rényi efficiency", "renyi_efficiency",
         (f"H_α(p) / log|V| with α = {alpha}, where p is the unigram distribution of token ids on the corpus, "
         f"H_α(p) = log(Σ p_i^α) / (1 − α) and |V| = vocab (Zouhar et al. 2023, Tokenization and the "
         f"Noiseless Channel).")),
        ("distinct tokens used", "token_types", "Number of different token ids that occur in the encoded corpus."),
        ("round-trip failures", "roundtrip_failures", "Number of records for which decode(encode(text)) != text."),
        ("tokens-per-morpheme histogram", "morpheme_token_histogram_<k>",
         "Number of morphemes overlapped by k tokens (k = 1…7, then 8 or more)."),
        (f"tokens vs {data.baseline}", "relative_tokens",
         f"tokens / tokens of {data.baseline} (the baseline) on the same corpus and group."),
        (f"compute vs {data.baseline}", "relative_compute",
         (f"Ratio of training compute 6·N·D to the baseline's, with D = tokens and the same N = {n:,}, so it "
         f"equals the token ratio; below 1 the same text costs less to train on. Equal N is the assumption: a "
         f"larger vocabulary adds embedding parameters, which this ignores.")),
        ("training FLOPs", "training_flops", f"6·N·D with N = {n:,} and D = tokens: one pass over the corpus."),
        (f"chars per {ctx:,}-token context", "chars_per_context",
         f"{ctx:,} × chars/token: how much text fits in one context window."),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Plots (pipeline/reportkit.py's figure and render_plot)
# ---------------------------------------------------------------------------------------------------------------


def _grouped_bars(ax: Any, n_groups: int, series: list[tuple[str, list[float], Any]],
                  fmt: Callable[[float], str] | None, horizontal: bool = False, fontsize: float = 8,
                  rotation: float = 0) -> None:
    """Draw one bar per (series, group); a NaN value draws no bar and is labelled "n/a"."""
    width = 0.8 / max(len(series), 1)
    positions = np.arange(n_groups)
    for i, (label, values, color) in enumerate(series):
        offsets = positions + (i - (len(series) - 1) / 2) * width
        heights = [0.0 if math.isnan(v) else v for v in values]
        draw = ax.barh if horizontal else ax.bar
        bars = draw(offsets, heights, width * 0.95, label=label, color=color)
        if fmt is not None:
            texts = ["n/a" if math.isnan(v) else fmt(v) for v in values]
            ax.bar_label(bars, labels=texts, padding=2, fontsize=fontsize, rotation=rotation)


def _title_and_legend(fig: Any, title: str, n_series: int) -> None:
    """Title on top, legend in one row below the axes, outside them so it never covers a bar or its label."""
    fig.suptitle(title)
    handles, labels = fig.axes[0].get_legend_handles_labels()  # panels share their series: list them once
    fig.legend(handles, labels, loc="outside lower center", ncols=min(n_series, 6), frameon=False)


def plot_chars_per_token(data: ReportData) -> Plot:
    corpora, tokenizers = data.corpora, data.tokenizers
    values = {c: [_value(data, t, c, "chars_per_token") for t in tokenizers] for c in corpora}

    def draw(labels: dict[str, str]) -> Any:
        fig, ax = kit.figure(9, 4.2)
        series = [(labels[c], values[c], CORPUS_COLORS[i % len(CORPUS_COLORS)]) for i, c in enumerate(corpora)]
        _grouped_bars(ax, len(tokenizers), series, kit.fmt_ratio)
        ax.set_xticks(np.arange(len(tokenizers)), [labels[t] for t in tokenizers])
        ax.set_ylabel("characters per token (higher = fewer tokens)")
        ax.margins(y=0.1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        _title_and_legend(fig, "Characters per token", len(series))
        return fig

    alt = "Bar chart of characters per token. " + "; ".join(
        f"{c}: " + ", ".join(f"{t} {kit.cell(v, kit.fmt_ratio)}" for t, v in zip(tokenizers, values[c])) for c in corpora)
    return Plot(kit.render_plot(draw, [*corpora, *tokenizers]), alt,
                "Characters per token, per tokenizer and corpus. Higher is better: the same text in fewer tokens.")


def plot_script_tokens(data: ReportData, corpus: str) -> Plot:
    rows = data.rows(corpus)
    scripts = [s for s in _scripts(data.records)
               if not all(kit.is_missing(r.get(f"tokens_per_char_{s}")) for r in rows)]
    values = {t: [_value(data, t, corpus, f"tokens_per_char_{s}") for s in scripts] for t in data.tokenizers}

    def draw(labels: dict[str, str]) -> Any:
        fig, ax = kit.figure(9, 4.6)
        series = [(labels[t], values[t], TOKENIZER_COLORS[i % 10]) for i, t in enumerate(data.tokenizers)]
        _grouped_bars(ax, len(scripts), series, kit.fmt_ratio, fontsize=7, rotation=90)
        ticks = []
        for s in scripts:
            share = _script_share(rows, s)
            ticks.append(s if share is None else f"{s}\n{kit.fmt_percent(share)} of chars")
        ax.set_xticks(np.arange(len(scripts)), ticks)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
        ax.set_ylabel("tokens per character (lower = better)")
        ax.margins(y=0.1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        _title_and_legend(fig, f"Tokens per character by script on {labels[corpus]}", len(series))
        return fig

    alt = f"Bar chart of tokens per character by script on {corpus}. " + "; ".join(
        f"{s}: " + ", ".join(f"{t} {kit.cell(values[t][j], kit.fmt_ratio)}" for t in data.tokenizers)
        for j, s in enumerate(scripts))
    return Plot(kit.render_plot(draw, [corpus, *data.tokenizers]), alt,
                f"Tokens per character for each script on {corpus}; the dashed line is one token per character.")


def _histogram_shares(data: ReportData, tokenizer: str, corpus: str) -> list[float]:
    counts = [_value(data, tokenizer, corpus, f"morpheme_token_histogram_{b}") for b in HISTOGRAM_BINS]
    total = sum(c for c in counts if not math.isnan(c))
    return [math.nan if math.isnan(c) or total == 0 else c / total for c in counts]


def plot_morpheme_histogram(data: ReportData, corpus: str) -> Plot:
    # Prefer the Japanese corpus; fall back to any corpus that has morpheme counts.
    candidates = [corpus] + [c for c in data.corpora if c != corpus]
    chosen = next((c for c in candidates if any(not all(map(math.isnan, _histogram_shares(data, t, c)))
                                                for t in data.tokenizers)), None)
    shares = {t: _histogram_shares(data, t, chosen) for t in data.tokenizers} if chosen else {}

    def draw(labels: dict[str, str]) -> Any:
        fig, ax = kit.figure(9, 4.2)
        if chosen is None:
            ax.text(0.5, 0.5, "no morpheme counts in these metrics", ha="center", va="center")
            ax.set_axis_off()
            return fig
        x = np.arange(len(HISTOGRAM_BINS))
        for i, t in enumerate(data.tokenizers):
            tpm = kit.cell(_value(data, t, chosen, "tokens_per_morpheme"), kit.fmt_ratio)
            ax.plot(x, [100 * v for v in shares[t]], marker="o", color=TOKENIZER_COLORS[i % 10],
                    label=f"{labels[t]} ({tpm} tokens/morpheme)")
        ax.set_xticks(x, list(HISTOGRAM_BINS))
        ax.set_xlabel("tokens a morpheme is spread over")
        ax.set_ylabel("share of morphemes")
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax.set_ylim(bottom=0)
        ax.set_title(f"Tokens per morpheme on {labels[chosen]}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        return fig

    if chosen is None:
        alt = "No morpheme counts in these metrics."
    else:
        alt = f"Line chart of the share of morphemes spread over 1 to 8+ tokens on {chosen}. " + "; ".join(
            f"{t}: " + ", ".join(f"{b} {kit.cell(v, kit.fmt_percent)}" for b, v in zip(HISTOGRAM_BINS, shares[t]))
            for t in data.tokenizers)
    caption = ("Distribution of tokens per morpheme (fugashi, unidic-lite) on " + (chosen or "no corpus") +
               ": more mass at 1 means tokens that keep Japanese words whole.")
    return Plot(kit.render_plot(draw, [*(c for c in [chosen] if c), *data.tokenizers]), alt, caption)


def plot_cost(data: ReportData) -> Plot:
    corpora, tokenizers = data.corpora, data.tokenizers
    compute = {c: [_value(data, t, c, "relative_compute") for t in tokenizers] for c in corpora}
    context = {c: [_value(data, t, c, "chars_per_context") for t in tokenizers] for c in corpora}

    def draw(labels: dict[str, str]) -> Any:
        fig, (left, right) = kit.figure(10, 4.8, ncols=2)
        for ax, values, fmt, ticks in ((left, compute, kit.fmt_times, "{x:g}"), (right, context, kit.fmt_count, "{x:,.0f}")):
            series = [(labels[c], values[c], CORPUS_COLORS[i % len(CORPUS_COLORS)]) for i, c in enumerate(corpora)]
            _grouped_bars(ax, len(tokenizers), series, fmt, horizontal=True)
            ax.set_yticks(np.arange(len(tokenizers)), [labels[t] for t in tokenizers])
            ax.invert_yaxis()  # first tokenizer at the top, as in the tables
            ax.margins(x=0.2)
            ax.grid(axis="x", alpha=0.3)
            ax.set_axisbelow(True)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.xaxis.set_major_formatter(StrMethodFormatter(ticks))
        left.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
        left.set_title(f"Training compute vs {labels[data.baseline]} (lower = cheaper)")
        left.set_xlabel("6·N·D relative to baseline, same N")
        right.set_title(f"Characters per {data.context_length:,}-token context")
        right.set_xlabel("characters (higher = more text per context)")
        _title_and_legend(fig, f"Cost vs {labels[data.baseline]} (baseline)", len(corpora))
        return fig

    alt = (f"Two bar charts. Training compute relative to {data.baseline}: " + "; ".join(
        f"{c}: " + ", ".join(f"{t} {kit.cell(v, kit.fmt_times)}" for t, v in zip(tokenizers, compute[c])) for c in corpora)
        + f". Characters per {data.context_length:,}-token context: " + "; ".join(
        f"{c}: " + ", ".join(f"{t} {kit.cell(v, kit.fmt_count)}" for t, v in zip(tokenizers, context[c])) for c in corpora)
        + ".")
    return Plot(kit.render_plot(draw, [*corpora, *tokenizers]), alt,
                f"Cost per tokenizer: training compute relative to {data.baseline} for the same text (left) and "
                f"characters that fit in a {data.context_length:,}-token context (right).")


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def write_report(metrics: dict, out_dir: Path, title: str = "Tokenizer efficiency report") -> list[Path]:
    """Write metrics.csv, report.md and report.html into out_dir (created if missing); return their paths.

    Arguments:
        metrics: the tokenizer-report metrics (layout in this module's docstring).
        out_dir: folder to write into; existing files of the same names are replaced.
        title: the report's title (first heading and HTML <title>).
    """
    data = load_report_data(metrics)
    blocks = build_blocks(data, title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [(out_dir / "metrics.csv", render_csv(data)),
               (out_dir / "report.md", kit.render_markdown(blocks)),
               (out_dir / "report.html", kit.render_html(blocks, title))]
    for path, text in outputs:
        kit.write_text(path, text)
    return [path for path, _ in outputs]


# ---------------------------------------------------------------------------------------------------------------
# The run report's section (StageSpec.report_section)
# ---------------------------------------------------------------------------------------------------------------

def report_section(ctx: SectionContext) -> Section:
    data = load_report_data(kit.read_json(ctx.stage_dir / "metrics.json"))
    blocks = [Heading("Tokenizer comparison (tokenizer-report)", 2), Paragraph(settings_sentence(data)),
              Bullets(summary_lines(data)), *kit.shift_headings(headline_section(data), 1),
              Paragraph("Costs, per-script figures, morpheme alignment, kanji coverage and every metric's definition: "
                        "stages/tokenizer-report/report.html.")]
    return Section("Tokenizer comparison", blocks, "stages/tokenizer-report/metrics.json")
