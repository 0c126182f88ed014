"""A transformers tokenizer for a tokenizer spec (bundled name, folder or model folder), offline.

    tokenizer = load_hf_tokenizer("llama2")                 # bundled
    tokenizer = load_hf_tokenizer("/models/Qwen2.5-7B")      # a local folder

Training and evaluation need the transformers object (ids, BOS/EOS, chat template, `save_pretrained` into the
output model folder), while `tokenizer.load` wraps the raw files for the tokenizer report.

A folder with only a SentencePiece `tokenizer.model` (bundled LLaMA-2, Mistral, llm-jp) is converted the way
extend-vocab writes its folders (`extend_sp.write_sentencepiece_folder`): transformers' own conversion ranks
LLaMA-2's merges differently from the `.model` and splits runs of spaces into other ids.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import BUNDLED_TOKENIZERS
from pipeline.errors import JpadaptError
from pipeline.paths import resolve_path

HF_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_folder(spec: str, key: str = "model.tokenizer") -> Path:
    """The folder a spec names: bundled names are unpacked into the asset cache; paths must exist."""
    from data.assets import materialize_dir

    if spec in BUNDLED_TOKENIZERS:
        return materialize_dir(f"tokenizers/{spec}")
    path = resolve_path(spec, key)
    if not path.is_dir():
        raise JpadaptError(f"{key}: {spec} is not a folder (expected a tokenizer or model folder)")
    return path


def load_hf_tokenizer(spec: str | Path, *, trust_remote_code: bool = False, key: str = "model.tokenizer") -> Any:
    """The transformers tokenizer of `spec`. Errors name `key` and the folder."""
    from transformers import AutoTokenizer

    folder = spec if isinstance(spec, Path) else tokenizer_folder(spec, key)
    if not any((folder / name).is_file() for name in HF_FILES):
        if (folder / "tokenizer.model").is_file():
            return _from_sentencepiece(folder / "tokenizer.model")
        raise JpadaptError(f"{key}: {folder} has no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JpadaptError(f"{key}: cannot load the tokenizer in {folder} ({first})") from None


def _from_sentencepiece(model_file: Path) -> Any:
    from transformers import AutoTokenizer

    from tokenizer.extend_sp import read_model, write_sentencepiece_folder

    with tempfile.TemporaryDirectory(prefix="jpadapt-tokenizer-") as tmp:
        write_sentencepiece_folder(read_model(model_file), Path(tmp), None)
        # Loaded fully into memory, so the temporary folder can go.
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
