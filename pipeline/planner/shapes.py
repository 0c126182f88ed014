"""Model architecture numbers and exact parameter counts, without weights or torch.

Covers decoder-only transformers of the LLaMA family as implemented in transformers: LLaMA-2/3, Mistral,
Qwen2/2.5 (q/k/v biases), Gemma 3 text models (q/k norms, four norms per layer). Counts are exact for these
implementations; tests check them against the same configs instantiated on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import JpadaptError

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")


@dataclass(frozen=True)
class Linear:
    """One weight matrix of a transformer layer: `name` as in transformers' module names."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False  # biases on q, k and v (Qwen2 always; LLaMA / Gemma 3 with attention_bias)
    qk_norm: bool = False  # Gemma 3: RMSNorm over each head's q and k
    norms_per_layer: int = 2  # LLaMA: input + post-attention; Gemma 3: 4
    o_proj_bias: bool = False  # LLaMA / Gemma 3 with attention_bias: o_proj too (Qwen2 never)
    mlp_bias: bool = False  # LLaMA with mlp_bias: gate, up and down projections

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise JpadaptError(f"model {self.name}: unknown architecture {self.architecture!r} "
                               f"({', '.join(ARCHITECTURES)})")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise JpadaptError(f"model {self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise JpadaptError(f"model {self.name}: num_heads {self.num_heads} is not a multiple of "
                               f"num_kv_heads {self.num_kv_heads}")

    def with_vocab(self, vocab_size: int) -> ModelShape:
        """The same model with an extended (or padded) vocabulary."""
        return replace(self, vocab_size=vocab_size, name=f"{self.name} (vocab {vocab_size:,})")

    # ------------------------------------------------------------------ parameters

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def linears(self) -> list[Linear]:
        """The weight matrices of ONE layer (what LoRA targets and NF4 quantizes)."""
        h, qkv, mlp = self.hidden_size, self.attention_bias, self.mlp_bias
        return [
            Linear("q_proj", h, self.q_dim, qkv),
            Linear("k_proj", h, self.kv_dim, qkv),
            Linear("v_proj", h, self.kv_dim, qkv),
            Linear("o_proj", self.q_dim, h, self.o_proj_bias),
            Linear("gate_proj", h, self.intermediate_size, mlp),
            Linear("up_proj", h, self.intermediate_size, mlp),
            Linear("down_proj", self.intermediate_size, h, mlp),
        ]

    @property
    def layer_norm_params(self) -> int:
        """RMSNorm weights of one layer (plus Gemma 3's per-head q/k norms)."""
        return self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def layer_params(self) -> int:
        return sum(linear.params for linear in self.linears()) + self.layer_norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when tied to the embedding (the same tensor)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def final_norm_params(self) -> int:
        return self.hidden_size

    @property
    def linear_params(self) -> int:
        """Parameters in the layers' linear weights (+ biases): what bitsandbytes quantizes to 4 bits."""
        return self.num_layers * sum(linear.params for linear in self.linears())

    @property
    def total_params(self) -> int:
        return (self.embedding_params + self.num_layers * self.layer_params + self.final_norm_params
                + self.lm_head_params)

    def lora_params(self, rank: int, targets: tuple[str, ...] | None = None) -> int:
        """LoRA A (r x in) + B (out x r) for each targeted linear of every layer (None = all linear layers)."""
        chosen = [l for l in self.linears() if targets is None or l.name in targets]
        return self.num_layers * sum(rank * (l.in_features + l.out_features) for l in chosen)


# ---------------------------------------------------------------------------------------------- config.json


# What transformers (5.x, configuration_<model>.py) uses for a key that config.json leaves out. A missing
# num_key_value_heads / head_dim that is None falls back to num_attention_heads / hidden_size // heads.
_OPTIONAL_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False,
              "max_position_embeddings": 2048},
    "mistral": {"num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False,
                "max_position_embeddings": 4096 * 32},
    "qwen2": {"num_key_value_heads": 32, "head_dim": None, "tie_word_embeddings": False,
              "max_position_embeddings": 32768},
    "gemma3": {"num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True,
               "max_position_embeddings": 131_072},
}

