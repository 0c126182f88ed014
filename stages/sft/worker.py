"""The sft training job on one rank: `python -m stages.sft.worker job.json` (started by the stage, `run()`).

Phases: setup (tokenizer, sequences of every epoch, the PEFT model on its frozen base, DeepSpeed engine), train
(the response-only loss checked against transformers', held-out loss at step 0, every eval_every steps and at the
end), save (adapter/, its reload check, generations, optionally merged/, summary.json), cleanup.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import SftConfig
from pipeline.errors import JpadaptError
from pipeline.training import (
    METRICS_FILE,
    MetricsLogger,
    append_jsonl,
    causal_lm_nats,
    decay_groups,
    deepspeed_config,
    grad_norm,
    initialize,
    lr_schedule,
    peak_memory,
    progress,
    start_worker,
    worker_exit,
    worker_main,
    write_json,
)
from stages.sft.job import GROUP_MICRO_BATCHES, SftJob, load_examples

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
EVAL_FILE, GENERATIONS_FILE = "eval.jsonl", "generations.jsonl"
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")
# Tokens of the one-time check of the response-only loss against transformers' loss.
CHECK_TOKENS = 128
# The adapter, reloaded from its folder, must reproduce the engine's logits to this (same weights, same kernels).
ADAPTER_TOLERANCE = 1e-4
# base + LoRA merged (before bf16 storage) against the trained model, relative to the largest logit: merging
# changes the order of additions, and bf16 compute rounds each of them.
MERGE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


# ============================================================================================ model and loss


def build_model(base: str, settings: SftConfig, target_modules: list[str], new_token_ids: list[int],
                device: Any, trust_remote_code: bool = False) -> Any:
    """The PEFT model to train: the base frozen (4-bit NF4 with double quantization for QLoRA), LoRA on
    `target_modules`, and trainable rows for `new_token_ids` (PEFT trainable tokens: a delta for those rows
    only, never the whole embedding matrix). Trainable parameters are fp32; the compute dtype is the precision's."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from pipeline.models import nf4_quantization, plain_4bit_kernels

    compute = getattr(torch, DTYPES[settings.precision])
    checkpointing = settings.gradient_checkpointing
    common = {"dtype": compute, "local_files_only": True, "use_safetensors": True,
              "trust_remote_code": trust_remote_code}
    if settings.quantization == "nf4":
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4_quantization(compute),
                                                     device_map={"": device}, **common)
        plain_4bit_kernels(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        # prepare_model_for_kbit_training upcasts every float weight to fp32, the frozen embedding and output
        # layers included: for a 262k vocabulary that is +0.3 GB (270M model) to +2 GB (7B) for nothing. Norms
        # stay fp32 (they are small and precision-sensitive); the big frozen matrices go back to the compute dtype.
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                layer.to(compute)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, **common).to(device)
        model.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    model.config.use_cache = False
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=target_modules, trainable_token_indices=new_token_ids or None,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 master copies: the optimizer steps these directly
    # from_pretrained leaves the model in eval mode, where transformers skips gradient checkpointing.
    return peft_model.train()


