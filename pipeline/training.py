"""The training runtime that cpt and sft share, on both sides of the launch (`pipeline/launch.py` starts the
processes). torch and DeepSpeed are imported inside the functions: `pipeline/` stays torch-free at import.

Stage side (the `jpadapt` process):
    accelerator = pick_accelerator("sft", settings.accelerator, settings.num_gpus, precision)
    run_workers("stages.X.worker", job, job_file, settings, accelerator, log)
        # writes the typed job (a pydantic model), launches, waits; worker errors become one-line messages

Worker side (every rank, `python -m stages.X.worker job.json`):
    worker_exit(worker_main(job_file, XJob, XRecipe))  # setup, train, save, cleanup; JpadaptError ->
                                                       # worker-error.txt, crash -> log.txt, Ctrl-C -> quiet
    start_worker, deepspeed_config, lr_schedule, initialize, MetricsLogger, progress, grad_norm, peak_memory
    checkpoint_hashes, check_checkpoint, load_checkpoint, load_weights_only   # resuming without running pickles
    causal_lm_nats (the loss of both: decoder once, output layer in checkpointed chunks), engine_nats
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import JpadaptError
from pipeline.hashing import sha256_file
from pipeline.launch import stop_quietly

ERROR_FILE = "worker-error.txt"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

JobT = TypeVar("JobT", bound=BaseModel)
# The output layer runs on at most this many (positions x vocabulary) logits at a time: 2**26 = 67M values, e.g.
# 441 positions of Qwen's 151,936-token vocabulary, ~0.8 GB at the ~12 B per logit its loss's backward holds,
# instead of 4 x 4096 x 151,936 x 12 B = 30 GB for a micro batch of 4 x 4096 tokens.
LOGIT_CHUNK_ELEMENTS = 2**26


class JobContext(BaseModel):
    """What every training job's workers are told whatever the stage: where to write, the seed, who started
    them, on what, for how long. The stage's job model holds it as its `context` field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out_dir: Path  # the stage directory; job.json is in it
    run_config: Path  # the run's config.yaml, copied into the model folders the job writes
    seed: int
    parent_pid: int  # the workers exit when this process is gone
    accelerator: Literal["cpu", "cuda"]
    total_steps: int = Field(ge=1)


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


def save_job(job: BaseModel, path: Path) -> None:
    """The job file the workers read; a stale worker error from an earlier attempt is removed with it."""
    path.write_text(job.model_dump_json(indent=1), encoding="utf-8")
    (path.parent / ERROR_FILE).unlink(missing_ok=True)


def job_context(ctx: Any, accelerator: str, total_steps: int) -> JobContext:
    """The context of a job launched from this process by the stage whose StageContext is `ctx`."""
    return JobContext(out_dir=ctx.out_dir, run_config=ctx.run_dir / "config.yaml", seed=ctx.seed,
                      parent_pid=os.getpid(), accelerator=accelerator, total_steps=total_steps)


def run_workers(module: str, job: BaseModel, job_file: Path, settings: Any, accelerator: str, log: Any,
                node: Any = None) -> None:
    """Write the job, run `python -m module job_file` on every rank (`pipeline.launch`; this node's ranks for
    a per-node launch), wait, and turn what the workers left behind into the stage's outcome (`check_job`)."""
    from pipeline.launch import launch_command, run_job

    save_job(job, job_file)
    check_job(job_file.parent, run_job(launch_command(module, [str(job_file)], settings, accelerator, node), log))


def join_workers(module: str, job_file: Path, settings: Any, accelerator: str, node: Any, log: Any) -> int:
    """Node K > 0 of a per-node launch: run this node's ranks of node 0's job; their exit code, or a worker's
    JpadaptError. They read `job_file` only after the rendezvous, which node 0 joins after writing it, so they
    never read a previous attempt's job."""
    from pipeline.launch import launch_command, run_job

    returncode = run_job(launch_command(module, [str(job_file)], settings, accelerator, node), log)
    error = job_file.parent / ERROR_FILE
    if error.is_file():
        raise JpadaptError(error.read_text(encoding="utf-8").strip())
    return returncode


def load_job(job_type: type[JobT], path: Path) -> JobT:
    """The job as the parent wrote it, validated: a missing or malformed field is named, not a KeyError."""
    try:
        return job_type.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise JpadaptError(f"{path}: not a valid {job_type.__name__} ({problems})") from None


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


