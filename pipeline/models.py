"""The model a config names: its files, its config values, and loading, building and saving it the way every
stage does (extend-vocab, plan, cpt, sft, evaluate).

    check_model_folder(path, "sft.base_model")     # a folder loading would refuse fails here, before any work
    files = model_inputs(cfg.model)                # {config key: files} the stage's fingerprint hashes
    n_rows = model_vocab_size(cfg.model)           # embedding rows, from config.json only (no weights read)
    model = load_causal_lm(cfg.model, seed=1234)   # a local HF folder, or random weights from model.from_config
    save_model_folder(model, out_dir)              # config.json + *.safetensors

Nothing here downloads. A `model.path` that is not an existing folder is an error here: transformers would take
it for a Hub id. Weights are read from safetensors only: `pytorch_model.bin` files are pickles, which can run code
when loaded. All problems a user can fix (a missing folder or config.json, an unknown `model_type`, no
safetensors weights, bad `from_config` values) are `JpadaptError`s naming the file or key.

`check_model_folder` finds the folder problems (everything but the model type) from the file system alone, in
milliseconds: `model_inputs` runs it, so the runner refuses a bad model.path before the first stage of a command
starts, and each stage runs it on every folder it will load before it launches or scores anything.

torch and transformers are imported inside the functions that need them: `pipeline/` stays torch-free at import,
so the CLI and fingerprints can name a model's files without loading a deep-learning library.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedConfig, PreTrainedModel

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded model: {"weight_map": {tensor name: shard file}}
# Weights files other than safetensors that loaders unpickle (transformers' pytorch_model*.bin, torch.save files).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def torch_dtype(name: str) -> torch.dtype:
    """"float32" / "bfloat16" / "float16" as a torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------------------------
# The files of a model, for fingerprints


def model_folder_files(path: str | Path, key: str) -> list[Path]:
    """Every file of a model folder that loading can read: config.json, generation_config.json, the weights
    (and their index), the tokenizer files, chat template, new_tokens.json. All files below the folder, sorted,
    except hidden ones (`.cache/`, `.git/`): which of them a loader opens depends on the library version, so all
    are hashed rather than a list that could miss one. A single file (a GGUF) is itself."""
    from pipeline.paths import resolve_path

    folder = resolve_path(str(path), key).resolve()
    if folder.is_file():
        return [folder]
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def tokenizer_files(spec: str, key: str) -> list[Path]:
    """The files a tokenizer spec stands for: a bundled name's shipped files, or the folder or file it names."""
    from pipeline.config import BUNDLED_TOKENIZERS

    if spec in BUNDLED_TOKENIZERS:
        from data.assets import bundled_names, stored_path

        prefix = f"tokenizers/{spec}/"
        return [stored_path(name) for name in bundled_names() if name.startswith(prefix)]
    return model_folder_files(spec, key)


def model_inputs(model_cfg: ModelConfig, *, config_only: bool = False) -> dict[str, list[Path]]:
    """{config key: files} of the model section: `model.path`'s folder and `model.tokenizer` (bundled or a
    path). The one place that says which files a model is made of: every stage that reads the model declares
    these as inputs, so replacing the weights in the same folder makes it stale. `config_only`: config.json
    alone (the planner reads nothing else). The folder is checked first (`check_model_folder`): the runner
    resolves every planned stage's inputs before it runs any, so a folder loading would refuse stops the command
    before its first stage."""
    files: dict[str, list[Path]] = {}
    if model_cfg.path is not None:
        found = model_folder_files(model_cfg.path, "model.path")
        check_model_folder(model_cfg.path, "model.path", config_only=config_only)
        files["model.path"] = [p for p in found if p.name == "config.json"] if config_only else found
    if not config_only and model_cfg.tokenizer is not None:
        files["model.tokenizer"] = tokenizer_files(model_cfg.tokenizer, "model.tokenizer")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Cheap facts, no weights


def model_config_values(model_cfg: ModelConfig) -> dict[str, Any]:
    """The model's config values (config.json, or `from_config` over the model type's defaults), without
    loading weights. Multimodal configs (e.g. Gemma 3 4B) keep the language model's values under `text_config`,
    which are merged over the top level here."""
    if model_cfg.path is not None:
        values = _read_config_json(_model_folder(model_cfg.path))
    elif model_cfg.from_config is not None:
        # The model type's defaults fill what from_config leaves out (LLaMA's vocab_size is 32000 by default).
        values = _build_config(model_cfg.from_config).to_dict()
    else:
        raise JpadaptError("model: set model.path (a local model folder) or model.from_config")
    text = values.get("text_config")
    return {**values, **text} if isinstance(text, dict) else values


