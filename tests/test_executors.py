"""data/executor.py's executors, end to end on this machine.

Local: datatrove's process pool. Slurm: fake `sbatch`, `squeue`, `scancel`, `srun` and `scontrol`
(tests/helpers/fake_slurm.py) run datatrove's job script for real. Ray: a real local cluster (`ray start --head`,
listening on 127.0.0.1 only), then a private instance. In all three: every task runs once, its outputs are right,
a failed task is one JpadaptError with the task's own message, the step and its log, and a rerun runs only the
tasks that had not finished.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import data.executor
from data.executor import ExecutorSettings, incomplete_ranks, run_tasks
from pipeline.config import RayConfig, SlurmConfig
from pipeline.errors import JpadaptError
from tests.helpers import fake_slurm
from tests.helpers.executor_steps import BAD_RECORD, WriteRank, outputs, runs

STEP = "ja scan"

# datatrove's Ray executor still passes placement groups the old way.
pytestmark = pytest.mark.filterwarnings("ignore:placement_group:DeprecationWarning")


@contextlib.contextmanager
def watchdog(seconds: float, stop: Callable[[], None]) -> Iterator[None]:
    """pytest-timeout is not installed: past `seconds`, `stop` ends what the blocked call waits for (it then
    returns or raises) and the test fails."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        stop()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not fired.is_set(), f"did not finish within {seconds} s"


def task_log(logs: Path, rank: int) -> Path:
    return logs / "logs" / f"task_{rank:05d}.log"


# --------------------------------------------------------------------------------------------- local


