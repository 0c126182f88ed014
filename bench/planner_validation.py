"""The memory planner against the bytes PyTorch, PEFT, bitsandbytes and DeepSpeed really hold, on CPU.

    python bench/planner_validation.py [--out bench/results/planner-validation-cpu.md] [--skip-zero]

Every model is a LLaMA built from config values (`AutoModelForCausalLM.from_config`, no downloads). Measured:
  - model states after ONE optimizer step: numel x element_size of the parameters, their .grad and every tensor
    in optimizer.state, counted once per storage (tied weights, views into DeepSpeed's flat buffers):
    full fp32 with torch AdamW; bf16 mixed precision with explicit fp32 master weights (torch has no built-in
    master-weight AdamW: emulated the way DeepSpeed does it); LoRA (PEFT, all-linear) on a bf16 base; QLoRA (NF4
    with double quantization through from_pretrained(quantization_config), LoRA, bitsandbytes PagedAdamW8bit);
  - activations: the tensors autograd saves in one decoder layer (`torch.autograd.graph.saved_tensors_hooks`,
    once per storage, parameters and the rotary cos/sin that all layers share left out), SDPA and eager,
    with and without GQA, bf16 and fp32, full and LoRA;
  - the logits + loss head (the chunked output layer cpt and sft train with, `pipeline.training.output_nats`):
    peak of live CPU allocations from torch.profiler's memory events, a small and Qwen's 152k vocabulary;
  - ZeRO-1/2/3 over 2 processes (torchrun, gloo, DS_ACCELERATOR=cpu, a torch AdamW passed in code so nothing
    compiles but DeepSpeed's shared-memory op, cached after the first run): the bytes each rank holds;
  - DeepSpeed's own estimators (estimate_zero2/zero3_model_states_mem_needs) on the same configurations.
Each row: planner bytes, measured bytes, error = planner / measured - 1. The tests in
tests/test_planner_measured.py call the same functions and hold the rows to their tolerances.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed (transformers does, lazily)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pipeline.planner.memory import MemoryPlan, Setup, _param_tensors, plan_memory
from pipeline.planner.shapes import ModelShape, shape_from_hf_config

# ------------------------------------------------------------------------------------------------- models

# LLaMA configs (config.json values). TINY: 0.2M parameters; MID: 58.5M (an untied 32k vocabulary is 56% of it,
# like a small real model); ZERO: 20.8M, every linear >= 100,000 values so ZeRO-3 partitions them (smaller
# tensors stay whole on every rank); LAYER: the layer the activation counts run on.
TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
        "tie_word_embeddings": False}
MID = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408,
       "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 256,
       "tie_word_embeddings": False}
ZERO = {"model_type": "llama", "vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 256,
        "tie_word_embeddings": False}
LAYER = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 704,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 256,
         "tie_word_embeddings": False}
# Gemma 3 text layer: fp32 norms, four per layer, q/k norms, head_dim 64 != hidden / heads.
GEMMA_LAYER = {"model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 704,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
               "sliding_window": 512, "max_position_embeddings": 256, "tie_word_embeddings": True}
MODELS = {"tiny": TINY, "mid": MID, "zero": ZERO, "layer": LAYER}

STEP_TOKENS = 16  # one sequence of 16 tokens per optimizer step: the model states do not depend on it


@dataclass(frozen=True)
class Row:
    """One planner term against one measurement. `explained`: bytes of a difference computed exactly from
    something the planner does not model (named in `note`); the tolerance applies to what is left."""

    case: str
    term: str
    planner: int
    measured: int
    tolerance: float
    note: str = ""
    explained: int = 0

    @property
    def error(self) -> float:
        return self.planner / self.measured - 1

    @property
    def residual(self) -> float:
        return (self.planner + self.explained) / self.measured - 1

    @property
    def ok(self) -> bool:
        return abs(self.residual) <= self.tolerance


def shape_of(spec: dict, name: str) -> ModelShape:
    return shape_from_hf_config(spec, name)


def build(spec: dict, dtype: torch.dtype, attention: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return model.train()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped): what the process really holds."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def one_step(model, parameters_optimizer, vocab: int, tokens: int = STEP_TOKENS) -> None:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    parameters_optimizer.step()


def plan(spec: dict, name: str, **setup) -> MemoryPlan:
    return plan_memory(shape_of(spec, name), Setup(micro_batch=1, seq_len=STEP_TOKENS, **setup))


# ------------------------------------------------------------------------------------------------- model states


def full_rows(name: str, precision: str) -> list[Row]:
    """Full fine-tuning, one step. fp32: torch AdamW on the fp32 parameters. bf16: bf16 parameters and gradients,
    AdamW on fp32 master copies (their fp32 gradients freed after the step, as DeepSpeed does)."""
    spec = MODELS[name]
    case = f"full {precision}, {name}"
    if precision == "fp32":
        model = build(spec, torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        one_step(model, optimizer, spec["vocab_size"])
        measured = {"weights": storage_bytes(model.parameters()),
                    "gradients": storage_bytes(p.grad for p in model.parameters()),
                    "optimizer states": storage_bytes(state_tensors(optimizer))}
    else:
        model = build(spec, torch.bfloat16)
        params = list(model.parameters())
        masters = [p.detach().float().requires_grad_(True) for p in params]
        optimizer = torch.optim.AdamW(masters, lr=1e-4)
        ids = torch.randint(0, spec["vocab_size"], (1, STEP_TOKENS), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        for p, master in zip(params, masters):
            master.grad = p.grad.float()
        optimizer.step()
        with torch.no_grad():
            for p, master in zip(params, masters):
                p.copy_(master)
                master.grad = None
        measured = {"weights": storage_bytes(params), "gradients": storage_bytes(p.grad for p in params),
                    "master weights": storage_bytes(masters),
                    "optimizer states": storage_bytes(state_tensors(optimizer))}
    planned = plan(spec, name, method="full", precision=precision)
    notes = {"optimizer states": "measured includes torch AdamW's 4-byte `step` per tensor"}
    return [Row(case, term, planned.term(term).bytes, value, 0.01, notes.get(term, ""))
            for term, value in measured.items()]


def lora_rows(name: str, rank: int = 8) -> list[Row]:
    """PEFT LoRA on all linear layers of a bf16 base, torch AdamW, one step."""
    from peft import LoraConfig, get_peft_model

    spec = MODELS[name]
    model = get_peft_model(build(spec, torch.bfloat16), LoraConfig(r=rank, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    dtypes = {str(p.dtype) for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    one_step(model, optimizer, spec["vocab_size"])
    planned = plan(spec, name, method="lora", lora_rank=rank)
    case = f"LoRA r={rank} on bf16, {name}"
    return [
        Row(case, "weights", planned.term("weights").bytes, storage_bytes(frozen), 0.01, "frozen bf16 base"),
        Row(case, "LoRA weights", planned.term("LoRA weights").bytes, storage_bytes(trainable), 0.01,
            f"adapter dtype {', '.join(sorted(dtypes))} (PEFT autocast_adapter_dtype)"),
        Row(case, "LoRA gradients", planned.term("LoRA gradients").bytes,
            storage_bytes(p.grad for p in trainable), 0.01),
        Row(case, "optimizer states", planned.term("optimizer states").bytes,
            storage_bytes(state_tensors(optimizer)), 0.01, "AdamW, incl. 4-byte `step` per tensor"),
    ]


def quantize(spec: dict, folder: Path, double_quant: bool):
    """The model saved in bf16 (safetensors) and reloaded with bitsandbytes NF4 on the CPU: from_config does not
    take a quantization_config, from_pretrained does."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not (folder / "config.json").is_file():
        build(spec, torch.bfloat16).save_pretrained(folder)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                dtype=torch.bfloat16)


