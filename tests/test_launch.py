"""How training jobs are launched (argument lists without a shell, rendezvous variables, hostfile and port
checks), and the DeepSpeed config and learning-rate schedule the workers train with, how they stop on Ctrl-C,
load checkpoints and forget what a killed attempt logged (`pipeline.training`)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.errors import JpadaptError
from pipeline.launch import JOIN_TIMEOUT_S, Node, check_launch, launch_command, node_from, port_free
from pipeline.training import (
    ERROR_FILE,
    TENSORBOARD_DIR,
    MetricsLogger,
    deepspeed_config,
    job_context,
    load_job,
    load_weights_only,
    lr_schedule,
    save_job,
    worker_main,
)
from tests.helpers.jsonl import read_jsonl
from tests.helpers.pickles import Planted
from tests.helpers.tensorboard import board_counts


@dataclass
class Settings:
    num_gpus: int = 1
    num_nodes: int = 1
    hostfile: str | None = None
    master_port: int = 29555


def test_one_process_runs_the_module_directly_with_rank_variables():
    job = launch_command("stages.cpt.worker", ["/tmp/job.json"], Settings(), "cpu")
    assert job.argv == [sys.executable, "-m", "stages.cpt.worker", "/tmp/job.json"]
    assert job.world_size == 1
    assert job.env["RANK"] == "0" and job.env["WORLD_SIZE"] == "1" and job.env["LOCAL_RANK"] == "0"
    assert job.env["MASTER_PORT"] == "29555" and job.env["DS_ACCELERATOR"] == "cpu"


def test_several_processes_go_through_the_deepspeed_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    job = launch_command("stages.cpt.worker", ["job.json"], Settings(8, 2, str(hostfile), 29600), "cuda")
    assert job.argv[:3] == [sys.executable, "-m", "pipeline.launch"]  # DeepSpeed's launcher, quiet on Ctrl-C
    assert job.argv[job.argv.index("--num_gpus") + 1] == "8"
    assert job.argv[job.argv.index("--num_nodes") + 1] == "2"
    assert job.argv[job.argv.index("--master_port") + 1] == "29600"
    assert job.argv[job.argv.index("--hostfile") + 1] == str(hostfile)
    assert job.argv[-3:] == ["--module", "stages.cpt.worker", "job.json"]
    assert job.world_size == 16 and job.env["DS_ACCELERATOR"] == "cuda"
    assert "RANK" not in job.env  # the launcher sets them per process


def test_a_per_node_launch_runs_torchrun_for_this_nodes_processes():
    job = launch_command("stages.cpt.worker", ["job.json"], Settings(4, 3, None, 29601), "cuda", Node(2, "node-a"))
    assert job.argv == [sys.executable, "-m", "pipeline.launch", "--torchrun", "--nnodes", "3", "--nproc_per_node", "4",
                        "--node_rank", "2", "--master_addr", "node-a", "--master_port", "29601",
                        "--rdzv_conf", f"timeout={JOIN_TIMEOUT_S}", "-m", "stages.cpt.worker", "job.json"]
    assert job.world_size == 12 and job.env["DS_ACCELERATOR"] == "cuda"
    assert job.env["JPADAPT_PARENT_PID"] == str(os.getpid())  # not job.json's pid, node 0's process
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(JpadaptError, match=f"cpt.master_port: port {port} is in use"):  # no hostfile needed
            check_launch(Settings(4, 3, None, port), "cpt", Node(0, "node-a"))  # node 0 hosts the rendezvous


def test_the_node_comes_from_the_flags_or_the_schedulers_environment():
    two = Settings(2, 2)
    assert node_from(two, "cpt", 1, "10.0.0.1", {"NODE_RANK": "0", "MASTER_ADDR": "x"}) == Node(1, "10.0.0.1")
    assert node_from(two, "cpt", None, None, {"NODE_RANK": "1", "MASTER_ADDR": "h0"}) == Node(1, "h0")  # torchrun
    assert node_from(two, "cpt", None, None, {"SLURM_NODEID": "0", "MASTER_ADDR": "h0"}) == Node(0, "h0")
    assert node_from(two, "cpt", None, None, {}) is None  # then check_launch asks for a rank or a hostfile
    with pytest.raises(JpadaptError, match=r"start `jpadapt` on every node with --node-rank"):
        check_launch(two, "cpt")
    # A hostfile keeps DeepSpeed's ssh launcher inside a Slurm allocation; the flag still wins.
    with_hosts = Settings(2, 2, "hosts")
    assert node_from(with_hosts, "cpt", None, None, {"SLURM_NODEID": "0", "MASTER_ADDR": "h0"}) is None
    assert node_from(with_hosts, "cpt", 0, "h0", {}) == Node(0, "h0")
    # One node ignores a scheduler's variables but refuses the flag.
    assert node_from(Settings(), "cpt", None, None, {"SLURM_NODEID": "0"}) is None
    with pytest.raises(JpadaptError, match="--node-rank: cpt.num_nodes is 1"):
        node_from(Settings(), "cpt", 0, "h0", {})
    with pytest.raises(JpadaptError, match=r"--node-rank 2: sft.num_nodes is 2 \(ranks 0 to 1\)"):
        node_from(two, "sft", 2, "h0", {})
    with pytest.raises(JpadaptError, match="node rank 1: give the rendezvous host"):
        node_from(two, "cpt", 1, None, {})


def test_hostfile_is_checked(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=4\n")
    check_launch(Settings(4, 2, str(hostfile)), "cpt")
    with pytest.raises(JpadaptError, match="node-b has fewer slots"):
        check_launch(Settings(8, 2, str(hostfile)), "cpt")
    with pytest.raises(JpadaptError, match="num_nodes is 3 but .* lists 2 host"):
        check_launch(Settings(4, 3, str(hostfile)), "cpt")
    hostfile.write_text("node-a 8\n")
    with pytest.raises(JpadaptError, match=r"hosts:1: expected `HOSTNAME slots=N`"):
        check_launch(Settings(4, 2, str(hostfile)), "cpt")
    with pytest.raises(JpadaptError, match="cannot read"):
        check_launch(Settings(4, 2, str(tmp_path / "missing")), "cpt")


def test_port_check():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_free(port)
        with pytest.raises(JpadaptError, match=f"port {port} is in use"):
            check_launch(Settings(master_port=port), "cpt")
    assert port_free(port)


def test_deepspeed_config():
    config = deepspeed_config(micro_batch_size=4, grad_accum=8, grad_clip=1.0, precision="bf16", zero_stage=3,
                              offload_optimizer=True, offload_params=True)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 8
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in config
    fp32 = deepspeed_config(micro_batch_size=1, grad_accum=1, grad_clip=0.5, precision="fp32", zero_stage=0,
                            optimizer={"type": "AdamW", "params": {"lr": 1e-4}})
    assert "bf16" not in fp32 and "fp16" not in fp32 and fp32["optimizer"]["type"] == "AdamW"
    assert "zero_force_ds_cpu_optimizer" not in fp32


def test_lr_schedule_rewarms_then_decays_to_the_floor():
    schedule = lr_schedule(1e-4, warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(1e-5) and schedule(9) == pytest.approx(1e-4)
    assert schedule(10) == pytest.approx(1e-4)
    assert schedule(60) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert schedule(110) == pytest.approx(1e-5) and schedule(500) == pytest.approx(1e-5)
    values = [schedule(step) for step in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_schedule(1e-3, warmup=0, total=5, min_ratio=0.0)(0) == pytest.approx(1e-3)


def cpt_job(folder: Path):
    from pipeline.config import CptConfig, ModelConfig
    from stages.cpt.job import CptJob, TokenFiles

    stage = SimpleNamespace(out_dir=folder, run_dir=folder.parent, seed=7)
    return CptJob(context=job_context(stage, "cpu", 3), model=ModelConfig(from_config={"model_type": "llama"}),
                  extended_from=None, extended_from_name=None, tokenizer_dir=folder / "tokenizer",
                  tokens={"ja": TokenFiles(folder=folder / "ja", n_tokens=10, n_docs=2)},
                  heldout={"ja": [folder / "ja_heldout.jsonl"]}, cpt=CptConfig(max_steps=3))


def test_job_file_round_trips_and_a_bad_field_is_named(tmp_path):
    """The typed job the stage writes is what the worker reads; a missing or malformed field stops the worker
    with a message naming it (in worker-error.txt, which the stage turns into its one-line error)."""
    from stages.cpt.job import CptJob

    job = cpt_job(tmp_path)
    job_file = tmp_path / "job.json"
    save_job(job, job_file)
    assert load_job(CptJob, job_file) == job

    values = json.loads(job_file.read_text(encoding="utf-8"))
    del values["context"]["seed"]
    values["cpt"]["lr"] = "fast"
    job_file.write_text(json.dumps(values), encoding="utf-8")
    with pytest.raises(JpadaptError, match=r"context\.seed: Field required.*cpt\.lr"):
        load_job(CptJob, job_file)

    def never(job):
        raise AssertionError("the recipe must not start on a bad job")

    assert worker_main(str(job_file), CptJob, never) == 2
    assert "context.seed" in (tmp_path / ERROR_FILE).read_text(encoding="utf-8")


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)])
def test_ctrl_c_or_sigterm_ends_a_worker_quietly(tmp_path, first, second):
    """Ctrl-C or SIGTERM in a worker: exit code 130, no traceback and no crash report (the jpadapt process says
    it in one line). The signals that follow (DeepSpeed's launcher sends SIGTERM after Ctrl-C) are ignored: they
    would interrupt the exit."""
    from stages.cpt.job import CptJob

    job_file = tmp_path / "job.json"
    save_job(cpt_job(tmp_path), job_file)

    class Interrupted:
        def __init__(self, job):
            pass

        def setup(self):
            try:
                signal.raise_signal(first)
            finally:
                signal.raise_signal(second)  # arrives while the first unwinds

    def unhandled(signum, frame):  # SIGTERM's default would end pytest
        raise AssertionError(f"the worker left signal {signum} to the test's handler")

    handlers = {signum: signal.signal(signum, unhandled) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = worker_main(str(job_file), CptJob, Interrupted)
        signal.raise_signal(first)  # while the worker exits
        signal.raise_signal(second)
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert code == 130
    assert not (tmp_path / "log.txt").exists() and not (tmp_path / ERROR_FILE).exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, on the second planted pickle
def test_checkpoint_files_are_loaded_as_data(tmp_path):
    """What DeepSpeed puts into checkpoints loads (the fp16 loss scaler too, which only a GPU run writes); a
    pickle that names code is refused, and its code does not run."""
    from collections import OrderedDict

    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": DynamicLossScaler(2.0**16, 1000, 1, 2, False, dtype=torch.float16),
             "static_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [OrderedDict(weight=fragment_address(numel=4, start=0))],
             "fp32_groups": [torch.arange(4.0)]}
    saved = tmp_path / "optim_states.pt"
    torch.save(state, saved, _use_new_zipfile_serialization=False)  # DeepSpeed's default format
    loaded = load_weights_only(saved, map_location="cpu", start_over=tmp_path)
    assert vars(loaded["loss_scaler"]) == vars(state["loss_scaler"])
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["weight"] == fragment_address(numel=4, start=0)
    assert torch.equal(loaded["fp32_groups"][0], state["fp32_groups"][0])

    planted = tmp_path / "mp_rank_00_model_states.pt"
    ran = tmp_path / "ran"
    refused = rf"^{re.escape(str(planted))}: not loaded: .* delete {re.escape(str(tmp_path))} to start over$"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # torch.save's, and one the weights-only loader cannot read
        planted.write_bytes(pickle.dumps(Planted(ran), protocol=protocol))
        with pytest.raises(JpadaptError, match=refused):
            load_weights_only(planted, start_over=tmp_path)
        assert not ran.exists()


def test_a_record_cut_by_the_kill_is_dropped_on_resume(tmp_path):
    """SIGKILL in the middle of a write leaves half a line; resuming must not choke on it. Damage anywhere else is
    one clear error."""
    logger = MetricsLogger(tmp_path, rank=0)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo', encoding="utf-8")
    logger.drop_after(2, ("metrics.jsonl",))
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2]
    metrics.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n', encoding="utf-8")
    with pytest.raises(JpadaptError, match="metrics.jsonl:2: not a record this run wrote"):
        logger.drop_after(2, ("metrics.jsonl",))
    logger.close()


def test_resuming_drops_what_the_killed_attempt_logged_after_the_checkpoint(tmp_path):
    """Records and TensorBoard events after the resumed step go; those before stay, each once, also when an
    earlier rewrite was killed before it deleted the event files it had read (here: a copy of one)."""
    first = MetricsLogger(tmp_path, rank=0)
    for step in range(1, 8):
        first.train({"step": step, "loss": 10.0 - step, "lr": 0.1}, ("loss", "lr"))
        if step % 3 == 0:
            first.record("eval.jsonl", {"step": step, "bpb": 2.0 / step}, {"eval/bpb": 2.0 / step})
    first.close()
    events = next((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    shutil.copy(events, events.with_name(events.name + ".2"))

    resumed = MetricsLogger(tmp_path, rank=0)
    resumed.drop_after(4, ("metrics.jsonl", "eval.jsonl"))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "eval.jsonl")] == [3]
    for step in range(5, 7):
        resumed.train({"step": step, "loss": 10.0 - step, "lr": 0.1}, ("loss", "lr"))
    resumed.close()
    counts = board_counts(tmp_path / TENSORBOARD_DIR)
    assert counts == {**{(tag, step): 1 for tag in ("train/loss", "train/lr") for step in range(1, 7)},
                      ("eval/bpb", 3): 1}


def test_shared_memory_of_the_finished_job_is_removed_and_nothing_else(tmp_path, monkeypatch):
    """DeepSpeed's shm all-reduce names a segment per rank by uid, master address and port, and never unlinks it."""
    from pipeline import launch

    monkeypatch.setattr(launch, "SHM_DIR", tmp_path)
    uid = os.getuid()
    ours = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_34655_{rank}" for rank in (0, 1)]
    others = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_4655_0",     # another job whose port is a suffix
              f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_346550_0",   # and a prefix of ours
              f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_34655_0",  # another user's
              "unrelated_34655_0"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    job = launch.Job([sys.executable, "-c", "pass"], {}, 2, 34655)
    assert launch.run_job(job, logging.getLogger("test")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
