"""Stage `cpt`: continued pretraining on Japanese mixed with English replay, on DeepSpeed ZeRO.

The stage process (`run`) checks everything it can before any GPU is touched, tokenizes the prepared train
shards once, in parallel tasks on the prepare stage's executor (cached by content under
`runs/<name>/.cache/cpt-tokens/`, `data/token_cache.py`), writes `job.json` and starts the
training job as a subprocess: one process, DeepSpeed's launcher for several GPUs or nodes, or torchrun for
this node's GPUs when the cluster starts one `jpadapt` per node (`--node-rank`)
(`pipeline/launch.py`). Every rank runs the worker (`python -m stages.cpt.worker job.json`, `worker.py`),
told what to do by the typed job in `job.py`.

Outputs, in `runs/<name>/stages/cpt/`:
    model/              consolidated HF folder (safetensors, also from ZeRO-3), tokenizer, jpadapt_config.yaml
    metrics.jsonl       per step: loss, lr, grad norm, tokens, tokens/s, realized English share
    forgetting.jsonl    per evaluation (step 0, every eval_every, the end): JA/EN loss and bits per byte
    summary.json        tokens seen, realized mix, wall time, tokens/s, peak memory, final evaluation
    report.md, forgetting.png   the forgetting curves (`stages/cpt/report.py`)
    tensorboard/        the same scalars for TensorBoard
    checkpoints/        the newest `keep_checkpoints` DeepSpeed checkpoints, each with data position and RNG
    job.json            what the workers were told (bookkeeping, like log.txt: not an output, never hashed)

Resuming: the stage is resumable. When a run dies (crash, SIGKILL, Ctrl-C), rerunning `jpadapt cpt` with
the same configuration reuses the partial directory; the worker loads the newest *complete* checkpoint
(marked by `complete.json`, written after every rank saved), drops metrics and TensorBoard events logged after
it and continues. A checkpoint is data, never code: its files must match the sha256 hashes in its `complete.json`
and are read with torch.load(weights_only=True) (`pipeline.training.load_checkpoint`).
The data position is the optimizer step: block indices are a pure function of the step
(`data.mixture.shard_indices`), so the resumed run reads exactly the blocks the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig, PipelineConfig
from pipeline.errors import JpadaptError
from pipeline.launch import check_launch
from pipeline.stage import JOB, StageContext, StageSpec, lazy
from pipeline.training import check_plan, job_context, pick_accelerator, run_workers, write_json
from stages.cpt.job import LANGS, CptJob, TokenFiles


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    settings = cfg.cpt
    extended = ctx.prerequisites.get("extend-vocab")
    _check_model_folder(cfg, extended)
    accelerator = pick_accelerator("cpt", settings.accelerator, settings.num_gpus, settings.precision)
    _check_seq_len(cfg)
    check_plan(cfg, "cpt", ctx)
    check_launch(settings, "cpt", ctx.node)
    prepared = ctx.artifact("prepare")
    tokenizer, tokenizer_dir = _tokenizer(cfg, extended, ctx.out_dir)
    _check_vocab(_trained_model(cfg, extended), tokenizer)
    tokens = _token_files(cfg, prepared, tokenizer, tokenizer_dir, ctx)
    steps = _total_steps(cfg)
    _warn_repeats(cfg, tokens, steps, ctx)
    job = _job(cfg, ctx, prepared, extended, tokenizer_dir, tokens, steps, accelerator)
    run_workers(WORKER, job, ctx.out_dir / JOB, settings, accelerator, ctx.log, ctx.node)

    from stages.cpt.report import write_report

    summary = json.loads((ctx.out_dir / "summary.json").read_text(encoding="utf-8"))
    if extended is not None:
        summary["vocab_saving"] = _vocab_saving(cfg, summary, extended)
        write_json(ctx.out_dir / "summary.json", summary)
    write_report(ctx.out_dir)
    final = summary["final_eval"]
    return {
        "steps": summary["steps"],
        "tokens": summary["tokens_seen"],
        "en_share": round(summary["realized_en_share"], 4),
        **{f"{lang}_bpb": round(final[lang]["bits_per_byte"], 4) for lang in LANGS if lang in final},
    }


def _total_steps(cfg: PipelineConfig) -> int:
    settings = cfg.cpt
    if settings.max_steps is not None:
        return settings.max_steps
    per_step = settings.micro_batch_size * settings.grad_accum * settings.num_gpus * settings.num_nodes * settings.seq_len
    return max(1, math.ceil(settings.train_tokens / per_step))


# ---------------------------------------------------------------------------------------------- preflight


def _check_model_folder(cfg: PipelineConfig, extended: Path | None) -> None:
    """The folder the workers will load, checked as they would check it (config.json, safetensors weights), so
    that a bad one stops the stage here and not in a launched worker."""
    from pipeline.models import check_model_folder

    model = _trained_model(cfg, extended)
    if model.path is not None:
        check_model_folder(model.path, "model.path" if model.path == cfg.model.path else "the extend-vocab output")


def _check_seq_len(cfg: PipelineConfig) -> None:
    from pipeline.models import model_config_values

    values = model_config_values(cfg.model)
    limit = values.get("max_position_embeddings")
    if isinstance(limit, int) and cfg.cpt.seq_len > limit:
        raise JpadaptError(
            f"cpt.seq_len is {cfg.cpt.seq_len} but the model allows at most {limit} positions "
            "(max_position_embeddings)"
        )


def _tokenizer(cfg: PipelineConfig, extended: Path | None, out_dir: Path) -> tuple[Any, Path]:
    """The tokenizer of the model being trained, saved once into the stage directory (the workers and the
    output model folder take it from there)."""
    from tokenizer.hf import load_hf_tokenizer

    if extended is not None:
        tokenizer = load_hf_tokenizer(extended / "tokenizer", key="extend-vocab output")
    else:
        spec = cfg.model.tokenizer or cfg.model.path
        if spec is None:
            raise JpadaptError("cpt needs the model's tokenizer: set model.tokenizer (or model.path)")
        tokenizer = load_hf_tokenizer(spec, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise JpadaptError("cpt: the tokenizer has no EOS token, which separates packed documents")
    folder = out_dir / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    return tokenizer, folder


def _trained_model(cfg: PipelineConfig, extended: Path | None) -> ModelConfig:
    """The `model` section the workers load: the extend-vocab output replaces the configured model."""
    if extended is not None and (extended / "model").is_dir():
        return cfg.model.model_copy(update={"path": str(extended / "model"), "from_config": None})
    return cfg.model


def _check_vocab(model_cfg: ModelConfig, tokenizer: Any) -> None:
    from pipeline.models import model_vocab_size

    rows = model_vocab_size(model_cfg)
    if len(tokenizer) > rows:
        raise JpadaptError(
            f"model: {rows:,} embedding rows but the tokenizer has {len(tokenizer):,} ids; "
            "set model.tokenizer to the model's own tokenizer (or enable extend-vocab to grow the model)"
        )


def _token_files(cfg: PipelineConfig, prepared: Path, tokenizer: Any, tokenizer_dir: Path,
                 ctx: StageContext) -> dict[str, TokenFiles]:
    """Tokenize the train shards once per (tokenizer, shards) content; later runs and reruns reuse them.

    The shards are tokenized in parallel, one token file each, by datatrove tasks on the prepare stage's executor
    (`data/token_cache.py`); the workers read a language's files as one corpus, in shard order.
    """
    from data.executor import ExecutorSettings
    from data.mixture import load_token_cache
    from data.prepare import prepared_shards
    from data.token_cache import build_token_cache
    from pipeline.hashing import digest, sha256_file

    # The shards' hashes are in prepare's manifest already: no second pass over gigabytes of text.
    hashes = {rel: entry["sha256"] for rel, entry in json.loads((prepared / "manifest.json").read_text())["outputs"].items()}
    tokenizer_key = {p.name: sha256_file(p) for p in sorted(tokenizer_dir.iterdir()) if p.is_file()}
    settings = ExecutorSettings.from_config(cfg.prepare)
    langs = ["ja"] + (["en"] if cfg.cpt.replay_ratio > 0 else [])
    entries = {}
    for lang in langs:
        shards = prepared_shards(prepared, lang, "train")
        if not shards:
            what = "Japanese" if lang == "ja" else "English replay (cpt.replay_ratio > 0)"
            raise JpadaptError(f"cpt: the prepare stage wrote no {what} train shards in {prepared / lang}")
        key = digest({
            "tokenizer": tokenizer_key,
            "shards": [hashes.get(f"{lang}/{p.name}") or sha256_file(p) for p in shards],
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        })[:16]
        entry = ctx.run_dir / ".cache" / "cpt-tokens" / key
        cached = load_token_cache(entry / lang)
        if cached is None:
            cached = build_token_cache(
                shards, entry / lang, tokenizer_dir, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                settings=settings, work_dir=entry / "work" / lang, tasks=cfg.prepare.tasks,
                trust_remote_code=cfg.model.trust_remote_code, step=f"tokenize {lang}", log=ctx.log,
            )
        else:
            ctx.log.info("%s: tokenized train set from the cache (%s)", lang, entry)
        ctx.log.info("%s: %s documents, %s tokens", lang, f"{cached.n_docs:,}", f"{cached.n_tokens:,}")
        entries[lang] = TokenFiles(folder=entry / lang, n_tokens=cached.n_tokens, n_docs=cached.n_docs)
    return entries


def _warn_repeats(cfg: PipelineConfig, tokens: dict[str, TokenFiles], steps: int, ctx: StageContext) -> None:
    settings = cfg.cpt
    blocks = steps * settings.micro_batch_size * settings.grad_accum * settings.num_gpus * settings.num_nodes
    share = {"ja": 1 - settings.replay_ratio, "en": settings.replay_ratio}
    for lang, entry in tokens.items():
        epochs = blocks * share[lang] * settings.seq_len / entry.n_tokens
        if epochs > 1:
            ctx.log.warning("%s: the run reads the train set %.1f times (repeated data)", lang, epochs)


def _job(cfg: PipelineConfig, ctx: StageContext, prepared: Path, extended: Path | None, tokenizer_dir: Path,
         tokens: dict[str, TokenFiles], steps: int, accelerator: str) -> CptJob:
    from data.prepare import prepared_shards

    heldout = {lang: prepared_shards(prepared, lang, "heldout") for lang in LANGS}
    return CptJob(
        context=job_context(ctx, accelerator, steps),
        model=_trained_model(cfg, extended),
        extended_from=extended,
        extended_from_name=None if extended is None else ctx.run_relative(extended),
        tokenizer_dir=tokenizer_dir,
        tokens=tokens,
        heldout={lang: files for lang, files in heldout.items() if files},
        cpt=cfg.cpt,
    )


def _vocab_saving(cfg: PipelineConfig, summary: dict[str, Any], extended: Path) -> dict[str, Any]:
    from pipeline.planner.plan import model_shape
    from stages.cpt.report import vocab_saving

    efficiency = json.loads((extended / "summary.json").read_text(encoding="utf-8"))["efficiency"]
    try:
        params = model_shape(cfg).total_params
    except JpadaptError:
        params = None  # an architecture the planner does not know: tokens only
    return vocab_saving(summary["tokens_by_language"], efficiency, params)


# The module every rank runs; also a root of cpt's code fingerprint (it is launched, not imported).
WORKER = "stages.cpt.worker"


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    from pipeline.models import model_inputs

    return model_inputs(cfg.model)


SPEC = StageSpec(
    name="cpt",
    run=run,
    description="continued pretraining on Japanese + English replay on DeepSpeed ZeRO, with a forgetting curve",
    requires=("prepare",),
    uses=("extend-vocab",),
    params=("run.seed", "model", "cpt.replay_ratio", "cpt.seq_len", "cpt.micro_batch_size", "cpt.grad_accum",
            "cpt.max_steps", "cpt.train_tokens", "cpt.lr", "cpt.min_lr_ratio", "cpt.warmup_steps",
            "cpt.weight_decay", "cpt.adam_betas", "cpt.grad_clip", "cpt.precision", "cpt.gradient_checkpointing",
            "cpt.zero_stage", "cpt.offload_optimizer", "cpt.offload_params", "cpt.num_gpus", "cpt.num_nodes",
            "cpt.accelerator", "cpt.eval_every", "cpt.eval_chars", "cpt.save_every"),
    # Launch details, checkpoint retention and the preflight plan check (the vocabulary it assumes is the
    # extend-vocab output, fingerprinted as upstream) do not change what cpt produces.
    # The prepare section's executor keys decide where the shards are tokenized, never the tokens.
    unhashed=("cpt.master_port", "cpt.hostfile", "cpt.keep_checkpoints", "plan",
              "extend_vocab.new_tokens", "extend_vocab.pad_to_multiple_of",
              "prepare.executor", "prepare.workers", "prepare.tasks", "prepare.slurm", "prepare.ray"),
    inputs=_inputs,
    outputs=("model/config.json", "metrics.jsonl", "forgetting.jsonl", "summary.json",
             "report.md", "forgetting.png"),
    libraries=("safetensors",),
    worker=WORKER,
    report_section=lazy("stages.cpt.report:report_section"),
    overview_line=lazy("stages.cpt.report:overview_line"),
    resumable=True,
)