class Recipe(Protocol):
    """A worker's phases, in the order `worker_main` runs them."""

    def setup(self) -> None: ...
    def train(self) -> None: ...
    def save(self) -> None: ...
    def cleanup(self) -> None: ...


def worker_main(job_file: str, job_type: type[JobT], recipe: Callable[[JobT], Recipe]) -> int:
    """One rank's life: read the typed job, run the recipe's phases. Errors land where the stage process looks:
    a JpadaptError in worker-error.txt (its one-line message), a crash's traceback in log.txt. Ctrl-C or
    SIGTERM ends the worker quietly with code 130."""
    out = Path(job_file).parent  # the stage writes job.json into its own directory
    stop_quietly()
    try:
        job = load_job(job_type, Path(job_file))
        quiet_libraries()
        phases = recipe(job)
        phases.setup()
        phases.train()
        phases.save()
        phases.cleanup()
    except JpadaptError as exc:
        (out / ERROR_FILE).write_text(str(exc) + "\n", encoding="utf-8")
        return 2
    except KeyboardInterrupt:
        # The jpadapt process says it in one line and marks the stage interrupted; a traceback from every rank
        # would only bury that line.
        return 130
    except Exception:
        with (out / "log.txt").open("a", encoding="utf-8") as log:
            log.write(f"worker rank {os.environ.get('RANK', '0')} crashed:\n{traceback.format_exc()}")
        raise
    return 0


def worker_exit(code: int) -> NoReturn:
    """A worker's `sys.exit(worker_main(...))`. An interrupted worker (130) ends without the interpreter's
    shutdown: that shutdown runs the C++ destructors of the process group's threads, and one still waiting in a
    collective the other ranks have left aborts with "terminate called without an active exception", a line on
    the console after the stage's one-line message. Nothing is lost: metrics and TensorBoard events are flushed
    as they are written, and a checkpoint counts only once its record is complete."""
    if code != 130:
        sys.exit(code)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class Rank:
    """Where this worker process sits in the job (from the launcher's environment)."""

    rank: int
    world: int
    local_rank: int
    device: Any  # torch.device


