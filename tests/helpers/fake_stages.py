"""Small stages with the real StageSpec shape, for testing the runner without corpora or models.

prepare -> cpt -> sft, each writing a file derived from its params and its prerequisite's output, so that
what reruns and what it reads can be checked. `CALLS` records the order stages ran in.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.errors import JpadaptError
from pipeline.paths import resolve_files
from pipeline.stage import StageContext, StageSpec

CALLS: list[str] = []
BEHAVIOUR: dict[str, str] = {}  # stage -> "crash" | "fail" | "kill" | "no-output"


def _misbehave(name: str, ctx: StageContext) -> None:
    (ctx.out_dir / "partial-work.txt").write_text("half done")
    action = BEHAVIOUR.get(name)
    if action == "crash":
        raise ValueError("boom")
    if action == "fail":
        raise JpadaptError("corpus.jsonl:3: invalid JSON")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def run_prepare(cfg: PipelineConfig, ctx: StageContext) -> dict:
    CALLS.append("prepare")
    _misbehave("prepare", ctx)
    if BEHAVIOUR.get("prepare") != "no-output":
        (ctx.out_dir / "corpus.txt").write_text(f"min_chars={cfg.prepare.min_chars}\n")
    return {"documents": 3}


def run_cpt(cfg: PipelineConfig, ctx: StageContext) -> dict:
    CALLS.append("cpt")
    _misbehave("cpt", ctx)
    corpus = (ctx.artifact("prepare") / "corpus.txt").read_text()
    (ctx.out_dir / "model.txt").write_text(f"{corpus}lr={cfg.cpt.lr}\n")
    return {}


def run_sft(cfg: PipelineConfig, ctx: StageContext) -> dict:
    CALLS.append("sft")
    _misbehave("sft", ctx)
    model = (ctx.artifact("cpt") / "model.txt").read_text()
    (ctx.out_dir / "adapter.txt").write_text(f"{model}sft_lr={cfg.sft.lr}\n")
    return {}


def corpus_inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    return {"data.ja.train": resolve_files(cfg.data.ja.train, "data.ja.train")}


SPECS = [
    StageSpec("prepare", run_prepare, "fake prepare", params=("data", "prepare"), inputs=corpus_inputs,
              outputs=("corpus.txt",)),
    StageSpec("cpt", run_cpt, "fake cpt", requires=("prepare",), params=("cpt", "model"), outputs=("model.txt",)),
    StageSpec("sft", run_sft, "fake sft", requires=("cpt",), params=("sft",), outputs=("adapter.txt",)),
]
