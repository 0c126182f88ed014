"""The run report: one page that explains a whole run from the files in its run directory.

    write_run_report(run_dir)   # -> [runs/<name>/report.md, runs/<name>/report.html]

Sections, each present only when its stage is committed (`stages/<stage>/manifest.json` with status done;
`<stage>.partial/` folders are attempts, never read):

    Overview                 every committed stage (finished, duration, fingerprint, summary), config hash,
                             seed, versions      <- config.yaml, stages/*/manifest.json
    Data (prepare)           kept and removed documents per language and split   <- prepare/stats.json
    Vocabulary extension     sizes, chars/token before and after, init           <- extend-vocab/summary.json
    Tokenizer comparison     headline tables and chars/token plot                <- tokenizer-report/metrics.json
    Plan vs measured         planned GiB per GPU and time next to the measured peak and wall time
                                                             <- plan/plan.json, cpt|sft/summary.json, manifests
    Continued pretraining    forgetting curves (eval/forgetting.py)   <- cpt/summary.json, forgetting.jsonl, ...
    Instruction tuning       loss, held-out loss, generations (eval/sft_report.py)  <- sft/summary.json, ...
    Evaluation               eval.eval_report.build_blocks(stage_dir), see `evaluate_section`
    Reproduce                the commands, and which file each section's numbers come from

Every number printed is read from those files (nothing is recomputed from models or corpora), so the same run
directory always gives byte-identical reports. report.html is self-contained (plots inline as base64 PNGs, inline
CSS, no URLs); report.md links the plots that the stages saved as PNG files. Both files are replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import JpadaptError
from pipeline.stage import MANIFEST
from tokenizer.report import (
    DASH,
    Block,
    Bullets,
    Heading,
    Paragraph,
    Plot,
    Table,
    headline_section,
    load_report_data,
    render_html,
    render_markdown,
    settings_sentence,
    summary_lines,
)

REPORT_FILES = ("report.md", "report.html")
# Pipeline order; a committed stage this module does not know still gets its row in the overview.
STAGE_ORDER = ("prepare", "extend-vocab", "tokenizer-report", "plan", "cpt", "sft", "evaluate")
GIB = 2**30
FINGERPRINT_CHARS = 12  # enough to tell runs apart at a glance; the manifest has all 64
SUMMARY_CHARS = 160
CUDA_PEAK = "torch.cuda.max_memory_allocated"  # pipeline/training.py's peak_memory kind on a GPU
OVERHEAD_TERM = "framework overhead"  # the planner's fixed allowance (CUDA context, workspace, fragmentation)
ENVIRONMENT_KEYS = (("jpadapt", "jpadapt"), ("python", "python"), ("platform", "platform"), ("host", "host"))


# ---------------------------------------------------------------------------------------------- entry point


def write_run_report(run_dir: Path) -> list[Path]:
    """Write report.md and report.html at the top of `run_dir`; return their paths.

    Arguments:
        run_dir: a run directory (`<run.output_dir>/<run.name>`) with at least one committed stage.

    Both texts are rendered before anything is written; each file goes to a temporary name and is renamed into
    place, so an error leaves the previous reports (or none) as they were, never a half-written file.
    """
    run_dir = Path(run_dir)
    stages = committed_stages(run_dir)
    if not stages:
        raise JpadaptError(f"{run_dir}: no committed stage to report on (run a stage first, e.g. `jpadapt run`)")
    blocks, images = build_report(run_dir, stages)
    title = f"Run report: {run_dir.name}"
    texts = {"report.md": render_markdown(blocks, images), "report.html": render_html(blocks, title)}
    return _write_atomically(run_dir, texts)


def _write_atomically(run_dir: Path, texts: dict[str, str]) -> list[Path]:
    temporary = {name: run_dir / f".{name}.{os.getpid()}.tmp" for name in texts}
    try:
        for name, text in texts.items():
            # newline="" keeps "\n" on every platform, so the files are byte-identical everywhere.
            with temporary[name].open("w", encoding="utf-8", newline="") as f:
                f.write(text)
        paths = []
        for name in texts:
            os.replace(temporary[name], run_dir / name)
            paths.append(run_dir / name)
        return paths
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def committed_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{stage: manifest} for every committed stage, in pipeline order (unknown stages last, by name)."""
    folder = Path(run_dir) / "stages"
    found: dict[str, dict[str, Any]] = {}
    if folder.is_dir():
        for stage_dir in folder.iterdir():
            if not stage_dir.is_dir() or stage_dir.name.endswith(".partial"):
                continue
            manifest = _read_json_or_none(stage_dir / MANIFEST)
            if isinstance(manifest, dict) and manifest.get("status") == "done":
                found[stage_dir.name] = manifest
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def build_report(run_dir: Path, stages: dict[str, dict[str, Any]]) -> tuple[list[Block], dict[int, str]]:
    """The page's blocks, and the PNG file (relative to run_dir) that report.md links for a plot, by id(plot)."""
    images: dict[int, str] = {}
    blocks: list[Block] = [Heading(f"Run report: {run_dir.name}", 1), *overview_section(run_dir, stages)]
    for stage, section in SECTIONS.items():
        if stage in stages:
            blocks += section(run_dir / "stages" / stage, stages, images)
    blocks += reproduce_section(run_dir, stages)
    return blocks, images