def start_worker(context: JobContext) -> Rank:
    """Every worker's first steps: the parent watchdog, its device, the process group (nccl or gloo)."""
    import deepspeed
    import torch

    exit_with_parent(int(os.environ.get("JPADAPT_PARENT_PID", context.parent_pid)))  # set on per-node launch
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = context.accelerator == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_flush_denormal(True)  # tiny gradients late in training otherwise halve CPU speed
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return Rank(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank,
                torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


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


# ---------------------------------------------------------------------------------------------- optimization


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    precision: str,
    zero_stage: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    optimizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `deepspeed.initialize` config. `optimizer`: let DeepSpeed build it (its CPU Adam for offloaded
    states); None: the caller passes a torch optimizer."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # The consolidated HF folder at the end needs the full weights gathered onto rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # jpadapt logs its own metrics
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if optimizer is not None:
        config["optimizer"] = optimizer
    elif offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # a torch AdamW stepping on the CPU copy is allowed
    return config


def lr_schedule(lr: float, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear re-warming from 0 to `lr` over `warmup` steps, then cosine decay to `lr * min_ratio` at `total`.
    `schedule(step)` is the learning rate of optimizer step `step` (0-based)."""

    def schedule(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return schedule


def decay_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: weight decay on matrices (and embeddings), none on norms
    and biases (1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def initialize(model: Any, optimizer: Any, schedule: Callable[[int], float], lr: float, config: dict[str, Any],
               model_parameters: Any = None) -> tuple[Any, Any]:
    """(engine, lr scheduler) from `deepspeed.initialize`; the step -> learning rate function becomes a torch
    scheduler over the optimizer DeepSpeed builds (from `config`) or wraps (`optimizer`)."""
    import deepspeed
    import torch

    def scheduler(built: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(built, lambda step: schedule(step) / lr)

    engine, _, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                      model_parameters=model_parameters,
                                                      lr_scheduler=scheduler, config=config)
    return engine, lr_scheduler


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


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_hashes(folder: Path, rank: int, world: int, marker: str) -> dict[str, str]:
    """The sha256 of every file in a checkpoint folder but `marker`, by relative path. A collective: each rank
    hashes a share of the files, every rank gets them all. The folder is on storage that all ranks see, as the
    marker already requires (rank 0 alone writes it, every rank reads it to resume)."""
    import torch

    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != marker)
    shares: list[Any] = [None] * world
    torch.distributed.all_gather_object(shares, {name: sha256_file(folder / name) for name in names[rank::world]})
    return {name: digest for share in shares for name, digest in share.items()}


def check_checkpoint(folder: Path, recorded: dict[str, str], rank: int, world: int, marker: str,
                     start_over: Path) -> None:
    """Refuse a checkpoint whose files are not exactly those the run hashed when it wrote them (`recorded`,
    from `checkpoint_hashes`): nothing planted or changed since is loaded. A collective; every rank gives the
    same verdict."""
    found = checkpoint_hashes(folder, rank, world, marker)
    for name in sorted(found.keys() | recorded.keys()):
        if found.get(name) != recorded.get(name):
            problem = ("is not a file this run wrote" if name not in recorded else
                       "is missing" if name not in found else "changed after this run wrote it")
            raise JpadaptError(f"{folder / name}: {problem}; delete {start_over} to start over")


def checkpoint_classes() -> list[type]:
    """What DeepSpeed 0.19's checkpoint files hold besides tensors, containers and numbers, all of it in the
    ZeRO optimizer states (read from files of ZeRO 0-3 in fp32 and bf16): the loss scaler (the dynamic one
    under fp16), the ZeRO stage and the map of parameter fragments."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location: Any = None, *, start_over: Path) -> Any:
    """`torch.load` of a checkpoint file that rebuilds tensors, containers, numbers and `checkpoint_classes`
    and nothing else: unpickling a file in full runs whatever code it names. A file that names anything else
    is refused with a JpadaptError that names the file and says how to start over."""
    import torch

    try:
        with torch.serialization.safe_globals(checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise JpadaptError(f"{path}: not loaded: it holds more than tensors and plain data, which no checkpoint "
                           f"does (torch.load with weights_only=True refused it); delete {start_over} to start over"
                           ) from None


def load_checkpoint(engine: Any, folder: Path, start_over: Path) -> None:
    """`engine.load_checkpoint` of one checkpoint folder with every file read by `load_weights_only`. DeepSpeed
    reads them all through the engine's checkpoint engine, whose `load` unpickles in full
    (torch.load(weights_only=False)): on this engine it is replaced."""
    engine.checkpoint_engine.load = functools.partial(load_weights_only, start_over=start_over)
    engine.load_checkpoint(str(folder.parent), tag=folder.name)


# ---------------------------------------------------------------------------------------------- loss


def causal_lm_nats(model: Any, input_ids: Any, labels: Any, position_ids: Any = None, attention_mask: Any = None,
                   chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> tuple[Any, int]:
    """(sum of nats in fp32, count) of next-token prediction over the positions whose target (`labels` shifted by
    one, as transformers' ForCausalLMLoss does) is not -100: nats / count is transformers' `.loss` for the same
    labels. The decoder runs once on every position; the output layer (+ final_logit_softcapping) only on the
    positions that carry loss, in chunks of `chunk_elements` logits under torch.utils.checkpoint, so no
    tokens x vocabulary logits tensor is ever kept (recomputed chunk by chunk in backward).

    `model`: a transformers causal LM (a PEFT model's base is used; its adapters live in the decoder's modules).
    Its decoder and output layer are called as modules, so DeepSpeed's ZeRO-3 hooks gather their parameters
    (again for each chunk recomputed in backward), tied embeddings included."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, causal.base_model_prefix)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                     use_cache=False).last_hidden_state
    return output_nats(causal, hidden, labels, chunk_elements)


def output_nats(causal: Any, hidden: Any, labels: Any, chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> tuple[Any, int]:
    """The output layer's part of `causal_lm_nats`: (nats, count) from the decoder's last hidden states."""
    import torch

    targets = labels[:, 1:]
    keep = targets != -100
    states, targets = hidden[:, :-1][keep], targets[keep]
    head = causal.get_output_embeddings()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    chunk = max(1, chunk_elements // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk):
        piece = (states[start:start + chunk], targets[start:start + chunk])
        if torch.is_grad_enabled():
            # Recomputed in backward: the chunk's logits are never kept.
            total = total + torch.utils.checkpoint.checkpoint(_chunk_nats, head, cap, *piece, use_reentrant=False)
        else:
            total = total + _chunk_nats(head, cap, *piece)
    return total, int(targets.numel())


def _chunk_nats(head: Any, cap: float | None, states: Any, targets: Any) -> Any:
    import torch

    logits = head(states).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def engine_nats(engine: Any, **batch: Any) -> tuple[Any, int]:
    """`causal_lm_nats(engine.module, **batch)` run as the engine's forward pass: DeepSpeed's forward bookkeeping
    (ZeRO-3's start-of-forward hook on the root module) and the output hooks that start its backward
    (gradient-accumulation boundary, ZeRO's backward prologue) run as they do for `engine(**batch)`. The module's
    own forward is swapped for the call and put back after it."""
    module = engine.module
    own = module.__dict__.get("forward")  # None: the class's forward
    module.forward = functools.partial(causal_lm_nats, module)
    try:
        return engine(**batch)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


# ---------------------------------------------------------------------------------------------- metrics


class MetricsLogger:
    """Rank 0's record of a training job: JSON lines in the stage directory (metrics.jsonl per step, one file
    per kind of evaluation) and the same scalars in TensorBoard. On other ranks every call does nothing."""

    def __init__(self, out: Path, rank: int):
        self.out = out
        self.enabled = rank == 0
        self._board: Any = None  # created on the first scalar: a run that stops earlier leaves no event file

    def train(self, record: dict[str, Any], scalars: tuple[str, ...]) -> None:
        """One optimizer step's record; `scalars`: its keys that go to TensorBoard as `train/<key>`."""
        self.record(METRICS_FILE, record, {f"train/{key}": record.get(key) for key in scalars})

    def record(self, file: str, record: dict[str, Any], scalars: dict[str, float | None]) -> None:
        """Append `record` (it has a "step") to `file`, and the scalars that are not None at that step."""
        if not self.enabled:
            return
        append_jsonl(self.out / file, record)
        if self._board is None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.out / TENSORBOARD_DIR))
        for tag, value in scalars.items():
            if value is not None:
                self._board.add_scalar(tag, value, record["step"])
        self._board.flush()

    def drop_after(self, step: int, files: tuple[str, ...]) -> None:
        """Forget what a killed attempt logged after `step`, the checkpoint the job resumes from: the records in
        `files` and the TensorBoard events. The resumed steps are logged again."""
        if not self.enabled:
            return
        for file in files:
            _truncate_after(self.out / file, step)
        self._truncate_board(step)

    def start_over(self, files: tuple[str, ...]) -> None:
        """Forget all that a killed attempt logged (it died before its first checkpoint)."""
        if not self.enabled:
            return
        for file in files:
            (self.out / file).unlink(missing_ok=True)
        shutil.rmtree(self.out / TENSORBOARD_DIR, ignore_errors=True)

    def _truncate_board(self, step: int) -> None:
        """Rewrite the event files as one that holds their events up to `step`, with their wall times. Each
        (step, tags) once: a rewrite killed before it deleted the files it read left those events twice."""
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
        from torch.utils.tensorboard.writer import FileWriter

        old = sorted((self.out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
        if not old:
            return
        kept = {}
        for path in old:
            for event in LegacyEventFileLoader(str(path)).Load():
                if event.HasField("summary") and event.step <= step:
                    kept[event.step, tuple(value.tag for value in event.summary.value)] = event
        writer = FileWriter(str(self.out / TENSORBOARD_DIR))
        for event in kept.values():
            writer.add_event(event, walltime=event.wall_time)
        writer.close()
        for path in old:
            path.unlink()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


def progress(rank: int, start: int, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=rank != 0, dynamic_ncols=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records of a JSON-lines file logged after `step`. A last line that does not parse was cut by the
    kill that ended the attempt: it is dropped (its step is logged again); a bad line before it is damage."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise JpadaptError(f"{path}:{number}: not a record this run wrote; delete {path.parent} to start over"
                               ) from None
        if record_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def write_json(path: Path, value: Any) -> None:
    """Written whole or not at all (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
