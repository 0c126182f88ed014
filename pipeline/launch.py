"""Start a distributed training job as a subprocess, the way users already run DeepSpeed.

    job = launch_command("stages.cpt.worker", [str(job_file)], cfg.cpt, accelerator)
    check_launch(cfg.cpt, "cpt")           # port, hostfile: clear errors before anything starts
    returncode = run_job(job, log)         # waits; Ctrl-C stops the workers too

One process (`num_gpus: 1`, one node) runs `python -m MODULE` directly with the rendezvous variables a single
rank needs. More processes go through DeepSpeed's own launcher (`deepspeed.launcher.runner`, the `deepspeed`
command), run by this module (`python -m pipeline.launch`) so that Ctrl-C does not print its traceback:
`--num_gpus`, `--num_nodes`, `--hostfile`, `--master_port` come from the YAML, and the argument list is built
without a shell. On CPU, `--num_gpus` must be given even on one node (DeepSpeed's CPU
"device count" is the number of NUMA nodes) and `DS_ACCELERATOR=cpu` selects gloo.

Per-node launch (`Node`): clusters that start one `jpadapt` per node themselves (Slurm, PBS, Kubernetes; no ssh
between nodes) give each its node rank and the rendezvous host, as `--node-rank/--master-addr` or in the
environment (`NODE_RANK` or `SLURM_NODEID`, and `MASTER_ADDR`). Each node then runs torchrun for its own
`num_gpus` processes, which waits at `master_addr:master_port` until every node has joined (static rendezvous).
The ssh launcher above stays for a configured hostfile without a node rank.

What the processes do once started (process group, DeepSpeed config, metrics) is `pipeline/training.py`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.errors import JpadaptError

# How long workers get to exit after Ctrl-C or a failure before they are killed.
STOP_GRACE_S = 30
# `python -m pipeline.launch --torchrun ARGS` runs torchrun (per-node launch); without it, DeepSpeed's launcher.
TORCHRUN = "--torchrun"


class LaunchSettings(Protocol):
    """The launch keys of a training section (cpt; sft when it runs on several GPUs)."""

    num_gpus: int
    num_nodes: int
    hostfile: str | None
    master_port: int


# How long a node waits at the rendezvous for the others: node 0 joins only after it has tokenized the data.
JOIN_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Node:
    """This process's place in a per-node launch: node `rank` of `num_nodes`, rendezvous at `master_addr`."""

    rank: int
    master_addr: str


def node_from(settings: LaunchSettings, section: str, rank: int | None, master_addr: str | None,
              environ: dict[str, str]) -> Node | None:
    """The node this `jpadapt` runs as: the flags, else the scheduler's variables (not when a hostfile asks for
    the ssh launcher). None for one node or the ssh launcher."""
    if settings.num_nodes == 1:
        if rank is not None:
            raise JpadaptError(f"--node-rank: {section}.num_nodes is 1")
        return None
    if rank is None and settings.hostfile is None:
        found = environ.get("NODE_RANK", environ.get("SLURM_NODEID", ""))
        rank = int(found) if found.isdigit() else None
    if rank is None:
        return None
    if rank >= settings.num_nodes:
        raise JpadaptError(f"--node-rank {rank}: {section}.num_nodes is {settings.num_nodes} (ranks 0 to "
                           f"{settings.num_nodes - 1})")
    master_addr = master_addr or environ.get("MASTER_ADDR")
    if not master_addr:
        raise JpadaptError(f"node rank {rank}: give the rendezvous host (node 0) as --master-addr or MASTER_ADDR")
    return Node(rank, master_addr)


@dataclass(frozen=True)
class Job:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the current environment
    world_size: int = 1
    master_port: int | None = None  # names the job's shared-memory segments (remove_shm_buffers)


def launch_command(module: str, args: list[str], settings: LaunchSettings, accelerator: str,
                   node: Node | None = None) -> Job:
    """The command that runs `python -m module args...` on every rank (on this node's ranks for a per-node
    launch). `accelerator` is "cpu" or "cuda"."""
    env = {"DS_ACCELERATOR": accelerator, "PYTHONUNBUFFERED": "1"}
    world = settings.num_gpus * settings.num_nodes
    if node is not None:
        # The workers watch this process, not the pid in job.json (node 0's `jpadapt`, on another machine).
        env["JPADAPT_PARENT_PID"] = str(os.getpid())
        argv = [sys.executable, "-m", "pipeline.launch", TORCHRUN, "--nnodes", str(settings.num_nodes),
                "--nproc_per_node", str(settings.num_gpus), "--node_rank", str(node.rank),
                "--master_addr", node.master_addr, "--master_port", str(settings.master_port),
                "--rdzv_conf", f"timeout={JOIN_TIMEOUT_S}"]
        return Job([*argv, "-m", module, *args], env, world, settings.master_port)
    if world == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(settings.master_port))
        return Job([sys.executable, "-m", module, *args], env, 1)
    argv = [sys.executable, "-m", "pipeline.launch", "--num_gpus", str(settings.num_gpus),
            "--num_nodes", str(settings.num_nodes), "--master_port", str(settings.master_port)]
    if settings.hostfile is not None:
        argv += ["--hostfile", str(Path(settings.hostfile).expanduser())]
    # The launcher starts `python -u -m module` on each node, from this working directory.
    return Job([*argv, "--module", module, *args], env, world, settings.master_port)