# ---------------------------------------------------------------------------------------------- helpers


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_json(path: Path) -> Any:
    """A stage output the report needs: a missing or broken file is an error that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JpadaptError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise JpadaptError(f"{path}: not valid JSON ({exc})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def nest(blocks: list[Block], stage: str, fallback_title: str) -> list[Block]:
    """A stage report's own blocks as one section of the page: its title (first heading) becomes a level-2
    heading naming the stage, and its other headings shift so the highest of them sits at level 3."""
    body = list(blocks)
    title = fallback_title
    if body and isinstance(body[0], Heading):
        title = body.pop(0).text
    levels = [b.level for b in body if isinstance(b, Heading)]
    shift = 3 - min(levels) if levels else 0
    body = [Heading(b.text, min(6, b.level + shift)) if isinstance(b, Heading) else b for b in body]
    # "Instruction tuning (QLoRA)" -> "Instruction tuning (QLoRA, sft)"; "Evaluation" -> "Evaluation (evaluate)"
    named = f"{title[:-1]}, {stage})" if title.endswith(")") else f"{title} ({stage})"
    return [Heading(named, 2), *body]


def shift_headings(blocks: list[Block], by: int) -> list[Block]:
    return [Heading(b.text, min(6, b.level + by)) if isinstance(b, Heading) else b for b in blocks]


def fmt_gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f}"


def fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.2g} s"  # a tiny model's planned GPU time: 0.037 s, not "0.0 s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


def fmt_money(amount: float) -> str:
    return f"${amount:.2g}" if 0 < amount < 0.01 else f"${amount:,.2f}"


def short_summary(summary: Any) -> str:
    """A manifest's summary on one line: "key: value; key: value", cut to SUMMARY_CHARS."""
    if not isinstance(summary, dict) or not summary:
        return DASH
    parts = []
    for key, value in summary.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        parts.append(f"{key}: {text}")
    line = " ".join("; ".join(parts).split())
    return line if len(line) <= SUMMARY_CHARS else line[:SUMMARY_CHARS - 1] + "…"


