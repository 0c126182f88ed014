"""`jpadapt sweep`: one pipeline run once per value of one config key, in sibling run directories, and one page
that compares the runs.

    jpadapt sweep [CONFIG] cpt.replay_ratio=0,0.1,0.25 [KEY=VALUE ...] [--stage cpt] [--force]

    runs/demo-cpt.replay_ratio-0/       a whole run directory per value: run.name = <run.name>-<KEY>-<value>
    runs/demo-cpt.replay_ratio-0.1/     (characters that are unsafe in a folder name become "_")
    runs/demo-cpt.replay_ratio-0.25/
    runs/demo-sweep-cpt.replay_ratio/   comparison.md, comparison.html, forgetting.png, sweep.json

The swept override is the one whose value has commas outside brackets and quotes (`evaluate.num_fewshot=[0,3]` is
an ordinary override); each value is read as YAML, like any override. Every value's config is validated, and its
stages' input files found, before anything runs. The values run one after another, each as `jpadapt run` (or
`jpadapt STAGE` with --stage) would, with the other siblings as donors: a stage whose fingerprint does not depend on
the swept key (prepare, when sweeping cpt.replay_ratio) runs once and is hard-linked into the other run directories
(`Pipeline(donors=...)`, pipeline/runner.py).

Every number on the page is read from the siblings' files: stages/cpt/forgetting.jsonl and summary.json when cpt is
among the stages run (through stages/cpt/report.py, which imports no torch), else the stages' manifests.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import reportkit as kit
from pipeline.config import PipelineConfig, load_config, parse_override
from pipeline.errors import JpadaptError
from pipeline.reportkit import DASH, Block, Bullets, Heading, Links, Paragraph, Plot, Table
from pipeline.rundir import RunDir
from pipeline.runner import Pipeline, StageCrashed

PLOT = "forgetting.png"
NO_VERDICT = "no verdict (fewer than two evaluations, or a language missing)"
# The sweep names each value's run directory itself.
UNSWEPT = ("run.name", "run.output_dir")
# One colour per value, in order (matplotlib's tab10, which stays distinct for up to ten lines).
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# ---------------------------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class SweepArgs:
    """The overrides of a sweep command, split: the swept key with its values, and the overrides all values share."""

    key: str
    texts: tuple[str, ...]  # each value as written
    values: tuple[Any, ...]  # each value read as YAML
    fixed: tuple[str, ...]


def split_values(raw: str) -> list[str]:
    """`0,0.1,0.25` -> ["0", "0.1", "0.25"]: split at the commas outside brackets, braces and quotes, so that a
    YAML list (`[0,3]`), mapping or quoted string stays one value."""
    pieces, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(raw):
        char = raw[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1  # an escaped character inside a double-quoted string
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            pieces.append(raw[start:i])
            start = i + 1
        i += 1
    pieces.append(raw[start:])
    return pieces


def parse_sweep(overrides: list[str]) -> SweepArgs:
    """Find the one swept override (a value with top-level commas) and read each of its values as YAML."""
    swept = [item for item in overrides if len(split_values(item.partition("=")[2])) > 1]
    if not swept:
        raise JpadaptError("sweep: no override lists several values; give one as KEY=V1,V2,... "
                           "(e.g. cpt.replay_ratio=0,0.1,0.25)")
    if len(swept) > 1:
        raise JpadaptError(f"sweep: one key at a time, but {' and '.join(repr(s) for s in swept)} each list several "
                           "values (a list value goes in brackets: evaluate.num_fewshot=[0,3])")
    item = swept[0]
    key, _, raw = item.partition("=")
    if key in UNSWEPT:
        raise JpadaptError(f"sweep: {key} cannot be swept: each value's run directory is "
                           "<run.output_dir>/<run.name>-<KEY>-<value>")
    texts = [text.strip() for text in split_values(raw)]
    if "" in texts:
        raise JpadaptError(f"sweep: override {item!r} has an empty value")
    values = [parse_override(f"{key}={text}")[1] for text in texts]
    for i, value in enumerate(values):
        if value in values[:i]:
            first = texts[values.index(value)]
            raise JpadaptError(f"sweep: {key} lists the same value twice ({first} and {texts[i]})")
    fixed = tuple(other for other in overrides if other is not item)
    return SweepArgs(key, tuple(texts), tuple(values), fixed)


def safe_name(text: str) -> str:
    """`text` as part of a folder name: runs of characters other than letters, digits, '.', '_' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Member:
    """One value of the sweep: its validated config (run.name renamed), the stages asked for and those it goes
    through."""

    text: str
    value: Any
    cfg: PipelineConfig
    targets: tuple[str, ...]
    plan: tuple[str, ...]

    @property
    def root(self) -> Path:
        return Path(self.cfg.run.output_dir) / self.cfg.run.name


