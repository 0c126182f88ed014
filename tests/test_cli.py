"""The `jpadapt` command as a user runs it: exit codes, one-line errors, no tracebacks, nothing marked done.

Most cases run in this process (`run_cli`); the `real_process` tests check the same things end to end."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.config import DEFAULT_CONFIG
from pipeline.runner import available_stages
from tests.helpers.cli import REPO, assert_one_line_error, jpadapt, run_cli, state_of
from tests.helpers.configs import GOOD, small_config

DEMO = DEFAULT_CONFIG.read_text(encoding="utf-8")




def test_parser_and_command_map_agree() -> None:
    parser, commands = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(commands)
    assert {spec.name for spec in available_stages()} <= set(commands)
    assert {"run", "status", "validate"} <= set(commands)


HEAVY = ("torch", "transformers", "deepspeed", "numpy", "scipy", "datatrove", "matplotlib", "pyarrow", "tokenizers")


@pytest.mark.parametrize("command", [["--help"], ["validate"], ["status"]])
def test_read_only_commands_import_no_heavy_library(command: list[str], tmp_path: Path) -> None:
    """`jpadapt --help`, `validate` and `status` start in a fraction of a second: no deep-learning, array or
    MinHash library is imported (they cost ~1-2 s before anything is printed)."""
    code = ("import sys, pipeline.cli\n"
            f"try:\n    pipeline.cli.main({command!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "HEAVY []" in out.stderr, out.stderr


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
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


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
        result = run_cli(command, str(path), cwd=tmp_path)
        assert_one_line_error(result, str(path), *fragments)
    assert not (tmp_path / "runs").exists()


def prepare_fails(tmp_path: Path, path: Path, *fragments: str, state: str = "incomplete") -> None:
    result = run_cli("prepare", str(path), cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    stage_dir = tmp_path / "runs" / "t" / "stages"
    assert not (stage_dir / "prepare" / "manifest.json").exists()  # nothing half-written looks done
    status = run_cli("status", str(path), cwd=tmp_path)
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
    result = run_cli("prepare", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "runs/t/stages/prepare/stats.json").read_text())
    skipped = {kind: n for kind, n in stats["languages"]["ja"]["skipped_lines"].items() if n}
    assert skipped == {"invalid_json": 1, "not_utf8": 1}


def test_run_twice_status_and_override(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD)
    first = jpadapt("run", str(path), cwd=tmp_path)  # a real process: `run` end to end
    assert first.returncode == 0, first.stderr
    assert "prepare: running (never run)" in first.stdout and "prepare: done in" in first.stdout
    second = run_cli("run", str(path), cwd=tmp_path)
    assert second.returncode == 0
    assert "prepare: up to date" in second.stdout and "Nothing to do" in second.stdout
    status = run_cli("status", str(path), "prepare.min_chars=20", cwd=tmp_path)
    assert state_of(status.stdout, "prepare") == "stale"
    assert "- prepare.min_chars: 5 -> 20" in status.stdout
    validate = run_cli("validate", str(path), cwd=tmp_path)
    assert validate.returncode == 0 and "valid" in validate.stdout


def test_status_of_a_run_that_never_started_writes_nothing(tmp_path: Path) -> None:
    result = run_cli("status", cwd=tmp_path)
    assert result.returncode == 0
    assert state_of(result.stdout, "prepare") == "never run"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ real processes


@pytest.mark.parametrize(
    "args",
    [["evaluat"], ["status", "prepare.min_chars=abc"]],
)
def test_real_process_exits_2_with_the_same_one_line_error_as_in_process(tmp_path: Path, args: list[str]) -> None:
    real = jpadapt(*args, cwd=tmp_path)
    assert_one_line_error(real)
    inside = run_cli(*args, cwd=tmp_path)
    assert (inside.returncode, inside.stdout, inside.stderr) == (real.returncode, real.stdout, real.stderr)


def test_real_process_config_error_in_a_stage_is_one_line_and_marks_nothing_done(tmp_path: Path) -> None:
    path = small_config(tmp_path, [*GOOD[:5], b'{"id": "x", "text": "broken\n', *GOOD[5:]])
    assert_one_line_error(jpadapt("prepare", str(path), cwd=tmp_path), "ja.jsonl:6", "invalid JSON")
    assert not (tmp_path / "runs/t/stages/prepare/manifest.json").exists()


def test_real_process_help_exits_0_like_in_process(tmp_path: Path) -> None:
    real = jpadapt("--help", cwd=tmp_path)
    inside = run_cli("--help", cwd=tmp_path)
    assert real.returncode == inside.returncode == 0, real.stderr
    assert real.stdout == inside.stdout and "jpadapt run [CONFIG]" in real.stdout


def test_run_cli_version_and_stage_help_exit_0(tmp_path: Path) -> None:
    version = run_cli("--version", cwd=tmp_path)
    assert (version.returncode, version.stdout.split()[0], version.stderr) == (0, "jpadapt", "")
    stage_help = run_cli("status", "--help", cwd=tmp_path)
    assert stage_help.returncode == 0 and stage_help.stdout.startswith("usage: jpadapt status")


# ------------------------------------------------------------------------------------ the in-process runner


def test_run_cli_puts_back_what_a_command_changes(tmp_path: Path) -> None:
    cwd, environ = os.getcwd(), dict(os.environ)
    sigterm, root_handlers = signal.getsignal(signal.SIGTERM), list(logging.getLogger().handlers)
    path = small_config(tmp_path, GOOD)
    result = run_cli("prepare", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "prepare: running (never run)" in result.stdout  # the stage's own lines are captured
    assert os.getcwd() == cwd and dict(os.environ) == environ
    assert signal.getsignal(signal.SIGTERM) is sigterm  # main() installs its SIGTERM handler
    assert logging.getLogger().handlers == root_handlers  # the stage log's file handler is gone
    assert not logging.getLogger("jpadapt.prepare").handlers


def test_run_cli_turns_an_escaping_exception_into_a_traceback_and_exit_1(tmp_path: Path, monkeypatch) -> None:
    import pipeline.cli

    def crash(args):
        raise ValueError("a bug")

    monkeypatch.setattr(pipeline.cli, "cmd_status", crash)
    result = run_cli("status", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: a bug" in result.stderr
    with pytest.raises(AssertionError):
        assert_one_line_error(result)


def test_run_cli_captures_a_child_process_output(tmp_path: Path, monkeypatch) -> None:
    import pipeline.cli

    def child(args):
        subprocess.run([sys.executable, "-c", "import sys; print('from the child'); print('child err', file=sys.stderr)"],
                       check=True)
        return 0

    monkeypatch.setattr(pipeline.cli, "cmd_status", child)
    result = run_cli("status", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "from the child\n", "child err\n")