def _stages_by_value(values: dict[str, Any]) -> dict[str, list[str]]:
    """{value as text: stages that recorded it}, in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for stage, value in values.items():
        grouped.setdefault(str(value), []).append(stage)
    return grouped


def agreed(label: str, values: dict[str, Any]) -> str:
    """"label value" when every stage recorded the same value, else each value with its stages."""
    grouped = _stages_by_value(values)
    if len(grouped) == 1:
        return f"{label}: {next(iter(grouped))}"
    return (f"{label} differs between stages: "
            + "; ".join(f"{value} in {', '.join(stages)}" for value, stages in grouped.items()))


# ---------------------------------------------------------------------------------------------- overview


def overview_section(run_dir: Path, stages: dict[str, dict[str, Any]]) -> list[Block]:
    rows = []
    for stage, manifest in stages.items():
        rows.append([stage, str(manifest.get("status", DASH)), str(manifest.get("finished", DASH)),
                     f"{manifest['duration_s']:.1f} s" if isinstance(manifest.get("duration_s"), (int, float))
                     else DASH,
                     str(manifest.get("fingerprint", ""))[:FINGERPRINT_CHARS] or DASH,
                     short_summary(manifest.get("summary"))])
    table = Table(["stage", "status", "finished", "duration", "fingerprint", "summary"], rows,
                  [False, False, False, True, False, False])
    config = run_dir / "config.yaml"
    if config.is_file():
        config_line = (f"config hash: sha256 of config.yaml = {sha256_file(config)} (config.yaml is the resolved "
                       "YAML of the last command that ran stages here)")
    else:
        config_line = "config hash: config.yaml is missing from the run directory"
    lines = [config_line, *environment_lines(stages)]
    blocks: list[Block] = [
        Heading("Overview", 2),
        Paragraph(f"Run {run_dir.name}: {len(stages)} committed stage(s). A stage's fingerprint hashes its settings, "
                  "inputs, code and library versions; `jpadapt status` says which stages the current YAML would "
                  "rerun and why."),
        table,
        Bullets(lines),
        *library_blocks(stages),
    ]
    return blocks


def environment_lines(stages: dict[str, dict[str, Any]]) -> list[str]:
    env = {stage: manifest.get("environment") or {} for stage, manifest in stages.items()}
    lines = [agreed("seed", {stage: manifest.get("seed", DASH) for stage, manifest in stages.items()})]
    for label, key in ENVIRONMENT_KEYS:
        lines.append(agreed(label, {stage: e.get(key, DASH) for stage, e in env.items()}))
    lines.append(agreed("git commit", {stage: _git_text(e) for stage, e in env.items()}))
    return lines


def _git_text(env: dict[str, Any]) -> str:
    commit = env.get("git_commit")
    if not commit:
        return "not recorded (jpadapt did not run from a git checkout)"
    dirty = env.get("git_dirty")
    state = {True: "plus uncommitted changes", False: "(clean)"}.get(dirty, "(uncommitted changes unknown)")
    return f"{commit} {state}"


def library_blocks(stages: dict[str, dict[str, Any]]) -> list[Block]:
    """Every library any stage recorded, with the stages that recorded each version."""
    versions: dict[str, dict[str, str]] = {}
    for stage, manifest in stages.items():
        for library, version in ((manifest.get("environment") or {}).get("libraries") or {}).items():
            versions.setdefault(library, {})[stage] = version
    if not versions:
        return []
    rows, differ = [], []
    for library in sorted(versions):
        grouped = _stages_by_value(versions[library])
        if len(grouped) > 1:
            differ.append(library)
        for version, recorded_by in grouped.items():
            note = "differs between stages" if len(grouped) > 1 else ""
            rows.append([library, version, ", ".join(recorded_by), note])
    summary = (f"Library versions differ between stages: {', '.join(differ)} (a stage records the versions it ran "
               "with; a later upgrade makes the earlier stages stale)." if differ
               else "Every stage that records a library recorded the same version.")
    return [Paragraph(summary),
            Table(["library", "version", "recorded by", "note"], rows, [False, False, False, False])]


# ---------------------------------------------------------------------------------------------- prepare


def prepare_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    stats = read_json(stage_dir / "stats.json")
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


# ---------------------------------------------------------------------------------------------- tokenizers


def extend_vocab_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    from tokenizer.extension_report import _efficiency_table  # the stage's own table: one layout for both reports

    summary = read_json(stage_dir / "summary.json")
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
    return [Heading("Vocabulary extension (extend-vocab)", 2), Bullets(lines), _efficiency_table(summary),
            Paragraph("The new tokens, invariants and the full before/after comparison: stages/extend-vocab/"
                      "report.md and stages/extend-vocab/comparison/report.html.")]


def tokenizer_report_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    data = load_report_data(read_json(stage_dir / "metrics.json"))
    return [Heading("Tokenizer comparison (tokenizer-report)", 2), Paragraph(settings_sentence(data)),
            Bullets(summary_lines(data)), *shift_headings(headline_section(data), 1),
            Paragraph("Costs, per-script figures, morpheme alignment, kanji coverage and every metric's definition: "
                      "stages/tokenizer-report/report.html.")]


# ---------------------------------------------------------------------------------------------- plan


def plan_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    plans = read_json(stage_dir / "plan.json")
    run_dir = stage_dir.parent.parent
    memory_rows, time_rows, notes = [], [], []
    for plan in plans:
        stage = plan["stage"]
        memory, compute = plan["memory"], plan.get("compute")
        setup = memory["setup"]
        summary = _measured_summary(run_dir, stage, stages)
        peak = (summary or {}).get("peak_memory")
        terms = sorted(memory["terms"], key=lambda t: -t["bytes"])[:3]
        memory_rows.append([
            stage,
            f"{setup['gpus']} x {plan['gpu']}, {setup['method']}, ZeRO-{setup['zero_stage']}",
            fmt_gib(memory["gpu_bytes"]),
            "yes" if plan["fits"] else "no",
            ", ".join(f"{t['name']} {fmt_gib(t['bytes'])}" for t in terms),
            fmt_gib(peak["bytes"]) if peak else DASH,
            (f"{peak['kind']}, {summary.get('accelerator', DASH)}, {summary.get('world_size', DASH)} process(es)"
             if peak else ("not run" if stage not in stages else "not recorded")),
        ])
        manifest = stages.get(stage) or {}
        if compute is None and stage not in stages:
            continue  # nothing planned (inference has no training time) and nothing measured
        time_rows.append([
            stage,
            f"{compute['tokens']:,}" if compute else DASH,
            f"{summary['tokens_seen']:,}" if summary and "tokens_seen" in summary else DASH,
            (f"{fmt_seconds(compute['hours'] * 3600)} at {compute['mfu']:.0%} MFU on {setup['gpus']} x "
             f"{compute['gpu']}" if compute else DASH),
            f"{fmt_money(compute['cost'])} at ${compute['price_per_gpu_hour']}/GPU-hour" if compute else DASH,
            fmt_seconds(summary["train_seconds"]) if summary and "train_seconds" in summary else DASH,
            fmt_seconds(summary["wall_seconds"]) if summary and "wall_seconds" in summary else DASH,
            fmt_seconds(manifest["duration_s"]) if "duration_s" in manifest else DASH,
        ])
        if summary is not None:
            notes += comparison_notes(plan, summary)
    return [
        Heading("Plan vs measured (plan)", 2),
        Paragraph("The plan stage's per-GPU memory estimate (plan.json) next to the peak the training stage "
                  "measured (its summary.json). GiB = 2^30 bytes. The largest planned terms are listed; "
                  "stages/plan/plan.md has every term and its formula."),
        Table(["stage", "planned for", "planned GiB per GPU", "fits", "largest planned terms (GiB)",
               "measured peak GiB", "measured as"], memory_rows, [False, False, True, False, False, True, False]),
        Heading("Time", 3),
        Table(["stage", "planned tokens", "trained tokens", "planned time", "planned cost", "measured training time",
               "measured wall time", "stage duration"], time_rows, [False, True, True, False, False, True, True, True]),
        Paragraph("Planned time = FLOPs / (GPUs x peak bf16 FLOP/s x MFU), training only. Measured training time "
                  "excludes evaluations, checkpoints and start-up, which the wall time and the stage's duration "
                  "(manifest) include."),
        *([Bullets(notes)] if notes else []),
    ]


def _measured_summary(run_dir: Path, stage: str, stages: dict) -> dict[str, Any] | None:
    if stage not in stages:
        return None
    path = run_dir / "stages" / stage / "summary.json"
    return read_json(path) if path.is_file() else None


def comparison_notes(plan: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Say plainly what the planned and measured numbers are, and when they measure different things."""
    stage, memory = plan["stage"], plan["memory"]
    setup, peak = memory["setup"], summary.get("peak_memory")
    accelerator = summary.get("accelerator", "unknown device")
    overhead = sum(t["bytes"] for t in memory["terms"] if t["name"] == OVERHEAD_TERM)
    notes = []
    if peak and peak.get("kind") == CUDA_PEAK:
        without = memory["gpu_bytes"] - overhead
        notes.append(f"{stage}: both numbers are GPU memory. The measured peak ({CUDA_PEAK}) counts tensors only; "
                     f"the plan adds a {fmt_gib(overhead)} GiB framework allowance, so compare "
                     f"{fmt_gib(without)} GiB planned without it against {fmt_gib(peak['bytes'])} GiB measured. "
                     f"The plan is for {plan['gpu']}; summary.json does not record which GPU the run used.")
    elif peak:
        notes.append(f"{stage}: the plan is for {setup['gpus']} x {plan['gpu']} (GPU memory per device), but the run "
                     f"was measured on the {accelerator} as the {peak.get('kind', 'peak')} (the whole process: "
                     "Python, libraries, data and model), so the two numbers measure different things and are not "
                     f"expected to agree. The planned time is for the GPU too, not the {accelerator}.")
    world = summary.get("world_size")
    if world is not None and world != setup["gpus"]:
        notes.append(f"{stage}: planned for {setup['gpus']} GPU(s), ran as {world} process(es).")
    if stage == "cpt" and "seq_len" in summary and summary["seq_len"] != setup.get("seq_len"):
        notes.append(f"{stage}: the plan is for seq_len {setup.get('seq_len')} but the run used {summary['seq_len']}: "
                     "the plan is stale (`jpadapt plan` redoes it).")
    compute = plan.get("compute")
    if compute and "tokens_seen" in summary and summary["tokens_seen"] != compute["tokens"]:
        notes.append(f"{stage}: the plan counts {compute['tokens']:,} training tokens, the run trained on "
                     f"{summary['tokens_seen']:,} (packing, padding or a changed step count).")
    return notes


