"""Plans for the stages of a pipeline YAML (cpt, sft, evaluate), and their JSON and Markdown forms.

`stage_setups(cfg)` is what `cpt` and `sft` call before launching (`check_fits`), so a run that cannot fit is
refused before any GPU time is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.errors import JpadaptError
from pipeline.planner.compute import Compute, Suggestion, advise, fit_table, fits, plan_compute
from pipeline.planner.gpus import CATALOG, GIB, GPU, gpu
from pipeline.planner.memory import MemoryPlan, Setup, plan_memory
from pipeline.planner.presets import resolve_model
from pipeline.planner.shapes import ModelShape, shape_from_hf_config


@dataclass(frozen=True)
class StagePlan:
    stage: str
    memory: MemoryPlan
    gpu: GPU
    compute: Compute | None
    advice: list[Suggestion]
    table: dict[str, dict[int, float]]

    @property
    def fits(self) -> bool:
        return fits(self.memory, self.gpu)

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "gpu": self.gpu.key,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "fits": self.fits,
            "memory": self.memory.to_dict(),
            "compute": None if self.compute is None else self.compute.to_dict(),
            "advice": [{"change": a.change, "gib": a.gib} for a in self.advice],
            "gib_per_gpu_by_catalog": {k: {str(n): v for n, v in row.items()} for k, row in self.table.items()},
        }


def model_shape(cfg: PipelineConfig) -> ModelShape:
    """The model the pipeline trains: preset, local config.json, or from_config; with the extended vocabulary."""
    model = cfg.model
    if model.preset is not None:
        shape = resolve_model(model.preset)
    elif model.path is not None:
        shape = resolve_model(model.path)
    elif model.from_config is not None:
        shape = shape_from_hf_config(model.from_config, "model.from_config")
    else:
        raise JpadaptError("plan needs the model's architecture: set model.preset, model.path or model.from_config")
    if cfg.enabled("extend_vocab"):
        pad = cfg.extend_vocab.pad_to_multiple_of
        shape = shape.with_vocab(math.ceil((shape.vocab_size + cfg.extend_vocab.new_tokens) / pad) * pad)
    return shape


def stage_setups(cfg: PipelineConfig) -> dict[str, tuple[Setup, int | None, int]]:
    """{stage: (setup, training tokens or None, nodes)} for the enabled stages the planner covers."""
    return {stage: stage_setup(cfg, stage) for stage in _SETUPS if cfg.enabled(stage)}


def stage_setup(cfg: PipelineConfig, stage: str) -> tuple[Setup, int | None, int]:
    """(setup, training tokens or None, nodes) of one stage, read from that stage's section alone: a stage's
    own plan check must not read the other stages' settings, which are not part of its fingerprint."""
    return _SETUPS[stage](cfg)


def _cpt_setup(cfg: PipelineConfig) -> tuple[Setup, int | None, int]:
    c = cfg.cpt
    gpus = c.num_gpus * c.num_nodes
    setup = Setup(method="full", micro_batch=c.micro_batch_size, seq_len=c.seq_len, gpus=gpus,
                  zero_stage=c.zero_stage, precision=c.precision, optimizer="adamw",
                  activation_checkpointing=c.gradient_checkpointing, offload_optimizer=c.offload_optimizer,
                  offload_params=c.offload_params)
    tokens = c.train_tokens or c.max_steps * c.micro_batch_size * c.grad_accum * gpus * c.seq_len
    return setup, tokens, c.num_nodes


def _sft_setup(cfg: PipelineConfig) -> tuple[Setup, int | None, int]:
    s = cfg.sft
    targets = None if s.target_modules == "all-linear" else tuple(s.target_modules)
    setup = Setup(method="qlora" if s.quantization == "nf4" else "lora", micro_batch=s.micro_batch_size,
                  seq_len=s.max_seq_len, gpus=s.num_gpus * s.num_nodes, zero_stage=s.zero_stage,
                  precision=s.precision, optimizer=s.optimizer,
                  lora_rank=s.lora_r, lora_targets=targets,
                  activation_checkpointing=s.gradient_checkpointing)
    tokens = (s.max_steps * s.micro_batch_size * s.grad_accum * s.num_gpus * s.num_nodes * s.max_seq_len
              if s.max_steps else None)
    return setup, tokens, s.num_nodes


