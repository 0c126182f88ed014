"""Stage `tokenizer-report`: how many tokens each candidate tokenizer spends on the prepared held-out text.

Reads the Japanese and English held-out shards written by `prepare` (and, when `extend-vocab` is enabled,
adds its extended tokenizer as "extended"). Outputs, in `runs/<name>/stages/tokenizer-report/`:
    metrics.json    every figure, layout {"corpora", "tokenizers": {NAME: {CORPUS: {metric: value}}}, ...}
    metrics.csv     one row per tokenizer x corpus (x genre/source group)
    report.md       tables, definitions and notes
    report.html     the same with plots, self-contained
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import JpadaptError
from pipeline.stage import StageContext, StageSpec, lazy

EXTENDED = "extended"
NFKC_NOTE = (
    "This run reads the prepare stage's output, normalized with {form}: where that differs from raw text "
    "(e.g. NFKC turns fullwidth letters and digits into ASCII), figures differ slightly from the reference."
)


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    from pipeline.models import tokenizer_files
    from pipeline.paths import resolve_files

    files = {
        f"tokenizer_report.tokenizers.{name}": tokenizer_files(spec, f"tokenizer_report.tokenizers.{name}")
        for name, spec in cfg.tokenizer_report.tokenizers.items()
    }
    # Read for its name only (the text comes from prepare), hashed all the same: a declared path is a file read.
    files["data.ja.heldout"] = resolve_files(cfg.data.ja.heldout, "data.ja.heldout")
    return files


def _heldout_corpora(prepared: Path) -> list[Any]:
    from data.prepare import prepared_shards
    from tokenizer.compare import Corpus

    corpora = []
    for lang in ("ja", "en"):
        shards = prepared_shards(prepared, lang, "heldout")
        if shards:
            corpora.append(Corpus(f"{lang}_heldout", shards))
    if not corpora:
        raise JpadaptError(f"{prepared}: the prepare stage wrote no held-out shards")
    return corpora


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    from tokenizer.compare import compare, reference_notes, write_outputs
    from tokenizer.load import load_tokenizer

    settings = cfg.tokenizer_report
    tokenizers = {name: load_tokenizer(spec, name=name) for name, spec in settings.tokenizers.items()}
    if "extend-vocab" in ctx.prerequisites:
        folder = ctx.artifact("extend-vocab") / "tokenizer"
        tokenizers[EXTENDED] = load_tokenizer(str(folder), name=EXTENDED, source=ctx.run_relative(folder))
    ctx.log.info("comparing %s on the prepared held-out text", ", ".join(tokenizers))
    metrics = compare(
        _heldout_corpora(ctx.artifact("prepare")),
        tokenizers,
        baseline=settings.baseline,
        compute_params=settings.compute_params,
        context_length=settings.context_length,
        max_documents=settings.max_documents,
    )
    if cfg.data.ja.heldout == ["bundled:corpus/ja_heldout.jsonl"] and settings.max_documents is None:
        note = NFKC_NOTE.format(form=cfg.prepare.normalization)
        metrics["notes"] += reference_notes(metrics, "ja_heldout", note)
    write_outputs(metrics, ctx.out_dir)
    ja = {name: per.get("ja_heldout", {}).get("chars_per_token") for name, per in metrics["tokenizers"].items()}
    best = max((name for name in ja if ja[name] is not None), key=lambda name: ja[name], default=None)
    summary = {"ja chars/token": ", ".join(f"{n} {v:.2f}" for n, v in ja.items() if v is not None)}
    if best is not None:
        summary["fewest Japanese tokens"] = best
    return summary


SPEC = StageSpec(
    name="tokenizer-report",
    run=run,
    description="compare tokenizers (chars/token, fertility, byte fallback, kanji coverage, cost) on the held-out text",
    requires=("prepare",),
    uses=("extend-vocab",),
    # data.ja.heldout, prepare.normalization: the bundled held-out text gets the published reference figures
    # beside its own, with a note on the normalization.
    params=("tokenizer_report", "data.ja.heldout", "prepare.normalization"),
    inputs=_inputs,
    outputs=("metrics.json", "metrics.csv", "report.md", "report.html"),
    report_section=lazy("stages.tokenizer_report.report:report_section"),
)
