"""Run corpus work as datatrove tasks on this machine, on a Slurm cluster or on a Ray cluster.

A step is a datatrove pipeline (steps and `(data, rank, world_size)` callables) run as `tasks` independent
tasks. `run_tasks` builds the executor the YAML names (`prepare.executor`), runs the step and returns only when
every task has finished, so the caller can chain steps. Each task records its completion in the step's
logging folder; rerunning a step skips the tasks an earlier, interrupted attempt finished (resume after a
crash or a SIGKILL). A failed task becomes one JpadaptError naming the step and the task's log file.

The console stays quiet: datatrove's own logging (per task, with tracebacks) goes to
`<logging folder>/logs/task_NNNNN.log`; the caller sees a progress bar of finished tasks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import PrepareConfig, RayConfig, SlurmConfig
from pipeline.errors import JpadaptError

# How often the waiting side looks at the completion markers (and, on Slurm, at the queue).
POLL_SECONDS = 1.0
SLURM_POLL_SECONDS = 30.0


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
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(tasks, self.workers or cores))


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
        step: what the tasks do, in progress bars and messages ("prepare ja: scan").
        pipeline: datatrove steps and `(data, rank, world_size)` callables; picklable (they travel to workers).
        tasks: how many tasks; task `rank` of `tasks` decides its own share of the work.
        settings: the executor to use.
        logging_dir: this step's folder for completion markers, stats and task logs (shared with the cluster).
        log: the stage's logger, told how many tasks ran and how many were already done.
    """
    logging_dir = logging_dir.resolve()  # tasks run in other processes, in other working directories
    logging_dir.mkdir(parents=True, exist_ok=True)
    # The first step is a function of this module, so that a worker unpickling the task imports the module (and
    # with it, the quiet logging below) before datatrove sets up the task's logging.
    steps = [_in_this_module, *pipeline]
    done_before = _completed(logging_dir, tasks)
    if log is not None:
        already = f" ({done_before} finished by an earlier attempt)" if done_before else ""
        log.info("%s: %d task(s) on %s%s", step, tasks, settings.kind, already)
    if done_before == tasks:
        return
    launch = {"local": _run_local, "slurm": _run_slurm, "ray": _run_ray}[settings.kind]
    with _Progress(step, logging_dir, tasks, done_before):
        try:
            launch(steps, tasks, settings, logging_dir, step)
        except JpadaptError:
            raise
        except Exception as exc:  # noqa: BLE001 (any task error: the worker pool re-raises it here)
            raise _task_failed(step, logging_dir, tasks, exc) from None
    missing = tasks - _completed(logging_dir, tasks)
    if missing:
        raise _task_failed(step, logging_dir, tasks, None)


def incomplete_ranks(logging_dir: Path, tasks: int) -> list[int]:
    return [rank for rank in range(tasks) if not (logging_dir / "completions" / f"{rank:05d}").exists()]


def _completed(logging_dir: Path, tasks: int) -> int:
    return tasks - len(incomplete_ranks(logging_dir, tasks))


def _task_failed(step: str, logging_dir: Path, tasks: int, exc: BaseException | None) -> JpadaptError:
    """One line: the task's own message when it raised ours (a corrupt record names file:line), else where to look."""
    if isinstance(exc, JpadaptError):
        return exc
    pending = incomplete_ranks(logging_dir, tasks)
    log_file = logging_dir / "logs" / f"task_{pending[0]:05d}.log" if pending else logging_dir / "logs"
    what = f"{type(exc).__name__}: {exc}" if exc is not None else f"{len(pending)} of {tasks} task(s) did not finish"
    return JpadaptError(f"{step}: {what} (see {log_file})")


# --------------------------------------------------------------------------------------------- executors


def _run_local(steps: list[Any], tasks: int, settings: ExecutorSettings, logging_dir: Path, step: str) -> None:
    from datatrove.executor import LocalPipelineExecutor

    workers = settings.local_workers(tasks)
    # forkserver: workers start from a clean process, not a fork of this one (whose threads, e.g. the progress
    # bar's, could hold locks at fork time).
    executor = LocalPipelineExecutor(
        pipeline=steps, tasks=tasks, workers=workers, logging_dir=str(logging_dir), start_method="forkserver"
    )
    with _datatrove_logs_to_file(logging_dir):
        executor.run()


def _run_slurm(steps: list[Any], tasks: int, settings: ExecutorSettings, logging_dir: Path, step: str) -> None:
    from datatrove.executor import SlurmPipelineExecutor

    slurm = settings.slurm or SlurmConfig()
    executor = SlurmPipelineExecutor(
        pipeline=steps,
        tasks=tasks,
        time=slurm.time,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        job_name=f"{slurm.job_name}-{_slug(step)}",
        env_command=slurm.env_command,
        sbatch_args=dict(slurm.sbatch_args),
        max_array_size=slurm.max_array_size,
        logging_dir=str(logging_dir),
        slurm_logs_folder=str(logging_dir / "slurm_logs"),
        mail_type="NONE",
    )
    with _datatrove_logs_to_file(logging_dir):
        executor.run()
    _wait_for_slurm(executor.job_id, logging_dir, tasks, step)


def _wait_for_slurm(job_id: str | None, logging_dir: Path, tasks: int, step: str) -> None:
    """Slurm runs the tasks after sbatch returns: wait until all are complete, or the job left the queue."""
    while _completed(logging_dir, tasks) < tasks:
        if job_id is None or not _slurm_job_queued(job_id):
            # Completion markers are written last; give a shared filesystem a moment to show them.
            time.sleep(POLL_SECONDS)
            if _completed(logging_dir, tasks) < tasks:
                raise _task_failed(step, logging_dir, tasks, None)
            return
        time.sleep(SLURM_POLL_SECONDS)


def _slurm_job_queued(job_id: str) -> bool:
    result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%i"],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def _run_ray(steps: list[Any], tasks: int, settings: ExecutorSettings, logging_dir: Path, step: str) -> None:
    import ray
    from datatrove.executor import RayPipelineExecutor

    options = settings.ray or RayConfig()
    if not ray.is_initialized():
        ray.init(address=options.address, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    executor = RayPipelineExecutor(
        pipeline=steps, tasks=tasks, workers=-1, logging_dir=str(logging_dir), cpus_per_task=options.cpus_per_task
    )
    with _datatrove_logs_to_file(logging_dir):
        executor.run()


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


def _quiet_datatrove() -> None:
    """Every process that runs our tasks imports this module first (see `_in_this_module`), so this is where
    datatrove's console logging is turned off: loguru's default stderr sink, the per-task one, and the one
    datatrove puts back after each task."""
    import datatrove.executor.base
    import datatrove.executor.ray
    import datatrove.utils.logging
    from loguru import logger

    logger.remove()
    datatrove.utils.logging.setup_default_logger = logger.remove
    for module in (datatrove.executor.base, datatrove.executor.ray):
        module.add_task_logger = _file_only_task_logger


_quiet_datatrove()


def _in_this_module(data: Any, rank: int = 0, world_size: int = 1) -> Any:
    return data


class _datatrove_logs_to_file:
    """While a step runs here, datatrove's messages in this process (task counts, skips) go to a file too."""

    def __init__(self, logging_dir: Path) -> None:
        self.path = logging_dir / "logs" / "executor.log"

    def __enter__(self) -> None:
        from loguru import logger

        logger.remove()
        self._handler = logger.add(str(self.path), level="INFO", colorize=False)

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