def model_vocab_size(model_cfg: ModelConfig) -> int:
    """The model's number of embedding rows, read from config.json or `from_config`, without loading weights.

    Stages call it first to refuse, before any work, a model whose vocabulary does not match the base tokenizer.
    """
    size = model_config_values(model_cfg).get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        where = f"{_model_folder(model_cfg.path) / 'config.json'}" if model_cfg.path is not None else "model.from_config"
        raise JpadaptError(f"{where}: no valid vocab_size (found {size!r})")
    return size


# ---------------------------------------------------------------------------------------------------------------
# Loading and building


def load_causal_lm(model_cfg: ModelConfig, seed: int | None = None) -> PreTrainedModel:
    """The causal LM that `model_cfg` describes, on the CPU, in the dtype it asks for.

    Arguments:
        model_cfg: the `model` section. `path`: a local Hugging Face folder (config.json + safetensors);
            `from_config`: HF config values including `model_type`, with randomly initialised weights.
            `dtype` "auto" keeps the folder's dtype (config.json's `dtype`/`torch_dtype`); a model built from
            config is float32 under "auto" (random init in half precision only adds rounding).
        seed: seeds the random initialisation of a `from_config` model, so that the same seed gives the same
            weights; the global torch RNG is left as it was. Ignored for folders. None: the current global RNG.
    """
    if model_cfg.path is not None:
        return _load_folder(model_cfg)
    if model_cfg.from_config is not None:
        return _build_random(model_cfg, seed)
    raise JpadaptError("model: set model.path (a local model folder) or model.from_config")


