"""The cpt training job on one rank: `python -m stages.cpt.worker job.json` (started by the stage, `run()`).

Phases: setup (tokenizer, JA/EN block mixture, held-out texts, DeepSpeed engine, resume from the newest complete
checkpoint), train (steps, evaluations, checkpoints), save (the consolidated HF folder, checked against the
engine, and summary.json), cleanup.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError
from pipeline.training import (
    METRICS_FILE,
    MetricsLogger,
    check_checkpoint,
    checkpoint_hashes,
    decay_groups,
    deepspeed_config,
    engine_nats,
    grad_norm,
    initialize,
    load_checkpoint,
    load_weights_only,
    lr_schedule,
    peak_memory,
    progress,
    start_worker,
    worker_exit,
    worker_main,
    write_json,
)
from stages.cpt.job import LANGS, CptJob

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
FORGETTING_FILE = "forgetting.jsonl"
RECORDS = (METRICS_FILE, FORGETTING_FILE)
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "en_share")
# Tolerance of the consolidated model's logits against the engine's, by training precision.
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Clock:
    """Seconds spent in training steps, and wall seconds, carried across resumes in the checkpoints."""

    train_seconds: float = 0.0
    wall_before: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def wall_seconds(self) -> float:
        return self.wall_before + time.monotonic() - self.started


class CptRecipe:
    """One rank of the training job: engine, data, evaluation, checkpoints, metrics."""

    def __init__(self, job: CptJob):
        self.job = job
        self.settings = job.cpt
        self.out = job.context.out_dir
        self.total = job.context.total_steps
        where = start_worker(job.context)
        self.rank, self.world, self.device = where.rank, where.world, where.device
        s = self.settings
        self.group_blocks = s.micro_batch_size * s.grad_accum * self.world
        self.schedule = lr_schedule(s.lr, s.warmup_steps, self.total, s.min_lr_ratio)
        self.metrics = MetricsLogger(self.out, self.rank)
        self.start = 0
        self.clock = Clock()

    # ----------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.job.tokenizer_dir), local_files_only=True)
        self.mixture = self._mixture()
        self.heldout = self._heldout()
        self.engine, self.scheduler = self._engine()
        self.start, state = self._resume()
        self.clock = Clock(state.get("train_seconds", 0.0), state.get("wall_seconds", 0.0))

    def _mixture(self):
        from data.mixture import LanguageStream, Mixture, load_token_cache

        streams = {}
        for salt, lang in enumerate(LANGS):
            entry = self.job.tokens.get(lang)
            if entry is not None:
                token_file = load_token_cache(entry.folder)
                if token_file is None:
                    raise JpadaptError(f"{entry.folder}: tokenized {lang} data is missing or incomplete")
                streams[lang] = LanguageStream(token_file, self.job.context.seed, salt)
        s = self.settings
        return Mixture(streams["ja"], streams.get("en"), s.replay_ratio, s.seq_len, self.job.context.seed)

    def _heldout(self) -> dict[str, list[str]]:
        from data.prepare import capped_texts, prepared_texts

        return {lang: capped_texts(prepared_texts(files), self.settings.eval_chars)
                for lang, files in self.job.heldout.items()}

    def _engine(self):
        import torch

        s = self.settings
        # Offloaded optimizer states on a GPU run: DeepSpeed's CPU Adam steps them far faster than torch's. Otherwise
        # torch's AdamW (fused on GPU): no DeepSpeed op to compile, nothing that needs a CUDA toolkit.
        native = self.job.context.accelerator == "cuda" and s.offload_optimizer
        optimizer_cfg = {"type": "AdamW", "params": {"lr": s.lr, "betas": list(s.adam_betas), "eps": 1e-8,
                                                     "weight_decay": s.weight_decay}} if native else None
        config = deepspeed_config(
            micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum, grad_clip=s.grad_clip,
            precision=s.precision, zero_stage=s.zero_stage, offload_optimizer=s.offload_optimizer,
            offload_params=s.offload_params, optimizer=optimizer_cfg,
        )
        model = self._model(config)
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        groups = decay_groups(model, s.weight_decay)
        optimizer = None if native else torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.adam_betas), eps=1e-8,
                                                          fused=self.job.context.accelerator == "cuda")
        return initialize(model, optimizer, self.schedule, s.lr, config, model_parameters=groups if native else None)

    def _model(self, ds_config: dict[str, Any]):
        """The model in the training precision (DeepSpeed keeps fp32 master weights for bf16/fp16)."""
        from pipeline.models import load_causal_lm

        model_cfg: ModelConfig = self.job.model.model_copy(update={"dtype": PRECISION_DTYPES[self.settings.precision]})
        zero3_load = None
        if model_cfg.path is not None and self.settings.zero_stage == 3:
            # Under ZeRO-3 transformers loads the folder straight into partitions (deepspeed.zero.Init): no rank
            # holds the whole model. transformers keeps only a weak reference: the setting ends when this
            # function returns, so later models (the consolidated one on rank 0) are built normally.
            from transformers.integrations import HfDeepSpeedConfig

            zero3_load = HfDeepSpeedConfig(ds_config)
        # Same seed on every rank: a model built from config starts identical everywhere.
        model = load_causal_lm(model_cfg, seed=self.job.context.seed)
        del zero3_load
        return model

    def _resume(self) -> tuple[int, dict[str, Any]]:
        """The step and state of the newest complete checkpoint, loaded into the engine (0 and {}: none). Its
        files must be those the run hashed when it wrote them, and they are read without running code
        (`load_checkpoint`): the checkpoint folder is only data."""
        import torch

        checkpoints = complete_checkpoints(self.out / CHECKPOINTS)
        if not checkpoints:
            self.metrics.start_over(RECORDS)  # a run that died before its first checkpoint starts over
            torch.distributed.barrier()
            return 0, {}
        latest = checkpoints[-1]
        state = json.loads((latest / COMPLETE).read_text(encoding="utf-8"))
        if state["world_size"] != self.world:
            raise JpadaptError(
                f"{latest}: the checkpoint was written by {state['world_size']} processes, this run has "
                f"{self.world}; set cpt.num_gpus/num_nodes back, or delete {self.out} to start over"
            )
        check_checkpoint(latest, state.get("sha256", {}), self.rank, self.world, COMPLETE, start_over=self.out)
        load_checkpoint(self.engine, latest, start_over=self.out)
        _set_rng_state(load_weights_only(latest / f"rng-rank{self.rank}.pt", start_over=self.out))
        if self.rank == 0:
            _log(f"resuming from {latest.name} (step {state['step']} of {self.total})")
        self.metrics.drop_after(state["step"], RECORDS)
        torch.distributed.barrier()
        return int(state["step"]), state

    # ----------------------------------------------------------------------------------------- training

    def train(self) -> None:
        if self.start == 0:
            self._evaluate(0)
        with progress(self.rank, self.start, self.total, "cpt") as bar:  # its line ends however training ends
            for step in range(self.start, self.total):
                began = time.monotonic()
                loss = self._train_step(step)
                self.clock.train_seconds += time.monotonic() - began
                record = self._step_record(step, loss, self.clock.train_seconds)
                self.metrics.train(record, TRAIN_SCALARS)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")  # shown on rank 0 only
                bar.update(1)
                done = step + 1
                if done % self.settings.eval_every == 0 or done == self.total:
                    self._evaluate(done)
                if done % self.settings.save_every == 0 or done == self.total:
                    self._save_checkpoint(done)

    def _train_step(self, step: int) -> float:
        import torch

        from data.mixture import shard_indices

        s = self.settings
        losses = []
        self.grad_norm = None
        for micro in range(s.grad_accum):
            indices = shard_indices(step, micro, self.rank, world=self.world, micro_batch=s.micro_batch_size,
                                    grad_accum=s.grad_accum)
            batch = torch.from_numpy(self.mixture.blocks(indices)).to(self.device)
            # Every next token is a target: nats / count is transformers' loss, without its full logits.
            nats, count = engine_nats(self.engine, input_ids=batch, labels=batch)
            loss = nats / count
            self.engine.backward(loss)
            if micro == s.grad_accum - 1 and s.zero_stage == 0:
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
        tokens = blocks * self.settings.seq_len
        norm = self.grad_norm
        return {
            "step": done,
            "loss": loss,
            "lr": self.schedule(step),
            "grad_norm": None if norm is None else float(norm),
            "tokens": tokens,
            "tokens_per_s": tokens / train_seconds if train_seconds > 0 else 0.0,
            "en_share": self.mixture.realized_ratio(blocks),
        }

    def _evaluate(self, step: int) -> dict[str, Any]:
        """Loss and bits per byte on each held-out set. ZeRO-3 needs every rank in every forward pass (the
        parameters are gathered collectively), so there every rank scores all texts; otherwise ranks split them
        and the sums are all-reduced."""
        import torch

        from eval.perplexity import LossResult, bits_per_byte

        zero3 = self.settings.zero_stage == 3
        seq_len = self.settings.seq_len
        results = {}
        for lang, texts in self.heldout.items():
            mine = texts if zero3 else texts[self.rank :: self.world]
            result = bits_per_byte(self.engine.module, self.tokenizer, mine, window=seq_len,
                                   stride=max(1, seq_len // 2), batch_size=self.settings.micro_batch_size)
            totals = torch.tensor([result.tokens, result.bytes, result.nats], dtype=torch.float64)
            if not zero3:
                torch.distributed.all_reduce(totals)
            tokens, n_bytes, nats = totals.tolist()
            results[lang] = LossResult(int(tokens), int(n_bytes), nats).to_dict()
        scalars = {}
        for lang, values in results.items():
            scalars[f"eval/{lang}_loss"] = values["loss"]
            scalars[f"eval/{lang}_bits_per_byte"] = values["bits_per_byte"]
        record = {"step": step, "tokens": step * self.group_blocks * seq_len, **results}
        self.metrics.record(FORGETTING_FILE, record, scalars)
        return results

    def _save_checkpoint(self, step: int) -> None:
        import torch

        root = self.out / CHECKPOINTS
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(str(root), tag=tag)
        torch.save(_rng_state(), root / tag / f"rng-rank{self.rank}.pt")
        torch.distributed.barrier()
        hashes = checkpoint_hashes(root / tag, self.rank, self.world, COMPLETE)  # what a resume will accept
        if self.rank == 0:
            state = {"step": step, "next_block": step * self.group_blocks, "train_seconds": self.clock.train_seconds,
                     "wall_seconds": self.clock.wall_seconds(), "world_size": self.world, "sha256": hashes}
            write_json(root / tag / COMPLETE, state)
            for old in complete_checkpoints(root)[: -self.settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    # ----------------------------------------------------------------------------------------- save

    def save(self) -> None:
        wall_seconds = self.clock.wall_seconds()  # of the training: consolidation and its check are not counted
        model_dir = self.out / "model"
        self._consolidate(model_dir)
        check = self._check_consolidated(model_dir)
        peak = peak_memory(self.job.context.accelerator, self.device)
        if self.rank == 0:
            write_json(self.out / "summary.json", self._summary(wall_seconds, check, peak))

    def _summary(self, wall_seconds: float, check: dict[str, Any], peak: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        blocks = self.total * self.group_blocks
        tokens = blocks * s.seq_len
        train_seconds = self.clock.train_seconds
        lines = [json.loads(line) for line in (self.out / FORGETTING_FILE).read_text(encoding="utf-8").splitlines()]
        en_blocks = self.mixture.en_blocks_before(blocks)
        return {
            "steps": self.total,
            "world_size": self.world,
            "accelerator": self.job.context.accelerator,
            "zero_stage": s.zero_stage,
            "precision": s.precision,
            "seq_len": s.seq_len,
            "global_batch_sequences": self.group_blocks,
            "tokens_seen": tokens,
            "tokens_by_language": {"ja": (blocks - en_blocks) * s.seq_len, "en": en_blocks * s.seq_len},
            "replay_ratio": s.replay_ratio,
            "realized_en_share": self.mixture.realized_ratio(blocks),
            "train_seconds": train_seconds,
            "wall_seconds": wall_seconds,
            "tokens_per_s": tokens / train_seconds if train_seconds > 0 else 0.0,
            "peak_memory": peak,
            "initial_eval": lines[0] if lines and lines[0]["step"] == 0 else None,
            "final_eval": {lang: lines[-1][lang] for lang in LANGS if lang in lines[-1]},
            "consolidation_check": check,
            "extended_from": self.job.extended_from_name,
        }

    def _consolidate(self, model_dir: Path) -> None:
        """The trained weights as one HF folder. ZeRO-3 gathers the shards onto rank 0 first (a collective)."""
        import torch

        if self.settings.zero_stage == 3:
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
            shutil.copy(self.job.context.run_config, tmp / "jpadapt_config.yaml")
            if self.job.extended_from is not None:
                new_tokens = self.job.extended_from / "new_tokens.json"
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

        probe = torch.from_numpy(self.mixture.blocks([0])[:, : min(64, self.settings.seq_len)]).to(self.device)
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
        tolerance = LOGIT_TOLERANCE[self.settings.precision]
        if not diff <= tolerance:
            raise RuntimeError(f"the consolidated model's logits differ from the engine's by {diff:.3g} "
                               f"(tolerance {tolerance})")
        return {"probe_tokens": int(probe.numel()), "max_abs_logit_diff": diff, "tolerance": tolerance}

    def cleanup(self) -> None:
        import torch

        self.metrics.close()
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------- helpers


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints every rank finished saving, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


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


def _log(message: str) -> None:
    print(f"  [cpt] {message}", flush=True)


if __name__ == "__main__":
    worker_exit(worker_main(sys.argv[-1], CptJob, CptRecipe))