def nf4_bytes(model) -> dict[str, int]:
    """Packed NF4 codes, the per-block constants, each tensor's own tables, and the weights left in bf16."""
    import bitsandbytes as bnb

    packed, blocks, tables = [], [], []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            packed.append(module.weight)
            blocks.append(state.absmax)
            tables.append(state.code)  # the 16-entry NF4 table
            if state.nested:
                blocks.append(state.state2.absmax)
                tables += [state.offset, state.state2.code]  # fp32 offset, 256-entry map of the 8-bit absmax
    rest = [p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)]
    return {"packed": storage_bytes(packed), "blocks": storage_bytes(blocks), "tables": storage_bytes(tables),
            "bf16": storage_bytes(rest), "tensors": len(packed)}


def qlora_rows(name: str, folder: Path, double_quant: bool = True, rank: int = 8, train: bool = True) -> list[Row]:
    """NF4 base (from_pretrained with BitsAndBytesConfig, device_map="cpu"), then LoRA + PagedAdamW8bit, one step
    (paged optimizers fall back to ordinary CPU tensors on the CPU)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    spec = MODELS[name]
    model = quantize(spec, folder, double_quant)
    held = nf4_bytes(model)
    optimizer_name = "paged_adamw_8bit"
    planned = plan(spec, name, method="qlora", lora_rank=rank, double_quant=double_quant, optimizer=optimizer_name)
    case = f"QLoRA NF4{' + double quant' if double_quant else ''}, {name}"
    tables = f"of which {held['tables']:,} B are the {held['tensors']} tensors' own tables"
    rows = [
        Row(case, "weights (4-bit)", planned.term("weights (4-bit)").bytes, held["packed"], 0.01, "Params4bit storage"),
        Row(case, "quantization constants", planned.term("quantization constants").bytes,
            held["blocks"] + held["tables"], 0.01, tables),
        Row(case, "weights (bf16, not quantized)", planned.term("weights (bf16, not quantized)").bytes, held["bf16"],
            0.01, "embeddings, lm_head, norms"),
    ]
    if not train:
        return rows
    model = get_peft_model(model, LoraConfig(r=rank, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU": falls back to non-paged
        optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
        one_step(model, optimizer, spec["vocab_size"])
    small = sum(p.numel() for p in trainable if p.numel() < 4096)
    rows += [
        Row(case, "LoRA weights", planned.term("LoRA weights").bytes, storage_bytes(trainable), 0.01),
        Row(case, "LoRA gradients", planned.term("LoRA gradients").bytes,
            storage_bytes(p.grad for p in trainable), 0.01),
        Row(case, "optimizer states", planned.term("optimizer states").bytes, storage_bytes(state_tensors(optimizer)),
            0.01, f"PagedAdamW8bit; {small:,} values in tensors under min_8bit_size keep fp32 moments"),
    ]
    return rows


# ------------------------------------------------------------------------------------------------- activations


def saved_per_token(model, layer, vocab: int, batch: int = 2, seq: int = 64) -> tuple[float, list[tuple]]:
    """Bytes per token of the tensors autograd saves while `layer` runs forward, once per storage, without
    parameters and without the rotary cos/sin (computed once per forward and shared by every layer)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared: set[int] = set()
    rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    hooks = [rotary.register_forward_hook(lambda m, a, out: shared.update(t.untyped_storage().data_ptr() for t in out))]
    recording, saved = [False], []

    def pack(t):
        if recording[0]:
            saved.append((t, traceback.extract_stack(limit=4)[0].name))
        return t

    hooks.append(layer.register_forward_pre_hook(lambda m, a, k: recording.__setitem__(0, True), with_kwargs=True))
    hooks.append(layer.register_forward_hook(lambda m, a, k, o: recording.__setitem__(0, False), with_kwargs=True))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    for hook in hooks:
        hook.remove()
    seen: dict[int, tuple] = {}
    for t, where in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in shared and ptr not in seen:
            seen[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""), where)
    return sum(v[0] for v in seen.values()) / (batch * seq), list(seen.values())


