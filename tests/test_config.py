"""Pipeline YAML: every shipped config validates; bad input gets one message naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import CONFIG_DIR, DEFAULT_CONFIG, load_config, resolved_yaml
from pipeline.errors import JpadaptError
from pipeline.yamlio import parse_yaml

DEMO = DEFAULT_CONFIG.read_text(encoding="utf-8")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(JpadaptError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run.name
    assert path.read_text(encoding="utf-8").startswith("#"), "a shipped config opens with the command that runs it"


def test_demo_is_the_default_and_enables_prepare() -> None:
    cfg = load_config()
    assert cfg.run.name == "demo"
    assert cfg.enabled("prepare")
    assert cfg.prepare.normalization == "NFKC"
    assert cfg.data.ja.train == ["bundled:corpus/ja_train.jsonl"]  # a single path is accepted as a list


def test_overrides_keep_types_and_reach_nested_keys() -> None:
    cfg = load_config(None, ["prepare.min_chars=100", "prepare.dedup.threshold=0.9", "run.seed=7"])
    assert (cfg.prepare.min_chars, cfg.prepare.dedup.threshold, cfg.run.seed) == (100, 0.9, 7)


def test_override_creates_a_section_and_reads_yaml_floats() -> None:
    cfg = load_config(None, ["cpt.lr=1e-5", "cpt.max_steps=3", "model.from_config={model_type: llama}"])
    assert cfg.cpt.lr == 1e-5 and isinstance(cfg.cpt.lr, float)
    assert cfg.enabled("cpt")


def test_yaml_floats_follow_yaml_1_2() -> None:
    assert parse_yaml("a: 1e-5\nb: 3E2\nc: 1.5\nd: '1e-5'\ne: 12", "x") == {
        "a": 1e-5, "b": 300.0, "c": 1.5, "d": "1e-5", "e": 12,
    }


def test_missing_file(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "run:\n  name: x\ndata: [\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: invalid YAML")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, DEMO + "\nprepare:\n  min_chars: 3\n")
    assert "duplicate key 'prepare'" in error_of(path)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, DEMO.replace("min_chars: 50", "min_char: 50"))
    line = DEMO.splitlines().index("  min_chars: 50") + 1
    assert error_of(path) == f"{path}:{line}: prepare.min_char: unknown key (did you mean 'prepare.min_chars'?)"


def test_unknown_top_level_section_lists_known(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, DEMO + "\ntraining:\n  lr: 1\n"))
    assert "training: unknown key" in message and "cpt" in message


def test_wrong_type_is_not_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, DEMO.replace("min_chars: 50", "min_chars: '50'"))
    assert "prepare.min_chars: must be a valid integer (got '50')" in error_of(path)
    assert "must be a valid boolean" in error_of(None, ["prepare.dedup.exact=maybe"])


def test_value_out_of_range_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, DEMO.replace("replay_ratio: 0.1 ", "replay_ratio: 1.5 "))
    message = error_of(path)
    assert message.endswith("cpt.replay_ratio: must be less than 1 (got 1.5)")
    assert message.startswith(f"{path}:")


def test_override_errors_name_the_override() -> None:
    assert error_of(None, ["prepare.min_chars=-3"]) == (
        "override 'prepare.min_chars=-3': prepare.min_chars: must be greater than or equal to 1 (got -3)"
    )
    assert "expected KEY=VALUE" in error_of(None, ["=3"])
    assert "did you mean 'prepare.dedup'" in error_of(None, ["prepare.dedupe.near=false"])


def test_cross_section_rules(tmp_path: Path) -> None:
    english = "  en:\n    train: bundled:corpus/en_train.jsonl\n    heldout: bundled:corpus/en_heldout.jsonl\n"
    assert english in DEMO
    message = error_of(write(tmp_path, DEMO.replace(english, "")))
    assert "cpt.replay_ratio: is 0.1 but data.en (the English replay corpus) is missing" in message
    assert "QLoRA" in error_of(None, ["sft.zero_stage=3"])
    assert "give either model.path or model.from_config" in error_of(None, ["model.path=/m"])
    assert "min_chars (500) is larger than prepare.max_chars (100)" in error_of(
        None, ["prepare.min_chars=500", "prepare.max_chars=100"]
    )


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "the file is empty" in error_of(write(tmp_path, "# nothing\n"))


def test_non_utf8_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"run:\n  name: \xff\xfe\n")
    assert error_of(path) == f"{path}: not UTF-8 (byte 13)"


def test_resolved_yaml_round_trips() -> None:
    cfg = load_config(None, ["prepare.min_chars=77"])
    again = parse_yaml(resolved_yaml(cfg), "resolved")
    assert again["prepare"]["min_chars"] == 77
    assert again["prepare"]["dedup"]["num_perm"] == 128  # defaults are written out


def _leaf_keys(model, prefix: str = "") -> list[str]:
    from pipeline.config import _model_in

    keys = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        keys += _leaf_keys(sub, f"{prefix}{name}.") if sub is not None else [f"{prefix}{name}"]
    return keys


def test_readme_documents_every_config_key() -> None:
    from pipeline.config import PipelineConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [key for key in _leaf_keys(PipelineConfig) if not key.startswith("data.en.") and f"`{key}`" not in readme]
    assert missing == [], f"add these keys to the README's YAML reference: {missing}"