# ---------------------------------------------------------------------------------------------- training


def cpt_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    from eval.forgetting import PLOT, stage_blocks

    return _stage_report(stage_dir, stage_blocks(stage_dir), PLOT, images, "Continued pretraining",
                         "summary.json, forgetting.jsonl, metrics.jsonl")


def sft_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    from eval.sft_report import PLOT, stage_blocks

    return _stage_report(stage_dir, stage_blocks(stage_dir), PLOT, images, "Instruction tuning",
                         "summary.json, metrics.jsonl, eval.jsonl, generations.jsonl")


def _stage_report(stage_dir: Path, blocks: list[Block], png: str, images: dict[int, str], title: str,
                  files: str) -> list[Block]:
    if (stage_dir / png).is_file():
        for block in blocks:
            if isinstance(block, Plot):
                images[id(block)] = f"stages/{stage_dir.name}/{png}"
                break
    return [*nest(blocks, stage_dir.name, title),
            Paragraph(f"From stages/{stage_dir.name}/ ({files}); the stage's own report: "
                      f"stages/{stage_dir.name}/report.html.")]


def evaluate_section(stage_dir: Path, stages: dict, images: dict[int, str]) -> list[Block]:
    from eval.eval_report import TITLE, stage_blocks

    blocks, files = stage_blocks(stage_dir)
    images.update({key: f"stages/{stage_dir.name}/{name}" for key, name in files.items()})
    return [*nest(blocks, stage_dir.name, TITLE),
            Paragraph(f"From stages/{stage_dir.name}/ (results.json, generations.jsonl); the stage's own report, "
                      f"with every prediction behind the JGLUE scores in predictions.jsonl: "
                      f"stages/{stage_dir.name}/report.html.")]