def activation_rows(dtype: str = "bfloat16", attention: str = "sdpa", kv_heads: int = 8,
                    lora_rank: int | None = None, lora_dropout: float = 0.0, seq: int = 64,
                    gemma: bool = False) -> list[Row]:
    """One layer's saved activations per token vs the planner's per-layer term (`activations` with
    checkpointing off, divided by layers x tokens), LoRA adapters included when lora_rank is set."""
    spec = GEMMA_LAYER if gemma else {**LAYER, "num_key_value_heads": kv_heads}
    model = build(spec, getattr(torch, dtype), attention)
    layer = model.model.layers[1]
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, target_modules="all-linear", lora_dropout=lora_dropout))
    per_token, tensors = saved_per_token(model, layer, spec["vocab_size"], seq=seq)
    precision = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    gqa = "GQA 8/2" if kv_heads != 8 else "MHA"
    lora = f", LoRA r={lora_rank} dropout {lora_dropout}" if lora_rank is not None else ""
    if gemma:
        row = layer_row(f"one Gemma 3 layer, {precision}, {attention}, GQA 4/2", spec, per_token, len(tensors),
                        precision, attention, seq, None, 0.0)
        # Gemma3RMSNorm multiplies by (1 + weight.float()): that fp32 factor is saved once per call, whatever the
        # batch (4 B x h for each of the 4 norms, 4 B x head_dim for the q and k norms): not per token.
        constant = (4 * 4 * spec["hidden_size"] + 2 * 4 * spec["head_dim"]) / (2 * seq)
        return [replace(row, explained=round(constant), note=row.note + "; + the (1 + weight) fp32 factors of the "
                        "norms, saved once per call (per sequence batch, not per token)")]
    return [layer_row(f"one layer, {precision}, {attention}, {gqa}{lora}", spec, per_token, len(tensors),
                      precision, attention, seq, lora_rank, lora_dropout)]


