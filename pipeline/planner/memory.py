"""Per-GPU memory of a training or inference step, term by term, each with its formula.

The model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020): with mixed precision and Adam,
16 bytes per parameter = bf16 weights (2) + bf16 gradients (2) + fp32 master weights (4) + fp32 Adam moments
(4 + 4); ZeRO-1 partitions the optimizer states (master weights and moments) over the data-parallel ranks,
ZeRO-2 also the gradients, ZeRO-3 also the weights. Activations follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), rewritten for LLaMA-style layers (RMSNorm, rotary,
SwiGLU, grouped-query attention, no dropout) and SDPA/flash attention, which keeps no s x s score matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from pipeline.errors import JpadaptError
from pipeline.planner.gpus import GIB
from pipeline.planner.shapes import ModelShape

Method = Literal["full", "lora", "qlora", "inference"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]

# bitsandbytes NF4: 4-bit codes + one absmax per 64-weight block. Without double quantization the absmax is
# fp32 (32/64 = 0.5 bit per weight); with it, 8-bit absmax + one fp32 constant per 256 blocks
# (8/64 + 32/(64*256) = 0.127 bit per weight), as in the QLoRA paper.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
# 8-bit optimizers (bitsandbytes) keep each moment in 1 byte plus one fp32 absmax per 2048-value block.
OPT8_BLOCK = 2048
# DeepSpeed defaults (bucket sizes in elements) that set its communication buffers.
ZERO12_BUCKET = 500_000_000
ZERO3_PREFETCH_BUCKET = 50_000_000
ZERO3_MAX_LIVE_PARAMS = 1_000_000_000
# CUDA context, cuBLAS/cuDNN workspaces and allocator slack: a fixed allowance until calibrated on a GPU.
DEFAULT_OVERHEAD_GIB = 1.5


@dataclass(frozen=True)
class Setup:
    """How the step is run. `gpus` is the number of data-parallel ranks (all nodes)."""

    method: Method = "full"
    micro_batch: int = 1
    seq_len: int = 2048
    gpus: int = 1
    zero_stage: int = 0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    optimizer: Optimizer = "adamw"
    activation_checkpointing: bool = True
    offload_optimizer: bool = False
    offload_params: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: every linear layer ("all-linear")
    double_quant: bool = True
    attention: Literal["sdpa", "eager"] = "sdpa"
    overhead_gib: float = DEFAULT_OVERHEAD_GIB

    def __post_init__(self) -> None:
        for name in ("micro_batch", "seq_len", "gpus", "lora_rank"):
            if getattr(self, name) <= 0:
                raise JpadaptError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise JpadaptError(f"zero stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.method == "qlora" and self.zero_stage == 3:
            raise JpadaptError("QLoRA cannot run under ZeRO-3: ZeRO-3 shards parameters as float tensors and "
                               "cannot partition bitsandbytes 4-bit weights; use ZeRO-2 (or 0)")
        if self.offload_params and self.zero_stage != 3:
            raise JpadaptError("parameter offload needs ZeRO-3 (only ZeRO-3 partitions the parameters)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise JpadaptError("optimizer offload needs ZeRO stage 1, 2 or 3")
        if self.method == "inference" and (self.gpus > 1 or self.zero_stage):
            raise JpadaptError("an inference plan is per GPU (no sharding): use --gpus 1 --zero 0")
        if self.method == "full" and self.optimizer != "adamw" and self.zero_stage:
            raise JpadaptError("8-bit optimizers are bitsandbytes optimizers: DeepSpeed ZeRO shards only its own "
                               "or torch optimizers; use --optimizer adamw with ZeRO")

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Term:
    """One memory term on one GPU: bytes, the formula with the numbers put in, and what it is."""

    name: str
    bytes: int
    formula: str
    note: str = ""
    on_cpu: bool = False  # offloaded: counted in CPU memory, not on the GPU

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    setup: Setup
    terms: list[Term] = field(default_factory=list)

    @property
    def gpu_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if not t.on_cpu)

    @property
    def cpu_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.on_cpu)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def to_dict(self) -> dict:
        return {
            "model": self.shape.name,
            "params": self.shape.total_params,
            "setup": asdict(self.setup),
            "terms": [{**asdict(t), "gib": t.gib} for t in self.terms],
            "gpu_bytes": self.gpu_bytes,
            "gpu_gib": self.gpu_bytes / GIB,
            "cpu_bytes": self.cpu_bytes,
        }


def plan_memory(shape: ModelShape, setup: Setup) -> MemoryPlan:
    """Every memory term of one GPU for `setup` on `shape`."""
    builders = {"full": _full, "lora": _lora, "qlora": _qlora, "inference": _inference}
    terms = builders[setup.method](shape, setup)
    terms.append(Term("framework overhead", int(setup.overhead_gib * GIB), f"{setup.overhead_gib} GiB",
                      "CUDA context, cuBLAS workspace, allocator fragmentation (a fixed allowance)"))
    return MemoryPlan(shape, setup, terms)


# ---------------------------------------------------------------------------------------------- methods


def _full(shape: ModelShape, s: Setup) -> list[Term]:
    p, n, w = shape.total_params, s.gpus, s.weight_bytes
    mixed = s.precision != "fp32"
    shard_params, shard_grads, shard_opt = s.zero_stage >= 3, s.zero_stage >= 2, s.zero_stage >= 1
    terms = [
        _sharded("weights", p, w, n, shard_params, f"{_dtype(s)} weights", on_cpu=s.offload_params),
        _sharded("gradients", p, w, n, shard_grads, f"{_dtype(s)} gradients"),
    ]
    if mixed:
        terms.append(_sharded("master weights", p, 4, n, shard_opt, "fp32 copy the optimizer updates",
                              on_cpu=s.offload_optimizer))
    terms.append(_optimizer_states(p, s, n, shard_opt))
    terms += _activations(shape, s, trainable_weights=True)
    terms += _zero_buffers(shape, s)
    return terms


def _lora(shape: ModelShape, s: Setup) -> list[Term]:
    p, lora = shape.total_params, shape.lora_params(s.lora_rank, s.lora_targets)
    shard_opt = s.zero_stage >= 1
    terms = [
        Term("weights", p * s.weight_bytes, f"{p:,} x {s.weight_bytes} B", f"frozen {_dtype(s)} base weights"),
        *_adapter_terms(lora, s, shard_opt),
    ]
    terms += _activations(shape, s, trainable_weights=False)
    terms += _zero_buffers(shape, s, trainable=lora)
    return terms


def _qlora(shape: ModelShape, s: Setup) -> list[Term]:
    linear_weights = shape.num_layers * sum(l.in_features * l.out_features for l in shape.linears())
    other = shape.total_params - linear_weights  # embeddings, lm_head, norms, biases stay in bf16
    constants = _nf4_constant_bytes(linear_weights, s.double_quant)
    lora = shape.lora_params(s.lora_rank, s.lora_targets)
    largest = max(l.in_features * l.out_features for l in shape.linears())
    dq = "double-quantized" if s.double_quant else "fp32"
    terms = [
        Term("weights (4-bit)", math.ceil(linear_weights / 2), f"{linear_weights:,} x 0.5 B",
             "NF4 codes of every linear layer's weight"),
        Term("quantization constants", constants,
             f"{linear_weights:,} / {NF4_BLOCK} blocks x " + ("(1 B + 4 B / 256)" if s.double_quant else "4 B"),
             f"{dq} absmax per {NF4_BLOCK}-weight block"),
        Term("weights (bf16, not quantized)", other * 2, f"{other:,} x 2 B", "embeddings, lm_head, norms, biases"),
        Term("dequantization buffer", largest * 2, f"{largest:,} x 2 B",
             "one linear weight dequantized to bf16 at a time"),
        *_adapter_terms(lora, s, s.zero_stage >= 1),
    ]
    terms += _activations(shape, s, trainable_weights=False)
    terms += _zero_buffers(shape, s, trainable=lora)
    return terms


def _inference(shape: ModelShape, s: Setup) -> list[Term]:
    p, w = shape.total_params, s.weight_bytes
    kv = 2 * shape.num_layers * shape.kv_dim * s.tokens * w
    return [
        Term("weights", p * w, f"{p:,} x {w} B", f"{_dtype(s)} weights"),
        Term("KV cache", kv, f"2 x {shape.num_layers} layers x {shape.kv_dim} x {s.tokens:,} tokens x {w} B",
             "keys and values of every layer for micro_batch x seq_len tokens (generation)"),
        Term("activations (one layer)", _layer_activation_bytes(shape, s) * s.tokens,
             f"{_layer_activation_bytes(shape, s)} B x {s.tokens:,} tokens",
             "a forward pass keeps only the layer being computed"),
        _logits_term(shape, s, training=False),
    ]


# ---------------------------------------------------------------------------------------------- terms


def _sharded(name: str, count: int, width: int, n: int, shard: bool, note: str, on_cpu: bool = False) -> Term:
    if shard and n > 1:
        per = math.ceil(count / n)
        return Term(name, per * width, f"ceil({count:,} / {n}) x {width} B", f"{note}, partitioned over {n} GPUs",
                    on_cpu)
    return Term(name, count * width, f"{count:,} x {width} B", note, on_cpu)


def _optimizer_states(count: int, s: Setup, n: int, shard: bool) -> Term:
    if s.optimizer == "adamw":
        term = _sharded("optimizer states", count, 8, n, shard, "AdamW exp_avg + exp_avg_sq in fp32")
        return Term(term.name, term.bytes, term.formula, term.note, on_cpu=s.offload_optimizer)
    blocks = 2 * math.ceil(count / OPT8_BLOCK)
    paged = "paged " if s.optimizer.startswith("paged") else ""
    return Term("optimizer states", 2 * count + 4 * blocks, f"{count:,} x 2 B + {blocks:,} blocks x 4 B",
                f"{paged}8-bit AdamW: two 1-byte moments + fp32 absmax per {OPT8_BLOCK} values"
                + (" (paged: evicted to CPU under memory pressure)" if paged else ""))


def _adapter_terms(lora: int, s: Setup, shard_opt: bool) -> list[Term]:
    # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) even on a bf16 or 4-bit base.
    n = s.gpus
    return [
        Term("LoRA weights", lora * 4, f"{lora:,} x 4 B", f"rank-{s.lora_rank} adapters in fp32"),
        _sharded("LoRA gradients", lora, 4, n, s.zero_stage >= 2, "fp32 adapter gradients"),
        _optimizer_states(lora, s, n, shard_opt),
    ]


def _nf4_constant_bytes(weights: int, double_quant: bool) -> int:
    blocks = math.ceil(weights / NF4_BLOCK)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK)


def _layer_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Bytes one layer keeps for backward per token (Korthikanti et al. 2022, LLaMA-style layer).

    attention block: RMSNorm input (h), q/k/v projection input (h), rotated q (q_dim), rotated k and v
    (2 kv_dim), SDPA output = o_proj input (q_dim), the SDPA log-sum-exp (fp32 per head); MLP block: RMSNorm
    input (h), gate/up input (h), gate output, SiLU output, up output, their product = down_proj input
    (4 x intermediate). Eager attention also keeps the s x s scores and probabilities per head.
    """
    h, i, w = shape.hidden_size, shape.intermediate_size, s.weight_bytes
    attention = (2 * h + 2 * shape.q_dim + 2 * shape.kv_dim) * w + 4 * shape.num_heads
    mlp = (2 * h + 4 * i) * w
    extra_norms = (shape.norms_per_layer - 2) * h * w
    eager = 2 * shape.num_heads * s.seq_len * w if s.attention == "eager" else 0
    return attention + mlp + extra_norms + eager


