"""Hostile configs, hostile run directories, and the states a crash leaves behind (issue #20).

Each case was a traceback, a hang or a wrong answer before: an alias bomb, non-finite numbers, a read-only run
directory, a pid that a dead attempt's process no longer owns, a manifest that is valid JSON but incomplete, a
same-size edit with its mtime put back, a plan made stale by a port, `status | head`, an interrupt while the run
report was written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import JpadaptError
from pipeline.yamlio import MAX_CONFIG_BYTES, MAX_VALUES, parse_yaml
from tests.helpers.cli import REPO, assert_one_line_error, run_cli, state_of
from tests.helpers.configs import GOOD, small_config


def prepared(tmp_path: Path, extra: str = "") -> Path:
    path = small_config(tmp_path, GOOD, extra)
    result = run_cli("prepare", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return path


def alias_bomb(levels: int, indent: str = "") -> str:
    """`levels` nested lists of 9 aliases each: 9**levels values once expanded, from a few hundred bytes."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"{indent}l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


HEADER = "run: {name: t}\ndata: {ja: {train: [ja.jsonl]}}\n"


# ------------------------------------------------------------------------------------------ 1. alias bombs


@pytest.mark.parametrize("where", ["top", "from_config"])
def test_an_alias_bomb_is_refused_at_once_naming_the_file(tmp_path: Path, where: str) -> None:
    bomb = alias_bomb(9) if where == "top" else "model:\n  from_config:\n" + alias_bomb(9, "    ")
    path = tmp_path / "bomb.yaml"
    path.write_text(HEADER + bomb, encoding="utf-8")
    for command in ("validate", "status", "run"):
        began = time.monotonic()
        result = run_cli(command, str(path), cwd=tmp_path)
        assert time.monotonic() - began < 10  # it was 79 s and a MemoryError (validate), ~6 GB (status)
        assert_one_line_error(result, "bomb.yaml:", "expands to more than")
    assert not (tmp_path / "runs").exists()  # run wrote a 117 MB config.yaml before


def test_aliases_that_expand_to_a_normal_config_still_work(tmp_path: Path) -> None:
    (tmp_path / "ja.jsonl").write_bytes(b"".join(GOOD))
    path = tmp_path / "p.yaml"
    path.write_text(HEADER + "prepare: &p {min_chars: 5, heldout_fraction: 0.5}\n", encoding="utf-8")
    assert run_cli("validate", str(path), cwd=tmp_path).returncode == 0
    assert parse_yaml("a: &x [1, 2]\nb: *x\nc: *x\n", "t") == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: &a [*a]\n", "refers to the value that contains it"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", "nested more than"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
        ("a: " + "x" * 70_000 + "\n", "characters"),
        ("a: " + "9" * 5000 + "\n", "invalid YAML value"),
        ("a: [" + ", ".join(["1"] * (MAX_VALUES + 1)) + "]\n", "expands to more than"),
    ],
    ids=["recursive", "deep", "very-deep", "long-scalar", "huge-int", "many-values"],
)
def test_yaml_over_the_bounds_is_one_error(text: str, fragment: str) -> None:
    with pytest.raises(JpadaptError, match=fragment):
        parse_yaml(text, "f.yaml")


def test_a_config_file_over_the_size_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(HEADER + "# " + "x" * MAX_CONFIG_BYTES + "\n", encoding="utf-8")
    assert_one_line_error(run_cli("validate", str(path), cwd=tmp_path), "big.yaml", "bytes")


# ------------------------------------------------------------------------------------------ 5. non-finite numbers


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("cpt.lr=.inf", "cpt.lr: must be a finite number"),
        ("sft.epochs=.inf", "sft.epochs: must be a finite number"),
        ("cpt.lr=.nan", "cpt.lr: must be a finite number"),
        ("cpt.lr=1e999", "cpt.lr: must be a finite number"),
        ("plan.mfu=-.inf", "plan.mfu: must be a finite number"),
        ("cpt.adam_betas=[0.9, .nan]", "cpt.adam_betas.1: must be a finite number"),
        ("model.from_config.rope_scaling={factor: .inf}", "rope_scaling.factor is inf"),
    ],
)
def test_non_finite_numbers_are_refused_everywhere(tmp_path: Path, override: str, fragment: str) -> None:
    assert_one_line_error(run_cli("validate", override, cwd=tmp_path), fragment)


# ------------------------------------------------------------------------------------------ 3. read-only run dir


