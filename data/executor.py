"""Run corpus work as datatrove tasks on this machine, on a Slurm cluster or on a Ray cluster.

A step is a datatrove pipeline (steps and `(data, rank, world_size)` callables) run as `tasks` independent
tasks. `run_tasks` builds the executor the YAML names (`prepare.executor`), runs the step and returns only when
every task has finished, so the caller can chain steps. Each task records its completion in the step's
logging folder; rerunning a step skips the tasks an earlier, interrupted attempt finished (resume after a
crash or a SIGKILL). A failed task becomes one JpadaptError naming the step, the task's own message and its log.

The console stays quiet: datatrove's own logging (per task, with tracebacks) goes to
`<logging folder>/logs/task_NNNNN.log`; the caller sees a progress bar of finished tasks.

On Slurm and Ray the tasks run elsewhere: the logging folder, the pipeline's inputs and outputs and this code
tree must be at the same paths on every node (a shared filesystem), as datatrove requires.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from tqdm import tqdm

from pipeline.config import PrepareConfig, RayConfig, SlurmConfig
from pipeline.errors import JpadaptError

# How often the waiting side looks at the completion markers (and, on Slurm, at the queue).
POLL_SECONDS = 1.0
SLURM_POLL_SECONDS = 30.0
# squeue can fail for a while (a busy controller); give up after this many failures in a row.
SQUEUE_ATTEMPTS = 10

# The directory holding `data/`: Slurm and Ray workers import this module and the pipeline's from there.
CODE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ExecutorSettings:
    """Where tasks run; from the prepare section, whose executor keys never change an output byte."""

    kind: str = "local"
    workers: int | None = None
    slurm: SlurmConfig | None = None
    ray: RayConfig | None = None

    @classmethod
    def from_config(cls, prepare: PrepareConfig) -> ExecutorSettings:
        return cls(kind=prepare.executor, workers=prepare.workers, slurm=prepare.slurm, ray=prepare.ray)

    def local_workers(self, tasks: int) -> int:
        return max(1, min(tasks, self.workers or _cores()))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_tasks(
    step: str,
    pipeline: Sequence[Any],
    tasks: int,
    settings: ExecutorSettings,
    logging_dir: Path,
    log: logging.Logger | None = None,
) -> None:
    """Run `pipeline` as `tasks` datatrove tasks and wait for all of them; skip tasks finished before.

    Arguments:
        step: what the tasks do, in progress bars and messages ("ja scan"; the stage names itself).
        pipeline: datatrove steps and `(data, rank, world_size)` callables; picklable (they travel to workers).
        tasks: how many tasks; task `rank` of `tasks` decides its own share of the work.
        settings: the executor to use.
        logging_dir: this step's folder for completion markers, stats and task logs (shared with the cluster).
        log: the stage's logger, told how many tasks ran and how many were already done.
    """
    logging_dir = logging_dir.resolve()  # tasks run in other processes, in other working directories
    logging_dir.mkdir(parents=True, exist_ok=True)
    steps = list(pipeline)
    done_before = _completed(logging_dir, tasks)
    if log is not None:
        already = f" ({done_before} finished by an earlier attempt)" if done_before else ""
        log.info("%s: %d task(s) on %s%s", step, tasks, settings.kind, already)
    if done_before == tasks:
        return
    # Failures of an earlier attempt are history: this attempt's are the ones to report.
    shutil.rmtree(logging_dir / "failures", ignore_errors=True)
    launch = {"local": _run_local, "slurm": _run_slurm, "ray": _run_ray}[settings.kind]
    with _Progress(step, logging_dir, tasks, done_before):
        try:
            launch(steps, tasks, settings, logging_dir, step)
        except Exception as exc:  # noqa: BLE001 - a task raised (the local pool re-raises it) or the launch failed
            raise _task_failed(step, logging_dir, tasks, exc) from None
    if _completed(logging_dir, tasks) < tasks:
        raise _task_failed(step, logging_dir, tasks, None)


def incomplete_ranks(logging_dir: Path, tasks: int) -> list[int]:
    return [rank for rank in range(tasks) if not (logging_dir / "completions" / f"{rank:05d}").exists()]


def _completed(logging_dir: Path, tasks: int) -> int:
    return tasks - len(incomplete_ranks(logging_dir, tasks))


def _failures(logging_dir: Path) -> list[tuple[int, str]]:
    """(rank, message) of the tasks that raised, from the records `_RecordsFailures` leaves."""
    folder = logging_dir / "failures"
    records = sorted(folder.iterdir()) if folder.is_dir() else []
    return [(int(record.name), record.read_text(encoding="utf-8")) for record in records]


def _task_log(logging_dir: Path, rank: int) -> Path:
    return logging_dir / "logs" / f"task_{rank:05d}.log"


def _task_failed(step: str, logging_dir: Path, tasks: int, exc: BaseException | None) -> JpadaptError:
    """One line: the step, what went wrong and the log to read.

    What went wrong is the first failed task's own message (ours names the file and line of a corrupt record),
    whichever machine ran it; else the launch's error (`exc`: tasks that raise leave records); else how many
    tasks did not finish (killed, out of memory or out of time: no Python exception to tell).
    """
    failures = _failures(logging_dir)
    if failures:
        rank, message = failures[0]
        return JpadaptError(f"{step}: {message} (see {_task_log(logging_dir, rank)})")
    if isinstance(exc, JpadaptError):  # the launch's own, already one line (sbatch missing, squeue failing)
        return JpadaptError(f"{step}: {exc}")
    if exc is not None:
        return JpadaptError(f"{step}: {type(exc).__name__}: {exc} (see {logging_dir / 'logs' / 'executor.log'})")
    pending = incomplete_ranks(logging_dir, tasks)
    # A task that never reached Python has no log of its own; the folder also holds Slurm's output files.
    log_file = _task_log(logging_dir, pending[0])
    return JpadaptError(f"{step}: {len(pending)} of {tasks} task(s) did not finish "
                        f"(see {log_file if log_file.exists() else logging_dir})")


# --------------------------------------------------------------------------------------------- executors


class _RecordsFailures:
    """Mixed into each datatrove executor: a task that raises leaves `failures/NNNNN` holding its message.

    Slurm and Ray do not hand a task's exception back to the submitting side (datatrove's Ray executor logs it
    and carries on), so the record is how `run_tasks` can say what went wrong wherever the task ran. Being
    defined here, it also makes every process that unpickles one of these executors import this module, which
    silences datatrove's console logging there (see `_quiet_datatrove`).
    """

    logging_dir: Any

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        try:
            return super()._run_for_rank(rank, local_rank, node_rank=node_rank)  # type: ignore[misc]
        except Exception as exc:
            message = str(exc) if isinstance(exc, JpadaptError) else f"{type(exc).__name__}: {exc}"
            with self.logging_dir.open(f"failures/{rank:05d}", "w") as record:
                record.write(" ".join(message.split()))  # one line
            raise


class _LocalExecutor(_RecordsFailures, LocalPipelineExecutor):
    pass


class _RayExecutor(_RecordsFailures, RayPipelineExecutor):
    pass


class _SlurmExecutor(_RecordsFailures, SlurmPipelineExecutor):
    """datatrove's Slurm executor, with sbatch options every cluster accepts and the ids of the jobs it submits."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(job_id_retriever=self._submitted, **kwargs)
        self.job_ids: list[str] = []

    def _submitted(self, sbatch_output: str) -> str:
        # "Submitted batch job 123", with " on cluster X" after it on a federation.
        found = re.search(r"Submitted batch job (\d+)", sbatch_output)
        if found is None:
            raise JpadaptError(f"cannot read the job id in sbatch's output: {sbatch_output.strip()!r}")
        self.job_ids.append(found[1])
        return found[1]

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if args.get("partition") is None:  # datatrove would write a bare `--partition`: use the cluster's default
            del args["partition"]
        # sbatch takes whole numbers ("1.5G" is refused): 1.5 GB per CPU is 1536M. The user's own options win.
        return {**args, "mem-per-cpu": f"{round(self.mem_per_cpu_gb * 1024)}M", **self._sbatch_args}

    def launch_merge_stats(self) -> None:
        """No stats-merging job: nothing reads datatrove's merged stats.json, and that job (afterok on the array)
        would stay pending forever once a task failed."""