SECTIONS: dict[str, Callable[[Path, dict, dict[int, str]], list[Block]]] = {
    "prepare": prepare_section,
    "extend-vocab": extend_vocab_section,
    "tokenizer-report": tokenizer_report_section,
    "plan": plan_section,
    "cpt": cpt_section,
    "sft": sft_section,
    "evaluate": evaluate_section,
}
# Where each section's numbers come from, relative to the run directory.
SOURCES = {
    "prepare": ("Data", "stages/prepare/stats.json"),
    "extend-vocab": ("Vocabulary extension", "stages/extend-vocab/summary.json"),
    "tokenizer-report": ("Tokenizer comparison", "stages/tokenizer-report/metrics.json"),
    "plan": ("Plan vs measured", ("stages/plan/plan.json, stages/cpt/summary.json, stages/sft/summary.json, "
                                  "stages/*/manifest.json (duration)")),
    "cpt": ("Continued pretraining", "stages/cpt/summary.json, stages/cpt/forgetting.jsonl, stages/cpt/metrics.jsonl"),
    "sft": ("Instruction tuning", ("stages/sft/summary.json, stages/sft/metrics.jsonl, stages/sft/eval.jsonl, "
                                   "stages/sft/generations.jsonl")),
    "evaluate": ("Evaluation", "stages/evaluate/results.json, stages/evaluate/generations.jsonl"),
}


# ---------------------------------------------------------------------------------------------- reproduce


def reproduce_section(run_dir: Path, stages: dict[str, dict[str, Any]]) -> list[Block]:
    config = _config_path_for_commands(run_dir)
    lines = [
        (f"rerun the pipeline: jpadapt run {config} (from the directory the run was started in: relative paths in "
         "the YAML are relative to it; up-to-date stages are skipped, --force recomputes them)"),
        f"one stage: jpadapt STAGE {config} --force (e.g. jpadapt {next(reversed(stages))} {config} --force)",
        f"what would rerun, and why: jpadapt status {config}",
        f"this report again: jpadapt report {config}",
    ]
    commits = {(m.get("environment") or {}).get("git_commit") for m in stages.values()} - {None, ""}
    dirty = any((m.get("environment") or {}).get("git_dirty") for m in stages.values())
    if len(commits) == 1:
        lines.append(f"the code: git checkout {next(iter(commits))}"
                     + (" (the source had uncommitted changes, so the commit alone does not reproduce it)"
                        if dirty else ""))
    rows = [["Overview", "config.yaml, stages/*/manifest.json"]]
    rows += [list(SOURCES[stage]) for stage in SECTIONS if stage in stages]
    return [Heading("Reproduce", 2), Bullets(lines),
            Paragraph("Where each section's numbers come from (paths relative to the run directory):"),
            Table(["section", "files"], rows, [False, False])]


def _config_path_for_commands(run_dir: Path) -> str:
    """runs/<name>/config.yaml as the run's own YAML names it (output_dir/name), else the path we were given."""
    try:
        run = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("run") or {}
        return (Path(str(run["output_dir"])) / str(run["name"]) / "config.yaml").as_posix()
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return (run_dir / "config.yaml").as_posix()