def _read_only(run_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`jpadapt ARGS` with `run_dir` bind-mounted read-only onto itself, in a private mount namespace (nothing to
    undo: the mount dies with the namespace). Root alone cannot be stopped by file modes, so a mount it is."""
    command = (f"mount --bind -o ro {run_dir} {run_dir} && exec {sys.executable} -m pipeline.cli "
               + " ".join(f"'{arg}'" for arg in args))
    return subprocess.run(["unshare", "-m", "sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def _can_mount_read_only(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        return False
    result = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {probe} {probe} && ! touch {probe}/x"],
                            capture_output=True, timeout=30, check=False)
    return result.returncode == 0


def test_status_and_report_work_on_a_read_only_run_directory(tmp_path: Path) -> None:
    if not _can_mount_read_only(tmp_path):
        pytest.skip("needs root and mount namespaces (unshare -m) for a read-only bind mount")
    path = prepared(tmp_path)
    run_dir = tmp_path / "runs" / "t"
    # The cache is what status would save: drop it, and touch an input so that hashes are computed afresh.
    shutil.rmtree(run_dir / ".cache")
    (tmp_path / "ja.jsonl").touch()

    status = _read_only(run_dir, "status", str(path), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr and state_of(status.stdout, "prepare") == "up to date"
    assert not (run_dir / ".cache").exists()

    report = _read_only(run_dir, "report", str(path), cwd=tmp_path)
    assert_one_line_error(report, "runs/t: cannot write the run report", "Read-only file system", "--out")
    elsewhere = _read_only(run_dir, "report", str(path), "--out", str(tmp_path / "mine"), cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (tmp_path / "mine" / "report.html").is_file() and (tmp_path / "mine" / "report.md").is_file()


def test_status_never_fails_for_want_of_a_writable_cache(tmp_path: Path) -> None:
    path = prepared(tmp_path)
    cache = tmp_path / "runs" / "t" / ".cache"
    shutil.rmtree(cache)
    cache.write_text("a file where the cache folder should be")  # mkdir fails as on a read-only disk
    (tmp_path / "ja.jsonl").touch()
    result = run_cli("status", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert state_of(result.stdout, "prepare") == "up to date"


# ------------------------------------------------------------------------------------------ 4. a reused pid


def _fake_running_attempt(run_dir: Path, pid: int) -> None:
    partial = run_dir / "stages" / "prepare.partial"
    partial.mkdir(parents=True, exist_ok=True)
    attempt = {"fingerprint": "0" * 64, "started": "2026-01-01T00:00:00+00:00", "pid": pid,
               "host": os.uname().nodename, "status": "running", "error": None}
    (partial / "attempt.json").write_text(json.dumps(attempt))


def test_a_dead_attempt_whose_pid_was_reused_does_not_block_the_run(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD)
    run_dir = tmp_path / "runs" / "t"
    # The attempt was SIGKILLed; its pid now belongs to an unrelated live process (here: this test itself).
    _fake_running_attempt(run_dir, os.getpid())
    status = run_cli("status", str(path), cwd=tmp_path)
    assert state_of(status.stdout, "prepare") == "incomplete", status.stdout
    for args in (("prepare",), ("prepare", "--force")):
        result = run_cli(*args, str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        _fake_running_attempt(run_dir, os.getpid())
    assert (run_dir / "stages" / "prepare" / "manifest.json").is_file()


# What a jpadapt command does while it runs stages: hold the run directory's lock.
HOLD_LOCK = """import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_an_attempt_of_a_command_that_holds_the_lock_is_running(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD)
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _fake_running_attempt(run_dir, holder.pid)
        status = run_cli("status", str(path), cwd=tmp_path)
        assert state_of(status.stdout, "prepare") == "running", status.stdout
        assert_one_line_error(run_cli("prepare", str(path), cwd=tmp_path), "another jpadapt command is running")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    status = run_cli("status", str(path), cwd=tmp_path)  # the lock died with its process
    assert state_of(status.stdout, "prepare") == "incomplete", status.stdout


# ------------------------------------------------------------------------------------------ 6. incomplete manifests


@pytest.mark.parametrize("manifest", ['{"status": "done"}', '[1, 2]', '{"status": "done", "fingerprint": 3}'])
def test_an_incomplete_manifest_counts_as_not_finished(tmp_path: Path, manifest: str) -> None:
    path = prepared(tmp_path)
    stage_dir = tmp_path / "runs" / "t" / "stages" / "prepare"
    (stage_dir / "manifest.json").write_text(manifest)
    status = run_cli("status", str(path), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert state_of(status.stdout, "prepare") == "incomplete"
    assert "manifest.json" in status.stdout and "runs again" in status.stdout
    report = run_cli("report", str(path), cwd=tmp_path)
    assert_one_line_error(report, "no committed stage")
    rerun = run_cli("run", str(path), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "prepare: running (incomplete" in rerun.stdout
    assert json.loads((stage_dir / "manifest.json").read_text())["status"] == "done"


def test_a_damaged_attempt_file_still_reads_as_incomplete(tmp_path: Path) -> None:
    path = small_config(tmp_path, GOOD)
    partial = tmp_path / "runs" / "t" / "stages" / "prepare.partial"
    partial.mkdir(parents=True)
    (partial / "attempt.json").write_text('{"pid": 1, "unexpected": true}')
    status = run_cli("status", str(path), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert state_of(status.stdout, "prepare") == "incomplete"
    assert run_cli("prepare", str(path), cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------------------------------ 7. the hash cache


def test_a_same_size_edit_with_the_mtime_put_back_is_seen(tmp_path: Path) -> None:
    path = prepared(tmp_path)
    corpus = tmp_path / "ja.jsonl"
    before = corpus.stat()
    text = corpus.read_text(encoding="utf-8")
    corpus.write_text(text.replace("これは1番目", "これは9番目", 1), encoding="utf-8")
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert corpus.stat().st_size == before.st_size and corpus.stat().st_mtime_ns == before.st_mtime_ns
    status = run_cli("status", str(path), cwd=tmp_path)
    assert state_of(status.stdout, "prepare") == "stale", status.stdout
    assert "input files of data.ja.train changed" in status.stdout


def test_status_verify_rehashes_what_the_cache_would_trust(tmp_path: Path) -> None:
    path = prepared(tmp_path)
    corpus = tmp_path / "ja.jsonl"
    cache_file = tmp_path / "runs" / "t" / ".cache" / "hashes.json"
    cache = json.loads(cache_file.read_text())
    old_hash = cache[str(corpus.resolve())][-1]
    corpus.write_text(corpus.read_text(encoding="utf-8").replace("これは1番目", "これは9番目", 1), encoding="utf-8")
    # A cache that cannot see the edit (a file system whose ctime lies, a copied cache): it still holds the old hash.
    stat = corpus.stat()
    cache[str(corpus.resolve())] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns, old_hash]
    cache_file.write_text(json.dumps(cache))
    assert state_of(run_cli("status", str(path), cwd=tmp_path).stdout, "prepare") == "up to date"
    verified = run_cli("status", str(path), "--verify", cwd=tmp_path)
    assert state_of(verified.stdout, "prepare") == "stale", verified.stdout


# ------------------------------------------------------------------------------------------ 7. plan staleness


def test_ports_and_training_settings_the_planner_ignores_leave_the_plan_up_to_date(tmp_path: Path) -> None:
    assert run_cli("plan", cwd=tmp_path).returncode == 0
    ignored = run_cli("status", "cpt.master_port=29999", "sft.master_port=30001", "cpt.lr=0.5",
                      "cpt.keep_checkpoints=5", "extend_vocab.max_training_chars=1000", cwd=tmp_path)
    assert state_of(ignored.stdout, "plan") == "up to date", ignored.stdout
    for override in ("cpt.seq_len=64", "sft.lora_r=4", "evaluate.window=256", "extend_vocab.new_tokens=100"):
        changed = run_cli("status", override, cwd=tmp_path)
        assert state_of(changed.stdout, "plan") == "stale", (override, changed.stdout)


# ------------------------------------------------------------------------------------------ 7. clean exits


def test_status_into_a_closed_pipe_prints_no_traceback(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "status"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    process.stdout.close()  # as `| head` does once it has its lines: before the command writes anything here
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert err == "", err
    assert process.returncode == 128 + signal.SIGPIPE


def test_an_interrupt_while_the_report_is_written_says_no_stage_is_incomplete(tmp_path: Path, monkeypatch) -> None:
    from pipeline import run_report

    def interrupted(run_dir, out=None):
        raise KeyboardInterrupt  # SIGTERM from a scheduler's time limit arrives as this

    monkeypatch.setattr(run_report, "write_run_report", interrupted)
    path = small_config(tmp_path, GOOD)
    result = run_cli("prepare", str(path), cwd=tmp_path)
    assert result.returncode == 130
    assert result.stderr.strip() == "interrupted: no stage was running; finished stages are kept"
    assert state_of(run_cli("status", str(path), cwd=tmp_path).stdout, "prepare") == "up to date"


def test_an_interrupt_inside_a_stage_names_it(tmp_path: Path, monkeypatch) -> None:
    from pipeline import runner

    real = runner.ConfigView.of

    def view(cfg, spec):  # the first thing of the stage's attempt: Ctrl-C lands inside it
        if spec.name == "prepare":
            raise KeyboardInterrupt
        return real(cfg, spec)

    monkeypatch.setattr(runner.ConfigView, "of", staticmethod(view))
    path = small_config(tmp_path, GOOD)
    result = run_cli("prepare", str(path), cwd=tmp_path)
    assert result.returncode == 130
    assert result.stderr.strip().startswith("interrupted: stage prepare is marked incomplete")
    assert state_of(run_cli("status", str(path), cwd=tmp_path).stdout, "prepare") == "incomplete"
