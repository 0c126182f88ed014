"""The run report: one page that explains a whole run from the files in its run directory.

    write_run_report(run_dir)   # -> [runs/<name>/report.md, runs/<name>/report.html]

Sections, each present only when its stage is committed (`stages/<stage>/manifest.json` with status done;
`<stage>.partial/` folders are attempts, never read):

    Overview      every committed stage (finished, duration, fingerprint, summary), config hash, seed, versions
                  <- config.yaml, stages/*/manifest.json; plus a headline line per stage whose StageSpec has an
                  overview_line hook (cpt: the forgetting verdict <- stages/cpt/forgetting.jsonl)
    one section per committed stage, in pipeline order: its StageSpec.report_section hook (pipeline/stage.py)
                  returns the blocks and the files its numbers come from (stages/__init__.py lists the stages;
                  e.g. stages/evaluate/report.py, stages/cpt/report.py)
    Reproduce     the commands, and which file each section's numbers come from

A new stage gets its section by naming a hook in its SPEC; nothing here changes.

Every number printed is read from those files (nothing is recomputed from models or corpora), so the same run
directory always gives byte-identical reports. report.html is self-contained (plots inline as base64 PNGs, inline
CSS, no URLs); report.md links the plots that the stages saved as PNG files. Both files are replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline import reportkit as kit
from pipeline.errors import JpadaptError
from pipeline.reportkit import DASH, Block, Bullets, Heading, Paragraph, Section, SectionContext, Table
from pipeline.rundir import manifest_problem
from pipeline.stage import MANIFEST, StageSpec

REPORT_FILES = ("report.md", "report.html")
FINGERPRINT_CHARS = 12  # enough to tell runs apart at a glance; the manifest has all 64
SUMMARY_CHARS = 160
ENVIRONMENT_KEYS = (("jpadapt", "jpadapt"), ("python", "python"), ("platform", "platform"), ("host", "host"))


# ---------------------------------------------------------------------------------------------- entry point


def write_run_report(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write report.md and report.html at the top of `run_dir` (or into `out`); return their paths.

    Arguments:
        run_dir: a run directory (`<run.output_dir>/<run.name>`) with at least one committed stage.
        out: another folder to write into, for a run directory that is read-only (report.md's plot links then
            point back into the run directory).

    Both texts are rendered before anything is written; each file goes to a temporary name and is renamed into
    place, so an error leaves the previous reports (or none) as they were, never a half-written file.
    """
    run_dir = Path(run_dir)
    stages = committed_stages(run_dir)
    if not stages:
        raise JpadaptError(f"{run_dir}: no committed stage to report on (run a stage first, e.g. `jpadapt run`)")
    blocks, images = build_report(run_dir, stages)
    folder = run_dir if out is None else Path(out)
    if out is not None:
        folder.mkdir(parents=True, exist_ok=True)
        images = {key: os.path.relpath(run_dir / rel, folder) for key, rel in images.items()}
    title = f"Run report: {run_dir.name}"
    texts = {"report.md": kit.render_markdown(blocks, images), "report.html": kit.render_html(blocks, title)}
    return kit.write_texts_atomically(folder, texts)


def stage_specs() -> list[StageSpec]:
    from stages import stage_specs as specs  # stages/ imports pipeline/: importing it at the top would be circular

    return specs()


def committed_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{stage: manifest} for every committed stage, in pipeline order (unknown stages last, by name)."""
    folder = Path(run_dir) / "stages"
    found: dict[str, dict[str, Any]] = {}
    if folder.is_dir():
        for stage_dir in folder.iterdir():
            if not stage_dir.is_dir() or stage_dir.name.endswith(".partial"):
                continue
            manifest = _read_json_or_none(stage_dir / MANIFEST)
            if manifest_problem(manifest) is None:
                found[stage_dir.name] = manifest
    rank = {spec.name: i for i, spec in enumerate(stage_specs())}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def build_report(run_dir: Path, stages: dict[str, dict[str, Any]]) -> tuple[list[Block], dict[int, str]]:
    """The page's blocks, and the PNG file (relative to run_dir) that report.md links for a plot, by id(plot)."""
    sections = stage_sections(run_dir, stages)
    images = {key: path for section in sections for key, path in section.images.items()}
    blocks: list[Block] = [Heading(f"Run report: {run_dir.name}", 1), *overview_section(run_dir, stages)]
    for section in sections:
        blocks += section.blocks
    blocks += reproduce_section(run_dir, stages, sections)
    return blocks, images


def stage_sections(run_dir: Path, stages: dict[str, dict[str, Any]]) -> list[Section]:
    """The report_section of every committed stage that has one, in pipeline order."""
    sections = []
    for spec in stage_specs():
        if spec.name in stages and spec.report_section is not None:
            section = spec.report_section(SectionContext(spec.name, run_dir, stages))
            if section is not None:
                sections.append(section)
    return sections


# ---------------------------------------------------------------------------------------------- helpers


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    headlines = overview_lines(run_dir, stages)
    blocks: list[Block] = [
        Heading("Overview", 2),
        Paragraph(f"Run {run_dir.name}: {len(stages)} committed stage(s). A stage's fingerprint hashes its settings, "
                  "inputs, code and library versions; `jpadapt status` says which stages the current YAML would "
                  "rerun and why."),
        *([Bullets(headlines)] if headlines else []),
        table,
        Bullets(lines),
        *library_blocks(stages),
    ]
    return blocks


def overview_lines(run_dir: Path, stages: dict[str, dict[str, Any]]) -> list[str]:
    """"stage: line" from the overview_line hook of every committed stage that has one, in pipeline order."""
    lines = []
    for spec in stage_specs():
        if spec.name in stages and spec.overview_line is not None:
            line = spec.overview_line(SectionContext(spec.name, run_dir, stages))
            if line:
                lines.append(f"{spec.name}: {line}")
    return lines


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


# ---------------------------------------------------------------------------------------------- reproduce


def reproduce_section(run_dir: Path, stages: dict[str, dict[str, Any]], sections: list[Section]) -> list[Block]:
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
    rows = [["Overview", "config.yaml, stages/*/manifest.json (a stage's headline line: its section's files)"]]
    rows += [[section.title, section.sources] for section in sections]
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