def layer_row(case: str, spec: dict, per_token: float, storages: int, precision: str, attention: str, seq: int,
              lora_rank: int | None, lora_dropout: float, method: str | None = None) -> Row:
    method = method or ("full" if lora_rank is None else "lora")
    setup = Setup(method=method, micro_batch=2, seq_len=seq, precision=precision, activation_checkpointing=False,
                  attention=attention, lora_rank=lora_rank or 16)
    shape = shape_of(spec, "layer")
    planned = plan_memory(shape, setup)
    per_layer = planned.term("activations").bytes / shape.num_layers / setup.tokens
    explained, note = 0, f"{storages} saved storages"
    if lora_rank is not None:
        per_layer += planned.term("LoRA activations").bytes / shape.num_layers / setup.tokens
        inputs = sum(l.in_features for l in shape.linears())  # every linear adapted (all-linear)
        if lora_dropout == 0:  # nn.Identity: no mask; the planner assumes lora_dropout > 0 (jpadapt's 0.05)
            explained, note = -inputs, note + "; lora_dropout=0 keeps no mask: planner - 1 B x in per adapter"
        else:  # CPU dropout keeps an fp32 noise tensor (CUDA's fused native_dropout a 1-byte mask)
            explained, note = 3 * inputs, note + "; CPU dropout keeps a 4-byte mask (CUDA 1 B): + 3 B x in per adapter"
    return Row(case, "activations per layer per token", round(per_layer), round(per_token), 0.05, note, explained)