def _preload_in_workers() -> None:
    """Workers fork from the forkserver: with these modules imported there once, a step's worker starts in
    milliseconds instead of importing datatrove, numpy and our code again (about a second per worker, per step:
    it was most of what kept 2 workers below 1.8x the speed of 1 on a 0.25 GB corpus)."""
    import multiprocess

    multiprocess.get_context("forkserver").set_forkserver_preload(
        ["data.executor", "data.prepare", "data.dedup", "datatrove.pipeline.dedup.minhash"]
    )


def _run_local(steps: list[Any], tasks: int, settings: ExecutorSettings, logging_dir: Path, step: str) -> None:
    workers = settings.local_workers(tasks)
    with _datatrove_logs_to_file(logging_dir):
        # forkserver: workers start from a clean process, not a fork of this one, whose threads (the progress
        # bar's) can hold locks at fork time: with "fork" the demo's prepare hung in a worker (seen once).
        _preload_in_workers()
        executor = _LocalExecutor(
            pipeline=steps, tasks=tasks, workers=workers, logging_dir=str(logging_dir), start_method="forkserver"
        )
        executor.run()


def _run_slurm(steps: list[Any], tasks: int, settings: ExecutorSettings, logging_dir: Path, step: str) -> None:
    slurm = settings.slurm or SlurmConfig()
    executor = _SlurmExecutor(
        pipeline=steps,
        tasks=tasks,
        time=slurm.time,
        partition=slurm.partition,
        qos=None,  # datatrove's "normal" is not on every cluster: the account's default applies
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        job_name=f"{slurm.job_name}-{_slug(step)}",
        env_command=_slurm_env_command(slurm.env_command),
        sbatch_args=dict(slurm.sbatch_args),
        max_array_size=slurm.max_array_size,
        logging_dir=str(logging_dir),
        slurm_logs_folder=str(logging_dir / "slurm_logs"),
        mail_type="NONE",
    )
    try:
        _submit(executor, logging_dir)
        _wait_for_slurm(executor.job_ids, logging_dir, tasks)
    finally:
        if executor.job_ids and _completed(logging_dir, tasks) < tasks:
            # A task failed, a submission or the wait did, or Ctrl-C: the step has failed and its remaining
            # tasks would run in vain. A rerun resumes from the completed ones.
            subprocess.run(["scancel", *executor.job_ids], capture_output=True, check=False)


