"""What a stage declares (StageSpec) and what it is handed when it runs (StageContext).

A stage is one module (or package) in `stages/` with a module-level `SPEC` and one public `run(cfg, ctx)`.
Stage modules import heavy libraries (torch, transformers) inside `run`, so the CLI can read every spec without
them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineConfig
from pipeline.errors import JpadaptError

if TYPE_CHECKING:
    from pipeline.launch import Node
    from pipeline.reportkit import Section, SectionContext

# Bookkeeping files in a stage directory that are not outputs (they hold times, pids, logs, and the attempt's
# own paths): they are left out of the manifest's outputs, so nothing downstream hashes them.
MANIFEST = "manifest.json"
ATTEMPT = "attempt.json"
LOG = "log.txt"
JOB = "job.json"  # what a training stage told its workers: the launching pid, paths inside `<stage>.partial/`
BOOKKEEPING = frozenset({MANIFEST, ATTEMPT, LOG, JOB})
# The folder a stage writes into while it runs; the runner renames it to `<stage>` when the stage succeeds.
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class StageSpec:
    """Everything the runner needs to order, fingerprint and check a stage.

    name: the CLI name (`tokenizer-report`); its YAML section is the same with `_` (`tokenizer_report`).
    run: `run(cfg, ctx) -> dict | None`; the returned dict is a short summary saved in the manifest.
    requires: stages whose outputs it reads; they must be enabled.
    uses: stages whose outputs it reads when they are enabled (e.g. cpt uses extend-vocab).
    params: dotted config keys whose values shape the outputs; nothing else in the YAML reruns the stage.
    unhashed: dotted config keys the stage reads that do not shape its outputs (a port, checkpoint retention,
        the preflight plan check). `run()` sees only params and unhashed keys: reading any other key raises,
        so a key that should rerun the stage cannot be forgotten.
    inputs: config -> {config key: files} for files outside the run directory (corpora, models).
    outputs: paths, relative to the stage directory, that a successful run must leave.
    libraries: distributions the stage uses without importing them (e.g. safetensors through transformers);
        the code and the versions of the libraries it imports are found by following its imports.
    worker: the module a stage launches as separate processes (`python -m MODULE job.json`); its imports are part
        of the code fingerprint like those of `run`'s module. The stage launches exactly this name.
    resumable: keep the work directory of an interrupted attempt with the same fingerprint (checkpoints).
    report_section: the stage's section of the run report (pipeline/run_report.py), from its committed outputs;
        None (or a hook that returns None) gives the stage an overview row only. `lazy("module:function")` keeps
        the report code unimported until the report is written.
    overview_line: one line the run report's Overview shows for the committed stage, from its outputs (cpt: what
        the run did to English and Japanese); None, or a hook that returns None, shows nothing.
    """

    name: str
    run: Callable[[PipelineConfig, StageContext], dict[str, Any] | None]
    description: str
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    unhashed: tuple[str, ...] = ()
    inputs: Callable[[PipelineConfig], dict[str, list[Path]]] | None = None
    outputs: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    worker: str | None = None
    resumable: bool = False
    report_section: Callable[[SectionContext], Section | None] | None = None
    overview_line: Callable[[SectionContext], str | None] | None = None

    @property
    def section(self) -> str:
        return self.name.replace("-", "_")


def lazy(target: str) -> Callable[..., Any]:
    """"module:function" as a function that imports the module on its first call, so that listing the stages
    (every CLI command does) never imports report code and its matplotlib."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = target
    return call


@dataclass
class StageContext:
    """Handed to `run()`: where to write, where prerequisites' outputs are, the seed, a logger."""

    name: str
    out_dir: Path
    run_dir: Path
    seed: int
    log: logging.Logger
    resuming: bool = False
    forced: bool = False  # `--force`: rerun even if up to date, and launch even if the plan says it will not fit
    prerequisites: dict[str, Path] = field(default_factory=dict)
    node: Node | None = None  # node 0 of a per-node launch (`jpadapt cpt --node-rank 0`): launch this node's ranks

    def run_relative(self, path: Path) -> str:
        """How an output names a folder of this run (`stages/cpt/model`): relative to the run directory, with the
        stage's own work folder `<stage>.partial/` named as the folder it is committed to. The name stays true
        after the commit and is the same in every run directory, so that runs in runs/a and runs/b write the
        same bytes (and every fingerprint downstream, which hashes those bytes, agrees). `resolve` reads it back."""
        try:
            parts = list(Path(path).resolve().relative_to(self.run_dir.resolve()).parts)
        except ValueError:
            raise ValueError(f"{path} is not inside the run directory {self.run_dir}") from None
        if len(parts) >= 2 and parts[0] == "stages" and parts[1].endswith(PARTIAL_SUFFIX):
            parts[1] = parts[1].removesuffix(PARTIAL_SUFFIX)
        return "/".join(parts)

    def resolve(self, name: str | Path) -> Path:
        """A folder named in an output: a `run_relative` name is found in this run directory; an absolute path
        (a folder outside the run, e.g. model.path) is itself."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.run_dir / path

    def artifact(self, stage: str) -> Path:
        """The committed output directory of a prerequisite (declared in `requires` or `uses`)."""
        try:
            return self.prerequisites[stage]
        except KeyError:
            raise JpadaptError(f"stage {self.name} reads {stage!r}, which it does not declare or which is disabled") from None
