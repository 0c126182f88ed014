"""`check_model_folder`: every model folder the pipeline will load is refused before any work when loading would
refuse it, with one message naming the folder and what is wrong, from the file system alone (no torch).

The folders here are file sets, not models: the check reads config.json and the first bytes of each weights file.
The stages that run it before they start (cpt, sft, evaluate) are tested in their own files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError
from pipeline.models import check_model_folder, model_inputs
from tests.helpers.cli import REPO

CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def safetensors_bytes(tag: str = "w") -> bytes:
    """A safetensors file holding no tensors: the 8-byte header length, then the JSON header."""
    header = json.dumps({"__metadata__": {"tag": tag}}).encode()
    return len(header).to_bytes(8, "little") + header


def folder_with(root: Path, files: dict[str, bytes | str]) -> Path:
    folder = root / "m"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def refusal(folder: Path, key: str = "model.path") -> str:
    with pytest.raises(JpadaptError) as info:
        check_model_folder(str(folder), key)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}: ")
    return message


def test_single_file_and_sharded_safetensors_folders_pass(tmp_path: Path) -> None:
    single = folder_with(tmp_path, {"config.json": json.dumps(CONFIG), "model.safetensors": safetensors_bytes()})
    assert check_model_folder(str(single), "model.path") == single.resolve()
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(CONFIG))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": SHARDS[0], "b": SHARDS[1], "c": SHARDS[1]}}))
    for shard in SHARDS:
        (sharded / shard).write_bytes(safetensors_bytes(shard))
    assert check_model_folder(sharded, "sft.base_model") == sharded.resolve()


def test_pickle_only_folder_names_the_file_and_why(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"config.json": json.dumps(CONFIG), "pytorch_model.bin": b"\x80\x02pickle"})
    message = refusal(folder, "evaluate.extra_models[0]")
    assert str(folder.resolve()) in message
    assert "no safetensors weights" in message and "only pytorch_model.bin" in message
    assert "pickle" in message and "convert them to safetensors" in message


@pytest.mark.parametrize(
    ("files", "fragments"),
    [
        ({"model.safetensors": safetensors_bytes()}, ["no config.json"]),
        ({"config.json": "{not json", "model.safetensors": safetensors_bytes()}, ["config.json", "JSON"]),
        ({"config.json": json.dumps(CONFIG)}, ["no safetensors weights", "no weights files at all"]),
        ({"config.json": json.dumps(CONFIG), "consolidated.safetensors": safetensors_bytes()},
         ["found consolidated.safetensors", "model.safetensors.index.json"]),
        ({"config.json": json.dumps(CONFIG),
          "model.safetensors.index.json": json.dumps({"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}}),
          SHARDS[0]: safetensors_bytes()},
         ["1 of the 2 weight shards", "missing: model-00002-of-00002.safetensors"]),
        ({"config.json": json.dumps(CONFIG), "model.safetensors.index.json": "{}"}, ["no weight_map"]),
        ({"config.json": json.dumps(CONFIG),
          "model.safetensors": "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4\n"},
         ["model.safetensors", "Git LFS pointer", "git lfs pull"]),
        ({"config.json": json.dumps(CONFIG), "model.safetensors": safetensors_bytes()[:-5]},
         ["model.safetensors", "not a safetensors file"]),
        ({"config.json": json.dumps(CONFIG), "model.safetensors": b"PK\x03\x04 a zip"},
         ["model.safetensors", "not a safetensors file"]),
    ],
    ids=["no-config", "bad-config", "no-weights", "unindexed-shards", "missing-shard", "empty-index", "lfs-pointer",
         "truncated", "zip"],
)
def test_what_loading_would_refuse_is_one_message(tmp_path: Path, files: dict, fragments: list[str]) -> None:
    message = refusal(folder_with(tmp_path, files))
    for fragment in fragments:
        assert fragment in message, message


def test_missing_folder_or_a_file_is_never_a_hub_id(tmp_path: Path) -> None:
    assert "does not exist (models are never downloaded" in refusal(tmp_path / "meta-llama" / "Llama-2-7b-hf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert "is not a folder" in refusal(tmp_path / "model.gguf")


def test_model_inputs_checks_model_path_and_the_planner_needs_config_json_only(tmp_path: Path) -> None:
    """What puts the check before the first stage: the runner resolves every planned stage's inputs first."""
    folder = folder_with(tmp_path, {"config.json": json.dumps(CONFIG), "pytorch_model.bin": b"pickle"})
    with pytest.raises(JpadaptError, match=r"^model\.path: .*only pytorch_model\.bin"):
        model_inputs(ModelConfig(path=str(folder)))
    assert model_inputs(ModelConfig(path=str(folder)), config_only=True) == {"model.path": [folder / "config.json"]}


def test_the_check_imports_no_torch(tmp_path: Path) -> None:
    """It runs before every command's first stage: milliseconds, not the seconds torch takes to import."""
    folder = folder_with(tmp_path, {"config.json": json.dumps(CONFIG), "model.safetensors": safetensors_bytes()})
    code = ("import sys; from pipeline.models import check_model_folder; "
            f"check_model_folder({str(folder)!r}, 'model.path'); "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