@dataclass(frozen=True)
class Sweep:
    key: str
    base: str  # run.name before the sweep renamed it per value
    output_dir: Path
    members: tuple[Member, ...]

    @property
    def page(self) -> Path:
        return self.output_dir / f"{self.base}-sweep-{safe_name(self.key)}"

    def label(self, member: Member) -> str:
        return f"{self.key}={member.text}"


def plan_sweep(path: Path | None, overrides: list[str], stage: str | None) -> Sweep:
    """Every value's config validated and its plan checked (targets enabled, input files found), before anything
    runs: a bad value is one error naming it."""
    args = parse_sweep(overrides)
    members, base = [], ""
    for text, value in zip(args.texts, args.values):
        swept = f"{args.key}={text}"
        try:
            base = load_config(path, [*args.fixed, swept]).run.name
            cfg = load_config(path, [*args.fixed, swept, f"run.name={base}-{safe_name(args.key)}-{safe_name(text)}"])
            members.append(_member(cfg, text, value, stage))
        except JpadaptError as exc:
            raise JpadaptError(f"sweep value {swept}: {exc}") from None
    _check_distinct_folders(members)
    return Sweep(args.key, base, Path(members[0].cfg.run.output_dir), tuple(members))


def _member(cfg: PipelineConfig, text: str, value: Any, stage: str | None) -> Member:
    pipeline = Pipeline(cfg)
    targets = [stage] if stage else [name for name in pipeline.stage_names() if cfg.enabled(name)]
    if not targets:
        raise JpadaptError("no enabled stage to run")
    return Member(text, value, cfg, tuple(targets), tuple(pipeline.plan(targets)))


def _check_distinct_folders(members: list[Member]) -> None:
    seen: dict[Path, str] = {}
    for member in members:
        if member.root in seen:
            raise JpadaptError(f"sweep: the values {seen[member.root]} and {member.text} give the same run "
                               f"directory {member.root}; quote or rewrite one of them")
        seen[member.root] = member.text


# ---------------------------------------------------------------------------------------------- running


def run_sweep(sweep: Sweep, force: bool, finish: Callable[[Pipeline, bool], None]) -> bool:
    """Run the values in turn, each followed by `finish` (the CLI's: the run report). True if any stage ran or was
    reused. A failure stops the sweep with an error naming the value's run directory and the values finished."""
    done: list[Member] = []
    ran_any = False
    for member in sweep.members:
        print(f"{sweep.label(member)}: {member.root}", flush=True)
        pipeline = Pipeline(member.cfg, donors=donors(sweep, member, done))
        targets = list(member.targets)
        try:
            ran = pipeline.execute(targets, force=set(targets) if force else set())
        except JpadaptError as exc:
            raise JpadaptError(_stopped(sweep, member, done, exc)) from None
        except StageCrashed as exc:
            raise StageCrashed(_stopped(sweep, member, done, exc)) from None
        finish(pipeline, ran)
        ran_any = ran_any or ran
        done.append(member)
    return ran_any


def donors(sweep: Sweep, member: Member, done: list[Member]) -> list[RunDir]:
    """Where `member` may take a stage from: the values done in this sweep, the most recent first (its hash cache
    recorded the shared files last, so checking them reads nothing), then the other values' run directories and
    any older sibling `<run.name>-<KEY>-*` (an earlier sweep over other values)."""
    waiting = [m for m in sweep.members if m is not member and all(m is not d for d in done)]
    roots = [m.root for m in reversed(done)] + [m.root for m in waiting]
    older = sweep.output_dir.glob(f"{sweep.base}-{safe_name(sweep.key)}-*")
    roots += sorted(p for p in older if p.is_dir() and p not in roots and p != member.root)
    return [RunDir(root) for root in roots]