def save_model_folder(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Save `model` as a Hugging Face folder (config.json, generation_config.json, *.safetensors).

    transformers v5 writes safetensors only (its `safe_serialization` switch is gone); tied weights are stored
    once. Returns the folder.
    """
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def _load_folder(model_cfg: ModelConfig) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = _model_folder(model_cfg.path)
    values = _read_config_json(folder)  # clear errors for a missing or broken config.json come first
    model_type = values.get("model_type")
    remote = model_cfg.trust_remote_code and "auto_map" in values
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING and not remote:
        raise JpadaptError(f"{folder / 'config.json'}: {_unknown_type(model_type)}")
    _check_safetensors(folder)
    try:
        config = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=model_cfg.trust_remote_code, local_files_only=True
        )
    except ValueError as exc:  # unknown model_type, or remote code that is not trusted
        raise JpadaptError(f"{folder / 'config.json'}: {_first_line(exc)}") from exc
    _check_causal_lm(config, f"{folder / 'config.json'}", model_cfg.trust_remote_code)
    dtype: str | torch.dtype = "auto" if model_cfg.dtype == "auto" else torch_dtype(model_cfg.dtype)
    return AutoModelForCausalLM.from_pretrained(
        str(folder),
        config=config,
        dtype=dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
        local_files_only=True,
    )


def _build_random(model_cfg: ModelConfig, seed: int | None) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    config = _build_config(model_cfg.from_config)
    _check_causal_lm(config, "model.from_config", model_cfg.trust_remote_code)
    dtype = torch_dtype("float32" if model_cfg.dtype == "auto" else model_cfg.dtype)
    if seed is None:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    # fork_rng restores the global CPU RNG afterwards: building a model must not shift the data order of the
    # caller's own seeded RNG. devices=[] keeps CUDA RNGs out of it (and avoids its warning on multi-GPU hosts).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)


def _build_config(values: dict[str, Any]) -> PreTrainedConfig:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(values)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise JpadaptError("model.from_config: needs model_type (e.g. llama, qwen2, mistral, gemma3_text)")
    if model_type not in CONFIG_MAPPING:
        raise JpadaptError(f"model.from_config.model_type: {_unknown_type(model_type)}")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as exc:  # e.g. hidden_size not divisible by num_attention_heads
        raise JpadaptError(f"model.from_config: {_first_line(exc)}") from exc


def _check_causal_lm(config: PreTrainedConfig, where: str, trust_remote_code: bool) -> None:
    """A clear error for a known config type that has no causal-LM class (e.g. a BERT folder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise JpadaptError(f"{where}: model_type {config.model_type!r} is not a causal language model in transformers")


# ---------------------------------------------------------------------------------------------------------------
# Folder checks


def check_model_folder(path: str | Path, key: str, *, config_only: bool = False) -> Path:
    """Refuse, before any work, a model folder that loading would refuse: it must exist, hold a readable
    config.json and (unless `config_only`) safetensors weights: model.safetensors, or the shards that
    model.safetensors.index.json names, every one present and a real safetensors file (not a Git LFS pointer).
    pytorch_model.bin alone is refused: it is a pickle, and unpickling can run code. `key` names the config
    entry in the one-line error. Reads config.json and 9 bytes of each weights file; no torch. Returns the folder,
    resolved. The model type is checked at load time (knowing the types needs transformers, seconds to import)."""
    folder = _model_folder(str(path), key)
    try:
        _read_config_json(folder)
        if not config_only:
            _check_safetensors(folder)
    except JpadaptError as exc:
        raise JpadaptError(f"{key}: {exc}") from None
    return folder


def _model_folder(path: str, key: str = "model.path") -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise JpadaptError(f"{key}: {path} does not exist (models are never downloaded; give a local folder)")
    if not folder.is_dir():
        raise JpadaptError(f"{key}: {path} is not a folder (expected a Hugging Face model folder)")
    return folder.resolve()


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise JpadaptError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise JpadaptError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise JpadaptError(f"{path}: expected a JSON object, found {type(values).__name__}")
    return values


def _check_safetensors(folder: Path) -> None:
    """The weights transformers loads with use_safetensors=True: model.safetensors, or the shards the index
    names. Each must be a safetensors file: 8 bytes of header length, then a JSON header ('{')."""
    index = folder / INDEX_FILE
    if index.is_file():
        shards = _index_shards(index)
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise JpadaptError(f"{folder}: {len(missing)} of the {len(shards)} weight shards that {INDEX_FILE} "
                               f"names are missing: {shown}")
        files = [folder / name for name in shards]
    elif (folder / SAFETENSORS_FILE).is_file():
        files = [folder / SAFETENSORS_FILE]
    else:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if others:
            why = f"found {', '.join(others[:3])}, but without {INDEX_FILE} to say which weights they hold"
        elif pickles:
            why = (f"only {', '.join(pickles[:3])}: pickle weights, which jpadapt refuses to load (unpickling can "
                   "run code); convert them to safetensors where you trust the file (from_pretrained, then "
                   "save_pretrained)")
        else:
            why = "no weights files at all"
        raise JpadaptError(f"{folder}: no safetensors weights ({SAFETENSORS_FILE} or {INDEX_FILE}); {why}")
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise JpadaptError(f"{file}: {problem}")


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise JpadaptError(f"{index}: cannot read it as a JSON object ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise JpadaptError(f"{index}: no weight_map of tensor names to shard files")
    return sorted(set(weight_map.values()))


def _safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a safetensors file, from its first 9 bytes and its size; None when it may be one."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(9)
    if head.startswith(b"version h"):  # "version https://git-lfs.github.com/spec/v1"
        return "a Git LFS pointer, not the weights (fetch them: git lfs pull)"
    if len(head) < 9:
        return f"not a safetensors file ({size} bytes)"
    header = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or 8 + header > size:
        return "not a safetensors file (no JSON header after the 8-byte length; truncated or another format)"
    return None


def _unknown_type(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown model_type {model_type!r} for this transformers version{hint}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# 4-bit bases (QLoRA): sft trains on them, evaluate scores the adapter on them as it was trained


def nf4_quantization(compute: torch.dtype) -> Any:
    """QLoRA's 4-bit storage: NF4 with double quantization (the quantization constants quantized too)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def plain_4bit_kernels(model: Any) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into a CPU inference layout the first time
    it runs in eval mode without gradients, and packs it back when the state dict is read; the round trip is not
    bit-exact, so a model that alternates training, evaluation and saving drifts from its own saved base
    (measured: logits 1.5e-3 apart after one step). Keeping the standard layout makes CPU runs compute what GPU
    runs compute: dequantize, then matmul in the compute dtype."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_frozen_base(folder: str, quantization: str, dtype: str, device: Any, trust_remote_code: bool) -> Any:
    """The base an adapter was trained on, as sft loaded it: 4-bit NF4 (`quantization` "nf4") with its
    embedding and output layers in the compute `dtype` ("float32" or "bfloat16"), or plain in that dtype."""
    from transformers import AutoModelForCausalLM

    compute = torch_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": compute, "local_files_only": True, "use_safetensors": True,
                              "trust_remote_code": trust_remote_code}
    if quantization != "nf4":
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4_quantization(compute),
                                                 device_map={"": device}, **kwargs)
    plain_4bit_kernels(model)
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None:
            layer.to(compute)
    return model
