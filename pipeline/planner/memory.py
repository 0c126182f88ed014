"""Per-GPU memory of a training or inference step, term by term, each with its formula.

The model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020): with mixed precision and Adam,
16 bytes per parameter = bf16 weights (2) + bf16 gradients (2) + fp32 master weights (4) + fp32 Adam moments
(4 + 4); ZeRO-1 partitions the optimizer states (master weights and moments) over the data-parallel ranks,
ZeRO-2 also the gradients, ZeRO-3 also the weights. DeepSpeed also builds an fp32 copy of the gradient partition
for the optimizer step (its estimators' "4_grads_32bit"). Activations follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), rewritten for LLaMA-style layers (RMSNorm, rotary,
SwiGLU, grouped-query attention, no dropout) and SDPA/flash attention, which keeps no s x s score matrix.

Every term was checked against what PyTorch, PEFT, bitsandbytes and DeepSpeed really hold on CPU (one optimizer
step on LLaMA models of 0.1M to 58M parameters, tensors saved for backward in one layer, a 2-process ZeRO-1/2/3
run): `bench/planner_validation.py`, results in `bench/results/planner-validation-cpu.md`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from pipeline.errors import JpadaptError
from pipeline.planner.gpus import GIB
from pipeline.planner.shapes import ModelShape
from pipeline.training import LOGIT_CHUNK_ELEMENTS  # torch-free at import

Method = Literal["full", "lora", "qlora", "inference"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]

# bitsandbytes NF4: 4-bit codes + one absmax per 64-weight block. Without double quantization the absmax is
# fp32 (32/64 = 0.5 bit per weight); with it, 8-bit absmax + one fp32 constant per 256 blocks
# (8/64 + 32/(64*256) = 0.127 bit per weight), as in the QLoRA paper. Each quantized weight's QuantState also
# owns its own copy of the 16-entry fp32 NF4 table (64 B) and, with double quantization, the fp32 offset (4 B)
# and the 256-entry fp32 dynamic map of the nested 8-bit quantization (1,024 B): measured with bitsandbytes
# 0.50 (no storage shared between weights); 13% of the constants of a 26M-weight model, 0.2% of a 7B one's.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
NF4_TENSOR_BYTES = 16 * 4
NF4_DQ_TENSOR_BYTES = 16 * 4 + 4 + 256 * 4
# 8-bit optimizers (bitsandbytes 0.50 `Optimizer2State.init_state`): each moment in 1 byte plus one fp32 absmax
# per 256-value block (the blocksize is fixed at 256 there, not the 2048 of the 8-bit optimizers paper); a tensor
# under min_8bit_size = 4,096 values keeps fp32 moments (8 B); the two 256-entry fp32 quantization maps are
# shared by every tensor of the optimizer.
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096
OPT8_MAPS_BYTES = 2 * 256 * 4
# DeepSpeed defaults (bucket sizes in elements) that set its communication buffers.
ZERO12_BUCKET = 500_000_000
ZERO3_PREFETCH_BUCKET = 50_000_000
ZERO3_MAX_LIVE_PARAMS = 1_000_000_000
# ZeRO-3 keeps a parameter under stage3_param_persistence_threshold (100,000 values: norms, biases) whole on
# every rank besides its partition, and steps the optimizer one sub-group (sub_group_size values) at a time.
ZERO3_PERSISTENCE_THRESHOLD = 100_000
ZERO3_SUB_GROUP = 1_000_000_000
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
    if shard_params and n > 1:
        # DeepSpeed ZeRO-3: every parameter's partition (ds_tensor), and the small ones whole on every rank too.
        persistent = sum(t for t in _param_tensors(shape) if t < ZERO3_PERSISTENCE_THRESHOLD)
        per = math.ceil(p / n) + persistent
        weights = Term("weights", per * w, f"(ceil({p:,} / {n}) + {persistent:,} persistent) x {w} B",
                       f"{_dtype(s)} weights, partitioned over {n} GPUs; tensors under "
                       f"{ZERO3_PERSISTENCE_THRESHOLD:,} values (norms, biases) also kept whole on every GPU",
                       s.offload_params)
    else:
        weights = _sharded("weights", p, w, n, False, f"{_dtype(s)} weights")
    terms = [weights, _sharded("gradients", p, w, n, shard_grads, f"{_dtype(s)} gradients")]
    if mixed:
        terms.append(_sharded("master weights", p, 4, n, shard_opt, "fp32 copy the optimizer updates",
                              on_cpu=s.offload_optimizer))
    terms.append(_optimizer_states(_param_tensors(shape), s, n, shard_opt))
    if mixed and s.zero_stage >= 1:
        # stage_1_and_2.py step(): single_grad_partition = flat_grad_partition.to(fp32), freed after the step;
        # stage3.py _prepare_fp32_grad_for_sub_group: the same per sub-group. Measured: 4 B x ceil(P / N) per rank.
        part = math.ceil(p / n)
        count = min(part, ZERO3_SUB_GROUP) if s.zero_stage == 3 else part
        formula = (f"min(ceil({p:,} / {n}), {ZERO3_SUB_GROUP:,}) x 4 B" if s.zero_stage == 3
                   else f"ceil({p:,} / {n}) x 4 B")
        terms.append(Term("fp32 gradients (optimizer step)", count * 4, formula,
                          "DeepSpeed casts the gradient partition to fp32 for the optimizer step (freed after it, "
                          "when activations are already freed: counted on top, conservatively)",
                          s.offload_optimizer))
    terms += _activations(shape, s, trainable_weights=True)
    terms += _zero_buffers(shape, s)
    return terms


def _lora(shape: ModelShape, s: Setup) -> list[Term]:
    p, lora = shape.total_params, shape.lora_params(s.lora_rank, s.lora_targets)
    shard_opt = s.zero_stage >= 1
    terms = [
        Term("weights", p * s.weight_bytes, f"{p:,} x {s.weight_bytes} B", f"frozen {_dtype(s)} base weights"),
        *_adapter_terms(shape, s, shard_opt),
    ]
    terms += _activations(shape, s, trainable_weights=False)
    terms += _zero_buffers(shape, s, trainable=lora)
    return terms


def _qlora(shape: ModelShape, s: Setup) -> list[Term]:
    linear_weights = shape.num_layers * sum(l.in_features * l.out_features for l in shape.linears())
    other = shape.total_params - linear_weights  # embeddings, lm_head, norms, biases stay in bf16
    constants, blocks, dq_blocks = _nf4_constant_bytes(shape, s.double_quant)
    tensors = shape.num_layers * len(shape.linears())
    lora = shape.lora_params(s.lora_rank, s.lora_targets)
    largest = max(l.in_features * l.out_features for l in shape.linears())
    dq = "double-quantized" if s.double_quant else "fp32"
    terms = [
        Term("weights (4-bit)", math.ceil(linear_weights / 2), f"{linear_weights:,} x 0.5 B",
             "NF4 codes of every linear layer's weight"),
        Term("quantization constants", constants,
             (f"{blocks:,} blocks x 1 B + {dq_blocks:,} x 4 B + {tensors} tensors x {NF4_DQ_TENSOR_BYTES:,} B"
              if s.double_quant else f"{blocks:,} blocks x 4 B + {tensors} tensors x {NF4_TENSOR_BYTES} B"),
             f"{dq} absmax per {NF4_BLOCK}-weight block (rounded up per tensor)"
             + (f", fp32 absmax per {NF4_DQ_BLOCK} blocks" if s.double_quant else "")
             + ", each tensor's own NF4 table" + (", offset and 8-bit map" if s.double_quant else "")),
        Term("weights (bf16, not quantized)", other * 2, f"{other:,} x 2 B", "embeddings, lm_head, norms, biases"),
        Term("dequantization buffer", largest * 2, f"{largest:,} x 2 B",
             "one linear weight dequantized to bf16 at a time"),
        *_adapter_terms(shape, s, s.zero_stage >= 1),
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


def _optimizer_states(tensors: list[int], s: Setup, n: int, shard: bool) -> Term:
    """AdamW moments of the trainable tensors (sizes in values). torch's AdamW also keeps a 4-byte `step` per
    tensor (on the CPU unless fused/capturable): left out, 300 B for a 75-tensor model."""
    count = sum(tensors)
    if s.optimizer == "adamw":
        term = _sharded("optimizer states", count, 8, n, shard, "AdamW exp_avg + exp_avg_sq in fp32")
        return Term(term.name, term.bytes, term.formula, term.note, on_cpu=s.offload_optimizer)
    small = sum(t for t in tensors if t < OPT8_MIN_SIZE)
    quantized = count - small
    blocks = 2 * sum(math.ceil(t / OPT8_BLOCK) for t in tensors if t >= OPT8_MIN_SIZE)
    maps = OPT8_MAPS_BYTES if quantized else 0
    paged = "paged " if s.optimizer.startswith("paged") else ""
    return Term("optimizer states", 2 * quantized + 4 * blocks + 8 * small + maps,
                f"{quantized:,} x 2 B + {blocks:,} blocks x 4 B + {small:,} x 8 B + {maps:,} B",
                f"{paged}8-bit AdamW: two 1-byte moments + fp32 absmax per {OPT8_BLOCK} values (rounded up per "
                f"tensor); tensors under {OPT8_MIN_SIZE:,} values keep fp32 moments; two shared 256-entry maps"
                + (" (paged: evicted to CPU under memory pressure)" if paged else ""))


def _param_tensors(shape: ModelShape) -> list[int]:
    """The size of every parameter tensor (transformers' modules): what per-tensor rules apply to (ZeRO-3
    persistence, 8-bit optimizer blocks and min_8bit_size). Sums to shape.total_params."""
    layer: list[int] = []
    for linear in shape.linears():
        layer.append(linear.in_features * linear.out_features)
        if linear.bias:
            layer.append(linear.out_features)
    layer += [shape.hidden_size] * shape.norms_per_layer + ([shape.head_dim] * 2 if shape.qk_norm else [])
    tensors = [shape.embedding_params, *layer * shape.num_layers, shape.final_norm_params]
    return tensors + ([shape.lm_head_params] if shape.lm_head_params else [])


def _lora_tensors(shape: ModelShape, s: Setup) -> list[int]:
    """LoRA A (r x in) and B (out x r) of each targeted linear of every layer."""
    chosen = [l for l in shape.linears() if s.lora_targets is None or l.name in s.lora_targets]
    layer = [t for l in chosen for t in (s.lora_rank * l.in_features, l.out_features * s.lora_rank)]
    return layer * shape.num_layers


def _adapter_terms(shape: ModelShape, s: Setup, shard_opt: bool) -> list[Term]:
    # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) even on a bf16 or 4-bit base.
    n, lora = s.gpus, shape.lora_params(s.lora_rank, s.lora_targets)
    return [
        Term("LoRA weights", lora * 4, f"{lora:,} x 4 B", f"rank-{s.lora_rank} adapters in fp32"),
        _sharded("LoRA gradients", lora, 4, n, s.zero_stage >= 2, "fp32 adapter gradients"),
        _optimizer_states(_lora_tensors(shape, s), s, n, shard_opt),
    ]


def _nf4_constant_bytes(shape: ModelShape, double_quant: bool) -> tuple[int, int, int]:
    """(bytes, absmax blocks, fp32 second-level blocks): bitsandbytes quantizes each linear weight on its own,
    so the blocks are rounded up per tensor, and each tensor carries its own tables (NF4_*TENSOR_BYTES)."""
    blocks = dq_blocks = 0
    for linear in shape.linears():
        b = math.ceil(linear.in_features * linear.out_features / NF4_BLOCK)
        blocks += shape.num_layers * b
        dq_blocks += shape.num_layers * math.ceil(b / NF4_DQ_BLOCK)
    tensors = shape.num_layers * len(shape.linears())
    if not double_quant:
        return 4 * blocks + tensors * NF4_TENSOR_BYTES, blocks, 0
    return blocks + 4 * dq_blocks + tensors * NF4_DQ_TENSOR_BYTES, blocks, dq_blocks


def _layer_activation_bytes(shape: ModelShape, s: Setup, frozen: bool = False) -> int:
    """Bytes one layer keeps for backward per token: the tensors autograd saves in transformers 5's LLaMA-family
    and Gemma 3 layers (Korthikanti et al. 2022's method), counted once per storage. `frozen`: the base weights
    do not train (LoRA, QLoRA), so their matmuls and norm multiplies keep nothing for weight gradients.

    RMSNorm (LLaMA, Mistral, Qwen2): x.to(fp32) (4 B x h), rsqrt per token (4 B) and, for the weight's
    gradient, the normalized x cast back (w x h). Gemma 3 norms run in fp32: 4 h + 4 + 4 h, and its q/k norms do
    the same over each head. q/k/v and gate/up inputs (w x h each) are kept by their linears. SDPA (flash on
    CPU and CUDA; GQA with enable_gqa, so k and v stay at kv_dim) keeps rotated q, rotated k, v, its output
    (which is o_proj's input, the same storage) and an fp32 log-sum-exp per head. Eager attention keeps q, k and
    v repeated to all heads, the fp32 softmax and its w copy per head and key (s), and o_proj's input. MLP: gate
    output (SiLU input), SiLU output and up output (the multiply keeps both), their product (down_proj's input).
    Rotary cos/sin are shared by all layers (2 x s x head_dim x w per sequence): left out.
    """
    h, i, w = shape.hidden_size, shape.intermediate_size, s.weight_bytes
    gemma = shape.architecture == "gemma3"
    norm = 4 * h + 4 + (0 if frozen else (4 if gemma else w) * h)
    norms = shape.norms_per_layer * norm
    if shape.qk_norm:  # Gemma 3: fp32 norms over each head of q and k
        norms += sum(4 * d + 4 * heads + (0 if frozen else 4 * d)
                     for d, heads in ((shape.q_dim, shape.num_heads), (shape.kv_dim, shape.num_kv_heads)))
    inputs = 0 if frozen else 2 * h * w
    if s.attention == "eager":
        attention = (3 + (0 if frozen else 1)) * shape.q_dim * w + (4 + w) * shape.num_heads * s.seq_len
    else:
        attention = (2 * shape.q_dim + 2 * shape.kv_dim) * w + 4 * shape.num_heads
    mlp = (3 if frozen else 4) * i * w
    return norms + inputs + attention + mlp


def _activations(shape: ModelShape, s: Setup, trainable_weights: bool) -> list[Term]:
    per_layer = _layer_activation_bytes(shape, s, frozen=not trainable_weights)
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
                      "every layer's saved activations (tensors autograd keeps, LLaMA-style)")]
    if not trainable_weights:
        per_token = _lora_activation_bytes(shape, s)
        # With checkpointing only the recomputed layer holds them; without, every layer does.
        held = 1 if s.activation_checkpointing else layers
        terms.append(Term("LoRA activations", held * per_token * tokens,
                          f"{held} layer(s) x {per_token:,} B x {tokens:,} tokens",
                          "per adapted linear: fp32 copy of its input (4 B x in), dropout mask (1 B x in; "
                          "none with lora_dropout=0), rank-r intermediate (4 B x r)"))
    terms.append(_logits_term(shape, s, training=True, trainable_head=trainable_weights))
    return terms


def _lora_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Bytes per token one layer's adapters keep: PEFT casts each adapted linear's input to the fp32 adapter
    dtype, applies dropout (mask kept) and keeps x @ A for B's backward."""
    chosen = [l for l in shape.linears() if s.lora_targets is None or l.name in s.lora_targets]
    return sum(5 * l.in_features + 4 * s.lora_rank for l in chosen)


def _logits_term(shape: ModelShape, s: Setup, training: bool, trainable_head: bool = True) -> Term:
    """Logits over the vocabulary: large for 150k-262k vocabularies at long sequence lengths. Training (cpt and
    sft) runs the output layer in chunks (`pipeline.training.causal_lm_nats`), so only one chunk's logits exist."""
    w, v, h = s.weight_bytes, shape.vocab_size, shape.hidden_size
    elements = s.tokens * v
    if not training:  # scoring: logits and their fp32 log-softmax
        per = w + 4
        return Term("logits and loss", elements * per, f"{s.tokens:,} tokens x {v:,} vocab x {per} B",
                    "logits and fp32 log-softmax")
    # Per logit of a chunk, as in transformers' ForCausalLMLoss: logits.float() then cross_entropy, which saves the
    # fp32 log-probabilities. Forward peak: logits (w) + fp32 copy (4, none when already fp32) + log-probabilities
    # (4). Backward peak (measured on CPU, higher): saved log-probabilities + their gradient from nll_loss +
    # log_softmax's input gradient, 4 + 4 + 4. Besides the chunk: its gradient of the output layer's weight
    # (v x h x w, summed into .grad; none for a frozen head), and the hidden states of the scored positions
    # gathered into one tensor + their gradient (2 x tokens x h x w).
    per = max(w + (4 if w != 4 else 0) + 4, 12)
    rows = min(s.tokens, max(1, LOGIT_CHUNK_ELEMENTS // v))
    head_grad = v * h * w if trainable_head else 0
    states = 2 * s.tokens * h * w
    formula = (f"min({s.tokens:,} tokens, {LOGIT_CHUNK_ELEMENTS:,} // {v:,}) = {rows:,} x {v:,} vocab x {per} B"
               + (f" + {v:,} x {h} x {w} B" if head_grad else "") + f" + 2 x {s.tokens:,} x {h} x {w} B")
    return Term("logits and loss", rows * v * per + head_grad + states, formula,
                f"chunked output layer (chunks of {LOGIT_CHUNK_ELEMENTS:,} logits, recomputed in backward): peak of "
                "one chunk's loss backward (fp32 log-probabilities, their gradient, the logits' gradient)"
                + (", the chunk's output-layer weight gradient" if head_grad else "")
                + ", the scored hidden states and their gradient; not tokens x vocab")


def _zero_buffers(shape: ModelShape, s: Setup, trainable: int | None = None) -> list[Term]:
    """DeepSpeed's communication buffers at its default sizes (only when ZeRO is on).

    The gradient reduce bucket is allocated at its full reduce_bucket_size whatever the model's size
    (stage_1_and_2.py setup_buckets, stage3.py __init__: torch.empty(reduce_bucket_size)): measured 5e8 bf16
    values = 1,000,000,000 B on every rank of a 20.8M-parameter model under ZeRO-1, 2 and 3. ZeRO-1/2 allocate a
    second one only with overlap_comm (off by default for them; DeepSpeed turns it on for ZeRO-3, which still
    allocated one). The updated weights are all-gathered in place (no buffer).
    """
    if s.zero_stage == 0 or s.gpus == 1:
        return []
    count = shape.total_params if trainable is None else trainable
    w = s.weight_bytes
    bucket = Term("ZeRO buckets" if s.zero_stage in (1, 2) else "ZeRO-3 reduce bucket", ZERO12_BUCKET * w,
                  f"{ZERO12_BUCKET:,} x {w} B",
                  "gradient reduce bucket at DeepSpeed's default reduce_bucket_size, whatever the model's size "
                  "(twice with overlap_comm)")
    if s.zero_stage in (1, 2):
        return [bucket]
    live = min(ZERO3_MAX_LIVE_PARAMS, count) + min(ZERO3_PREFETCH_BUCKET, count)
    return [bucket, Term("ZeRO-3 gathered parameters", live * w,
                         f"(min({ZERO3_MAX_LIVE_PARAMS:,}, P) + min({ZERO3_PREFETCH_BUCKET:,}, P)) x {w} B",
                         "parameters gathered for the layers being computed + prefetch (DeepSpeed defaults)",
                         on_cpu=False)]


def _dtype(s: Setup) -> str:
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[s.precision]