def _evaluate_setup(cfg: PipelineConfig) -> tuple[Setup, int | None, int]:
    return Setup(method="inference", micro_batch=cfg.evaluate.batch_size, seq_len=cfg.evaluate.window), None, 1


_SETUPS = {"cpt": _cpt_setup, "sft": _sft_setup, "evaluate": _evaluate_setup}

# The keys each setup above reads: the plan stage fingerprints exactly these (its ConfigView refuses a read of any
# other), so a port, a checkpoint interval or a learning rate does not make the plan stale.
SETUP_KEYS: dict[str, tuple[str, ...]] = {
    "cpt": ("num_gpus", "num_nodes", "micro_batch_size", "seq_len", "zero_stage", "precision", "gradient_checkpointing",
            "offload_optimizer", "offload_params", "train_tokens", "max_steps", "grad_accum"),
    "sft": ("target_modules", "quantization", "micro_batch_size", "max_seq_len", "num_gpus", "num_nodes", "zero_stage",
            "precision", "optimizer", "lora_r", "gradient_checkpointing", "max_steps", "grad_accum"),
    "evaluate": ("batch_size", "window"),
}
# model_shape: the extended vocabulary's size.
VOCAB_KEYS = ("extend_vocab.enabled", "extend_vocab.new_tokens", "extend_vocab.pad_to_multiple_of")


def planned_keys() -> tuple[str, ...]:
    """Every config key the plan stage reads, dotted."""
    setups = [f"{stage}.{key}" for stage, keys in SETUP_KEYS.items() for key in ("enabled", *keys)]
    return ("model", "plan", *VOCAB_KEYS, *setups)


def plan_stage(stage: str, shape: ModelShape, setup: Setup, tokens: int | None, nodes: int, target: GPU,
               mfu: float, price: float) -> StagePlan:
    memory = plan_memory(shape, setup)
    compute = None if tokens is None else plan_compute(shape, setup, tokens, target, mfu, price, nodes)
    advice = [] if fits(memory, target) else advise(shape, setup, target)
    return StagePlan(stage, memory, target, compute, advice, fit_table(shape, setup))


def plan_pipeline(cfg: PipelineConfig) -> list[StagePlan]:
    shape = model_shape(cfg)
    settings = cfg.plan
    target = gpu(settings.gpu)
    return [
        plan_stage(stage, shape, setup, tokens, nodes, target, settings.mfu, settings.price_per_gpu_hour)
        for stage, (setup, tokens, nodes) in stage_setups(cfg).items()
    ]


def check_fits(cfg: PipelineConfig, stage: str) -> StagePlan | None:
    """Refuse a stage that cannot fit on the configured GPU (cpt and sft call this before launching)."""
    if stage not in _SETUPS or cfg.plan is None:
        return None
    setup, tokens, nodes = stage_setup(cfg, stage)
    result = plan_stage(stage, model_shape(cfg), setup, tokens, nodes, gpu(cfg.plan.gpu), cfg.plan.mfu,
                        cfg.plan.price_per_gpu_hour)
    if not result.fits:
        need = result.memory.gpu_bytes / GIB
        hint = f"; it would fit with: {result.advice[0].change}" if result.advice else ""
        raise JpadaptError(f"{stage} needs ~{need:.1f} GiB per GPU, more than a {result.gpu.name} has "
                           f"({result.gpu.memory_bytes / GIB:.1f} GiB){hint} (run `jpadapt plan` for the breakdown, "
                           f"or --force to try anyway)")
    return result


# ---------------------------------------------------------------------------------------------- markdown


