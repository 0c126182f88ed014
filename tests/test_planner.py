"""The planner's interfaces: `jpadapt plan --model ...`, the `plan` stage, compute and advice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import CONFIG_DIR, load_config
from pipeline.errors import JpadaptError
from pipeline.planner.compute import advise, fits, flops_per_token, plan_compute
from pipeline.planner.gpus import CATALOG, GIB, gpu
from pipeline.planner.memory import Setup, plan_memory
from pipeline.planner.plan import check_fits, model_shape, stage_setups
from pipeline.planner.presets import resolve_model
from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli, state_of

SWALLOW = CONFIG_DIR / "llama2-7b-swallow.yaml"
QWEN = CONFIG_DIR / "qwen2.5-7b.yaml"


def test_full_training_flops_are_6nd_plus_attention_and_recompute() -> None:
    shape = resolve_model("llama2-7b")
    setup = Setup(method="full", seq_len=4096, activation_checkpointing=False)
    per_token, _ = flops_per_token(shape, setup)
    n = shape.total_params
    assert per_token == 6 * n + 12 * 32 * 4096 * 4096
    with_recompute, _ = flops_per_token(shape, Setup(method="full", seq_len=4096))
    assert with_recompute - per_token == 2 * n
    lora, _ = flops_per_token(shape, Setup(method="lora", seq_len=4096, activation_checkpointing=False))
    assert lora == 4 * n + 6 * shape.lora_params(16) + 12 * 32 * 4096 * 4096  # no weight gradients for the base


def test_time_and_cost_follow_from_flops() -> None:
    shape = resolve_model("qwen2.5-7b")
    setup = Setup(method="full", gpus=8, zero_stage=2, seq_len=4096)
    h100 = gpu("H100-80GB")
    compute = plan_compute(shape, setup, tokens=10**9, gpu=h100, mfu=0.5, price_per_gpu_hour=3.0)
    seconds = compute.flops / (8 * 989e12 * 0.5)
    assert compute.hours == pytest.approx(seconds / 3600)
    assert compute.cost == pytest.approx(seconds / 3600 * 8 * 3.0)
    assert compute.communication_gb_per_step == pytest.approx(2 * shape.total_params * 2 / 1e9)


def test_interconnect_note_for_zero3_across_nodes() -> None:
    shape = resolve_model("llama3-70b")
    setup = Setup(method="full", gpus=16, zero_stage=3, seq_len=4096)
    compute = plan_compute(shape, setup, 10**9, gpu("H100-80GB"), 0.4, 2.5, nodes=2)
    assert "across 2 nodes" in compute.note and compute.communication_gb_per_step == pytest.approx(
        3 * shape.total_params * 2 / 1e9)


def test_7b_full_training_does_not_fit_one_gpu_and_advice_does() -> None:
    shape = resolve_model("llama2-7b")
    setup = Setup(method="full", seq_len=4096, micro_batch=4, activation_checkpointing=False)
    h100 = gpu("H100-80GB")
    assert not fits(plan_memory(shape, setup), h100)
    advice = advise(shape, setup, h100)
    assert advice, "some change must make a 7B step fit on an 80 GB card"
    for suggestion in advice:
        assert suggestion.gib * GIB <= h100.memory_bytes
        assert plan_memory(shape, suggestion.setup).gpu_bytes / GIB == pytest.approx(suggestion.gib)
    assert any("LoRA" in s.change for s in advice)


def test_qlora_7b_fits_a_24gb_card() -> None:
    shape = resolve_model("llama2-7b")
    plan = plan_memory(shape, Setup(method="qlora", seq_len=2048, optimizer="paged_adamw_8bit"))
    assert fits(plan, gpu("RTX4090-24GB"))
    assert plan.term("weights (4-bit)").bytes == shape.linear_params // 2 or plan.term("weights (4-bit)").bytes > 0


def test_qwen_logits_are_one_chunk_not_tokens_x_vocab() -> None:
    """Qwen's 152k vocabulary at 4 x 4096 tokens: full logits would be 4 x 4096 x 151,936 x 12 B = 30 GB (more
    than all of a 0.5B model's weights); the chunked output layer holds one chunk of 441 positions (measured
    peak: tests/test_planner_measured.py), its weight gradient and the hidden states: ~1.1 GB."""
    shape = resolve_model("qwen2.5-0.5b")
    plan = plan_memory(shape, Setup(method="full", micro_batch=4, seq_len=4096))
    logits = plan.term("logits and loss")
    v, h, tokens = shape.vocab_size, shape.hidden_size, 4 * 4096
    assert logits.bytes == 441 * v * 12 + v * h * 2 + 2 * tokens * h * 2
    assert logits.bytes < (4 * 4096 * v * 12) / 25
    assert "441" in logits.formula and "chunk" in logits.note
    frozen = plan_memory(shape, Setup(method="lora", micro_batch=4, seq_len=4096)).term("logits and loss")
    assert frozen.bytes == logits.bytes - v * h * 2  # a frozen output layer has no weight gradient


def test_pipeline_stage_setups_come_from_the_yaml() -> None:
    cfg = load_config(SWALLOW)
    setups = stage_setups(cfg)
    cpt, tokens, nodes = setups["cpt"]
    assert (cpt.method, cpt.gpus, cpt.zero_stage, cpt.micro_batch, cpt.seq_len) == ("full", 8, 3, 4, 4096)
    assert tokens == 20_000_000_000 and nodes == 1
    sft = setups["sft"][0]
    assert (sft.method, sft.lora_rank, sft.zero_stage) == ("qlora", 64, 2)
    shape = model_shape(cfg)
    assert shape.vocab_size == 48_000  # 32,000 + 16,000 new tokens, already a multiple of 64
    assert shape.total_params == resolve_model("llama2-7b").total_params + 2 * 16_000 * 4096


def test_plan_stage_on_the_shipped_examples(tmp_path: Path) -> None:
    for config in (SWALLOW, QWEN):
        result = jpadapt("plan", str(config), "run.output_dir=" + str(tmp_path), cwd=tmp_path)  # a real process
        assert result.returncode == 0, result.stderr
        name = load_config(config).run.name
        out = tmp_path / name / "stages" / "plan"
        plans = json.loads((out / "plan.json").read_text())
        assert [p["stage"] for p in plans] == ["cpt", "sft", "evaluate"]
        for plan in plans:
            total = sum(t["bytes"] for t in plan["memory"]["terms"] if not t["on_cpu"])
            assert total == plan["memory"]["gpu_bytes"]
            assert plan["fits"] == (total <= plan["gpu_memory_bytes"])
        md = (out / "plan.md").read_text()
        assert "| term | bytes | GiB | formula | what |" in md and "GPU-hours" in md
    status = run_cli("status", str(QWEN), "run.output_dir=" + str(tmp_path), "cpt.seq_len=8192", cwd=tmp_path)
    assert state_of(status.stdout, "plan") == "stale" and "cpt.seq_len: 4096 -> 8192" in status.stdout


def test_disabling_a_stage_makes_the_plan_stale(tmp_path: Path) -> None:
    assert run_cli("plan", str(QWEN), f"run.output_dir={tmp_path}", cwd=tmp_path).returncode == 0
    status = run_cli("status", str(QWEN), f"run.output_dir={tmp_path}", "sft.enabled=false", cwd=tmp_path)
    assert state_of(status.stdout, "plan") == "stale"


def test_check_fits_refuses_what_cannot_fit() -> None:
    cfg = load_config(QWEN, ["cpt.num_gpus=1", "cpt.zero_stage=0", "plan.gpu=RTX4090-24GB"])
    with pytest.raises(JpadaptError, match="cpt needs ~.* GiB per GPU, more than a GeForce RTX 4090"):
        check_fits(cfg, "cpt")
    assert check_fits(load_config(QWEN), "sft").fits


def test_ad_hoc_plan_text_and_json(tmp_path: Path) -> None:
    text = run_cli("plan", "--model", "llama2-7b", "--method", "full", "--gpus", "8", "--zero", "3",
                   "--micro-batch", "4", "--seq-len", "4096", "--tokens", "1e9", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "## plan: full, 8 GPU(s), ZeRO-3" in text.stdout and "fits on one H100 SXM 80 GB" in text.stdout
    raw = run_cli("plan", "--model", "qwen2.5-7b", "--method", "qlora", "--gpu", "RTX4090-24GB", "--json",
                  cwd=tmp_path)
    plan = json.loads(raw.stdout)
    assert plan["gpu"] == "RTX4090-24GB"
    assert {t["name"] for t in plan["memory"]["terms"]} >= {"weights (4-bit)", "quantization constants",
                                                              "LoRA weights", "optimizer states",
                                                              "logits and loss", "framework overhead"}
    assert all(isinstance(t["bytes"], int) and t["formula"] for t in plan["memory"]["terms"])
    assert set(plan["gib_per_gpu_by_catalog"]) == set(CATALOG)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "llama9-7b"], "model 'llama9-7b' is neither a preset"),
        (["--model", "llama2-7b", "--micro-batch", "0"], "expected a positive integer"),
        (["--model", "llama2-7b", "--seq-len", "-5"], "expected a positive integer"),
        (["--model", "llama2-7b", "--method", "qlora", "--zero", "3", "--gpus", "2"], "QLoRA cannot run under ZeRO-3"),
        (["--model", "llama2-7b", "--gpus", "64", "--tokens", "4096", "--seq-len", "4096"], "more GPUs than the method can use"),
        (["--model", "llama2-7b", "--method", "inference", "--gpus", "2"], "an inference plan is per GPU"),
        (["--model", "llama2-7b", "--gpu", "H1000"], "unknown GPU 'H1000'"),
        (["--model", "llama2-7b", "--mfu", "1.5"], "expected a number in (0, 1]"),
        (["--model", "llama2-7b", "--offload-params"], "parameter offload needs ZeRO-3"),
    ],
)
def test_ad_hoc_bad_input(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli("plan", *args, cwd=tmp_path), fragment)


def test_plan_stage_needs_an_architecture(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("plan", "model.from_config=null", "model.path=nowhere", cwd=tmp_path),
                          "model.path: file not found: nowhere")
