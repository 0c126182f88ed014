"""What a stage declares (StageSpec) and what it is handed when it runs (StageContext).

A stage is one module (or package) in `stages/` with a module-level `SPEC` and one public `run(cfg, ctx)`.
Stage modules import heavy libraries (torch, transformers) inside `run`, so the CLI can read every spec without
them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import JpadaptError

# Bookkeeping files in a stage directory that are not outputs (they hold times, pids, logs).
MANIFEST = "manifest.json"
ATTEMPT = "attempt.json"
LOG = "log.txt"
BOOKKEEPING = frozenset({MANIFEST, ATTEMPT, LOG})


@dataclass(frozen=True)
class StageSpec:
    """Everything the runner needs to order, fingerprint and check a stage.

    name: the CLI name (`tokenizer-report`); its YAML section is the same with `_` (`tokenizer_report`).
    run: `run(cfg, ctx) -> dict | None`; the returned dict is a short summary saved in the manifest.
    requires: stages whose outputs it reads; they must be enabled.
    uses: stages whose outputs it reads when they are enabled (e.g. cpt uses extend-vocab).
    params: dotted config keys whose values shape the outputs; nothing else in the YAML reruns the stage.
    inputs: config -> {config key: files} for files outside the run directory (corpora, models).
    outputs: paths, relative to the stage directory, that a successful run must leave.
    code: modules or packages whose source is part of the fingerprint.
    libraries: distributions whose versions are part of the fingerprint.
    resumable: keep the work directory of an interrupted attempt with the same fingerprint (checkpoints).
    """

    name: str
    run: Callable[[PipelineConfig, StageContext], dict[str, Any] | None]
    description: str
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    inputs: Callable[[PipelineConfig], dict[str, list[Path]]] | None = None
    outputs: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    resumable: bool = False

    @property
    def section(self) -> str:
        return self.name.replace("-", "_")


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

    def artifact(self, stage: str) -> Path:
        """The committed output directory of a prerequisite (declared in `requires` or `uses`)."""
        try:
            return self.prerequisites[stage]
        except KeyError:
            raise JpadaptError(f"stage {self.name} reads {stage!r}, which it does not declare or which is disabled") from None