def _stopped(sweep: Sweep, member: Member, done: list[Member], exc: Exception) -> str:
    finished = ", ".join(sweep.label(m) for m in done) or "none"
    return (f"{member.root}: {exc} (the sweep stopped at {sweep.label(member)}; finished: {finished}; the comparison "
            "page is written once every value has finished)")


# ---------------------------------------------------------------------------------------------- the page


def write_page(sweep: Sweep) -> list[Path]:
    """comparison.md, comparison.html, sweep.json (and forgetting.png when cpt ran) in `sweep.page`, each replaced
    atomically. Returns their paths."""
    folder = sweep.page
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JpadaptError(f"{folder}: cannot write the comparison page ({exc.strerror})") from None
    with_cpt = all("cpt" in member.plan for member in sweep.members)
    blocks, plot, record = cpt_page(sweep) if with_cpt else stages_page(sweep)
    title = f"Sweep of {sweep.key}: {sweep.base}"
    files: dict[str, str | bytes] = {PLOT: plot.png} if plot else {}
    files["sweep.json"] = json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n"
    files["comparison.md"] = kit.render_markdown(blocks, {id(plot): PLOT} if plot else {})
    files["comparison.html"] = kit.render_html(blocks, title)
    if plot is None:
        (folder / PLOT).unlink(missing_ok=True)  # an earlier page's plot would no longer match
    return kit.write_texts_atomically(folder, files)


def _intro(sweep: Sweep) -> list[Block]:
    values = ", ".join(m.text for m in sweep.members)
    stages = ", ".join(dict.fromkeys(stage for m in sweep.members for stage in m.plan))
    return [Heading(f"Sweep of {sweep.key}: {sweep.base}", 1),
            Paragraph(f"{len(sweep.members)} runs of {sweep.base}, one per value of {sweep.key} ({values}), each in "
                      f"its own run directory under {sweep.output_dir}/. Stages: {stages}.")]


def _links(sweep: Sweep) -> list[Block]:
    items = [(f"{sweep.label(m)}: run report of {m.root.name}", os.path.relpath(m.root / "report", sweep.page))
             for m in sweep.members]
    return [Heading("Run reports", 2), Links(items)]


def _base_record(sweep: Sweep) -> dict[str, Any]:
    return {"key": sweep.key, "values": [m.value for m in sweep.members], "texts": [m.text for m in sweep.members],
            "base_run": sweep.base, "runs": []}


def _run_record(member: Member) -> dict[str, Any]:
    return {"value": member.value, "text": member.text, "run_dir": str(member.root), "stages": list(member.plan),
            "report": str(member.root / "report.md")}


# ---------------------------------------------------------------------------------------------- with cpt


def cpt_numbers(run_dir: Path) -> dict[str, Any]:
    """What the page shows for one run, from its stages/cpt/forgetting.jsonl and summary.json."""
    from stages.cpt.report import endpoints, verdict

    folder = run_dir / "stages" / "cpt"
    evals = kit.read_jsonl(folder / "forgetting.jsonl")
    summary = kit.read_json(folder / "summary.json")
    numbers: dict[str, Any] = {}
    for lang, delta in (("en", "change"), ("ja", "gain")):
        if evals and lang in evals[0] and lang in evals[-1]:
            base, final = endpoints(evals, lang)
            # English change: up is forgotten. Japanese gain: down is learned.
            numbers[f"{lang}_bits_per_byte"] = {"base": base, "final": final,
                                               delta: final - base if lang == "en" else base - final}
    numbers.update(tokens_by_language=summary["tokens_by_language"], realized_en_share=summary["realized_en_share"],
                   wall_seconds=summary["wall_seconds"], verdict=verdict(evals))
    return numbers