def response_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(sum of nats over the response tokens, their count) for one batch: `causal_lm_nats`, which runs the output
    layer only on positions whose next token is a response token, in chunks."""
    return causal_lm_nats(model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                          attention_mask=batch.get("attention_mask"))


def batch_tensors(batch: Any, device: Any) -> dict[str, Any]:
    import torch

    tensors = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids}
    if batch.attention_mask is not None:
        tensors["attention_mask"] = batch.attention_mask
    return {key: torch.from_numpy(value).to(device) for key, value in tensors.items()}


# ============================================================================================ the recipe


class SequenceStream:
    """The training sequences of every epoch in order; step s, micro batch m, rank r reads a fixed slice, so the
    ranks see disjoint data and one process with a k-times larger micro batch sees the same sequences per step."""

    def __init__(self, examples: list[Any], settings: SftConfig, seed: int, world: int):
        self.examples, self.settings, self.seed = examples, settings, seed
        self.batch_rows = settings.micro_batch_size * world  # one micro step over all ranks
        self.epochs: list[list[Any]] = []
        self.starts: list[int] = []

    def _epoch(self, epoch: int) -> list[Any]:
        from data.instruct import epoch_sequences

        while len(self.epochs) <= epoch:
            s = self.settings
            self.starts.append(self.starts[-1] + len(self.epochs[-1]) if self.epochs else 0)
            self.epochs.append(epoch_sequences(self.examples, packing=s.packing, max_seq_len=s.max_seq_len,
                                               seed=self.seed, epoch=len(self.epochs),
                                               group_size=self.batch_rows * GROUP_MICRO_BATCHES,
                                               batch_rows=self.batch_rows))
        return self.epochs[epoch]

    def take(self, start: int, count: int) -> list[Any]:
        out, epoch = [], 0
        while len(out) < count:
            sequences = self._epoch(epoch)
            begin = max(0, start + len(out) - self.starts[epoch])
            if begin < len(sequences):
                out.extend(sequences[begin:begin + count - len(out)])
            epoch += 1
        return out

    def epoch_of(self, position: int) -> float:
        """Epochs read before sequence `position` (fractional)."""
        epoch = 0
        while True:
            sequences = self._epoch(epoch)
            if position < self.starts[epoch] + len(sequences):
                return epoch + (position - self.starts[epoch]) / len(sequences)
            epoch += 1


class SftRecipe:
    """One rank of the training job: model, engine, data order, evaluation, the adapter and its checks."""

    def __init__(self, job: SftJob):
        self.job = job
        self.s = job.sft
        self.out = job.context.out_dir
        self.accelerator = job.context.accelerator
        self.total = job.context.total_steps
        where = start_worker(job.context)
        self.rank, self.world, self.device = where.rank, where.world, where.device
        self.group = self.s.micro_batch_size * self.s.grad_accum * self.world
        self.schedule = lr_schedule(self.s.lr, self.s.warmup_steps, self.total, self.s.min_lr_ratio)
        self.metrics = MetricsLogger(self.out, self.rank)

    def setup(self) -> None:
        import torch
        from transformers import AutoTokenizer

        torch.manual_seed(self.job.context.seed)  # LoRA's A matrices start identical on every rank
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.job.tokenizer_dir), local_files_only=True)
        self.stream = SequenceStream(load_examples(self.job.data.train), self.s, self.job.context.seed, self.world)
        self.heldout = load_examples(self.job.data.heldout)
        self.model = build_model(self.job.base_model, self.s, self.job.target_modules,
                                 self.job.new_token_ids, self.device, self.job.trust_remote_code)
        self.engine, self.scheduler = self._engine()
        for path in (METRICS_FILE, EVAL_FILE, GENERATIONS_FILE):
            (self.out / path).unlink(missing_ok=True)

    def _engine(self):
        s = self.s
        groups = [g for g in decay_groups(self.model, s.weight_decay) if g["params"]]
        optimizer = _optimizer(s.optimizer, groups, s.lr)
        config = deepspeed_config(micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum,
                                  grad_clip=s.grad_clip, precision="fp32", zero_stage=s.zero_stage)
        # fp32 for DeepSpeed: the trainable parameters are fp32 already and tiny; the frozen base computes in the
        # precision's dtype under autocast. DeepSpeed's bf16 mode would cast the whole module, norms included.
        return initialize(self.model, optimizer, self.schedule, s.lr, config)

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.precision == "bf16")

    # ----------------------------------------------------------------------------------------- training

    def train(self) -> None:
        self._check_loss()
        self.initial_eval = self._evaluate(0)
        seen = {"tokens": 0, "response_tokens": 0}
        self.positions = 0  # real + pad positions of every batch trained on (all ranks)
        train_seconds, started = 0.0, time.monotonic()
        record: dict[str, Any] = {}
        with progress(self.rank, 0, self.total, "sft") as bar:  # its line ends however training ends
            for step in range(self.total):
                began = time.monotonic()
                loss, tokens, responses = self._train_step(step)
                train_seconds += time.monotonic() - began
                seen["tokens"] += tokens
                seen["response_tokens"] += responses
                record = {"step": step + 1, "loss": loss, "lr": self.schedule(step),
                          "grad_norm": None if self.norm is None else float(self.norm), **seen,
                          "tokens_per_s": seen["tokens"] / train_seconds if train_seconds > 0 else 0.0,
                          "epoch": self.stream.epoch_of((step + 1) * self.group)}
                self.metrics.train(record, TRAIN_SCALARS)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")  # shown on rank 0 only
                bar.update(1)
                if (step + 1) % self.s.eval_every == 0 and step + 1 != self.total:
                    self._evaluate(step + 1)
        self.final_eval = self._evaluate(self.total)
        self.last, self.train_seconds, self.wall_seconds = record, train_seconds, time.monotonic() - started

    def _step_batches(self, step: int) -> list[list[Any]]:
        """The micro batches of every rank for `step`: [micro * world + rank] -> sequences."""
        mb = self.s.micro_batch_size
        sequences = self.stream.take(step * self.group, self.group)
        return [sequences[i * mb:(i + 1) * mb] for i in range(self.s.grad_accum * self.world)]

    def _train_step(self, step: int) -> tuple[float, int, int]:
        import torch

        from data.instruct import collate

        batches = [collate(seqs, self.tokenizer.pad_token_id, self.s.packing) for seqs in self._step_batches(step)]
        # Every rank knows the whole step's batches, so each can divide by the step's total response tokens:
        # DeepSpeed divides by grad_accum (backward) and world (gradient average); the factors below undo that,
        # and the gradient is that of (all response nats of the step) / (all response tokens of the step).
        total = max(1, sum(_shifted_responses(b) for b in batches))
        scale = self.s.grad_accum * self.world / total
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        self.norm = None
        for micro in range(self.s.grad_accum):
            batch = batches[micro * self.world + self.rank]
            with self._autocast():
                loss_sum, _ = response_loss(self.engine.module, batch_tensors(batch, self.device))
            self.engine.backward(loss_sum * scale)
            if micro == self.s.grad_accum - 1 and self.s.zero_stage == 0:
                self.norm = grad_norm(self.engine.module)
            self.engine.step()
            nats += loss_sum.detach().double()
        if self.norm is None:
            self.norm = self.engine.get_global_grad_norm()
        torch.distributed.all_reduce(nats)
        self.positions += sum(b.input_ids.size for b in batches)
        return float(nats) / total, sum(b.tokens for b in batches), sum(b.response_tokens for b in batches)

    def _check_loss(self) -> None:
        """The response-only loss against transformers' own loss on the first example: an architecture whose output
        layer does more than `lm_head` (+ softcapping) would otherwise train on a wrong objective unnoticed. At
        most CHECK_TOKENS tokens ending with the answer: transformers' loss materializes every position's logits,
        which for a large vocabulary would set the run's peak memory."""
        import numpy as np
        import torch

        from data.instruct import Sequence, collate

        ids, labels, _ = _arrays(self.stream.examples[0])
        end = int(np.flatnonzero(labels != -100)[-1]) + 1
        start = max(0, end - CHECK_TOKENS)
        seq = Sequence(ids[start:end], labels[start:end], np.arange(end - start, dtype=np.int64), examples=1)
        batch = batch_tensors(collate([seq], self.tokenizer.pad_token_id, False), self.device)
        module = self.engine.module
        module.eval()
        with torch.no_grad(), self._autocast():
            mine, count = response_loss(module, batch)
            theirs = module(**batch, use_cache=False).loss
        module.train()
        mine = float(mine) / max(1, count)
        tolerance = 1e-4 if self.s.precision == "fp32" else 2e-2
        if abs(mine - float(theirs)) > tolerance * max(1.0, abs(float(theirs))):
            raise JpadaptError(f"sft: the response-only loss ({mine:.5f}) disagrees with transformers' loss "
                               f"({float(theirs):.5f}) for {type(module.get_base_model()).__name__}; this "
                               "architecture transforms its logits in a way jpadapt does not reproduce")

    # ----------------------------------------------------------------------------------------- evaluation

    def _evaluate(self, step: int) -> dict[str, Any] | None:
        """Held-out loss per response token; ranks split the examples and all-reduce the sums."""
        import torch

        from data.instruct import Sequence, collate

        if not self.heldout:
            return None
        mine = self.heldout[self.rank::self.world]
        module = self.engine.module
        module.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        mb = self.s.micro_batch_size
        with torch.no_grad():
            for start in range(0, len(mine), mb):
                seqs = [Sequence(*_arrays(e), examples=1) for e in mine[start:start + mb]]
                with self._autocast():
                    nats, count = response_loss(module, batch_tensors(collate(seqs, self.tokenizer.pad_token_id,
                                                                              False), self.device))
                sums += torch.tensor([float(nats), count], dtype=torch.float64, device=self.device)
        module.train()
        torch.distributed.all_reduce(sums)
        nats, count = sums.tolist()
        result = {"step": step, "loss": nats / max(1.0, count), "response_tokens": int(count),
                  "examples": len(self.heldout)}
        self.metrics.record(EVAL_FILE, result, {"eval/loss": result["loss"]})
        return result

    # ----------------------------------------------------------------------------------------- save

    def save(self) -> None:
        peak = peak_memory(self.accelerator, self.device)
        if self.rank == 0:
            adapter_dir = self.out / "adapter"
            self._save_adapter(adapter_dir)
            adapter_check = self._check_adapter(adapter_dir)
            self._generate()
            merged_check = self._merge(adapter_dir) if self.s.merge else None
            write_json(self.out / "summary.json", self._summary(peak, adapter_check, merged_check))

    def cleanup(self) -> None:
        import torch

        self.metrics.close()
        torch.distributed.barrier()

    def _save_adapter(self, adapter_dir: Path) -> None:
        """adapter/ already holds the tokenizer (written by the stage); weights and provenance are added."""
        self.engine.module.save_pretrained(str(adapter_dir))
        config_file = adapter_dir / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = self.job.base_model_name
        write_json(config_file, config)
        write_json(adapter_dir / "jpadapt.json", {
            "jpadapt_version": self.job.jpadapt_version, "stage": "sft", "base_model": self.job.base_model_name,
            "quantization": self.s.quantization, "prompt_format": self.job.prompt_format,
            "new_token_ids": _ranges(self.job.new_token_ids),
        })
        shutil.copy(self.job.context.run_config, adapter_dir / "jpadapt_config.yaml")

    def _probe(self) -> dict[str, Any]:
        from data.instruct import Sequence, collate

        example = (self.heldout or self.stream.examples)[0]
        return batch_tensors(collate([Sequence(*_arrays(example), examples=1)], self.tokenizer.pad_token_id, False),
                             self.device)

    def _logits(self, model: Any) -> Any:
        import torch

        probe = self._probe()
        model.eval()
        with torch.no_grad(), self._autocast():
            return model(input_ids=probe["input_ids"], use_cache=False).logits.float().cpu()

    def _check_adapter(self, adapter_dir: Path) -> dict[str, Any]:
        """Reload base + adapter from disk the way a user would and compare logits with the trained model's."""
        from peft import PeftModel

        from pipeline.models import load_frozen_base

        expected = self._logits(self.engine.module)
        base = load_frozen_base(self.job.base_model, self.s.quantization, DTYPES[self.s.precision],
                                self.device, self.job.trust_remote_code)
        reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
        diff = float((self._logits(reloaded) - expected).abs().max())
        del reloaded, base
        if not diff <= ADAPTER_TOLERANCE:
            raise RuntimeError(f"adapter/ reloaded on the base gives logits {diff:.3g} away from the trained model's")
        return {"probe_tokens": int(expected.shape[1]), "max_abs_logit_diff": diff, "tolerance": ADAPTER_TOLERANCE}

    def _generate(self) -> None:
        """Greedy answers to held-out prompts, without the adapter (the base) and with it."""
        import torch

        from data.instruct import Conversation, prompt_text

        model = self.engine.module
        model.eval()
        for prompt in self.job.data.prompts:
            conv = Conversation(tuple(prompt.messages), prompt.where, prompt.reference, prompt.instruction,
                                prompt.input)
            ids = self.tokenizer(prompt_text(conv, self.tokenizer), add_special_tokens=False,
                                 return_tensors="pt").input_ids.to(self.device)
            answers = {}
            for key in ("base_output", "output"):
                with torch.no_grad(), self._autocast():
                    if key == "base_output":
                        with model.disable_adapter():
                            tokens = self._greedy(model, ids)
                    else:
                        tokens = self._greedy(model, ids)
                answers[key] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            append_jsonl(self.out / GENERATIONS_FILE, {
                "where": prompt.where, "instruction": prompt.instruction, "input": prompt.input,
                "reference": prompt.reference, **answers})
        model.train()

    def _greedy(self, model: Any, ids: Any) -> list[int]:
        output = model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape), do_sample=False,
                                max_new_tokens=self.s.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        return output[0, ids.shape[1]:].tolist()

    def _merge(self, adapter_dir: Path) -> dict[str, Any]:
        """base (dequantized when it was 4-bit: the weights the adapter was trained against) + LoRA, merged in the
        compute dtype and checked against the trained model; then saved in bf16 and checked after a reload with
        plain transformers. The two checks are separate because bf16 storage alone moves the logits of a model by
        its own rounding, which says nothing about the merge."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from pipeline.models import load_frozen_base

        expected = self._logits(self.engine.module)
        base = load_frozen_base(self.job.base_model, self.s.quantization, DTYPES[self.s.precision],
                                self.device, self.job.trust_remote_code)
        if self.s.quantization == "nf4":
            base = base.dequantize()
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merge_diff = float((self._logits(merged) - expected).abs().max())
        scale = max(1.0, float(expected.abs().max()))
        tolerance = MERGE_TOLERANCE[self.s.precision] * scale
        if not merge_diff <= tolerance:
            raise RuntimeError(f"base + LoRA merged gives logits {merge_diff:.3g} away from the trained model's "
                               f"(tolerance {tolerance:.3g})")
        for param in merged.parameters():  # not `.to(bf16)`: that would also round buffers such as RoPE frequencies
            param.data = param.data.to(torch.bfloat16)
        merged.config.dtype = torch.bfloat16  # what `dtype="auto"` loads it as
        in_memory = self._logits(merged)
        folder, tmp = self.out / "merged", self.out / "merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        shutil.copy(self.job.context.run_config, tmp / "jpadapt_config.yaml")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        del merged, base
        reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", local_files_only=True)
        saved_diff = float((self._logits(reloaded.to(self.device)) - in_memory).abs().max())
        if saved_diff != 0.0:
            raise RuntimeError(f"merged/ reloaded gives logits {saved_diff:.3g} away from the model it was saved from")
        return {"max_abs_logit_diff": merge_diff, "tolerance": tolerance, "max_abs_logit": scale,
                "bf16_rounding_diff": float((in_memory - expected).abs().max()), "saved_diff": saved_diff,
                "dtype": "bfloat16"}

    def _summary(self, peak: dict[str, Any], adapter_check: dict[str, Any], merged_check: Any) -> dict[str, Any]:
        last, train_seconds = self.last, self.train_seconds
        model = self.engine.module
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        new_rows = len(self.job.new_token_ids)
        delta = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n)
        sequences = self.total * self.group
        padding = 1 - last["tokens"] / self.positions if self.positions else 0.0
        return {
            "steps": self.total, "epochs": self.stream.epoch_of(sequences), "world_size": self.world,
            "accelerator": self.accelerator, "zero_stage": self.s.zero_stage,
            "quantization": self.s.quantization, "precision": self.s.precision,
            "optimizer": self.s.optimizer,
            "lora": {"r": self.s.lora_r, "alpha": self.s.lora_alpha, "dropout": self.s.lora_dropout,
                     "target_modules": self.job.target_modules},
            "base_model": self.job.base_model_name, "prompt_format": self.job.prompt_format,
            "packing": self.s.packing, "max_seq_len": self.s.max_seq_len, "global_batch_sequences": self.group,
            "data": self.job.data.stats, "sequences_per_epoch": self.job.sequences_per_epoch,
            "padding_share": padding,
            "trainable_params": trainable, "total_params": _total_params(model), "lora_params": trainable - delta,
            "new_token_rows": new_rows,
            "tokens_seen": last["tokens"], "response_tokens_seen": last["response_tokens"],
            "train_seconds": train_seconds, "wall_seconds": self.wall_seconds,
            "tokens_per_s": last["tokens"] / train_seconds if train_seconds > 0 else 0.0,
            "peak_memory": peak, "final_loss": last["loss"], "initial_eval": self.initial_eval, "final_eval": self.final_eval,
            "adapter_check": adapter_check, "merged_check": merged_check,
            "jpadapt_version": self.job.jpadapt_version,
        }


def _optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> Any:
    """paged_adamw_8bit (the QLoRA default: 8-bit states, paged to CPU under memory pressure; plain 8-bit on a
    CPU), adamw_8bit, or torch's AdamW."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import bitsandbytes as bnb

    kind = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return kind(groups, lr=lr)


def _total_params(model: Any) -> int:
    """Parameters of the base plus adapters; a 4-bit weight counts as its unquantized size (bitsandbytes packs two
    4-bit values per stored byte)."""
    total = 0
    for param in model.parameters():
        total += param.numel() * 2 if param.__class__.__name__ == "Params4bit" else param.numel()
    return total


def _shifted_responses(batch: Any) -> int:
    """Response tokens that are predicted (label positions 1..end: the first position has no context)."""
    return int((batch.labels[:, 1:] != -100).sum())


def _arrays(example: Any) -> tuple[Any, Any, Any]:
    import numpy as np

    n = len(example.input_ids)
    return (np.asarray(example.input_ids, dtype=np.int64), np.asarray(example.labels, dtype=np.int64),
            np.arange(n, dtype=np.int64))


def _ranges(ids: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9] -> [[3, 6], [9, 10]]: new ids are contiguous, so this stays short in jpadapt.json."""
    ranges: list[list[int]] = []
    for i in ids:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


if __name__ == "__main__":
    worker_exit(worker_main(sys.argv[-1], SftJob, SftRecipe))
