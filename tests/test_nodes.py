"""Per-node launch for real on one machine: two 'nodes' are two `jpadapt cpt --node-rank K --master-addr
127.0.0.1` processes, each running torchrun for one gloo worker, as a Slurm or PBS job starts one per node.

What this covers: the rendezvous of separate launchers, the global ranks across nodes (the losses equal the
1-node 2-process run, recorded in test_cpt), node 0 alone keeping the run directory's books, a killed node
stopping the other, and the resume. What it cannot: separate machines (no network between hosts, no firewall),
a filesystem shared over NFS or Lustre (both nodes see this disk at once, with its ordering of writes), several
processes per node, and NCCL; `pipeline/configs/slurm/cpt.sbatch` and `pipeline/configs/pbs/cpt.pbs` are the
launch for those, untested here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.cli import REPO, assert_one_line_error, jpadapt, state_of
from tests.helpers.jsonl import read_jsonl
from tests.test_cpt import (  # noqa: F401 (workspace is a fixture)
    RECORDED_FULL_LOGITS,
    STEPS,
    logged_steps,
    newest_checkpoint,
    partial_dir,
    stage_dir,
    still_running,
    workspace,
    write_config,
)


def start_node(config: Path, rank: int, log: Path) -> subprocess.Popen:
    """One node's `jpadapt cpt` in a process group of its own, as a scheduler starts it on its node."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cpt", str(config), "--node-rank", str(rank),
                                 "--master-addr", "127.0.0.1"], cwd=config.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    children = [child for child, parent in parents.items() if parent == pid]
    return children + [grandchild for child in children for grandchild in descendants(child)]


def wait_all(nodes: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    while None in [node.poll() for node in nodes]:  # every one reaped (a zombie still answers kill(pid, 0))
        if time.monotonic() > deadline:
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)
            raise AssertionError("the nodes did not finish:\n" + "\n".join(log.read_text(errors="replace")[-2000:]
                                                                             for log in logs))
        time.sleep(0.2)
    return [node.returncode for node in nodes]


def run_two_nodes(config: Path, tmp: Path, tag: str) -> list[str]:
    logs = [tmp / f"{tag}-node{rank}.log" for rank in (0, 1)]
    codes = wait_all([start_node(config, rank, log) for rank, log in enumerate(logs)], logs)
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    return texts


def two_node_config(workspace: Path, out: Path, **cpt) -> Path:  # noqa: F811
    config = write_config(workspace, out, num_gpus=1, num_nodes=2, **cpt)
    result = jpadapt("prepare", str(config), cwd=out)  # what node 0 would run first, before the nodes start
    assert result.returncode == 0, result.stdout + result.stderr
    return config