def qlora_activation_rows(folder: Path, lora_rank: int = 8, seq: int = 64) -> list[Row]:
    """One layer of an NF4 model with LoRA adapters: bitsandbytes' MatMul4Bit keeps only the packed weight."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(quantize(LAYER, folder, True), LoraConfig(r=lora_rank, target_modules="all-linear"))
    layer = model.base_model.model.model.layers[1]
    per_token, tensors = saved_per_token(model, layer, LAYER["vocab_size"], seq=seq)
    return [layer_row(f"one layer, NF4 base, sdpa, MHA, LoRA r={lora_rank} dropout 0.0", LAYER, per_token,
                      len(tensors), "bf16", "sdpa", seq, lora_rank, 0.0, method="qlora")]


def checkpoint_rows(seq: int = 64) -> list[Row]:
    """Activation checkpointing (transformers' activation_checkpointing_enable): what the whole layer stack keeps
    during the forward vs the planner's 'activations (checkpoints)' (each layer's input)."""
    spec = LAYER
    model = build(spec, torch.bfloat16)
    model.activation_checkpointing_enable()
    layers = model.model.layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared: set[int] = set()
    rotary = model.model.rotary_emb
    hook = rotary.register_forward_hook(lambda m, a, out: shared.update(t.untyped_storage().data_ptr() for t in out))
    recording, saved = [False], []
    h1 = layers[0].register_forward_pre_hook(lambda m, a, k: recording.__setitem__(0, True), with_kwargs=True)
    h2 = layers[-1].register_forward_hook(lambda m, a, k, o: recording.__setitem__(0, False), with_kwargs=True)
    ids = torch.randint(0, spec["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t if recording[0] else t, lambda t: t):
        model(input_ids=ids, labels=ids)
    for h in (hook, h1, h2):
        h.remove()
    measured = storage_bytes(t for t in saved if t.untyped_storage().data_ptr() not in params | shared)
    planned = plan_memory(shape_of(spec, "layer"), Setup(micro_batch=2, seq_len=seq, activation_checkpointing=True))
    return [Row("checkpointed layers, bf16, all layers", "activations (checkpoints)",
                planned.term("activations (checkpoints)").bytes, measured, 0.01, "each layer's input")]


def profiled_peak(fn) -> int:
    """Peak of live bytes the CPU allocator held during `fn()` (allocations minus frees, in order), measured on a
    second call: the first creates the parameter gradients a training step finds already there."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def logits_rows(dtype: str = "bfloat16", vocab: int = 4000, tokens: int = 512) -> list[Row]:
    """Peak live bytes of the training loss's output layer (`pipeline.training.output_nats`: lm_head + cross
    entropy in checkpointed chunks, what cpt and sft run) over forward and backward from given hidden states, from
    the profiler's allocation events (CPU allocator), after a warm-up step (the weight's .grad exists)."""

    from pipeline.training import LOGIT_CHUNK_ELEMENTS, output_nats

    spec = {**TINY, "vocab_size": vocab}
    model = build(spec, getattr(torch, dtype))
    hidden = torch.randn(2, tokens // 2, spec["hidden_size"], dtype=getattr(torch, dtype), requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=torch.Generator().manual_seed(3))

    def head() -> None:
        nats, count = output_nats(model, hidden, labels)
        (nats / count).backward()

    peak = profiled_peak(head)
    precision = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    planned = plan_memory(shape_of(spec, "head"), Setup(micro_batch=2, seq_len=tokens // 2, precision=precision))
    term = planned.term("logits and loss")
    # The planner counts every token; the last position of each sequence has no target (-2 rows here). When all
    # targets fit one chunk, the weight gradient is computed after the chunk's logit gradients are freed: not in
    # the peak (with several chunks each chunk's weight gradient is, as the planner counts it).
    targets = 2 * (tokens // 2 - 1)
    rows = min(tokens, LOGIT_CHUNK_ELEMENTS // vocab)
    explained = -(min(rows, tokens) - min(rows, targets)) * vocab * 12
    if targets <= rows:
        explained -= vocab * spec["hidden_size"] * planned.setup.weight_bytes
    return [Row(f"chunked logits + loss, {precision}, vocab {vocab:,}, {tokens} tokens", "logits and loss",
                term.bytes, peak, 0.01, term.formula, explained)]


# ------------------------------------------------------------------------------------------------- ZeRO


def zero_worker(stage: int, out: Path) -> None:
    """One rank of `torchrun --nproc_per_node 2 bench/planner_validation.py --zero-worker STAGE OUT`."""
    import deepspeed

    started = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    spec = ZERO
    model = build(spec, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # a torch optimizer: nothing to compile
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ready = time.perf_counter()
    held: dict[str, int | str | float] = {"rank": rank, "stage": stage, "optimizer": type(zero).__name__}
    buckets: list[int] = []
    if stage in (1, 2):  # the reduce buckets live during backward only: read them just before their release
        release = zero._release_ipg_buffers

        def recorded() -> None:
            buckets.append(storage_bytes(b for bucket in zero.ipg_buckets.values() for b in bucket.buffer))
            release()

        zero._release_ipg_buffers = recorded
    inner = zero.optimizer  # the torch AdamW over this rank's fp32 partition

    def before_step(opt, args, kwargs) -> None:
        held["master weights"] = storage_bytes(p for g in opt.param_groups for p in g["params"])
        held["fp32 gradients (optimizer step)"] = storage_bytes(p.grad for g in opt.param_groups for p in g["params"])

    inner.register_step_pre_hook(before_step)
    ids = torch.randint(0, spec["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    params = list(engine.module.parameters())
    if stage == 3:
        held["gradients"] = storage_bytes([zero.grad_partitions_flat_buffer])
        held["ZeRO buckets"] = storage_bytes(b.buffer for b in zero.ipg_buckets.values())
    elif stage == 2:
        held["gradients"] = storage_bytes(t for group in zero.averaged_gradients.values() for t in group)
    engine.step()
    if buckets:
        held["ZeRO buckets"] = max(buckets)
    held["optimizer states"] = storage_bytes(state_tensors(inner))
    if stage == 3:
        held["weights"] = storage_bytes([*(p.ds_tensor for p in params), *(p.data for p in params)])
        held["persistent values"] = sum(p.ds_numel for p in params if p.ds_persist)
    else:
        held["weights"] = storage_bytes(p.data for p in params)
    held["params"] = sum(p.ds_numel if stage == 3 else p.numel() for p in params)
    held["setup_s"] = ready - started
    held["step_s"] = time.perf_counter() - ready
    (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(held))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # DeepSpeed's ZeRO-3 background threads can abort the interpreter's teardown now and then ("terminate called
    # without an active exception", SIGABRT): the results are written, so leave without C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_zero(stage: int, workdir: Path, port: int) -> tuple[list[dict], float]:
    """Launch 2 ranks with torchrun; return each rank's JSON and the wall time."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = workdir / f"zero{stage}"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), __file__, "--zero-worker", str(stage), str(out)],
                            env=env, capture_output=True, text=True, timeout=900, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"ZeRO-{stage} run failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return [json.loads((workdir / f"zero{stage}.rank{r}.json").read_text()) for r in range(2)], wall


ZERO_TERMS = ("weights", "gradients", "master weights", "optimizer states", "fp32 gradients (optimizer step)",
              "ZeRO buckets")


def zero_rows(stage: int, ranks: list[dict]) -> list[Row]:
    planned = plan(ZERO, "zero", method="full", gpus=2, zero_stage=stage, precision="bf16")
    rows = []
    for held in ranks:
        case = f"ZeRO-{stage}, 2 ranks, bf16, rank {held['rank']}"
        for term in ZERO_TERMS:
            if term not in held:
                continue
            name = "ZeRO-3 reduce bucket" if term == "ZeRO buckets" and stage == 3 else term
            if name not in {t.name for t in planned.terms}:
                continue
            note, explained = "", 0
            if term == "gradients" and stage == 2:
                extra = straddled_values(_param_tensors(shape_of(ZERO, "zero")), 2, held["rank"])
                note = (f"bf16 gradients after backward: + {extra:,} values of the parameter straddling the "
                        "partition boundary, kept whole on both ranks")
                explained = 2 * extra
            if term == "weights" and stage == 3:
                note = f"partitions + {held['persistent values']:,} persistent values whole"
            rows.append(Row(case, name, planned.term(name).bytes, held[term], 0.01, note, explained))
    return rows


def straddled_values(tensors: list[int], ranks: int, rank: int, alignment: int = 2) -> int:
    """Values of the tensors that cross `rank`'s partition boundary but lie outside it. DeepSpeed ZeRO-2 keeps
    such a parameter's whole bf16 gradient on every rank it touches (params_in_partition), so a rank holds
    ceil(P / N) + this many gradient values. The flat buffer is padded to a multiple of alignment x ranks
    (nccl_start_alignment_factor = 2) and cut into equal partitions, in the parameters' order."""
    total = sum(tensors)
    part = math.ceil(total / (alignment * ranks)) * alignment
    lo, hi = rank * part, (rank + 1) * part
    extra, start = 0, 0
    for n in tensors:
        end = start + n
        inside = max(0, min(end, hi) - max(start, lo))
        if 0 < inside < n:
            extra += n - inside
        start = end
    return extra


# ------------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_estimates(params: int, largest_layer: int, gpus_per_node: int, nodes: int = 1) -> dict[str, int]:
    """DeepSpeed's estimators, no offload: per-GPU bytes and per-CPU bytes (additional_buffer_factor 1.5)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False,
                                                       additional_buffer_factor=1.5)
    cpu3, gpu3, largest = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes,
                                                               cpu_offload=False, cpu_offload_params=False,
                                                               zero_init=True, additional_buffer_factor=1.5)
    return {"zero2_gpu": gpu2, "zero2_cpu": cpu2, "zero3_gpu": gpu3, "zero3_cpu": cpu3, "zero3_largest": largest}


MODEL_STATE_TERMS = ("weights", "gradients", "master weights", "optimizer states")


def model_states(memory: MemoryPlan, with_fp32_gradients: bool = False) -> int:
    names = MODEL_STATE_TERMS + (("fp32 gradients (optimizer step)",) if with_fp32_gradients else ())
    return sum(t.bytes for t in memory.terms if t.name in names)


def largest_layer_params(shape: ModelShape) -> int:
    """DeepSpeed's model_to_params: the most parameters any one module owns directly (the embedding or the
    lm_head for these models)."""
    return max([shape.embedding_params, shape.lm_head_params, *(l.params for l in shape.linears())])


def deepspeed_rows(shape: ModelShape, gpus: int) -> list[Row]:
    """The planner's model states (with the fp32 gradient partition that DeepSpeed's estimators count) vs theirs.

    ZeRO-2: the same sum, 2P + 18P/N. ZeRO-3: DeepSpeed = 4 x largest layer + 18P/N; the planner = 20 x ceil(P/N)
    + 2 x persistent values (bf16 weights 2 + bf16 gradient partition 2 + master 4 + Adam 8 + fp32 gradients 4,
    and the tensors under the persistence threshold whole): the explained difference is 4 x largest layer
    - 2 x ceil(P/N) - 2 x persistent, what is left is rounding (int vs ceil)."""
    largest = largest_layer_params(shape)
    ds = deepspeed_estimates(shape.total_params, largest, gpus)
    z2 = plan_memory(shape, Setup(method="full", gpus=gpus, zero_stage=2))
    z3 = plan_memory(shape, Setup(method="full", gpus=gpus, zero_stage=3))
    part = math.ceil(shape.total_params / gpus)
    persistent = sum(t for t in _param_tensors(shape) if t < 100_000)
    case = f"{shape.name}, {gpus} GPUs, DeepSpeed estimator (no offload)"
    return [
        Row(case, "ZeRO-2 model states", model_states(z2, True), ds["zero2_gpu"], 1e-8,
            "planner 2P + (2 + 4 + 8 + 4) ceil(P/N) = DeepSpeed 2P + int(18P/N)"),
        Row(case, "ZeRO-3 model states", model_states(z3, True), ds["zero3_gpu"], 1e-8,
            f"DeepSpeed adds 4 x largest layer ({largest:,}); leaves out the bf16 gradient partition (2 x "
            f"{part:,}) and the {persistent:,} persistent values (2 B each)",
            4 * largest - 2 * part - 2 * persistent),
    ]


# ------------------------------------------------------------------------------------------------- report


def markdown(rows: list[Row], timings: dict[str, float], ds_text: list[str]) -> str:
    lines = [
        "# Planner validation on CPU",
        "",
        (f"Machine: CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}. "
        "Produced by `python bench/planner_validation.py`; error = planner / measured - 1."),
        "",
        "| case | term | planner bytes | measured bytes | error | explained bytes | residual | ok | note |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.case} | {r.term} | {r.planner:,} | {r.measured:,} | {100 * r.error:+.3f}% | "
                     f"{r.explained:+,} | {100 * r.residual:+.4f}% | {'yes' if r.ok else 'NO'} "
                     f"(±{100 * r.tolerance:g}%) | {r.note} |")
    lines += ["", "## Timings", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in timings.items()]
    lines += ["", ("The first ZeRO run on a machine also builds DeepSpeed's shared-memory op (measured: +25 s on this "
              "machine, cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).")]
    lines += ["", *ds_text, "", "## What the measurements changed in the planner, and what they show", "",
              *FINDINGS, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "planner-validation-cpu.md")
    parser.add_argument("--skip-zero", action="store_true", help="leave out the 2-process ZeRO runs")
    parser.add_argument("--zero-worker", nargs=2, metavar=("STAGE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zero_worker:
        zero_worker(int(args.zero_worker[0]), Path(args.zero_worker[1]))
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def timed(label: str, fn, *a, **k):
        started = time.perf_counter()
        out = fn(*a, **k)
        timings[label] = time.perf_counter() - started
        return out

    for name in ("tiny", "mid"):
        for precision in ("fp32", "bf16"):
            rows += timed(f"full {precision} {name}", full_rows, name, precision)
        rows += timed(f"LoRA {name}", lora_rows, name)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tiny", "mid"):
            rows += timed(f"QLoRA {name}", qlora_rows, name, Path(tmp) / name)
        rows += timed("NF4 without double quant mid", qlora_rows, "mid", Path(tmp) / "mid", double_quant=False,
                      train=False)
        rows += timed("activations NF4 + LoRA", qlora_activation_rows, Path(tmp) / "layer")
    for kwargs in ({}, {"kv_heads": 2}, {"attention": "eager"}, {"attention": "eager", "kv_heads": 2},
                   {"dtype": "float32", "kv_heads": 2}, {"lora_rank": 8}, {"lora_rank": 8, "lora_dropout": 0.05},
                   {"gemma": True}):
        rows += timed("activations " + ",".join(f"{k}={v}" for k, v in kwargs.items()), activation_rows, **kwargs)
    rows += timed("checkpointed activations", checkpoint_rows)
    for dtype in ("bfloat16", "float32"):
        rows += timed(f"logits {dtype}", logits_rows, dtype)
        rows += timed(f"logits {dtype} vocab 151,936", logits_rows, dtype, vocab=151_936, tokens=1024)
    if not args.skip_zero:
        with tempfile.TemporaryDirectory() as tmp:
            for stage in (1, 2, 3):
                ranks, wall = run_zero(stage, Path(tmp), 29500 + 17 * stage)
                timings[f"ZeRO-{stage} 2-process run (torchrun wall)"] = wall
                timings[f"ZeRO-{stage} DeepSpeed init (rank 0)"] = ranks[0]["setup_s"]
                rows += zero_rows(stage, ranks)
    from pipeline.planner.presets import resolve_model

    ds_text = ["## DeepSpeed's estimators (no offload, per GPU)", ""]
    for model, gpus in (("llama2-7b", 8), ("llama2-7b", 64), ("qwen2.5-7b", 8)):
        shape = resolve_model(model)
        rows += deepspeed_rows(shape, gpus)
    ds_text += DEEPSPEED_DIFFERENCES
    timings["all of the above (wall)"] = time.perf_counter() - started
    text = markdown(rows, timings, ds_text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0 if all(r.ok for r in rows) else 1


DEEPSPEED_DIFFERENCES = [
    ("- ZeRO-2, no offload: DeepSpeed `2P + int(18P/N)` = bf16 weights (2P) + bf16 gradients, fp32 gradients, "
    "fp32 master weights and Adam moments (2 + 4 + 4 + 8 per parameter, partitioned). The planner's terms sum "
    "to the same: weights 2P, gradients 2 ceil(P/N), master 4 ceil(P/N), optimizer 8 ceil(P/N), fp32 gradients "
    "(optimizer step) 4 ceil(P/N); the rows differ only by the rounding of ceil and int."),
    ("- ZeRO-3, no offload: DeepSpeed `4 x largest_layer + int(18P/N)`. The 2-rank run holds 20 B per parameter "
    "partition: bf16 weights (ds_tensor, 2), the bf16 gradient partition (grad_partitions_flat_buffer, 2), fp32 "
    "master (4), Adam (8) and the fp32 gradients of the step (4): the estimator leaves out one 2-byte "
    "term (2P/N). Its `4 x largest_layer` is the gathered bf16 weights + gradients of the largest module; the "
    "planner counts gathering as 'ZeRO-3 gathered parameters' (max_live_parameters + prefetch bucket), outside "
    "the model states, plus the tensors under the persistence threshold kept whole."),
    ("- CPU side: `P x 4 x gpus_per_node x 1.5` (ZeRO-2) / `largest_layer x 4 x gpus_per_node x 1.5` (ZeRO-3 with "
    "zero_init) is host memory to load the fp32 model in every process with a 1.5 safety factor; the planner "
    "plans GPU memory and offloaded states only, not model loading. additional_buffer_factor never applies to GPU "
    "memory."),
    ("- With optimizer offload DeepSpeed puts nothing but the bf16 weights on the GPU (2P for ZeRO-2): gradients "
    "are copied to the fp32 partition on the CPU during backward. The planner keeps the bf16 gradient "
    "partition on the GPU (2 ceil(P/N) more, conservative)."),
]


FINDINGS = [
    ("- Activations: transformers 5's LlamaRMSNorm upcasts its input to fp32 and saves it (4 B x h, not w x h), its "
    "fp32 rsqrt (4 B per token) and the normalized input cast back (w x h) for the weight's gradient. The old "
    "formula (2 w h per norm) was 17% low on a bf16 layer; the new one matches SDPA/eager, MHA/GQA, bf16/fp32 "
    "to the byte. With frozen weights (LoRA, QLoRA) the linears and norm multiplies keep nothing for weight "
    "gradients: no projection inputs, no normalized copy, no down_proj input (the old formula counted them: "
    "+7% on the LoRA layer). Eager attention keeps q and k, v repeated to every head, the fp32 softmax and its w "
    "copy per key, and o_proj's input (the old formula left out the fp32 softmax and the repeated k/v: -20%)."),
    ("- LoRA activations per adapted linear: the fp32 copy of its input (4 B x in) and x A (4 B x r); with "
    "lora_dropout > 0 a mask: 1 B x in on CUDA (fused native_dropout), but 4 B x in on the CPU (dropout there "
    "multiplies by an fp32 noise tensor). The planner keeps CUDA's 1 B (jpadapt's sft.lora_dropout is 0.05); the "
    "rows subtract or add exactly that difference."),
    ("- Logits + loss: the peak is in the loss's backward, 12 B per logit (saved fp32 log-probabilities, their "
    "gradient from nll_loss, log_softmax's input gradient), not 10 (bf16) or 8 (fp32): the forward peak, logits + "
    "fp32 copy + log-probabilities, is 10 B in bf16. Training now runs the output layer in checkpointed chunks of "
    "2**26 logits (bench/results/cpt_loss_memory-cpu.md): the term is one chunk at 12 B per logit + the chunk's "
    "output-layer weight gradient + the scored hidden states and their gradient, not tokens x vocab x 12 B."),
    ("- NF4: each quantized weight's QuantState owns its 16-entry NF4 table, and with double quantization the "
    "fp32 offset and the 256-entry 8-bit map (1,092 B a tensor, no sharing): 13% of the constants of the 58M "
    "model, now in the formula; the absmax blocks are rounded up per tensor."),
    ("- bitsandbytes 0.50 8-bit AdamW: absmax per 256 values (not 2048), tensors under 4,096 values keep fp32 "
    "moments (every LoRA tensor of a hidden-64 model), two shared 2 KB maps. The old term was 1.5% low on the "
    "58M model and 75% low on the tiny one."),
    ("- DeepSpeed (measured on the 2-rank runs): the fp32 gradient partition built for the optimizer step "
    "(4 B x ceil(P/N), freed after it) is a new term for mixed precision under ZeRO; ZeRO-3 keeps tensors under "
    "100,000 values whole on every rank besides their partition (now in the weights term); the gradient reduce "
    "bucket is allocated at its full 5e8 values (1 GB in bf16) whatever the model's size, once (overlap_comm is "
    "off by default for ZeRO-1/2): the old 2 x min(5e8, P) was 92% low for this model and 2x high for a 7B one. "
    "A parameter straddling the ZeRO-2 partition boundary keeps its whole bf16 gradient on both ranks (+2.5% on "
    "rank 0 here; up to one tensor in general); the planner keeps ceil(P/N) and the rows count the straddler."),
    ("- Not planned, measured: PEFT's prepare_model_for_kbit_training casts every non-quantized weight (embeddings, "
    "lm_head, norms) to fp32: 65,553,408 -> 131,106,816 B on the 58M model; the planner's 'weights (bf16, not "
    "quantized)' holds only if the SFT stage does not call it (or casts back)."),
    ("- CPU vs GPU: the byte counts are the tensors' sizes, which CUDA's caching allocator also allocates; on the "
    "CPU the 1 GB reduce bucket is virtual until touched. CUDA kernels that differ from the CPU ones: dropout "
    "(above) and SDPA (flash/efficient on CUDA keep the same q, k, v, output and fp32 log-sum-exp as the CPU flash "
    "kernel; efficient attention pads the log-sum-exp to 32 queries). The framework overhead term (CUDA "
    "context, workspaces) cannot be measured here."),
]


if __name__ == "__main__":
    sys.exit(main())