def _activations(shape: ModelShape, s: Setup, trainable_weights: bool) -> list[Term]:
    per_layer = _layer_activation_bytes(shape, s)
    tokens, layers, w = s.tokens, shape.num_layers, s.weight_bytes
    if s.activation_checkpointing:
        kept = layers * shape.hidden_size * w * tokens
        terms = [
            Term("activations (checkpoints)", kept, f"{layers} layers x {shape.hidden_size} x {w} B x {tokens:,} tokens",
                 "each layer's input, kept for recomputation"),
            Term("activations (recomputed layer)", per_layer * tokens, f"{per_layer:,} B x {tokens:,} tokens",
                 "one layer's activations during its backward"),
        ]
    else:
        terms = [Term("activations", layers * per_layer * tokens, f"{layers} layers x {per_layer:,} B x {tokens:,} tokens",
                      "every layer's saved activations (Korthikanti et al. 2022, LLaMA-style)")]
    if not trainable_weights:
        per_token = _lora_activation_bytes(shape, s)
        # With checkpointing only the recomputed layer holds them; without, every layer does.
        held = 1 if s.activation_checkpointing else layers
        terms.append(Term("LoRA activations", held * per_token * tokens,
                          f"{held} layer(s) x {per_token:,} B x {tokens:,} tokens",
                          "per adapted linear: fp32 copy of its input (4 B x in), dropout mask (1 B x in), "
                          "rank-r intermediate (4 B x r)"))
    terms.append(_logits_term(shape, s, training=True))
    return terms


