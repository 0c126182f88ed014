"""Training compute, time and cost, and the cheapest changes that make a step fit.

FLOPs per token: full training 6·N (forward 2·N, backward 4·N: activation and weight gradients); a frozen base
(LoRA, QLoRA) skips the weight gradients, 4·N, plus 6 per adapter parameter; activation checkpointing repeats
the forward, +2·N; attention scores add 12·L·d·s per token for training (PaLM's MFU convention), 4·L·d·s for
a forward. Time = FLOPs / (GPUs x dense bf16 peak x MFU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from pipeline.errors import JpadaptError
from pipeline.planner.gpus import CATALOG, GPU
from pipeline.planner.memory import MemoryPlan, Setup, plan_memory
from pipeline.planner.shapes import ModelShape

# ZeRO-3 moves every parameter three times per step (gather for forward, gather for backward, reduce-scatter
# of gradients); ZeRO-1/2 twice (reduce-scatter gradients, gather updated weights), as an all-reduce does.
ZERO_TRAFFIC = {0: 2, 1: 2, 2: 2, 3: 3}
INTER_NODE_GBPS = 50.0  # a 400 Gb/s InfiniBand link per GPU, in GB/s


@dataclass(frozen=True)
class Compute:
    tokens: int
    flops_per_token: float
    flops: float
    formula: str
    gpu: str
    mfu: float
    hours: float
    gpu_hours: float
    cost: float
    price_per_gpu_hour: float
    communication_gb_per_step: float
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def flops_per_token(shape: ModelShape, setup: Setup) -> tuple[float, str]:
    n, layers, d, seq = shape.total_params, shape.num_layers, shape.q_dim, setup.seq_len
    if setup.method == "inference":
        return 2 * n + 4 * layers * d * seq, f"2·N + 4·L·d·s = 2·{n:,} + 4·{layers}·{d}·{seq}"
    recompute = 2 * n if setup.activation_checkpointing else 0
    if setup.method == "full":
        base, text = 6 * n, f"6·N = 6·{n:,}"
    else:
        lora = shape.lora_params(setup.lora_rank, setup.lora_targets)
        base, text = 4 * n + 6 * lora, f"4·N + 6·N_lora = 4·{n:,} + 6·{lora:,}"
    attention = 12 * layers * d * seq
    text += f" + 12·L·d·s (12·{layers}·{d}·{seq})" + (" + 2·N (recompute)" if recompute else "")
    return base + attention + recompute, text


def plan_compute(shape: ModelShape, setup: Setup, tokens: int, gpu: GPU, mfu: float,
                 price_per_gpu_hour: float, nodes: int = 1) -> Compute:
    per_token, formula = flops_per_token(shape, setup)
    flops = per_token * tokens
    seconds = flops / (setup.gpus * gpu.bf16_tflops * 1e12 * mfu)
    hours = seconds / 3600
    traffic = 0.0
    note = ""
    if setup.method != "inference" and setup.gpus > 1:
        moved = shape.total_params if setup.method == "full" else shape.lora_params(setup.lora_rank, setup.lora_targets)
        traffic = ZERO_TRAFFIC[setup.zero_stage] * moved * setup.weight_bytes / 1e9
        if nodes > 1:
            note = (f"across {nodes} nodes each step moves ~{traffic:,.1f} GB per GPU over the interconnect "
                    f"(~{traffic / INTER_NODE_GBPS:.2f} s at {INTER_NODE_GBPS:.0f} GB/s per GPU): ZeRO-3 across "
                    "nodes needs a fast fabric (InfiniBand/EFA), or use ZeRO-2 within nodes")
    return Compute(tokens, per_token, flops, formula, gpu.key, mfu, hours, hours * setup.gpus,
                   hours * setup.gpus * price_per_gpu_hour, price_per_gpu_hour, traffic, note)


# ---------------------------------------------------------------------------------------------- verdicts


def fits(plan: MemoryPlan, gpu: GPU) -> bool:
    return plan.gpu_bytes <= gpu.memory_bytes


def fit_table(shape: ModelShape, setup: Setup, counts: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, dict[int, float]]:
    """GiB per GPU for each catalog GPU and GPU count (the count changes only sharded terms)."""
    rows: dict[str, dict[int, float]] = {}
    for key in CATALOG:
        rows[key] = {}
        for count in counts:
            if setup.method == "inference" and count > 1:
                continue
            plan = plan_memory(shape, replace(setup, gpus=count))
            rows[key][count] = plan.gpu_bytes / 2**30
    return rows


@dataclass(frozen=True)
class Suggestion:
    change: str
    setup: Setup
    gib: float


def advise(shape: ModelShape, setup: Setup, gpu: GPU, limit: int = 3) -> list[Suggestion]:
    """The cheapest single or paired changes that make the step fit on `gpu`, cheapest first.

    Order of preference: free (activation checkpointing, smaller micro batch with more accumulation), then
    sharding (ZeRO), then slower (offload), then different results (8-bit optimizer, QLoRA), then more GPUs.
    """
    found: list[Suggestion] = []
    seen: set[Setup] = set()
    for first_text, first in _changes(setup):
        for text, candidate in [(first_text, first), *[(f"{first_text}, {t}", c) for t, c in _changes(first)]]:
            if candidate in seen:
                continue
            seen.add(candidate)
            plan = plan_memory(shape, candidate)
            if fits(plan, gpu):
                found.append(Suggestion(text, candidate, plan.gpu_bytes / 2**30))
                break
        if len(found) >= limit:
            break
    return found


def _changes(s: Setup) -> list[tuple[str, Setup]]:
    options: list[tuple[str, Setup]] = []

    def add(text: str, **kwargs) -> None:
        try:
            options.append((text, replace(s, **kwargs)))
        except JpadaptError:  # a change that makes an invalid setup (e.g. offload without ZeRO) is no option
            pass

    if not s.activation_checkpointing:
        add("turn on activation checkpointing", activation_checkpointing=True)
    if s.micro_batch > 1:
        add(f"micro batch {s.micro_batch // 2} with twice the gradient accumulation", micro_batch=s.micro_batch // 2)
    if s.gpus > 1 and s.zero_stage < 3 and not (s.method == "qlora" and s.zero_stage >= 2):
        add(f"ZeRO-{s.zero_stage + 1}", zero_stage=s.zero_stage + 1)
    if s.zero_stage >= 1 and not s.offload_optimizer:
        add("offload the optimizer to CPU", offload_optimizer=True)
    if s.zero_stage == 0 and s.method != "inference":
        # ZeRO-Offload: even on one GPU, DeepSpeed can keep the fp32 master weights and Adam states in CPU memory.
        add("ZeRO-2 with the optimizer offloaded to CPU (ZeRO-Offload)", zero_stage=2, offload_optimizer=True)
    if s.zero_stage == 3 and not s.offload_params:
        add("offload the parameters to CPU", offload_params=True)
    if s.method in ("lora", "qlora") and s.optimizer == "adamw":
        add("paged 8-bit AdamW", optimizer="paged_adamw_8bit")
    if s.method == "lora" and s.zero_stage < 3:
        add("QLoRA (4-bit base) instead of LoRA", method="qlora")
    if s.method == "full":
        add("LoRA instead of full training", method="lora", zero_stage=min(s.zero_stage, 2))
    if s.method != "inference":
        add(f"{s.gpus * 2} GPUs", gpus=s.gpus * 2, zero_stage=s.zero_stage or (3 if s.method == "full" else 2))
    return options