def _slurm_env_command(env_command: str | None) -> str:
    """The job script's environment line: this code tree importable, this Python's bin folder on PATH (datatrove's
    `launch_pickled_pipeline` runner is there), then the user's command, whose own activation would come first.
    One line: datatrove dedents the script around it."""
    setup = f"export PYTHONPATH={CODE_ROOT}${{PYTHONPATH:+:$PYTHONPATH}} PATH={Path(sys.executable).parent}:$PATH"
    return f"{setup}; {env_command}" if env_command else setup


def _submit(executor: _SlurmExecutor, logging_dir: Path) -> None:
    """Write the job script and sbatch it (several array jobs when the tasks exceed the cluster's MaxArraySize)."""
    with _datatrove_logs_to_file(logging_dir):
        try:
            executor.run()
        except subprocess.CalledProcessError as exc:  # sbatch printed why on stderr
            script = logging_dir / "launch_script.slurm"
            raise JpadaptError(f"sbatch refused the job (exit code {exc.returncode}); the script: {script}") from None
        except FileNotFoundError as exc:
            if exc.filename != "sbatch":
                raise
            raise JpadaptError("prepare.executor is slurm but sbatch is not on PATH") from None


def _wait_for_slurm(job_ids: list[str], logging_dir: Path, tasks: int) -> None:
    """Slurm runs the tasks after sbatch returns: wait until all are complete, one failed, or the jobs left the
    queue. Array jobs beyond the first wait for the one before (afterany), so the last leaves the queue last."""
    failed_squeues = 0
    while job_ids and _completed(logging_dir, tasks) < tasks and not _failures(logging_dir):
        queued = _slurm_job_queued(job_ids[-1])
        if queued is False:
            # Completion markers are written last; give a shared filesystem a moment to show them.
            time.sleep(POLL_SECONDS)
            return
        failed_squeues = failed_squeues + 1 if queued is None else 0
        if failed_squeues == SQUEUE_ATTEMPTS:
            raise JpadaptError(f"squeue failed {SQUEUE_ATTEMPTS} times in a row while waiting for job {job_ids[-1]}")
        time.sleep(SLURM_POLL_SECONDS)


def _slurm_job_queued(job_id: str) -> bool | None:
    """Whether the job (any task of the array) is pending or running; None when squeue failed."""
    result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%i"],
                            capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return bool(result.stdout.strip())
    # Slurm forgets a finished job after MinJobAge; squeue then calls its id invalid.
    return False if "Invalid job id" in result.stderr else None