# ZeRO-3 (~105 s) and the kill of node 0 (~145 s) are opt-in (`-m slow`): the default suite keeps one run of each
# path (ZeRO-2, the kill of node 1) so CI stays near its 15-minute budget.
@pytest.mark.parametrize("zero", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_two_launchers_train_as_one_node_with_two_processes(zero, workspace, tmp_path):  # noqa: F811
    out = tmp_path / f"zero{zero}"
    model = {} if zero == 2 else {"model_path": workspace / "model"}  # as test_cpt's zero3 fixture
    config = two_node_config(workspace, out, zero_stage=zero, **model)
    _, node1 = run_two_nodes(config, tmp_path, "run")
    assert "cpt: node 1 done (node 0 commits the stage)" in node1
    losses = [m["loss"] for m in read_jsonl(stage_dir(out) / "metrics.jsonl")]
    assert losses == pytest.approx(RECORDED_FULL_LOGITS[f"zero{zero}"], rel=1e-5, abs=0)
    assert state_of(jpadapt("status", str(config), cwd=out).stdout, "cpt") == "up to date"
    # Both ranks' checkpoint files are there: each node wrote its own.
    assert sorted(p.name for p in (stage_dir(out) / "checkpoints" / f"step{STEPS:08d}").glob("rng-rank*.pt")) == [
        "rng-rank0.pt", "rng-rank1.pt"]
    # Up to date: node 1 launches nothing and does not wait for node 0.
    result = jpadapt("cpt", str(config), "--node-rank", "1", "--master-addr", "127.0.0.1", cwd=out)
    assert result.returncode == 0 and "cpt: up to date" in result.stdout


def test_a_node_started_before_the_prerequisites_are_done_says_so(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "early"
    config = write_config(workspace, out, num_gpus=1, num_nodes=2)
    result = jpadapt("cpt", str(config), "--node-rank", "1", "--master-addr", "127.0.0.1", cwd=out)
    assert_one_line_error(result, "node 1: stage prepare is never run",
                          "before starting cpt on every node")
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("killed", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_sigkill_of_one_node_stops_both_and_the_rerun_resumes(killed, workspace, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    config = two_node_config(workspace, out)
    logs = [tmp_path / f"first-node{rank}.log" for rank in (0, 1)]
    nodes = [start_node(config, rank, log) for rank, log in enumerate(logs)]
    deadline = time.monotonic() + 240
    while not 0 < newest_checkpoint(out) < logged_steps(out):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), logs[0].read_text()
        time.sleep(0.1)
    # The node dies: its jpadapt, torchrun and worker (torchrun starts the worker in a session of its own).
    for pid in [nodes[killed].pid, *descendants(nodes[killed].pid)]:
        os.kill(pid, signal.SIGKILL)
    codes = wait_all(nodes, logs, timeout=120)
    survivor = 1 - killed
    assert codes[survivor] == 1  # its worker lost its peer at the next collective
    if survivor == 1:
        assert "error: cpt: node 1's workers exited with code 1" in logs[1].read_text()
    assert state_of(jpadapt("status", str(config), cwd=out).stdout, "cpt") == "incomplete"  # checkpoints kept

    node0, _ = run_two_nodes(config, tmp_path, "rerun")
    assert "resuming from step0000000" in node0
    resumed = read_jsonl(stage_dir(out) / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in resumed] == pytest.approx(RECORDED_FULL_LOGITS["zero2"], rel=1e-5, abs=0)


@pytest.mark.parametrize("how", ["ctrl-c", pytest.param("sigterm", marks=pytest.mark.slow)])
def test_interrupting_the_nodes_prints_one_line_each_and_leaves_no_process(how, workspace, tmp_path):  # noqa: F811
    """Ctrl-C at each node's terminal (SIGINT to its process group; torchrun's workers have sessions of their
    own), or SIGTERM to each `jpadapt` alone (`kill`): every node ends with code 130 and one line, no torchrun
    traceback or "death signal" warnings, and nothing of the job outlives its `jpadapt`."""
    out = tmp_path / how
    config = two_node_config(workspace, out, max_steps=500)
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [start_node(config, rank, log) for rank, log in enumerate(logs)]
    deadline = time.monotonic() + 240
    while logged_steps(out) < 2:
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), logs[0].read_text()
        time.sleep(0.1)
    job = [psutil.Process(pid) for node in nodes for pid in descendants(node.pid)]
    before = [log.stat().st_size for log in logs]
    for node in nodes:
        if how == "ctrl-c":
            os.killpg(node.pid, signal.SIGINT)
        else:
            os.kill(node.pid, signal.SIGTERM)
    assert wait_all(nodes, logs, timeout=90) == [130, 130]
    assert still_running(job) == []
    tails = [log.read_bytes()[start:].decode("utf-8", errors="replace") for log, start in zip(logs, before)]
    for tail in tails:
        assert "Traceback" not in tail and "death signal" not in tail and "closing signal" not in tail, tail
    assert tails[0].rstrip().rsplit("\n", 1)[-1].startswith("interrupted: stage cpt is marked incomplete"), tails[0]
    assert tails[1].rstrip().rsplit("\n", 1)[-1].startswith(
        "interrupted: node 1's workers of stage cpt stopped (node 0 marks the stage incomplete)"), tails[1]
    assert state_of(jpadapt("status", str(config), cwd=out).stdout, "cpt") == "incomplete"
