"""Stage `cpt`: continued pretraining on Japanese mixed with English replay, on DeepSpeed ZeRO.

The stage process (`run`) checks everything it can before any GPU is touched, tokenizes the prepared train
shards once (cached by content under `runs/<name>/.cache/cpt-tokens/`), writes `job.json` and starts the
training job as a subprocess: one process, or DeepSpeed's launcher for several GPUs or nodes
(`pipeline/launch.py`). Every rank runs this module's worker (`python -m stages.cpt job.json`).

Outputs, in `runs/<name>/stages/cpt/`:
    model/              consolidated HF folder (safetensors, also from ZeRO-3), tokenizer, jpadapt_config.yaml
    metrics.jsonl       per step: loss, lr, grad norm, tokens, tokens/s, realized English share
    forgetting.jsonl    per evaluation (step 0, every eval_every, the end): JA/EN loss and bits per byte
    summary.json        tokens seen, realized mix, wall time, tokens/s, peak memory, final evaluation
    report.md, forgetting.png   the forgetting curves (`eval/forgetting.py`)
    tensorboard/        the same scalars for TensorBoard
    checkpoints/        the newest `keep_checkpoints` DeepSpeed checkpoints, each with data position and RNG
    job.json            what the workers were told

Resuming: the stage is resumable. When a run dies (crash, SIGKILL, Ctrl-C), rerunning `jpadapt cpt` with
the same configuration reuses the partial directory; the worker loads the newest *complete* checkpoint
(marked by `complete.json`, written after every rank saved), drops metrics logged after it and continues.
The data position is the optimizer step: block indices are a pure function of the step
(`data.mixture.shard_indices`), so the resumed run reads exactly the blocks the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.workers import (
    ERROR_FILE,
    append_jsonl,
    check_job,
    check_plan,
    grad_norm,
    lambda_scheduler,
    peak_memory,
    pick_accelerator,
    progress,
    start_worker,
    tensorboard,
    worker_main,
    write_json,
)
from pipeline.config import ModelConfig, PipelineConfig
from pipeline.errors import JpadaptError
from pipeline.launch import check_launch, deepspeed_config, launch_command, lr_schedule, run_job
from pipeline.stage import StageContext, StageSpec

LANGS = ("ja", "en")
CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
# Tolerance of the consolidated model's logits against the engine's, by training precision.
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ============================================================================================ stage process


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    settings = cfg.cpt
    accelerator = pick_accelerator("cpt", settings.accelerator, settings.num_gpus, settings.precision)
    _check_seq_len(cfg)
    check_plan(cfg, "cpt", ctx)
    check_launch(settings, "cpt")
    prepared = ctx.artifact("prepare")
    extended = ctx.prerequisites.get("extend-vocab")
    tokenizer, tokenizer_dir = _tokenizer(cfg, extended, ctx.out_dir)
    _check_vocab(_trained_model(cfg, extended), tokenizer)
    tokens = _token_files(cfg, prepared, tokenizer, tokenizer_dir, ctx)
    steps = _total_steps(cfg)
    _warn_repeats(cfg, tokens, steps, ctx)
    job = _job(cfg, ctx, prepared, extended, tokenizer_dir, tokens, steps, accelerator)
    job_file = ctx.out_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=1, ensure_ascii=False), encoding="utf-8")
    _launch(cfg, ctx, job_file, accelerator)

    from eval.forgetting import write_report

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


def _check_seq_len(cfg: PipelineConfig) -> None:
    from eval.models import model_config_values

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
    from eval.models import model_vocab_size

    rows = model_vocab_size(model_cfg)
    if len(tokenizer) > rows:
        raise JpadaptError(
            f"model: {rows:,} embedding rows but the tokenizer has {len(tokenizer):,} ids; "
            "set model.tokenizer to the model's own tokenizer (or enable extend-vocab to grow the model)"
        )


def _token_files(cfg: PipelineConfig, prepared: Path, tokenizer: Any, tokenizer_dir: Path, ctx: StageContext) -> dict:
    """Tokenize the train shards once per (tokenizer, shards) content; later runs and reruns reuse them."""
    from data.mixture import load_token_file, tokenize_corpus
    from data.prepare import prepared_shards, prepared_texts
    from pipeline.hashing import digest, sha256_file

    # The shards' hashes are in prepare's manifest already: no second pass over gigabytes of text.
    hashes = {rel: entry["sha256"] for rel, entry in json.loads((prepared / "manifest.json").read_text())["outputs"].items()}
    tokenizer_key = {p.name: sha256_file(p) for p in sorted(tokenizer_dir.iterdir()) if p.is_file()}
    langs = ["ja"] + (["en"] if cfg.cpt.replay_ratio > 0 else [])
    prefixes = {}
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
        prefix = ctx.run_dir / ".cache" / "cpt-tokens" / key / lang
        cached = load_token_file(prefix)
        if cached is None:
            prefix.parent.mkdir(parents=True, exist_ok=True)
            count = sum(_line_count(shard) for shard in shards)  # one record per line
            cached = tokenize_corpus(prepared_texts(shards), tokenizer, prefix, bos_id=tokenizer.bos_token_id,
                                     eos_id=tokenizer.eos_token_id, total=count, desc=f"tokenize {lang}")
        else:
            ctx.log.info("%s: tokenized train set from the cache (%s)", lang, prefix.parent)
        ctx.log.info("%s: %s documents, %s tokens", lang, f"{cached.n_docs:,}", f"{cached.n_tokens:,}")
        prefixes[lang] = {"prefix": str(prefix), "n_tokens": cached.n_tokens, "n_docs": cached.n_docs}
    return prefixes


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _warn_repeats(cfg: PipelineConfig, tokens: dict, steps: int, ctx: StageContext) -> None:
    settings = cfg.cpt
    blocks = steps * settings.micro_batch_size * settings.grad_accum * settings.num_gpus * settings.num_nodes
    share = {"ja": 1 - settings.replay_ratio, "en": settings.replay_ratio}
    for lang, entry in tokens.items():
        epochs = blocks * share[lang] * settings.seq_len / entry["n_tokens"]
        if epochs > 1:
            ctx.log.warning("%s: the run reads the train set %.1f times (repeated data)", lang, epochs)


def _job(cfg: PipelineConfig, ctx: StageContext, prepared: Path, extended: Path | None, tokenizer_dir: Path,
         tokens: dict, steps: int, accelerator: str) -> dict[str, Any]:
    from data.prepare import prepared_shards

    heldout = {lang: [str(p) for p in prepared_shards(prepared, lang, "heldout")] for lang in LANGS}
    return {
        "out_dir": str(ctx.out_dir),
        "run_config": str(ctx.run_dir / "config.yaml"),
        "seed": ctx.seed,
        "parent_pid": os.getpid(),
        "accelerator": accelerator,
        "total_steps": steps,
        "model": _trained_model(cfg, extended).model_dump(mode="json"),
        "extended_from": str(extended) if extended is not None else None,
        "tokenizer_dir": str(tokenizer_dir),
        "tokens": tokens,
        "heldout": {lang: files for lang, files in heldout.items() if files},
        "cpt": cfg.cpt.model_dump(mode="json"),
    }


def _vocab_saving(cfg: PipelineConfig, summary: dict[str, Any], extended: Path) -> dict[str, Any]:
    from eval.forgetting import vocab_saving
    from pipeline.planner.plan import model_shape

    efficiency = json.loads((extended / "summary.json").read_text(encoding="utf-8"))["efficiency"]
    try:
        params = model_shape(cfg).total_params
    except JpadaptError:
        params = None  # an architecture the planner does not know: tokens only
    return vocab_saving(summary["tokens_by_language"], efficiency, params)


def _launch(cfg: PipelineConfig, ctx: StageContext, job_file: Path, accelerator: str) -> None:
    (ctx.out_dir / ERROR_FILE).unlink(missing_ok=True)
    job = launch_command("stages.cpt", [str(job_file)], cfg.cpt, accelerator)
    check_job(ctx.out_dir, run_job(job, ctx.log))


# ============================================================================================ worker (every rank)


@dataclass
class _Clock:
    """Seconds spent in training steps, and wall seconds, carried across resumes in the checkpoints."""

    train_seconds: float
    wall_before: float
    started: float = field(default_factory=time.monotonic)

    def wall_seconds(self) -> float:
        return self.wall_before + time.monotonic() - self.started



class _Worker:
    """One rank of the training job: engine, data, evaluation, checkpoints, metrics."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        self.settings = job["cpt"]
        self.out = Path(job["out_dir"])
        self.accelerator = job["accelerator"]
        self.total = int(job["total_steps"])
        where = start_worker(job)
        self.rank, self.world, self.device = where.rank, where.world, where.device
        s = self.settings
        self.group_blocks = s["micro_batch_size"] * s["grad_accum"] * self.world
        self.schedule = lr_schedule(s["lr"], s["warmup_steps"], self.total, s["min_lr_ratio"])
        self.metrics = self.out / "metrics.jsonl"
        self.forgetting = self.out / "forgetting.jsonl"
        self.board = None

    # ----------------------------------------------------------------------------------------- setup

    def setup(self) -> None:

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.job["tokenizer_dir"], local_files_only=True)
        self.mixture = self._mixture()
        self.heldout = self._heldout()
        self.engine, self.scheduler = self._engine()

    def _mixture(self):
        from data.mixture import LanguageStream, Mixture, load_token_file

        streams = {}
        for salt, lang in enumerate(LANGS):
            entry = self.job["tokens"].get(lang)
            if entry is not None:
                token_file = load_token_file(Path(entry["prefix"]))
                if token_file is None:
                    raise JpadaptError(f"{entry['prefix']}: tokenized {lang} data is missing or incomplete")
                streams[lang] = LanguageStream(token_file, self.job["seed"], salt)
        s = self.settings
        return Mixture(streams["ja"], streams.get("en"), s["replay_ratio"], s["seq_len"], self.job["seed"])

    def _heldout(self) -> dict[str, list[str]]:
        from data.prepare import capped_texts, prepared_texts

        files = self.job["heldout"]
        return {lang: capped_texts(prepared_texts([Path(f) for f in files[lang]]), self.settings["eval_chars"])
                for lang in files}

    def _engine(self):
        import deepspeed
        import torch

        s = self.settings
        # Offloaded optimizer states on a GPU run: DeepSpeed's CPU Adam steps them far faster than torch's. Otherwise
        # torch's AdamW (fused on GPU): no DeepSpeed op to compile, nothing that needs a CUDA toolkit.
        native = self.accelerator == "cuda" and s["offload_optimizer"]
        optimizer_cfg = {"type": "AdamW", "params": {"lr": s["lr"], "betas": list(s["adam_betas"]), "eps": 1e-8,
                                                     "weight_decay": s["weight_decay"]}} if native else None
        config = deepspeed_config(
            micro_batch_size=s["micro_batch_size"], grad_accum=s["grad_accum"], grad_clip=s["grad_clip"],
            precision=s["precision"], zero_stage=s["zero_stage"], offload_optimizer=s["offload_optimizer"],
            offload_params=s["offload_params"], optimizer=optimizer_cfg,
        )
        model = self._model(config)
        if s["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        groups = _param_groups(model, s["weight_decay"])
        optimizer = None if native else torch.optim.AdamW(groups, lr=s["lr"], betas=tuple(s["adam_betas"]), eps=1e-8,
                                                          fused=self.accelerator == "cuda")

        engine, _, _, lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if native else None,
            lr_scheduler=lambda_scheduler(self.schedule, s["lr"]), config=config,
        )
        return engine, lr_scheduler

    def _model(self, ds_config: dict[str, Any]):
        """The model in the training precision (DeepSpeed keeps fp32 master weights for bf16/fp16)."""
        from eval.models import load_causal_lm

        dtype = PRECISION_DTYPES[self.settings["precision"]]
        model_cfg = ModelConfig(**self.job["model"]).model_copy(update={"dtype": dtype})
        zero3_load = None
        if model_cfg.path is not None and self.settings["zero_stage"] == 3:
            # Under ZeRO-3 transformers loads the folder straight into partitions (deepspeed.zero.Init): no rank
            # holds the whole model. transformers keeps only a weak reference: the setting ends when this
            # function returns, so later models (the consolidated one on rank 0) are built normally.
            from transformers.integrations import HfDeepSpeedConfig

            zero3_load = HfDeepSpeedConfig(ds_config)
        # Same seed on every rank: a model built from config starts identical everywhere.
        model = load_causal_lm(model_cfg, seed=self.job["seed"])
        del zero3_load
        return model

    # ----------------------------------------------------------------------------------------- training

    def train(self) -> None:
        import torch

        start, state = self._resume()
        clock = _Clock(state.get("train_seconds", 0.0), state.get("wall_seconds", 0.0))
        if start == 0:
            self._evaluate(0)
        bar = progress(self.rank, start, self.total, "cpt")
        for step in range(start, self.total):
            began = time.monotonic()
            loss = self._train_step(step)
            clock.train_seconds += time.monotonic() - began
            record = self._step_record(step, loss, clock.train_seconds)
            if self.rank == 0:
                append_jsonl(self.metrics, record)
                self._board_scalars(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            done = step + 1
            if done % self.settings["eval_every"] == 0 or done == self.total:
                self._evaluate(done)
            if done % self.settings["save_every"] == 0 or done == self.total:
                self._save_checkpoint(done, clock)
        bar.close()
        self._finish(clock.train_seconds, clock.wall_seconds())
        if self.board is not None:
            self.board.close()
        torch.distributed.barrier()

    def _train_step(self, step: int) -> float:
        import torch

        from data.mixture import shard_indices

        s = self.settings
        losses = []
        self.grad_norm = None
        for micro in range(s["grad_accum"]):
            indices = shard_indices(step, micro, self.rank, world=self.world, micro_batch=s["micro_batch_size"],
                                    grad_accum=s["grad_accum"])
            batch = torch.from_numpy(self.mixture.blocks(indices)).to(self.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            if micro == s["grad_accum"] - 1 and s["zero_stage"] == 0:
                self.grad_norm = grad_norm(self.engine.module)  # ZeRO-0 does not report it; grads are reduced
            self.engine.step()
            losses.append(loss.detach().float())
        if self.grad_norm is None:
            self.grad_norm = self.engine.get_global_grad_norm()
        mean = torch.stack(losses).mean().to(self.device)
        torch.distributed.all_reduce(mean)
        return float(mean) / self.world

    def _step_record(self, step: int, loss: float, train_seconds: float) -> dict[str, Any]:
        done = step + 1
        blocks = done * self.group_blocks
        tokens = blocks * self.settings["seq_len"]
        grad_norm = self.grad_norm
        return {
            "step": done,
            "loss": loss,
            "lr": self.schedule(step),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens,
            "tokens_per_s": tokens / train_seconds if train_seconds > 0 else 0.0,
            "en_share": self.mixture.realized_ratio(blocks),
        }

    def _writer(self):
        if self.board is None:
            self.board = tensorboard(self.out)
        return self.board

    def _board_scalars(self, record: dict[str, Any]) -> None:
        board = self._writer()
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "en_share"):
            if record.get(key) is not None:
                board.add_scalar(f"train/{key}", record[key], record["step"])
        board.flush()

    # ----------------------------------------------------------------------------------------- evaluation

    def _evaluate(self, step: int) -> dict[str, Any]:
        """Loss and bits per byte on each held-out set. ZeRO-3 needs every rank in every forward pass (the
        parameters are gathered collectively), so there every rank scores all texts; otherwise ranks split them
        and the sums are all-reduced."""
        import torch

        from eval.perplexity import LossResult, bits_per_byte

        zero3 = self.settings["zero_stage"] == 3
        seq_len = self.settings["seq_len"]
        results = {}
        for lang, texts in self.heldout.items():
            mine = texts if zero3 else texts[self.rank :: self.world]
            result = bits_per_byte(self.engine.module, self.tokenizer, mine, window=seq_len,
                                   stride=max(1, seq_len // 2), batch_size=self.settings["micro_batch_size"])
            totals = torch.tensor([result.tokens, result.bytes, result.nats], dtype=torch.float64)
            if not zero3:
                torch.distributed.all_reduce(totals)
            tokens, n_bytes, nats = totals.tolist()
            results[lang] = LossResult(int(tokens), int(n_bytes), nats).to_dict()
        if self.rank == 0:
            append_jsonl(self.forgetting, {"step": step, "tokens": step * self.group_blocks * seq_len, **results})
            self._board_eval(step, results)
        return results

    def _board_eval(self, step: int, results: dict[str, Any]) -> None:
        board = self._writer()
        for lang, values in results.items():
            board.add_scalar(f"eval/{lang}_loss", values["loss"], step)
            board.add_scalar(f"eval/{lang}_bits_per_byte", values["bits_per_byte"], step)
        board.flush()

    # ----------------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, step: int, clock: _Clock) -> None:
        import torch

        root = self.out / CHECKPOINTS
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(str(root), tag=tag)
        torch.save(_rng_state(), root / tag / f"rng-rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.rank == 0:
            state = {"step": step, "next_block": step * self.group_blocks, "train_seconds": clock.train_seconds,
                     "wall_seconds": clock.wall_seconds(), "world_size": self.world}
            write_json(root / tag / COMPLETE, state)
            for old in _complete_checkpoints(root)[: -self.settings["keep_checkpoints"]]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def _resume(self) -> tuple[int, dict[str, Any]]:
        import torch

        checkpoints = _complete_checkpoints(self.out / CHECKPOINTS)
        if not checkpoints:
            if self.rank == 0:  # a run that died before its first checkpoint starts over
                for path in (self.metrics, self.forgetting):
                    path.unlink(missing_ok=True)
                shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            torch.distributed.barrier()
            return 0, {}
        latest = checkpoints[-1]
        state = json.loads((latest / COMPLETE).read_text(encoding="utf-8"))
        if state["world_size"] != self.world:
            raise JpadaptError(
                f"{latest}: the checkpoint was written by {state['world_size']} processes, this run has "
                f"{self.world}; set cpt.num_gpus/num_nodes back, or delete {self.out} to start over"
            )
        self.engine.load_checkpoint(str(latest.parent), tag=latest.name)
        rng = latest / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        if self.rank == 0:
            _log(f"resuming from {latest.name} (step {state['step']} of {self.total})")
            for path in (self.metrics, self.forgetting):
                _truncate_after(path, state["step"])
        torch.distributed.barrier()
        return int(state["step"]), state

    # ----------------------------------------------------------------------------------------- the end

    def _finish(self, train_seconds: float, wall_seconds: float) -> None:
        model_dir = self.out / "model"
        self._consolidate(model_dir)
        check = self._check_consolidated(model_dir)
        peak = peak_memory(self.accelerator, self.device)
        if self.rank != 0:
            return
        s = self.settings
        blocks = self.total * self.group_blocks
        tokens = blocks * s["seq_len"]
        lines = [json.loads(line) for line in self.forgetting.read_text(encoding="utf-8").splitlines()]
        en_blocks = self.mixture.en_blocks_before(blocks)
        summary = {
            "steps": self.total,
            "world_size": self.world,
            "accelerator": self.accelerator,
            "zero_stage": s["zero_stage"],
            "precision": s["precision"],
            "seq_len": s["seq_len"],
            "global_batch_sequences": self.group_blocks,
            "tokens_seen": tokens,
            "tokens_by_language": {"ja": (blocks - en_blocks) * s["seq_len"], "en": en_blocks * s["seq_len"]},
            "replay_ratio": s["replay_ratio"],
            "realized_en_share": self.mixture.realized_ratio(blocks),
            "train_seconds": train_seconds,
            "wall_seconds": wall_seconds,
            "tokens_per_s": tokens / train_seconds if train_seconds > 0 else 0.0,
            "peak_memory": peak,
            "initial_eval": lines[0] if lines and lines[0]["step"] == 0 else None,
            "final_eval": {lang: lines[-1][lang] for lang in LANGS if lang in lines[-1]},
            "consolidation_check": check,
            "extended_from": self.job["extended_from"],
        }
        write_json(self.out / "summary.json", summary)

    def _consolidate(self, model_dir: Path) -> None:
        """The trained weights as one HF folder. ZeRO-3 gathers the shards onto rank 0 first (a collective)."""
        import torch

        if self.settings["zero_stage"] == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = None
        if self.rank == 0:
            tmp = model_dir.with_name("model.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if state is None:
                self.engine.module.save_pretrained(str(tmp))
            else:
                _save_state_dict(self.engine.module.config, state, tmp)
            self.tokenizer.save_pretrained(str(tmp))
            shutil.copy(self.job["run_config"], tmp / "jpadapt_config.yaml")
            if self.job["extended_from"] is not None:
                new_tokens = Path(self.job["extended_from"]) / "new_tokens.json"
                if new_tokens.is_file():
                    shutil.copy(new_tokens, tmp / "new_tokens.json")
            shutil.rmtree(model_dir, ignore_errors=True)
            tmp.replace(model_dir)
        torch.distributed.barrier()

    def _check_consolidated(self, model_dir: Path) -> dict[str, Any]:
        """Reload the folder with plain transformers and compare its logits with the engine's on a probe batch:
        a consolidation that lost or mixed up a weight fails the stage here, not in someone's evaluation."""
        import torch
        from transformers import AutoModelForCausalLM

        probe = torch.from_numpy(self.mixture.blocks([0])[:, : min(64, self.settings["seq_len"])]).to(self.device)
        was_training = self.engine.module.training
        self.engine.module.eval()
        with torch.no_grad():
            engine_logits = self.engine.module(input_ids=probe).logits.float().cpu()
        self.engine.module.train(was_training)
        if self.rank != 0:
            return {}
        reloaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", local_files_only=True)
        with torch.no_grad():
            logits = reloaded.to(self.device).eval()(input_ids=probe).logits.float().cpu()
        diff = float((logits - engine_logits).abs().max())
        tolerance = LOGIT_TOLERANCE[self.settings["precision"]]
        if not diff <= tolerance:
            raise RuntimeError(f"the consolidated model's logits differ from the engine's by {diff:.3g} "
                               f"(tolerance {tolerance})")
        return {"probe_tokens": int(probe.numel()), "max_abs_logit_diff": diff, "tolerance": tolerance}



# ---------------------------------------------------------------------------------------------- worker helpers


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and embeddings), none on norms and biases (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _save_state_dict(config: Any, state: dict[str, Any], folder: Path) -> None:
    """Write a full state dict as an HF folder without materializing a second model: built on the meta device,
    then the gathered tensors are assigned."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"ZeRO-3 consolidation is missing {', '.join(missing[:3])}")
    model.save_pretrained(str(folder))


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _truncate_after(path: Path, step: int) -> None:
    """Drop records logged after `step` (by the run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _log(message: str) -> None:
    print(f"  [cpt] {message}", flush=True)


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
    outputs=("model/config.json", "metrics.jsonl", "forgetting.jsonl", "summary.json",
             "report.md", "forgetting.png"),
    code=("stages.cpt", "data.mixture", "data.prepare", "pipeline.launch", "eval.models", "eval.perplexity",
          "eval.forgetting", "tokenizer.hf"),
    libraries=("torch", "transformers", "deepspeed", "tokenizers", "numpy", "safetensors"),
    resumable=True,
)


def _train(job: dict[str, Any]) -> None:
    worker = _Worker(job)
    worker.setup()
    worker.train()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[-1], _train))
