"""report.md of the extend-vocab stage, rendered from its summary.json and new_tokens.json alone.

Every figure printed here is a value of `summary` (or of the token records), so a test can recompute the report
from the run directory. The full before/after tokenizer report (plots included) is in `comparison/`.
"""

from __future__ import annotations

from typing import Any

from pipeline.reportkit import Bullets, Heading, Paragraph, Section, SectionContext, Table, read_json, render_markdown

CORPUS_TITLES = {"ja_heldout": "Japanese held-out", "en_heldout": "English held-out"}


def efficiency_table(summary: dict[str, Any]) -> Table:
    rows = []
    for stem, row in summary["efficiency"].items():
        rows.append([
            CORPUS_TITLES.get(stem, stem),
            f"{row['base_chars_per_token']:.3f}",
            f"{row['extended_chars_per_token']:.3f}",
            f"{row['chars_per_token_ratio']:.3f}x",
            f"{row['base_tokens_per_morpheme']:.3f}",
            f"{row['extended_tokens_per_morpheme']:.3f}",
            f"{row['base_tokens']:,}",
            f"{row['extended_tokens']:,}",
            f"{100 * row['token_change']:+.1f}%",
        ])
    header = ["corpus", "chars/token base", "chars/token extended", "ratio", "tokens/morpheme base",
              "tokens/morpheme extended", "tokens base", "tokens extended", "tokens change"]
    return Table(header, rows, [False] + [True] * 8)


def _invariant_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for lang, row in summary["invariants"].items():
        title = CORPUS_TITLES.get(f"{lang}_heldout", lang)
        text = (f"{title}: decode(encode(x)) == x on {row['documents'] - row['roundtrip_failures']:,} of "
                f"{row['documents']:,} records; ids changed in {row['documents_with_changed_ids']:,} records "
                f"({row['tokens_in_changed_documents']:,} of {row['base_tokens']:,} base tokens are in them)")
        if "documents_matching_sentencepiece" in row:
            text += (f"; tokenizer.json gives the ids of tokenizer.model on {row['documents_matching_sentencepiece']:,}"
                     f" of {row['documents']:,} records")
        lines.append(text)
    return lines


def _saving_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for stem, row in summary["efficiency"].items():
        share = 1 - row["extended_tokens"] / row["base_tokens"]
        lines.append(f"{CORPUS_TITLES.get(stem, stem)}: the same text in {100 * share:.1f}% fewer tokens, so a "
                     "training run reads that much more text per token budget.")
    lines.append("The cpt stage's report converts this into the tokens and 6·N·D FLOPs its run saved.")
    return lines


def _examples_table(records: list[dict[str, Any]], limit: int) -> Table:
    top = sorted(records, key=lambda r: (-r["count"], r["id"]))[:limit]
    rows = [[str(r["id"]), repr(r["text"]), str(len(r["base_pieces"])), f"{r['count']:,}"] for r in top]
    return Table(["id", "token", "base tokens it replaces", "count in training text"], rows, [True, False, True, True])


def render_report(summary: dict[str, Any], records: list[dict[str, Any]], examples: int) -> str:
    unused = sum(1 for r in records if r["count"] == 0)
    blocks: list[Any] = [
        Heading("Vocabulary extension", 1),
        Paragraph(
            f"Base tokenizer {summary['base']} ({summary['kind']}, {summary['base_size']:,} ids) + "
            f"{summary['new_tokens']:,} Japanese tokens = {summary['tokenizer_size']:,} ids. Candidates: "
            f"{summary['algorithm']}"
            + (" on fugashi morphemes" if summary["morpheme_pretokenize"] else "")
            + f", learned from {summary['training_chars']:,} characters."
            + (f" {unused:,} new tokens never occur in the training text." if unused else "")
        ),
        Heading("Efficiency on the held-out text", 2),
        efficiency_table(summary),
        Paragraph("Full before/after tokenizer report with plots: comparison/report.html."),
        Heading("Invariants", 2),
        Bullets(["every base and special token keeps its id; new ids follow the base's last id", *_invariant_lines(summary)]),
        Heading("Expected compute saving", 2),
        Bullets(_saving_lines(summary)),
    ]
    model = summary.get("model")
    if model is not None:
        blocks += [
            Heading("Model", 2),
            Paragraph(
                f"Embedding rows {model['rows_before']:,} -> {model['vocab_size']:,} (a multiple of the padding; "
                f"ids from {summary['tokenizer_size']:,} up are padding the tokenizer never produces). New rows "
                f"initialized with `{model['method']}`" + (", input and output embeddings tied" if model["tied"]
                                                           else ", input and output embeddings separately") + "."
            ),
        ]
    blocks += [
        Heading(f"New tokens by frequency (top {min(examples, len(records))})", 2),
        _examples_table(records, examples),
    ]
    return render_markdown(blocks)


def report_section(ctx: SectionContext) -> Section:
    """The run report's section (StageSpec.report_section): the efficiency table of this stage's own report."""
    summary = read_json(ctx.stage_dir / "summary.json")
    lines = [
        f"base tokenizer: {summary['base']} ({summary['kind']}), {summary['base_size']:,} ids",
        (f"new tokens: {summary['new_tokens']:,} ({summary['algorithm']}"
         + (", on fugashi morphemes" if summary.get("morpheme_pretokenize") else "")
         + f", learned from {summary['training_chars']:,} characters)"),
        f"total: {summary['tokenizer_size']:,} ids",
    ]
    ja = (summary.get("efficiency") or {}).get("ja_heldout")
    if ja:
        lines.append(f"Japanese held-out chars/token: {ja['base_chars_per_token']:.3f} -> "
                     f"{ja['extended_chars_per_token']:.3f} ({ja['chars_per_token_ratio']:.3f}x); tokens "
                     f"{ja['base_tokens']:,} -> {ja['extended_tokens']:,} ({100 * ja['token_change']:+.1f}%)")
    model = summary.get("model")
    if model:
        lines.append(f"model embeddings: {model['rows_before']:,} -> {model['rows_after']:,} rows, new rows "
                     f"initialized with `{model['method']}`" + (", input and output embeddings tied"
                                                               if model.get("tied") else ""))
    else:
        lines.append("model embeddings: not resized (the YAML names no model; the tokenizer alone was extended)")
    blocks = [Heading("Vocabulary extension (extend-vocab)", 2), Bullets(lines), efficiency_table(summary),
              Paragraph("The new tokens, invariants and the full before/after comparison: stages/extend-vocab/"
                        "report.md and stages/extend-vocab/comparison/report.html.")]
    return Section("Vocabulary extension", blocks, "stages/extend-vocab/summary.json")
