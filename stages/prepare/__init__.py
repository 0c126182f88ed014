"""Stage `prepare`: normalize, filter, deduplicate and split the Japanese corpus and the English replay corpus.

Outputs, in `runs/<name>/stages/prepare/`:
    ja/train-FFFFF-KKKKK.jsonl     cleaned Japanese documents (`text` plus the input record's other fields), named
                                   by input file FFFFF (held-out files first) and shard KKKKK
    ja/heldout-FFFFF-KKKKK.jsonl   held-out documents: the given held-out files, or a seeded document-level split
    en/...                         the same for the English corpus, when `data.en` is set
    stats.json                     documents, characters and bytes per split; removals by rule
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import EXECUTOR_KEYS, PipelineConfig, PrepareConfig
from pipeline.paths import display_path, resolve_files
from pipeline.stage import StageContext, StageSpec, lazy


def _corpora(cfg: PipelineConfig) -> list[tuple[str, Any]]:
    return [(lang, corpus) for lang, corpus in (("ja", cfg.data.ja), ("en", cfg.data.en)) if corpus is not None]


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    files = {}
    for lang, corpus in _corpora(cfg):
        files[f"data.{lang}.train"] = resolve_files(corpus.train, f"data.{lang}.train")
        if corpus.heldout:
            files[f"data.{lang}.heldout"] = resolve_files(corpus.heldout, f"data.{lang}.heldout")
    return files


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    from data.prepare import prepare_language

    files = _inputs(cfg)
    stats: dict[str, Any] = {"normalization": cfg.prepare.normalization, "languages": {}}
    summary = {}
    for lang, corpus in _corpora(cfg):
        ctx.log.info("%s: %d train file(s), %d held-out file(s)", lang, len(files[f"data.{lang}.train"]),
                     len(files.get(f"data.{lang}.heldout", [])))
        result = prepare_language(
            lang,
            corpus,
            train_files=files[f"data.{lang}.train"],
            heldout_files=files.get(f"data.{lang}.heldout", []),
            opts=cfg.prepare,
            seed=ctx.seed,
            out_dir=ctx.out_dir,
            display_name=display_path,
            log=ctx.log,
        )
        stats["languages"][lang] = result
        splits = result["splits"]
        summary[lang] = (
            f"{splits['train']['documents']} train / {splits['heldout']['documents']} held-out docs, "
            f"{sum(result['removed'].values())} removed"
        )
        ctx.log.info("%s: %s", lang, summary[lang])
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


SPEC = StageSpec(
    name="prepare",
    run=run,
    description="clean, filter, deduplicate and split the Japanese and English corpora",
    params=("data", *(f"prepare.{key}" for key in PrepareConfig.model_fields if key not in EXECUTOR_KEYS), "run.seed"),
    # Where the tasks run and how many there are never changes an output byte (tests/test_prepare_scale.py).
    unhashed=tuple(f"prepare.{key}" for key in EXECUTOR_KEYS),
    resumable=True,
    inputs=_inputs,
    outputs=("stats.json",),
    report_section=lazy("stages.prepare.report:report_section"),
)
