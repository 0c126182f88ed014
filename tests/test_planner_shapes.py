"""Model shapes and presets: parameter counts equal transformers' own models, LoRA counts equal PEFT's, presets equal
the published totals, and config.json parsing follows transformers' defaults and rejects bad input by name.

Big presets are instantiated on the meta device (no storage: the 405B model costs about a second); PEFT runs on
tiny real models of each architecture.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from pipeline.errors import JpadaptError
from pipeline.planner.presets import PRESETS, known_presets, resolve_model
from pipeline.planner.shapes import ModelShape, shape_from_config_file, shape_from_hf_config

REPO = Path(__file__).resolve().parents[1]

CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}


def hf_config(shape: ModelShape):
    """The transformers config with the shape's values (what `from_pretrained` would build from config.json)."""
    values = {"vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
              "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
              "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
              "head_dim": shape.head_dim, "tie_word_embeddings": shape.tie_embeddings,
              "max_position_embeddings": shape.max_position_embeddings}
    if shape.architecture == "llama":
        values.update(attention_bias=shape.o_proj_bias, mlp_bias=shape.mlp_bias)
    if shape.architecture == "gemma3":
        values.update(attention_bias=shape.o_proj_bias)
    return CONFIG_CLASSES[shape.architecture](**values)


def on_meta(config) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@cache
def preset_model(name: str) -> nn.Module:
    return on_meta(hf_config(PRESETS[name]))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once


def layer0_linears(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    layer = model.model.layers[0]
    return {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features, m.bias is not None)
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------------------- presets vs transformers


def test_known_presets() -> None:
    assert known_presets() == [
        "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b",
        "llama3.1-405b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b",
        "qwen2.5-72b", "mistral-7b", "gemma3-270m", "gemma3-1b", "gemma3-4b"]
    assert all(PRESETS[name].name == name for name in known_presets())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_transformers_model(name: str) -> None:
    shape = PRESETS[name]
    model = preset_model(name)
    assert count(model) == shape.total_params

    assert layer0_linears(model) == {l.name: (l.in_features, l.out_features, l.bias) for l in shape.linears()}
    assert count(model.model.layers[0]) == shape.layer_params
    assert len(model.model.layers) == shape.num_layers

    embedding = model.get_input_embeddings().weight
    assert embedding.numel() == shape.embedding_params
    if shape.tie_embeddings:
        assert model.lm_head.weight is embedding and shape.lm_head_params == 0
    else:
        assert model.lm_head.weight is not embedding and model.lm_head.weight.numel() == shape.lm_head_params
    assert model.model.norm.weight.numel() == shape.final_norm_params

    in_linears = sum(p.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear)
                     for p in m.parameters())
    assert in_linears == shape.linear_params


# Published totals: the count each model's own release reports (sources in pipeline/planner/presets.py).
PUBLISHED = {
    "llama2-7b": 6_738_415_616,  # keras-hub llama2_7b_en
    "llama2-13b": 13_015_864_320,  # meta-llama/Llama-2-13b-chat-hf as listed by several model catalogues
    "llama2-70b": 68_976_648_192,  # meta-llama/Llama-2-70b-chat-hf, ditto
    "llama3-8b": 8_030_261_248,  # keras-hub llama3_8b_en
    "llama3-70b": 70_553_706_496,  # HF safetensors total of Llama-3(.1/.3)-70B
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,  # HF safetensors total of meta-llama/Llama-3.1-405B
    "qwen2.5-0.5b": 494_032_768,  # keras-hub qwen2.5_0.5b_en
    "qwen2.5-1.5b": 1_543_714_304,  # keras-hub qwen2.5_math_1.5b_en (the same shapes)
    "qwen2.5-3b": 3_085_938_688,  # keras-hub qwen2.5_3b_en
    "qwen2.5-7b": 7_615_616_512,  # keras-hub qwen2.5_math_7b_en (the same shapes)
    "qwen2.5-14b": 14_770_033_664,  # llama.cpp n_params of Qwen2.5-14B GGUFs
    "qwen2.5-32b": 32_763_876_352,  # keras-hub qwen2.5_instruct_32b_en
    "qwen2.5-72b": 72_706_203_648,  # keras-hub qwen2.5_instruct_72b_en
    "mistral-7b": 7_241_732_096,  # keras-hub mistral_7b_en
    "gemma3-270m": 268_098_176,  # keras-hub gemma3_270m
    "gemma3-1b": 999_885_952,  # keras-hub gemma3_1b
    "gemma3-4b": 3_880_263_168,  # Gemma3ForCausalLM.num_parameters() / llama.cpp n_params of gemma-3-4b-it
}


def test_every_preset_has_a_published_total() -> None:
    assert set(PUBLISHED) == set(PRESETS)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_total_is_the_published_count(name: str) -> None:
    assert PRESETS[name].total_params == PUBLISHED[name]


# --------------------------------------------------------------------------------------------- LoRA vs PEFT