# Gemma3TextConfig's defaults. A multimodal Gemma 3 config.json stores only the text_config keys that differ from
# them: google/gemma-3-4b-it's text_config names hidden_size, intermediate_size and num_hidden_layers, not
# vocab_size (262,208), the heads (8 / 4) or head_dim (256).
_GEMMA3_TEXT_DEFAULTS: dict[str, object] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, **_OPTIONAL_DEFAULTS["gemma3"],
}

_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3"}


def shape_from_hf_config(config: dict, name: str) -> ModelShape:
    """A ModelShape from the values of a Hugging Face `config.json` (Gemma 3 multimodal: its text_config)."""
    if not isinstance(config, dict):
        raise JpadaptError(f"{name}: config.json must hold a JSON object, got {type(config).__name__}")
    if config.get("model_type") == "gemma3":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise JpadaptError(f"{name}: Gemma 3 config.json has no text_config object")
        outer = {k: config[k] for k in ("tie_word_embeddings",) if k in config}
        config = {**_GEMMA3_TEXT_DEFAULTS, **outer, **text, "model_type": "gemma3_text"}
    model_type = config.get("model_type", "")
    architecture = _MODEL_TYPES.get(model_type)
    if architecture is None:
        raise JpadaptError(f"{name}: model_type {model_type!r} is not supported by the planner "
                           f"({', '.join([*_MODEL_TYPES, 'gemma3'])})")
    defaults = _OPTIONAL_DEFAULTS[architecture]

    def integer(key: str, default: object = ..., nullable: bool = False) -> int | None:
        """config[key] (or transformers' default where it has one); None only where transformers fills it in."""
        if key not in config and default is ...:
            raise JpadaptError(f"{name}: config.json has no {key!r}")
        value = config.get(key, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise JpadaptError(f"{name}: config.json {key} must be an integer, got {value!r}")
        return value

    heads, hidden = integer("num_attention_heads"), integer("hidden_size")
    if heads <= 0:
        raise JpadaptError(f"{name}: num_attention_heads must be positive, got {heads}")
    kv_heads = integer("num_key_value_heads", defaults["num_key_value_heads"], nullable=True)
    head_dim = integer("head_dim", defaults["head_dim"], nullable=True)
    tie = config.get("tie_word_embeddings", defaults["tie_word_embeddings"])
    if not isinstance(tie, bool):
        raise JpadaptError(f"{name}: config.json tie_word_embeddings must be true or false, got {tie!r}")
    # transformers' biases: Qwen2 has q/k/v biases and no others; LLaMA's attention_bias covers q, k, v and o and
    # its mlp_bias gate/up/down; Gemma 3's attention_bias covers q, k, v and o; Mistral has none.
    attention_bias = bool(config.get("attention_bias", False)) and architecture in {"llama", "gemma3"}
    return ModelShape(
        name=name,
        architecture=architecture,
        vocab_size=integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=integer("intermediate_size"),
        num_layers=integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=hidden // heads if head_dim is None else head_dim,
        tie_embeddings=tie,
        max_position_embeddings=integer("max_position_embeddings", defaults["max_position_embeddings"]),
        attention_bias=architecture == "qwen2" or attention_bias,
        qk_norm=architecture == "gemma3",
        norms_per_layer=4 if architecture == "gemma3" else 2,
        o_proj_bias=attention_bias,
        mlp_bias=architecture == "llama" and bool(config.get("mlp_bias", False)),
    )


def shape_from_config_file(path: Path) -> ModelShape:
    """Read `config.json` (or a model folder holding it)."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise JpadaptError(f"{path}: no config.json")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JpadaptError(f"{file}: not a readable JSON config ({exc})") from None
    return shape_from_hf_config(config, path.name if path.is_dir() else path.parent.name or file.stem)
