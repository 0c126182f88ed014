"""What the training stages (cpt, sft) share on both sides of the launch.

Stage side (the `jpadapt` process):
    accelerator = pick_accelerator("sft", settings.accelerator, settings.num_gpus, precision)
    returncode = run_job(job, log); check_job(out_dir, returncode)   # worker errors become one-line messages

Worker side (every rank, `python -m stages.X job.json`):
    sys.exit(worker_main(job_file, body))   # body(job) trains; JpadaptError -> worker-error.txt, crash -> log.txt
    exit_with_parent(pid), progress(...), append_jsonl, write_json, grad_norm(model), peak_memory(...)
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import JpadaptError

ERROR_FILE = "worker-error.txt"


# ---------------------------------------------------------------------------------------------- stage side


def pick_accelerator(section: str, wanted: str, num_gpus: int, precision: str) -> str:
    """"cuda" or "cpu" for a section's `accelerator` setting, refusing what this machine cannot do."""
    import torch

    available = torch.cuda.is_available()
    if wanted == "cuda" and not available:
        raise JpadaptError(f"{section}.accelerator: cuda requested but torch sees no GPU (set {section}.accelerator: cpu)")
    accelerator = "cuda" if wanted == "cuda" or (wanted == "auto" and available) else "cpu"
    if accelerator == "cuda" and num_gpus > torch.cuda.device_count():
        raise JpadaptError(f"{section}.num_gpus is {num_gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    if accelerator == "cpu" and precision == "fp16":
        raise JpadaptError(f"{section}.precision: fp16 needs a GPU; on the CPU use bf16 or fp32")
    return accelerator


def check_plan(cfg: Any, stage: str, ctx: Any) -> None:
    """The planner's verdict before a launch: a run that cannot fit stops here, unless `--force`."""
    from pipeline.planner.plan import check_fits

    if ctx.forced:
        ctx.log.info("--force: the planner's memory check is skipped")
        return
    plan = check_fits(cfg, stage)
    if plan is not None:
        ctx.log.info("plan: ~%.1f GiB per GPU on %s, fits", plan.memory.gpu_bytes / 2**30, plan.gpu.name)


def check_job(out_dir: Path, returncode: int, expected: str = "summary.json") -> None:
    """After the job: a worker's JpadaptError as the stage's one-line error; a crash or a missing result as a
    RuntimeError (the runner points at log.txt, where the worker's traceback is)."""
    error = out_dir / ERROR_FILE
    if error.is_file():
        raise JpadaptError(error.read_text(encoding="utf-8").strip())
    if returncode != 0:
        raise RuntimeError(f"the training job exited with code {returncode} (its output is above)")
    if not (out_dir / expected).is_file():
        raise RuntimeError(f"the training job exited without writing {expected}")


# ---------------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class Rank:
    """Where this worker process sits in the job (from the launcher's environment)."""

    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device


def start_worker(job: dict[str, Any]) -> Rank:
    """Every worker's first steps: the parent watchdog, its device, the process group (nccl or gloo)."""
    import deepspeed
    import torch

    exit_with_parent(int(job["parent_pid"]))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = job["accelerator"] == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_flush_denormal(True)  # tiny gradients late in training otherwise halve CPU speed
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return Rank(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank,
                torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def lambda_scheduler(schedule: Callable[[int], float], lr: float) -> Callable[[Any], Any]:
    """What `deepspeed.initialize(lr_scheduler=...)` takes: the step -> learning rate function as a torch
    scheduler over the optimizer DeepSpeed builds or wraps."""
    import torch

    def build(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / lr)

    return build


def tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))


def worker_main(job_file: str, body: Callable[[dict[str, Any]], None]) -> int:
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    out = Path(job["out_dir"])
    try:
        quiet_libraries()
        body(job)
    except JpadaptError as exc:
        # The stage process turns this file into its one-line error.
        (out / ERROR_FILE).write_text(str(exc) + "\n", encoding="utf-8")
        return 2
    except Exception:
        # Into the stage's log.txt too, where the stage's crash message points.
        with (out / "log.txt").open("a", encoding="utf-8") as log:
            log.write(f"worker rank {os.environ.get('RANK', '0')} crashed:\n{traceback.format_exc()}")
        raise
    return 0


def exit_with_parent(pid: int, interval: float = 2.0) -> None:
    """Workers exit when the jpadapt process that launched them is gone (killed), instead of living on as
    orphans that hold the GPUs, wait forever in a collective, or keep writing into the stage directory."""

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:  # alive, owned by someone else
                pass
            time.sleep(interval)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def quiet_libraries() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def progress(rank: int, start: int, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=rank != 0, dynamic_ncols=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: Path, value: Any) -> None:
    """Written whole or not at all (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def grad_norm(model: Any) -> float:
    """The L2 norm of all gradients, before clipping (ZeRO-0 does not report it)."""
    import torch

    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def peak_memory(accelerator: str, device: Any) -> dict[str, Any]:
    """The largest peak over ranks (a collective): GPU memory allocated by torch, or the process's max RSS."""
    import resource

    import torch

    if accelerator == "cuda":
        value, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        value, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
    peak = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return {"bytes": int(peak.item()), "kind": kind}