def _lora_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Bytes per token one layer's adapters keep: PEFT casts each adapted linear's input to the fp32 adapter
    dtype, applies dropout (mask kept) and keeps x @ A for B's backward."""
    chosen = [l for l in shape.linears() if s.lora_targets is None or l.name in s.lora_targets]
    return sum(5 * l.in_features + 4 * s.lora_rank for l in chosen)


def _logits_term(shape: ModelShape, s: Setup, training: bool) -> Term:
    """Logits over the vocabulary: large for 150k-262k vocabularies at long sequence lengths."""
    w = s.weight_bytes
    # Training: the logits (w), their fp32 copy for the loss (4, unless already fp32) and the saved fp32
    # log-probabilities (4). Scoring: logits and their fp32 log-softmax.
    per = w + (4 if w != 4 else 0) + (4 if training else 0)
    elements = s.tokens * shape.vocab_size
    return Term("logits and loss", elements * per, f"{s.tokens:,} tokens x {shape.vocab_size:,} vocab x {per} B",
                "logits, their fp32 copy and log-probabilities" if training else "logits and fp32 log-softmax")


def _zero_buffers(shape: ModelShape, s: Setup, trainable: int | None = None) -> list[Term]:
    """DeepSpeed's communication buckets at its default sizes (only when ZeRO is on)."""
    if s.zero_stage == 0 or s.gpus == 1:
        return []
    count = shape.total_params if trainable is None else trainable
    w = s.weight_bytes
    if s.zero_stage in (1, 2):
        elements = 2 * min(ZERO12_BUCKET, count)
        return [Term("ZeRO buckets", elements * w, f"2 x min({ZERO12_BUCKET:,}, {count:,}) x {w} B",
                     "reduce + allgather buckets (DeepSpeed defaults)")]
    live = min(ZERO3_MAX_LIVE_PARAMS, count) + min(ZERO3_PREFETCH_BUCKET, count)
    return [Term("ZeRO-3 gathered parameters", live * w,
                 f"(min({ZERO3_MAX_LIVE_PARAMS:,}, P) + min({ZERO3_PREFETCH_BUCKET:,}, P)) x {w} B",
                 "parameters gathered for the layers being computed + prefetch (DeepSpeed defaults)",
                 on_cpu=False)]


def _dtype(s: Setup) -> str:
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[s.precision]