def _run_ray(steps: list[Any], tasks: int, settings: ExecutorSettings, logging_dir: Path, step: str) -> None:
    try:
        import ray
    except ImportError:
        raise JpadaptError("prepare.executor is ray but Ray is not installed: pip install 'jpadapt[ray]'") from None

    options = settings.ray or RayConfig()
    with _datatrove_logs_to_file(logging_dir):
        executor = _RayExecutor(
            pipeline=steps, tasks=tasks, workers=-1, logging_dir=str(logging_dir), cpus_per_task=options.cpus_per_task
        )
        try:
            _connect_ray(options, settings)
            executor.run()  # returns once every task has ended; the failed ones left their records
        finally:
            ray.shutdown()  # disconnect (and stop a private instance): nothing outlives the step


def _connect_ray(options: RayConfig, settings: ExecutorSettings) -> None:
    """Join the configured cluster, or start a private instance; with no output on the console."""
    import ray

    quiet: dict[str, Any] = {
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        # Workers unpickle the executor and the pipeline, importing this code tree's modules.
        "runtime_env": {"env_vars": {"PYTHONPATH": _worker_pythonpath()}},
    }
    if options.address is not None:
        ray.init(address=options.address, **quiet)
        return
    # "local": a new instance even when RAY_ADDRESS or `ray start` points at another one. Room for `workers`
    # tasks at once (default: one CPU each for every core), and for at least one.
    cpus = settings.workers * options.cpus_per_task if settings.workers else max(_cores(), options.cpus_per_task)
    with _loopback_only():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)


def _worker_pythonpath() -> str:
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return os.pathsep.join([str(CODE_ROOT), *inherited])


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a private Ray starts, make it listen on 127.0.0.1 only.

    By default Ray listens on every interface of the machine, without authentication: anyone on the network
    could run code. It keeps to the loopback only where it considers clusters unsupported (Windows and macOS),
    a switch read when it resolves its node address, which is what is flipped here.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


# --------------------------------------------------------------------------------------------- logs and progress


def _file_only_task_logger(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
    """datatrove's per-task logger without its console sink: the task's log file gets everything (tracebacks
    of a failed task belong there); the user gets one line and the file's name."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    prefix = f"[NODE {node_rank}] " if node_rank != -1 else ""
    logger.add(logfile, level="DEBUG", colorize=False,
               format=prefix + "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}")
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _close_task_logger(logfile: Any) -> None:
    """datatrove's, without putting its console sink back after each task."""
    from loguru import logger

    logger.complete()
    logger.remove()
    logfile.close()


def _quiet_datatrove() -> None:
    """Every process that runs our tasks imports this module first (unpickling its executor does), so this is
    where datatrove's console logging is turned off: loguru's default stderr sink, and the per-task one (the
    Ray executor imported both task-logger functions under its own names)."""
    import datatrove.executor.base
    import datatrove.executor.ray
    from loguru import logger

    logger.remove()
    for module in (datatrove.executor.base, datatrove.executor.ray):
        module.add_task_logger = _file_only_task_logger
        module.close_task_logger = _close_task_logger


_quiet_datatrove()


class _datatrove_logs_to_file:
    """While a step runs here, datatrove's messages in this process (task counts, skips) go to a file too."""

    def __init__(self, logging_dir: Path) -> None:
        self.path = logging_dir / "logs" / "executor.log"

    def __enter__(self) -> None:
        from loguru import logger

        logger.remove()
        logger.add(str(self.path), level="INFO", colorize=False)

    def __exit__(self, *exc: object) -> None:
        from loguru import logger

        logger.remove()


class _Progress:
    """A bar of finished tasks, read from the completion markers, so it works the same for every executor."""

    def __init__(self, step: str, logging_dir: Path, tasks: int, done: int) -> None:
        self.logging_dir, self.tasks = logging_dir, tasks
        # disable=None: silent when stderr is not a terminal (CI, logs).
        self.bar = tqdm(total=tasks, initial=done, desc=step, unit=" tasks", disable=None, leave=False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> None:
        if not self.bar.disable:
            self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.bar.close()

    def _poll(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            done = _completed(self.logging_dir, self.tasks)
            self.bar.update(done - self.bar.n)