# Tiny configs of each architecture (and of each bias variant): hidden 64, 4 heads of 16, 2 KV heads.
TINY = {
    "llama": {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama-biases": {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True},
    "gemma3": {"model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24},
    "gemma3-biases": {"model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
                      "attention_bias": True, "tie_word_embeddings": False},
}


def tiny_model(values: dict) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**values))


def peft_trainable(values: dict, targets: str | list[str]) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(values), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_shape_matches_transformers(kind: str) -> None:
    shape = shape_from_hf_config(TINY[kind], kind)
    model = tiny_model(TINY[kind])
    assert count(model) == shape.total_params
    assert layer0_linears(model) == {l.name: (l.in_features, l.out_features, l.bias) for l in shape.linears()}


@pytest.mark.parametrize("kind", list(TINY))
def test_lora_params_match_peft(kind: str) -> None:
    shape = shape_from_hf_config(TINY[kind], kind)
    assert peft_trainable(TINY[kind], "all-linear") == shape.lora_params(8)
    assert peft_trainable(TINY[kind], ["q_proj", "v_proj"]) == shape.lora_params(8, ("q_proj", "v_proj"))


def test_lora_params_by_hand() -> None:
    # 2 layers x r 8 x (q 64+64 + k 64+32 + v 64+32 + o 64+64 + gate 64+112 + up 64+112 + down 112+64 = 976)
    assert shape_from_hf_config(TINY["llama"], "tiny").lora_params(8) == 15_616
    # LLaMA-2 7B, r=8, all linear layers: 32 x 8 x (4 x 8192 + 3 x 15104) = 19,988,480
    assert PRESETS["llama2-7b"].lora_params(8) == 19_988_480


# ------------------------------------------------------------------------------------------ config.json input

# Real config.json files as published on the Hub (values as in the sources named in presets.py).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 152064}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}
# google/gemma-3-4b-it: the text_config names only what differs from Gemma3TextConfig's defaults.
GEMMA3_4B_MULTIMODAL = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}

REAL_CONFIGS = {"llama2-7b": LLAMA2_7B, "llama3.1-8b": LLAMA31_8B, "mistral-7b": MISTRAL_7B,
                "qwen2.5-7b": QWEN25_7B, "gemma3-1b": GEMMA3_1B, "gemma3-4b": GEMMA3_4B_MULTIMODAL}


@pytest.mark.parametrize("preset", list(REAL_CONFIGS))
def test_real_config_json_gives_the_preset(preset: str) -> None:
    assert shape_from_hf_config(REAL_CONFIGS[preset], preset) == PRESETS[preset]


@pytest.mark.parametrize("preset", ["llama2-7b", "llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma3-1b"])
def test_real_config_json_counts_like_transformers(preset: str) -> None:
    """transformers fills in what config.json leaves out (LLaMA-2's head_dim); the parser must fill in the same."""
    model = on_meta(AutoConfig.for_model(**REAL_CONFIGS[preset]))
    assert count(model) == shape_from_hf_config(REAL_CONFIGS[preset], preset).total_params


def test_gemma3_multimodal_config_uses_text_config_defaults() -> None:
    shape = shape_from_hf_config(GEMMA3_4B_MULTIMODAL, "gemma-3-4b-it")
    assert (shape.vocab_size, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (262_208, 8, 4, 256)
    assert (shape.max_position_embeddings, shape.tie_embeddings) == (131_072, True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**GEMMA3_4B_MULTIMODAL))
    assert count(model) == 4_300_079_472  # google/gemma-3-4b-it with its vision tower
    assert count(model.model.language_model) == shape.total_params == 3_880_263_168


def test_config_file_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "Qwen2.5-7B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN25_7B), encoding="utf-8")
    from_folder = shape_from_config_file(folder)
    assert from_folder.name == "Qwen2.5-7B"
    assert dataclasses.replace(from_folder, name="qwen2.5-7b") == PRESETS["qwen2.5-7b"]
    assert resolve_model(folder) == resolve_model(str(folder)) == from_folder
    assert resolve_model(str(folder / "config.json")) == from_folder


def test_resolve_model_presets() -> None:
    assert resolve_model("qwen2.5-0.5b") is PRESETS["qwen2.5-0.5b"]
    assert resolve_model("Llama3.1-8B") is PRESETS["llama3.1-8b"]


def test_with_vocab() -> None:
    # A Japanese extension of LLaMA-2 7B's 32,000-token vocabulary to 43,176 tokens, untied: embedding and lm_head
    # both grow by 11,176 x 4096 = 45,776,896.
    base = PRESETS["llama2-7b"]
    extended = base.with_vocab(43_176)
    assert extended.name == "llama2-7b (vocab 43,176)"
    assert extended.total_params - base.total_params == 2 * 45_776_896
    assert extended.linear_params == base.linear_params and extended.lora_params(8) == base.lora_params(8)
    # Tied (Qwen2.5 0.5B): only one matrix grows; checked against transformers.
    tied = PRESETS["qwen2.5-0.5b"].with_vocab(160_000)
    assert tied.total_params - PRESETS["qwen2.5-0.5b"].total_params == (160_000 - 151_936) * 896
    assert count(on_meta(hf_config(tied))) == tied.total_params
    with pytest.raises(JpadaptError, match="vocab_size must be positive"):
        base.with_vocab(0)