def render_markdown(plans: list[StagePlan], title: str = "Memory and compute plan") -> str:
    lines = [f"# {title}", ""]
    if not plans:
        return "\n".join([*lines, "No enabled stage needs a plan (cpt, sft and evaluate are off).", ""])
    shape = plans[0].memory.shape
    lines += [(f"Model: **{shape.name}**, {shape.total_params:,} parameters ({shape.num_layers} layers, hidden "
              f"{shape.hidden_size}, {shape.num_heads} heads / {shape.num_kv_heads} KV heads, vocabulary "
              f"{shape.vocab_size:,}, embeddings {'tied' if shape.tie_embeddings else 'untied'})."), ""]
    for plan in plans:
        lines += _stage_markdown(plan)
    return "\n".join(lines) + "\n"


def _stage_markdown(plan: StagePlan) -> list[str]:
    s = plan.memory.setup
    verdict = "fits" if plan.fits else "**does not fit**"
    need = plan.memory.gpu_bytes / GIB
    lines = [
        (f"## {plan.stage}: {s.method}, {s.gpus} GPU(s), ZeRO-{s.zero_stage}, micro batch {s.micro_batch} x "
        f"{s.seq_len:,} tokens"),
        "",
        f"{need:.2f} GiB per GPU: {verdict} on one {plan.gpu.name} ({plan.gpu.memory_bytes / GIB:.1f} GiB).",
        "",
        "| term | bytes | GiB | formula | what |",
        "|:---|---:|---:|:---|:---|",
    ]
    for term in plan.memory.terms:
        where = " (CPU)" if term.on_cpu else ""
        lines.append(f"| {term.name}{where} | {term.bytes:,} | {term.gib:.3f} | {term.formula} | {term.note} |")
    lines += [f"| **total on each GPU** | **{plan.memory.gpu_bytes:,}** | **{need:.3f}** | | |", ""]
    if plan.advice:
        lines += ["Cheapest changes that make it fit:", ""]
        lines += [f"- {a.change}: {a.gib:.2f} GiB" for a in plan.advice] + [""]
    if plan.compute is not None:
        c = plan.compute
        lines += [
            (f"Compute: {c.tokens:,} tokens x {c.flops_per_token:.3e} FLOPs/token ({c.formula}) = {c.flops:.3e} "
            f"FLOPs; at {c.mfu:.0%} MFU on {s.gpus} x {plan.gpu.name}: {_duration(c.hours)}, {c.gpu_hours:,.2f} "
            f"GPU-hours, {_money(c.cost)} at ${c.price_per_gpu_hour}/GPU-hour."),
            "",
        ]
        if c.note:
            lines += [f"Interconnect: {c.note}.", ""]
    counts = sorted({n for row in plan.table.values() for n in row})
    sharding = ("ZeRO-0 replicates everything on each GPU, so more GPUs add throughput, not memory"
                if s.zero_stage == 0 else f"ZeRO-{s.zero_stage} as configured, partitioned over the GPU count")
    lines += [f"GiB per GPU on each GPU kind (x: does not fit; {sharding}):", "",
              "| GPU | memory GiB | " + " | ".join(f"{n} GPU" for n in counts) + " |",
              "|:---|---:|" + "---:|" * len(counts)]
    for key, row in plan.table.items():
        memory = CATALOG[key].memory_bytes / GIB
        cells = [f"{row[n]:.1f}" + ("" if row[n] <= memory else " x") if n in row else "" for n in counts]
        lines.append(f"| {key} | {memory:.1f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.1f} s"
    if hours < 2:
        return f"{seconds / 60:.1f} min"
    return f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} days"


def _money(amount: float) -> str:
    return f"${amount:,.2f}" if amount < 100 else f"${amount:,.0f}"


def write_outputs(plans: list[StagePlan], out_dir: Path) -> None:
    import json

    (out_dir / "plan.json").write_text(json.dumps([p.to_dict() for p in plans], indent=1) + "\n", encoding="utf-8")
    (out_dir / "plan.md").write_text(render_markdown(plans), encoding="utf-8")