def test_local_failed_task_is_one_line_and_a_rerun_resumes(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    settings = ExecutorSettings(kind="local", workers=2)
    with pytest.raises(JpadaptError) as failed:
        run_tasks(STEP, [WriteRank(out, fail_rank=1)], 3, settings, logs)
    assert str(failed.value) == f"{STEP}: {BAD_RECORD} (see {task_log(logs, 1)})"
    finished = sorted(set(range(3)) - set(incomplete_ranks(logs, 3)))

    run_tasks(STEP, [WriteRank(out)], 3, settings, logs)
    assert sorted(outputs(out)) == [0, 1, 2]
    assert all(runs(out)[rank] == 1 for rank in finished)
    assert capfd.readouterr() == ("", "")  # nothing on the console, from this process or its workers


# --------------------------------------------------------------------------------------------- Slurm


@pytest.fixture
def slurm_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "slurm"
    fake_slurm.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the tasks find our modules through the job script alone
    monkeypatch.setattr(data.executor, "SLURM_POLL_SECONDS", 0.2)
    monkeypatch.setattr(data.executor, "POLL_SECONDS", 0.2)
    try:
        yield state
    finally:
        fake_slurm.stop_all(state)


def test_slurm_runs_every_task_as_configured(slurm_state: Path, tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    slurm = SlurmConfig(partition="debug", time="01:00:00", cpus_per_task=2, mem_per_cpu_gb=1.5, job_name="jp",
                        env_command="export JPADAPT_TEST_ENV=from-env-command", sbatch_args={"account": "abc"},
                        max_array_size=3)
    with watchdog(120, lambda: fake_slurm.stop_all(slurm_state)):
        run_tasks(STEP, [WriteRank(out)], 4, ExecutorSettings(kind="slurm", slurm=slurm), logs)

    # Every task ran once, after the env_command, and saw its own rank.
    assert outputs(out) == {rank: {"rank": rank, "world_size": 4, "env": "from-env-command", "ray_nodes": None}
                            for rank in range(4)}
    assert runs(out) == dict.fromkeys(range(4), 1)
    script = (logs / "launch_script.slurm").read_text().splitlines()
    for option in ("partition=debug", "time=01:00:00", "cpus-per-task=2", "mem-per-cpu=1536M",
                   "job-name=jp-ja-scan", "account=abc", "array=0-2"):
        assert f"#SBATCH --{option}" in script
    assert not [line for line in script if "--qos" in line or "--mail" in line]
    assert [line for line in script if line.endswith("; export JPADAPT_TEST_ENV=from-env-command")]
    # 4 tasks with MaxArraySize 3: two array jobs, the second after the first, offset by one array.
    first, second = fake_slurm.submissions(slurm_state)
    assert (first["exports"], first["after"]) == ({"RUN_OFFSET": "0"}, [])
    assert (second["exports"], second["after"]) == ({"RUN_OFFSET": "1"}, [first["job"]])
    assert fake_slurm.cancelled(slurm_state) == []


def test_slurm_failed_task_cancels_the_job_and_a_rerun_resumes(slurm_state: Path, tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    settings = ExecutorSettings(kind="slurm", slurm=SlurmConfig())  # no partition: the cluster's default
    started = time.monotonic()
    with watchdog(120, lambda: fake_slurm.stop_all(slurm_state)), pytest.raises(JpadaptError) as failed:
        run_tasks(STEP, [WriteRank(out, fail_rank=1, slow_rank=2, fail_after=0)], 3, settings, logs)

    assert str(failed.value) == f"{STEP}: {BAD_RECORD} (see {task_log(logs, 1)})"
    assert "Traceback" in task_log(logs, 1).read_text()
    # The failure ended the wait at once: the slow task (60 s) was cancelled, not waited for.
    assert time.monotonic() - started < 50
    [job] = fake_slurm.submissions(slurm_state)
    assert fake_slurm.cancelled(slurm_state) == [job["job"]]
    assert "partition" not in job["options"]
    assert sorted(outputs(out)) == [0]

    with watchdog(120, lambda: fake_slurm.stop_all(slurm_state)):
        run_tasks(STEP, [WriteRank(out)], 3, settings, logs)
    assert sorted(outputs(out)) == [0, 1, 2]
    assert runs(out)[0] == 1  # finished by the first attempt: not run again
    rerun = fake_slurm.submissions(slurm_state)[1]
    assert rerun["options"]["array"] == "0-1"  # ranks 1 and 2 only

    run_tasks(STEP, [WriteRank(out)], 3, settings, logs)  # all done: no job at all
    assert len(fake_slurm.submissions(slurm_state)) == 2


def test_slurm_submission_errors_are_one_line(slurm_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    refused = ExecutorSettings(kind="slurm", slurm=SlurmConfig(sbatch_args={"mem-per-cpu": "1.5G"}))
    with pytest.raises(JpadaptError) as failed:
        run_tasks(STEP, [WriteRank(out)], 2, refused, logs)
    assert str(failed.value) == (
        f"{STEP}: sbatch refused the job (exit code 1); the script: {logs / 'launch_script.slurm'}"
    )
    assert "invalid --mem-per-cpu specification: 1.5G" in capfd.readouterr().err  # sbatch's own words

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(JpadaptError, match=f"^{STEP}: prepare.executor is slurm but sbatch is not on PATH$"):
        run_tasks(STEP, [WriteRank(out)], 2, ExecutorSettings(kind="slurm"), logs)
    assert fake_slurm.submissions(slurm_state) == [] and runs(out) == {}


# --------------------------------------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_ray_head(group: int, temp: Path) -> None:
    """`ray stop` would stop every Ray on this machine: kill only the head's process group (all its daemons,
    started by our `ray start`), then any process still naming our temp dir."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    _kill_processes_naming(temp)


def _kill_processes_naming(temp: Path) -> None:
    """Kill, by id, the processes whose command line names `temp` (Ray's daemons name their session folder)."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str(temp).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, Callable[[], None]]]:
    """A local Ray cluster of 2 CPUs: its address, and what stops it."""
    pytest.importorskip("ray")
    ray = Path(sys.executable).parent / "ray"
    temp = Path(tempfile.mkdtemp(prefix="jpray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    # Without Ray's "clusters unsupported" switch, it would resolve 127.0.0.1 to the machine's address and
    # listen on every interface. No token authentication (else on whenever ~/.ray/auth_token exists): the
    # cluster is only reachable from this machine.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("PYTHONPATH", None)  # workers find our modules through the job's runtime_env alone
    command = [str(ray), "start", "--head", "--port", "0", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(temp), "--include-dashboard", "false", "--disable-usage-stats",
               "--ray-client-server-port", str(_free_port()), "--object-store-memory", str(100 * 2**20)]
    head = subprocess.Popen(command, env=env, cwd=temp, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = functools.partial(_stop_ray_head, head.pid, temp)
    try:
        printed, _ = head.communicate(timeout=120)
        assert head.returncode == 0, printed
        yield (temp / "ray_current_cluster").read_text().split()[0], stop
    finally:
        if head.poll() is None:
            head.kill()
        stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_runs_every_task_reports_a_failure_and_resumes(
    ray_head: tuple[str, Callable[[], None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    address, stop = ray_head
    # The head listens on 127.0.0.1 only: keep this driver from resolving that address to the machine's.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the head
    # Ray puts the driver's folder on the workers' sys.path: not this repository's, so that the workers can
    # import our modules only through the runtime_env run_tasks gives them.
    monkeypatch.chdir(tmp_path)
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    settings = ExecutorSettings(kind="ray", ray=RayConfig(address=address))
    with watchdog(180, stop), pytest.raises(JpadaptError) as failed:
        run_tasks(STEP, [WriteRank(out, fail_rank=2)], 4, settings, logs)
    assert str(failed.value) == f"{STEP}: {BAD_RECORD} (see {task_log(logs, 2)})"
    assert "Traceback" in task_log(logs, 2).read_text()
    assert sorted(outputs(out)) == [0, 1, 3]
    assert not ray.is_initialized()

    with watchdog(180, stop):
        run_tasks(STEP, [WriteRank(out)], 4, settings, logs)
    assert {rank: (task["rank"], task["world_size"]) for rank, task in outputs(out).items()} == {
        rank: (rank, 4) for rank in range(4)
    }
    assert runs(out) == {0: 1, 1: 1, 2: 2, 3: 1}  # the rerun ran the failed task only
    assert not ray.is_initialized()
    run_tasks(STEP, [WriteRank(out)], 4, settings, logs)  # all done: returns without connecting
    assert runs(out) == {0: 1, 1: 1, 2: 2, 3: 1}
    assert capfd.readouterr() == ("", "")  # nothing on the console


def test_prepare_on_the_ray_cluster_writes_what_it_writes_locally(
    ray_head: tuple[str, Callable[[], None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("ray")
    from ray._private import ray_constants

    from data.assets import stored_path
    from data.prepare import prepare_language
    from pipeline.config import CorpusConfig, PrepareConfig

    # Before the private-instance test: a driver that has started a private Ray hung connecting to the cluster
    # here (and the watchdog's stop then made Ray abort the pytest process).
    address, stop = ray_head
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # as in the test above
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    train, heldout = [stored_path("corpus/ja_train.jsonl")], [stored_path("corpus/ja_heldout.jsonl")]
    results = {}
    for name, opts in {"local": {"workers": 1}, "ray": {"executor": "ray", "ray": {"address": address}}}.items():
        with watchdog(300, stop):
            stats = prepare_language("ja", CorpusConfig(train=["x"]), train, heldout, PrepareConfig(**opts), 1234,
                                     tmp_path / name, display_name=lambda path: path.name)
        files = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "ja").iterdir())}
        results[name] = (stats, files)
    assert results["ray"] == results["local"]
    assert results["local"][0]["splits"]["train"]["documents"] == 176


def test_ray_private_instance_after_a_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    """No address: a private Ray on this machine, listening on 127.0.0.1 (also: the previous test's connection
    was closed, or this one could not start)."""
    ray = pytest.importorskip("ray")

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes its authentication token into ~/.ray
    temp = Path(tempfile.mkdtemp(prefix="jpray", dir="/tmp"))  # short, as in ray_head
    monkeypatch.setenv("RAY_TMPDIR", str(temp))  # the instance's session folder (else under /tmp/ray)
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    try:
        with watchdog(180, functools.partial(_kill_processes_naming, temp)):
            run_tasks(STEP, [WriteRank(out)], 3, ExecutorSettings(kind="ray", workers=2, ray=RayConfig()), logs)
    finally:
        _kill_processes_naming(temp)  # none, unless the watchdog fired: ray.shutdown() stopped them
        shutil.rmtree(temp, ignore_errors=True)
        # Ray sets RAY_AUTH_MODE=token in os.environ when it starts an instance: keep it from later tests.
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
    assert {rank: (task["world_size"], task["ray_nodes"]) for rank, task in outputs(out).items()} == {
        rank: (3, "127.0.0.1") for rank in range(3)
    }
    assert not ray.is_initialized()
    assert capfd.readouterr() == ("", "")

