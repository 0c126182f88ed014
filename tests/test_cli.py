"""The `jpadapt` command as a user runs it: exit codes, one-line errors, no tracebacks, nothing marked done."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.config import DEFAULT_CONFIG
from pipeline.runner import available_stages

REPO = Path(__file__).resolve().parent.parent
DEMO = DEFAULT_CONFIG.read_text(encoding="utf-8")


def jpadapt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def state_of(status_stdout: str, stage: str) -> str:
    """The state column of `jpadapt status` for one stage."""
    for line in status_stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == stage:
            return re.split(r"\s{2,}", parts[1].strip())[0]
    raise AssertionError(f"{stage} not in status output:\n{status_stdout}")


def small_config(tmp_path: Path, ja_lines: list[bytes], extra: str = "") -> Path:
    (tmp_path / "ja.jsonl").write_bytes(b"".join(ja_lines))
    config = (
        "# test pipeline\nrun:\n  name: t\n  output_dir: runs\n"
        "data:\n  ja:\n    train: ja.jsonl\n"
        "prepare:\n  min_chars: 5\n  heldout_fraction: 0.5\n" + extra
    )
    path = tmp_path / "p.yaml"
    path.write_text(config, encoding="utf-8")
    return path


def doc(text: str, id_: str) -> bytes:
    return (json.dumps({"id": id_, "text": text}, ensure_ascii=False) + "\n").encode()


GOOD = [doc(f"これは{i}番目の文書です。日本語の文章がここに続きます。" * 3, f"d{i}") for i in range(40)]


def test_parser_and_command_map_agree() -> None:
    parser, commands = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(commands)
    assert {spec.name for spec in available_stages()} <= set(commands)
    assert {"run", "status", "validate"} <= set(commands)


def test_listing_stages_does_not_import_torch() -> None:
    code = "import sys, pipeline.cli, stages; pipeline.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "nope.yaml"], ["nope.yaml: config file not found"]),
        (["frobnicate"], ["unknown command 'frobnicate'", "prepare"]),
        (["evaluat"], ["unknown command 'evaluat' (did you mean evaluate?"]),
        (["run", "a.yaml", "b.yaml"], ["at most one config file"]),
        (["status", "prepare.min_chars=abc"], ["override 'prepare.min_chars=abc'", "must be a valid integer"]),
        (["prepare", "--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(jpadapt(*args, cwd=tmp_path), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda t: t + "data: [\n", ["invalid YAML"]),
        (lambda t: t.replace("min_chars: 50", "min_chars: fifty"), ["prepare.min_chars: must be a valid integer"]),
        (lambda t: t.replace("min_chars: 50", "min_chrs: 50"), ["prepare.min_chrs: unknown key"]),
        (lambda t: t.replace("threshold: 0.8", "threshold: 1.5"), ["prepare.dedup.threshold", "(got 1.5)"]),
    ],
)
def test_config_errors(tmp_path: Path, edit, fragments: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(edit(DEMO), encoding="utf-8")
    for command in ("validate", "run", "status"):
        result = jpadapt(command, str(path), cwd=tmp_path)
        assert_one_line_error(result, str(path), *fragments)
    assert not (tmp_path / "runs").exists()


def prepare_fails(tmp_path: Path, path: Path, *fragments: str, state: str = "incomplete") -> None:
    result = jpadapt("prepare", str(path), cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    stage_dir = tmp_path / "runs" / "t" / "stages"
    assert not (stage_dir / "prepare" / "manifest.json").exists()  # nothing half-written looks done
    status = jpadapt("status", str(path), cwd=tmp_path)
    assert status.returncode == 0
    assert state_of(status.stdout, "prepare") == state, status.stdout


def test_missing_data_file(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD)
    path.write_text(path.read_text().replace("train: ja.jsonl", "train: missing.jsonl"))
    prepare_fails(tmp_path, path, "data.ja.train: file not found: missing.jsonl", state="error")


def test_corrupt_jsonl_line(tmp_path: Path) -> None:
    path = small_config(tmp_path, [*GOOD[:5], b'{"id": "x", "text": "broken\n', *GOOD[5:]])
    prepare_fails(tmp_path, path, "ja.jsonl:6", "invalid JSON")


def test_non_utf8_data(tmp_path: Path) -> None:
    path = small_config(tmp_path, [*GOOD[:2], '{"id": "x", "text": "日本語"}\n'.encode("shift_jis"), *GOOD[2:]])
    prepare_fails(tmp_path, path, "ja.jsonl:3", "UTF-8")


def test_empty_corpus_after_filtering(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD, extra="  max_chars: 6\n")
    prepare_fails(tmp_path, path, "data.ja", "no training documents left")


def test_skip_mode_counts_bad_lines_and_finishes(tmp_path: Path) -> None:
    path = small_config(tmp_path, [*GOOD[:5], b"{not json\n", b"\xff\xfe\n", *GOOD[5:]], extra="  on_error: skip\n")
    result = jpadapt("prepare", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "runs/t/stages/prepare/stats.json").read_text())
    skipped = {kind: n for kind, n in stats["languages"]["ja"]["skipped_lines"].items() if n}
    assert skipped == {"invalid_json": 1, "not_utf8": 1}


def test_run_twice_status_and_override(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD)
    first = jpadapt("run", str(path), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "prepare: running (never run)" in first.stdout and "prepare: done in" in first.stdout
    second = jpadapt("run", str(path), cwd=tmp_path)
    assert second.returncode == 0
    assert "prepare: up to date" in second.stdout and "Nothing to do" in second.stdout
    status = jpadapt("status", str(path), "prepare.min_chars=20", cwd=tmp_path)
    assert state_of(status.stdout, "prepare") == "stale"
    assert "- prepare.min_chars: 5 -> 20" in status.stdout
    validate = jpadapt("validate", str(path), cwd=tmp_path)
    assert validate.returncode == 0 and "valid" in validate.stdout


def test_status_of_a_run_that_never_started_writes_nothing(tmp_path: Path) -> None:
    result = jpadapt("status", cwd=tmp_path)
    assert result.returncode == 0
    assert state_of(result.stdout, "prepare") == "never run"
    assert list(tmp_path.iterdir()) == []
