"""Named model shapes: the values of each model's official Hugging Face config.json, so the planner needs no download.

Each entry is written with config.json's own key names and read by `shape_from_hf_config`, the same code that reads
a local config.json. Every preset's total parameter count is checked in tests/test_planner_shapes.py against
transformers (the same config instantiated on the meta device) and against the published count.

Sources (stored public copies; none fetched at run time):
  litgpt    Lightning-AI/litgpt litgpt/config.py, its "https://huggingface.co/<id>/blob/main/config.json" entries
  maxtext   AI-Hypercomputer/maxtext src/MaxText/utils/ckpt_conversion/utils/hf_model_configs.py (HF configs)
  keras-hub keras-team/keras-hub keras_hub/src/models/<family>/<family>_presets.py ("params" = total count)
head_dim is written out where config.json leaves it to transformers (hidden_size / num_attention_heads).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pipeline.errors import JpadaptError
from pipeline.planner.shapes import ModelShape, shape_from_config_file, shape_from_hf_config


def _llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           max_positions: int, model_type: str = "llama") -> dict:
    """LLaMA-2/3 and Mistral: untied embeddings, head_dim 128 (hidden / heads)."""
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": hidden // heads, "tie_word_embeddings": False, "max_position_embeddings": max_positions}


def _qwen2(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool,
           max_positions: int) -> dict:
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": hidden // heads, "tie_word_embeddings": tied, "max_position_embeddings": max_positions}


def _gemma3(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            max_positions: int) -> dict:
    """Gemma 3 text models: head_dim 256 (not hidden / heads), tied embeddings."""
    return {"model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": 256, "tie_word_embeddings": True,
            "max_position_embeddings": max_positions}


_CONFIGS: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf (litgpt "Llama-2-7b{}-hf"; n_embd/n_head are litgpt's defaults 4096/32)
    # 6,738,415,616 parameters (keras-hub llama2_7b_en)
    "llama2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    # meta-llama/Llama-2-13b-hf (litgpt "Llama-2-13b{}-hf") -- 13,015,864,320
    "llama2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    # meta-llama/Llama-2-70b-hf (litgpt "Llama-2-70b{}-hf", 8 KV heads) -- 68,976,648,192
    "llama2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    # meta-llama/Meta-Llama-3-8B (litgpt "Llama-3-8B{}": padded vocab 128,256, block 8192)
    # 8,030,261,248 (keras-hub llama3_8b_en)
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192),
    # meta-llama/Meta-Llama-3-70B (litgpt "Llama-3-70B{}") -- 70,553,706,496
    "llama3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192),
    # meta-llama/Llama-3.1-8B (litgpt "Llama-3.1-8B{}"; maxtext llama31_8b_config) -- same shapes as 3-8B,
    # 131,072 positions (rope_scaling llama3, factor 8)
    "llama3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, 131072),
    # meta-llama/Llama-3.1-70B (litgpt "Llama-3.1-70B{}"; maxtext llama31_70b_config)
    "llama3.1-70b": _llama(128256, 8192, 28672, 80, 64, 8, 131072),
    # meta-llama/Llama-3.1-405B (litgpt "Llama-3.1-405B{}"; maxtext llama31_405b_config) -- 405,853,388,800
    "llama3.1-405b": _llama(128256, 16384, 53248, 126, 128, 8, 131072),
    # Qwen/Qwen2.5-*: base-model configs (litgpt "Qwen2.5-*"; maxtext-style qwen25_*_config listing
    # "From https://huggingface.co/Qwen/Qwen2.5-*/blob/main/config.json"). The -Instruct configs differ only in
    # max_position_embeddings (32,768) and not in any shape. 0.5B / 1.5B / 3B tie the embeddings.
    "qwen2.5-0.5b": _qwen2(151936, 896, 4864, 24, 14, 2, True, 32768),  # 494,032,768 (keras-hub)
    "qwen2.5-1.5b": _qwen2(151936, 1536, 8960, 28, 12, 2, True, 131072),  # 1,543,714,304
    "qwen2.5-3b": _qwen2(151936, 2048, 11008, 36, 16, 2, True, 32768),  # 3,085,938,688 (keras-hub)
    "qwen2.5-7b": _qwen2(152064, 3584, 18944, 28, 28, 4, False, 131072),  # 7,615,616,512
    "qwen2.5-14b": _qwen2(152064, 5120, 13824, 48, 40, 8, False, 131072),  # 14,770,033,664
    "qwen2.5-32b": _qwen2(152064, 5120, 27648, 64, 40, 8, False, 131072),  # 32,763,876,352 (keras-hub)
    "qwen2.5-72b": _qwen2(152064, 8192, 29568, 80, 64, 8, False, 131072),  # 72,706,203,648 (keras-hub)
    # mistralai/Mistral-7B-v0.1 (litgpt "Mistral-7B-{}v0.1": vocab 32,000; HF config max_position_embeddings
    # 32,768, sliding window 4096) -- 7,241,732,096 (keras-hub mistral_7b_en). v0.3 has vocab 32,768: give its
    # config.json instead.
    "mistral-7b": _llama(32000, 4096, 14336, 32, 32, 8, 32768, model_type="mistral"),
    # google/gemma-3-270m (keras-hub gemma3_270m: 18 layers, 268,098,176; rasbt/LLMs-from-scratch ch05/12_gemma3
    # GEMMA3_CONFIG_270M: 640 / 2048 / 4 heads / 1 KV head / head_dim 256 / 32,768 context)
    "gemma3-270m": _gemma3(262144, 640, 2048, 18, 4, 1, 32768),
    # google/gemma-3-1b-pt (litgpt "Gemma-3-1b-it"; keras-hub gemma3_1b: 999,885,952)
    "gemma3-1b": _gemma3(262144, 1152, 6912, 26, 4, 1, 32768),
    # google/gemma-3-4b-pt text model (Gemma3ForConditionalGeneration's language_model). Its config.json's
    # text_config names only hidden_size 2560, intermediate_size 10240, num_hidden_layers 34: vocab 262,208,
    # 8 / 4 heads, head_dim 256 and 131,072 positions are Gemma3TextConfig's defaults (litgpt "Gemma-3-4b-it"
    # agrees on the shapes but pads to 262,144). 3,880,263,168 text parameters; 4,300,079,472 with the vision
    # tower (google/gemma-3-4b-it).
    "gemma3-4b": _gemma3(262208, 2560, 10240, 34, 8, 4, 131072),
}

PRESETS: dict[str, ModelShape] = {name: shape_from_hf_config(config, name) for name, config in _CONFIGS.items()}


def known_presets() -> list[str]:
    """Preset names, by family and size."""
    return list(PRESETS)


def resolve_model(spec: str | Path) -> ModelShape:
    """A preset name (case-insensitive), or a path to a config.json or to a model folder holding one."""
    key = str(spec).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec).expanduser()
    if path.exists():
        return shape_from_config_file(path)
    close = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise JpadaptError(f"model {str(spec)!r} is neither a preset nor an existing config.json or model folder{hint}; "
                       f"presets: {', '.join(PRESETS)} (Hub ids are not downloaded: pass a local config.json)")
