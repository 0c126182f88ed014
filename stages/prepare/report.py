"""The prepare stage's section of the run report (StageSpec.report_section): kept and removed documents per
language and split, from stats.json alone.

Here, not in data/, because data/ is part of prepare's fingerprint: a change to the run report must not
rerun prepare."""

from __future__ import annotations

from typing import Any

from pipeline.reportkit import DASH, Block, Bullets, Heading, Paragraph, Section, SectionContext, Table, read_json


def report_section(ctx: SectionContext) -> Section:
    return Section("Data", prepare_blocks(ctx), "stages/prepare/stats.json")


def prepare_blocks(ctx: SectionContext) -> list[Block]:
    stats = read_json(ctx.stage_dir / "stats.json")
    languages = stats.get("languages") or {}
    kept_rows, lines = [], []
    for lang, lang_stats in languages.items():
        splits = lang_stats["splits"]
        by_files = lang_stats.get("heldout_source") == "files"
        read = {split: sum(f["records"] for f in lang_stats["input"]["files"] if f["split"] == split)
                for split in splits}
        for split, split_stats in splits.items():
            removed = read[split] - split_stats["documents"] if by_files else None
            kept_rows.append([lang, split, f"{read[split]:,}" if by_files else DASH,
                              f"{split_stats['documents']:,}", f"{split_stats['chars']:,}",
                              f"{split_stats['bytes']:,}", DASH if removed is None else f"{removed:,}",
                              str(len(split_stats.get("shards", [])))])
        removed_total = sum(lang_stats["removed"].values())
        skipped_total = sum(lang_stats["skipped_lines"].values())
        source = ("held-out documents come from the held-out files" if by_files else
                  "the held-out split is a seeded hash of each document's id, drawn after filtering")
        lines.append(f"{lang}: {lang_stats['input']['records']:,} records read, "
                     f"{sum(s['documents'] for s in splits.values()):,} kept, {removed_total:,} removed, "
                     f"{skipped_total:,} input lines skipped; {source}")
    reason_rows = _reason_rows(languages)
    langs = list(languages)
    blocks: list[Block] = [
        Heading("Data (prepare)", 2),
        Paragraph(f"Unicode normalization {stats.get('normalization', DASH)}; per language, each rule removes the "
                  "documents it is the first to fire on (filters, then exact and near-duplicate removal, held-out "
                  "text first so training duplicates of it go)."),
        Bullets(lines),
        Table(["language", "split", "records read", "documents kept", "characters kept", "UTF-8 bytes kept",
               "documents removed", "shards"], kept_rows, [False, False, True, True, True, True, True, True]),
        Paragraph("stats.json counts removed documents per rule and language (not per split, and not their "
                  "characters); a split's removed documents are its records read minus those kept, known when "
                  "held-out documents come from their own files."),
        Table(["reason", *langs], reason_rows, [False] + [True] * len(langs)),
    ]
    examples = _duplicate_examples(languages)
    if examples:
        blocks += [Paragraph("Examples of removed duplicates (document: the document it repeats):"), Bullets(examples)]
    return blocks


def _reason_rows(languages: dict[str, Any]) -> list[list[str]]:
    def row(label: str, counts: list[int]) -> list[str]:
        return [label, *(f"{n:,}" for n in counts)]

    stats = list(languages.values())
    rules = list(dict.fromkeys(rule for s in stats for rule in s["removed"]))
    rows = [row(f"removed: {rule}", [s["removed"].get(rule, 0) for s in stats]) for rule in rules]
    rows.append(row("removed: total", [sum(s["removed"].values()) for s in stats]))
    for kind in dict.fromkeys(k for s in stats for k in s.get("decontamination", {})):
        rows.append(row(f"of which training copies of held-out text: {kind.removesuffix('_of_heldout')}",
                        [s.get("decontamination", {}).get(kind, 0) for s in stats]))
    for kind in dict.fromkeys(k for s in stats for k in s["skipped_lines"]):
        counts = [s["skipped_lines"].get(kind, 0) for s in stats]
        if any(counts):  # skipped lines exist only with on_error: skip; zero rows would be noise
            rows.append(row(f"input lines skipped: {kind}", counts))
    return rows


def _duplicate_examples(languages: dict[str, Any]) -> list[str]:
    lines = []
    for lang, s in languages.items():
        for rule, pairs in (s.get("duplicate_examples") or {}).items():
            lines += [f"{lang} {rule}: {p['document']}: {p['duplicate_of']}" for p in pairs]
    return lines