# -------------------------------------------------------------------------------------------------- errors


def error_of(config: object) -> str:
    with pytest.raises(JpadaptError) as info:
        shape_from_hf_config(config, "m")  # type: ignore[arg-type]
    return str(info.value)


def without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


def test_unknown_model_type() -> None:
    message = error_of({**LLAMA31_8B, "model_type": "gpt2"})
    assert message.startswith("m: model_type 'gpt2' is not supported")
    assert "llama, mistral, qwen2, gemma3_text, gemma3" in message
    assert "model_type '' is not supported" in error_of(without(LLAMA31_8B, "model_type"))


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"])
def test_missing_key(key: str) -> None:
    assert error_of(without(QWEN25_7B, key)) == f"m: config.json has no {key!r}"


@pytest.mark.parametrize(("key", "field"), [("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                                            ("intermediate_size", "intermediate_size"),
                                            ("num_hidden_layers", "num_layers"),
                                            ("num_key_value_heads", "num_kv_heads"), ("head_dim", "head_dim"),
                                            ("max_position_embeddings", "max_position_embeddings")])
@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_sizes(key: str, field: str, value: int) -> None:
    assert error_of({**GEMMA3_1B, key: value}) == f"model m: {field} must be positive, got {value}"


def test_non_positive_heads() -> None:
    assert error_of({**LLAMA31_8B, "num_attention_heads": 0}) == "m: num_attention_heads must be positive, got 0"


def test_heads_not_divisible_by_kv_heads() -> None:
    message = error_of({**LLAMA31_8B, "num_key_value_heads": 5})
    assert message == "model m: num_heads 32 is not a multiple of num_kv_heads 5"


@pytest.mark.parametrize("value", ["4096", 4096.0, True, None, [4096]])
def test_non_integer_size(value: object) -> None:
    message = error_of({**MISTRAL_7B, "hidden_size": value})
    assert message == f"m: config.json hidden_size must be an integer, got {value!r}"


def test_bad_tie_and_structure() -> None:
    message = error_of({**LLAMA2_7B, "tie_word_embeddings": "yes"})
    assert message == "m: config.json tie_word_embeddings must be true or false, got 'yes'"
    assert error_of([LLAMA2_7B]) == "m: config.json must hold a JSON object, got list"
    assert error_of(without(GEMMA3_4B_MULTIMODAL, "text_config")) == "m: Gemma 3 config.json has no text_config object"


def test_missing_optional_keys_take_transformers_defaults() -> None:
    """Each architecture's defaults for num_key_value_heads / head_dim / max positions / tying, as transformers."""
    for values in (without(without(LLAMA2_7B, "num_key_value_heads"), "max_position_embeddings"),
                   without(MISTRAL_7B, "num_key_value_heads"),
                   {**without(QWEN25_7B, "num_key_value_heads"), "num_attention_heads": 32},  # Qwen2: 32 KV heads
                   without(without(GEMMA3_1B, "head_dim"), "tie_word_embeddings")):
        config = AutoConfig.for_model(**values)
        shape = shape_from_hf_config(values, "m")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        assert (shape.num_kv_heads, shape.head_dim, shape.max_position_embeddings, shape.tie_embeddings) == (
            config.num_key_value_heads, head_dim, config.max_position_embeddings, config.tie_word_embeddings)
    # An explicit null is filled in by transformers' __post_init__: KV heads = attention heads.
    assert shape_from_hf_config({**QWEN25_7B, "num_key_value_heads": None}, "m").num_kv_heads == 28


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(JpadaptError, match="no config.json"):
        shape_from_config_file(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(JpadaptError, match="not a readable JSON config"):
        resolve_model(str(bad))


def test_unknown_preset_lists_presets_and_close_matches() -> None:
    with pytest.raises(JpadaptError) as info:
        resolve_model("llama-2-7b")
    message = str(info.value)
    assert message.startswith("model 'llama-2-7b' is neither a preset nor an existing config.json or model folder "
                              "(did you mean llama2-7b")
    assert "presets: " + ", ".join(known_presets()) in message
    with pytest.raises(JpadaptError) as info:
        resolve_model("Qwen/Qwen2.5-7B")
    assert "did you mean qwen2.5-7b" in str(info.value) and "not downloaded" in str(info.value)
    with pytest.raises(JpadaptError) as info:
        resolve_model("zzz")
    assert "did you mean" not in str(info.value)


def test_planner_does_not_import_torch() -> None:
    code = ("import sys, pipeline.planner.presets, pipeline.planner.shapes; "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0