def cpt_page(sweep: Sweep) -> tuple[list[Block], Plot, dict[str, Any]]:
    record = _base_record(sweep)
    rows, verdicts, curves = [], [], []
    for member in sweep.members:
        numbers = cpt_numbers(member.root)
        record["runs"].append({**_run_record(member), "cpt": numbers})
        rows.append([member.text, *_cpt_cells(numbers)])
        verdicts.append(f"{sweep.label(member)}: {numbers['verdict'] or NO_VERDICT}")
        curves.append(kit.read_jsonl(member.root / "stages" / "cpt" / "forgetting.jsonl"))
    header = [sweep.key, "EN bits/byte base -> final", "EN change", "JA bits/byte base -> final", "JA gain",
              "JA tokens", "EN tokens", "realized EN share", "cpt wall time"]
    plot = sweep_plot(sweep, curves)
    blocks = [
        *_intro(sweep),
        Heading("Forgetting", 2),
        plot,
        Table(header, rows, [False, *([True] * (len(header) - 1))]),
        Paragraph("Bits per byte on the held-out text; base = the evaluation at step 0, before any training. EN "
                  "change = final - base (positive: English forgotten); JA gain = base - final (positive: Japanese "
                  "learned). From each run's stages/cpt/forgetting.jsonl (bits per byte) and summary.json (tokens, "
                  "realized share, wall time)."),
        Heading("Verdicts", 2),
        Bullets(verdicts),
        *_links(sweep),
    ]
    return blocks, plot, record


def _cpt_cells(numbers: dict[str, Any]) -> list[str]:
    cells = []
    for lang, delta in (("en", "change"), ("ja", "gain")):
        bpb = numbers.get(f"{lang}_bits_per_byte")
        cells += ([f"{bpb['base']:.4f} -> {bpb['final']:.4f}", f"{bpb[delta]:+.4f}"] if bpb else [DASH, DASH])
    tokens = numbers["tokens_by_language"]
    return [*cells, f"{tokens['ja']:,}", f"{tokens['en']:,}", f"{numbers['realized_en_share']:.2%}",
            kit.fmt_seconds(numbers["wall_seconds"])]


def sweep_plot(sweep: Sweep, curves: list[list[dict[str, Any]]]) -> Plot:
    """Japanese and English held-out bits per byte against training tokens, a line per value."""
    from stages.cpt.report import draw_language

    names = [sweep.label(m) for m in sweep.members]
    labels, families = kit.plot_labels(names)
    with kit.plot_style(families):
        fig, axes = kit.figure(10, 4.2, ncols=2)
        for ax, lang in zip(axes, ("ja", "en")):
            runs = [(labels[name], evals, COLORS[i % len(COLORS)])
                    for i, (name, evals) in enumerate(zip(names, curves)) if evals and lang in evals[0]]
            if runs:
                draw_language(ax, lang, runs)
        image = kit.png(fig)
    return Plot(image, "forgetting curves per value",
                f"Held-out bits per byte against training tokens, one line per value of {sweep.key}; dashed: the "
                "base model (the evaluation at step 0).")


# ---------------------------------------------------------------------------------------------- without cpt


def stages_page(sweep: Sweep) -> tuple[list[Block], None, dict[str, Any]]:
    """The runs and each stage's summary line, from the manifests: a sweep that did not run cpt."""
    from pipeline.run_report import FINGERPRINT_CHARS, committed_stages, short_summary

    record = _base_record(sweep)
    rows = []
    for member in sweep.members:
        manifests = committed_stages(member.root)
        stages = {stage: manifests[stage] for stage in member.plan if stage in manifests}
        record["runs"].append({**_run_record(member), "manifests": {
            stage: {key: m[key] for key in ("fingerprint", "finished", "duration_s", "summary")}
            for stage, m in stages.items()}})
        rows += [[member.text, stage, m["finished"], m["fingerprint"][:FINGERPRINT_CHARS], short_summary(m["summary"])]
                 for stage, m in stages.items()]
    table = Table([sweep.key, "stage", "finished", "fingerprint", "summary"], rows, [False] * 5)
    blocks = [*_intro(sweep), Heading("Stages", 2),
              Paragraph("From each run's stages/*/manifest.json. A stage with the same fingerprint in several runs "
                        "ran once and was reused by the others."),
              table, *_links(sweep)]
    return blocks, None, record