def check_launch(settings: LaunchSettings, section: str, node: Node | None = None) -> None:
    """Problems that would otherwise surface minutes later inside the launcher or the first all-reduce. `node`:
    node 0 of a per-node launch (nodes K > 0 only join, `Pipeline.join`)."""
    if node is None and settings.num_nodes > 1:
        if settings.hostfile is None:
            raise JpadaptError(
                f"{section}.num_nodes is {settings.num_nodes}: start `jpadapt` on every node with --node-rank and "
                f"--master-addr (or the scheduler's NODE_RANK/SLURM_NODEID and MASTER_ADDR), or set "
                f"{section}.hostfile for DeepSpeed's ssh launcher"
            )
        _check_hostfile(settings, section)
    elif not port_free(settings.master_port):  # on node 0 of a per-node launch (it hosts the rendezvous) too
        raise JpadaptError(
            f"{section}.master_port: port {settings.master_port} is in use on this machine (another training "
            f"job?); pick a free one, e.g. {section}.master_port={free_port()}"
        )


def port_free(port: int) -> bool:
    """Nothing listens on `port`. SO_REUSEADDR as torch's rendezvous store sets it: connections of a finished
    job lingering in TIME_WAIT do not block the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_hostfile(settings: LaunchSettings, section: str) -> None:
    path = Path(str(settings.hostfile)).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise JpadaptError(f"{section}.hostfile: cannot read {path} ({exc})") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise JpadaptError(f"{path}:{number}: expected `HOSTNAME slots=N`, got {line!r}")
        hosts.append((parts[0], int(slots[0][6:])))
    if len(hosts) < settings.num_nodes:
        raise JpadaptError(f"{section}.num_nodes is {settings.num_nodes} but {path} lists {len(hosts)} host(s)")
    short = [host for host, slots in hosts[: settings.num_nodes] if slots < settings.num_gpus]
    if short:
        raise JpadaptError(f"{path}: {', '.join(short)} has fewer slots than {section}.num_gpus ({settings.num_gpus})")


def run_job(job: Job, log: logging.Logger) -> int:
    """Run the job with its output on this console; wait for it. Ctrl-C (or any exception here) stops the
    workers as well: they are in this process group, and get SIGINT, then SIGKILL after a grace period."""
    log.info("launching %d process(es): %s", job.world_size, " ".join(job.argv))
    process = subprocess.Popen(job.argv, env={**os.environ, **job.env})
    try:
        return process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        if job.master_port is not None:
            remove_shm_buffers(job.master_port)


# DeepSpeed's CPU all-reduce (its `shm` comm op, used when several ranks share a machine) maps one 66 MB segment per
# local rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>, and never unlinks it:
# every multi-process CPU run would leave 130+ MB of RAM behind until reboot (14 GB had piled up on our test machine).
SHM_DIR = Path("/dev/shm")


def remove_shm_buffers(port: int) -> None:
    """Unlink the segments of the job that used `port`, once its processes have exited. No other job can hold the
    port at the same time, so this never touches a running job's segments."""
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_quietly() -> None:
    """Ctrl-C (SIGINT) and SIGTERM end this process, the launcher or a worker, with a KeyboardInterrupt the
    first time and do nothing after: Ctrl-C reaches every process of the job (one process group), DeepSpeed's
    launcher then sends the workers SIGTERM and `run_job` the launcher SIGINT once more, and a second
    KeyboardInterrupt would break the quiet exit with a traceback. (Not SIG_IGN: a signal already pending when
    the handler becomes SIG_IGN makes Python print "Signal 15 ignored due to race condition".)"""
    stopping = False

    def interrupt_once(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt_once)


def deepspeed_launcher() -> int:
    """`python -m pipeline.launch ARGS`: DeepSpeed's launcher with DeepSpeed's arguments. On Ctrl-C it would
    print a traceback (it waits for its processes without a handler for SIGINT); they got the same SIGINT and
    stop on their own, so here it only exits, quietly, as they do."""
    from deepspeed.launcher.runner import main

    stop_quietly()
    try:
        main()
    except KeyboardInterrupt:
        stop_descendants()
        return 130
    return 0


def stop_descendants(grace_s: float = STOP_GRACE_S) -> None:
    """Stop the processes this one started (DeepSpeed's per-node launcher, the workers) and wait for them, so
    that `jpadapt` returns only when none of them can still print or write into the stage directory. After
    Ctrl-C they had the same SIGINT (one process group); when only `jpadapt` was told (SIGTERM from `kill` or a
    scheduler, passed on by `run_job` to this process alone) they had nothing, so each gets SIGTERM: a worker
    ends quietly on the first signal and ignores the rest (`stop_quietly`). Those still there after `grace_s`
    are killed."""
    import psutil

    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(descendants, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def torchrun_launcher(args: list[str]) -> int:
    """`python -m pipeline.launch --torchrun ARGS`: torchrun with torchrun's arguments. On Ctrl-C or SIGTERM
    torchrun stops its workers itself, then re-raises the signal as an exception whose traceback (with its
    "death signal" warnings) would bury the stage's one line; and a second signal while it waits for them (the
    jpadapt process passes the first on) cuts that wait short. So here the signal ends torchrun quietly, the
    signals after it are ignored, and the workers are waited for. A failed worker is still torchrun's error
    report, as before."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):  # its own bookkeeping; its errors still show
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        main(args)
    except SignalException:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _ignore_signal)
        stop_descendants()
        return 130
    return 0


def _ignore_signal(signum: int, frame: object) -> None:
    """Not SIG_IGN: see `stop_quietly`."""


if __name__ == "__main__":
    sys.exit(torchrun_launcher(sys.argv[2:]) if sys.argv[1:2] == [TORCHRUN] else deepspeed_launcher())
