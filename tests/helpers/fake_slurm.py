"""Slurm's commands played on one machine, for testing data/executor.py's Slurm path without a cluster.

`install(bin_dir, state_dir)` writes `sbatch`, `squeue`, `scancel`, `srun` and `scontrol` into `bin_dir`; each
runs this module. sbatch checks the script's `#SBATCH` lines and its own options as strictly as Slurm does for
the ones datatrove writes, prints `Submitted batch job N` and hands the array to a background runner: two tasks
at a time, each in its own process group, bounded in time, with the variables Slurm sets (SLURM_ARRAY_TASK_ID,
SLURM_NODELIST, ...) and those of `--export`. squeue lists a job until its runner is done; scancel makes the
runner kill its tasks. Everything is recorded under `state_dir`: `submissions.jsonl` (one line per sbatch),
`scancel.log`, and `jobs/N/` (the script, `queued` while the job is in the queue, task exit codes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "squeue", "scancel", "srun", "scontrol")
TASK_SECONDS = 120  # a task running longer is killed, as Slurm does at --time
PARALLEL_TASKS = 2
FLAGS = {"requeue"}  # the sbatch options datatrove writes without a value


def install(bin_dir: Path, state_dir: Path) -> None:
    """Run as a script (standard library only), so the jobs get the caller's environment untouched."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        wrapper = bin_dir / name
        wrapper.write_text(
            f'#!/bin/sh\nFAKE_SLURM_STATE={state_dir} exec {sys.executable} {Path(__file__).resolve()} {name} "$@"\n'
        )
        wrapper.chmod(0o755)


def submissions(state_dir: Path) -> list[dict]:
    path = state_dir / "submissions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def cancelled(state_dir: Path) -> list[str]:
    path = state_dir / "scancel.log"
    return path.read_text().split() if path.exists() else []


def queued(state_dir: Path) -> list[str]:
    return sorted(path.parent.name for path in (state_dir / "jobs").glob("*/queued"))


def stop_all(state_dir: Path, seconds: float = 30) -> None:
    """Cancel every job and wait (bounded) until their runners are gone: what a test does in its finally."""
    for job_dir in (state_dir / "jobs").iterdir():
        (job_dir / "cancel").touch()
    deadline = time.monotonic() + seconds
    while queued(state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------- the commands


def sbatch(args: list[str], state: Path) -> int:
    *cli, script_path = args
    script = Path(script_path).read_text()  # datatrove deletes it once sbatch returns
    options = dict(_option(line[len("#SBATCH "):]) for line in script.splitlines() if line.startswith("#SBATCH "))
    options.update(_option(arg) for arg in cli)
    error = _invalid(options)
    if error:
        print(f"sbatch: error: {error}", file=sys.stderr)
        return 1
    job_id = _next_id(state)
    job_dir = state / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "script.sh").write_text(script)
    first, last, _ = re.fullmatch(r"(\d+)-(\d+)(%\d+)?", options["array"]).groups()
    exports = dict(item.split("=", 1) for item in options.get("export", "ALL").split(",") if "=" in item)
    after = re.findall(r"\d+", options.get("dependency", ""))
    job = {"job": job_id, "options": options, "indices": list(range(int(first), int(last) + 1)),
           "exports": exports, "after": after, "cwd": os.getcwd()}
    (job_dir / "job.json").write_text(json.dumps(job))
    with (state / "submissions.jsonl").open("a") as log:
        log.write(json.dumps(job) + "\n")
    (job_dir / "queued").touch()
    subprocess.Popen([sys.executable, __file__, "_run", str(job_dir)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")
    return 0


def squeue(args: list[str], state: Path) -> int:
    jobs = args[args.index("--jobs") + 1].split(",")
    if any(not (state / "jobs" / job).is_dir() for job in jobs):
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    for job in jobs:
        if (state / "jobs" / job / "queued").exists():
            print(job)
    return 0


def scancel(args: list[str], state: Path) -> int:
    with (state / "scancel.log").open("a") as log:
        for job in args:
            log.write(job + "\n")
            if (state / "jobs" / job).is_dir():
                (state / "jobs" / job / "cancel").touch()
    return 0


def srun(args: list[str], state: Path) -> int:
    command = list(args)
    while command and command[0].startswith("-"):
        option = command.pop(0)
        if option in ("-n", "-N", "-c"):
            command.pop(0)
    os.execvp(command[0], command)


def scontrol(args: list[str], state: Path) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(args[2].split(",")))
    return 0


# --------------------------------------------------------------------------------------------- the runner


def run_job(job_dir: Path) -> None:
    """Run an array job's tasks, after the jobs it depends on, until done or cancelled; then leave the queue."""
    job = json.loads((job_dir / "job.json").read_text())
    try:
        jobs = job_dir.parent
        while any((jobs / after / "queued").exists() for after in job["after"]):
            if (job_dir / "cancel").exists():
                return
            time.sleep(0.1)
        _run_tasks(job, job_dir)
    finally:
        (job_dir / "queued").unlink(missing_ok=True)


def _run_tasks(job: dict, job_dir: Path) -> None:
    pending, running = list(job["indices"]), {}
    while pending or running:
        if (job_dir / "cancel").exists():
            for process, _ in running.values():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return
        while pending and len(running) < PARALLEL_TASKS:
            index = pending.pop(0)
            running[index] = (_start_task(job, job_dir, index), time.monotonic())
        for index, (process, started) in list(running.items()):
            if process.poll() is None and time.monotonic() - started > TASK_SECONDS:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if process.returncode is not None:
                (job_dir / f"exit_{index}").write_text(str(process.returncode))
                del running[index]
        time.sleep(0.1)


def _start_task(job: dict, job_dir: Path, index: int) -> subprocess.Popen:
    job_id, options = job["job"], job["options"]
    env = {
        **os.environ,
        **job["exports"],
        "SLURM_JOB_ID": job_id,
        "SLURM_ARRAY_JOB_ID": job_id,
        "SLURM_ARRAY_TASK_ID": str(index),
        "SLURM_JOB_NAME": options["job-name"],
        "SLURM_CPUS_PER_TASK": options["cpus-per-task"],
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    output = Path(options["output"].replace("%A", job_id).replace("%a", str(index)))
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as log:
        return subprocess.Popen(["bash", str(job_dir / "script.sh")], env=env, cwd=job["cwd"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


# --------------------------------------------------------------------------------------------- parsing


def _option(text: str) -> tuple[str, str | None]:
    key, _, value = text.strip().removeprefix("--").partition("=")
    return key, value if value else None


def _invalid(options: dict[str, str | None]) -> str | None:
    """What real sbatch would refuse among what datatrove writes."""
    for key, value in options.items():
        if value is None and key not in FLAGS:
            return f"option --{key} requires an argument"
    memory = options.get("mem-per-cpu")
    if memory is not None and not re.fullmatch(r"\d+[KMGT]?", memory):
        return f"invalid --mem-per-cpu specification: {memory}"
    if "array" not in options:
        return "this fake runs array jobs only"
    return None


def _next_id(state: Path) -> str:
    counter = state / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 1))
    return str(job_id)


def main(argv: list[str]) -> int:
    name, args = argv[0], argv[1:]
    if name == "_run":
        run_job(Path(args[0]))
        return 0
    return {"sbatch": sbatch, "squeue": squeue, "scancel": scancel, "srun": srun, "scontrol": scontrol}[name](
        args, Path(os.environ["FAKE_SLURM_STATE"])
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
