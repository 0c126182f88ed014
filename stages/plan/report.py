"""The plan stage's section of the run report (StageSpec.report_section): the planned memory and time of each
stage next to what its run measured (plan.json, the stages' summary.json and manifests).

Here, not in pipeline/planner/, because that package is part of plan's fingerprint: a change to the run
report must not rerun plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import reportkit as kit
from pipeline.reportkit import DASH, Block, Bullets, Heading, Paragraph, Section, SectionContext, Table

CUDA_PEAK = "torch.cuda.max_memory_allocated"  # pipeline/training.py's peak_memory kind on a GPU
OVERHEAD_TERM = "framework overhead"  # the planner's fixed allowance (CUDA context, workspace, fragmentation)


def report_section(ctx: SectionContext) -> Section:
    return Section("Plan vs measured", plan_blocks(ctx),
                   ("stages/plan/plan.json, stages/cpt/summary.json, stages/sft/summary.json, "
                    "stages/*/manifest.json (duration)"))


def plan_blocks(ctx: SectionContext) -> list[Block]:
    plans = kit.read_json(ctx.stage_dir / "plan.json")
    run_dir, stages = ctx.run_dir, ctx.stages
    memory_rows, time_rows, notes = [], [], []
    for plan in plans:
        stage = plan["stage"]
        memory, compute = plan["memory"], plan.get("compute")
        setup = memory["setup"]
        summary = _measured_summary(run_dir, stage, stages)
        peak = (summary or {}).get("peak_memory")
        terms = sorted(memory["terms"], key=lambda t: -t["bytes"])[:3]
        memory_rows.append([
            stage,
            f"{setup['gpus']} x {plan['gpu']}, {setup['method']}, ZeRO-{setup['zero_stage']}",
            kit.fmt_gib(memory["gpu_bytes"]),
            "yes" if plan["fits"] else "no",
            ", ".join(f"{t['name']} {kit.fmt_gib(t['bytes'])}" for t in terms),
            kit.fmt_gib(peak["bytes"]) if peak else DASH,
            (f"{peak['kind']}, {summary.get('accelerator', DASH)}, {summary.get('world_size', DASH)} process(es)"
             if peak else ("not run" if stage not in stages else "not recorded")),
        ])
        manifest = stages.get(stage) or {}
        if compute is None and stage not in stages:
            continue  # nothing planned (inference has no training time) and nothing measured
        time_rows.append([
            stage,
            f"{compute['tokens']:,}" if compute else DASH,
            f"{summary['tokens_seen']:,}" if summary and "tokens_seen" in summary else DASH,
            (f"{kit.fmt_seconds(compute['hours'] * 3600)} at {compute['mfu']:.0%} MFU on {setup['gpus']} x "
             f"{compute['gpu']}" if compute else DASH),
            f"{kit.fmt_money(compute['cost'])} at ${compute['price_per_gpu_hour']}/GPU-hour" if compute else DASH,
            kit.fmt_seconds(summary["train_seconds"]) if summary and "train_seconds" in summary else DASH,
            kit.fmt_seconds(summary["wall_seconds"]) if summary and "wall_seconds" in summary else DASH,
            kit.fmt_seconds(manifest["duration_s"]) if "duration_s" in manifest else DASH,
        ])
        if summary is not None:
            notes += comparison_notes(plan, summary)
    return [
        Heading("Plan vs measured (plan)", 2),
        Paragraph("The plan stage's per-GPU memory estimate (plan.json) next to the peak the training stage "
                  "measured (its summary.json). GiB = 2^30 bytes. The largest planned terms are listed; "
                  "stages/plan/plan.md has every term and its formula."),
        Table(["stage", "planned for", "planned GiB per GPU", "fits", "largest planned terms (GiB)",
               "measured peak GiB", "measured as"], memory_rows, [False, False, True, False, False, True, False]),
        Heading("Time", 3),
        Table(["stage", "planned tokens", "trained tokens", "planned time", "planned cost", "measured training time",
               "measured wall time", "stage duration"], time_rows, [False, True, True, False, False, True, True, True]),
        Paragraph("Planned time = FLOPs / (GPUs x peak bf16 FLOP/s x MFU), training only. Measured training time "
                  "excludes evaluations, checkpoints and start-up, which the wall time and the stage's duration "
                  "(manifest) include."),
        *([Bullets(notes)] if notes else []),
    ]


def _measured_summary(run_dir: Path, stage: str, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if stage not in stages:
        return None
    path = run_dir / "stages" / stage / "summary.json"
    return kit.read_json(path) if path.is_file() else None


def comparison_notes(plan: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Say plainly what the planned and measured numbers are, and when they measure different things."""
    stage, memory = plan["stage"], plan["memory"]
    setup, peak = memory["setup"], summary.get("peak_memory")
    accelerator = summary.get("accelerator", "unknown device")
    overhead = sum(t["bytes"] for t in memory["terms"] if t["name"] == OVERHEAD_TERM)
    notes = []
    if peak and peak.get("kind") == CUDA_PEAK:
        without = memory["gpu_bytes"] - overhead
        notes.append(f"{stage}: both numbers are GPU memory. The measured peak ({CUDA_PEAK}) counts tensors only; "
                     f"the plan adds a {kit.fmt_gib(overhead)} GiB framework allowance, so compare "
                     f"{kit.fmt_gib(without)} GiB planned without it against {kit.fmt_gib(peak['bytes'])} GiB measured. "
                     f"The plan is for {plan['gpu']}; summary.json does not record which GPU the run used.")
    elif peak:
        notes.append(f"{stage}: the plan is for {setup['gpus']} x {plan['gpu']} (GPU memory per device), but the run "
                     f"was measured on the {accelerator} as the {peak.get('kind', 'peak')} (the whole process: "
                     "Python, libraries, data and model), so the two numbers measure different things and are not "
                     f"expected to agree. The planned time is for the GPU too, not the {accelerator}.")
    world = summary.get("world_size")
    if world is not None and world != setup["gpus"]:
        notes.append(f"{stage}: planned for {setup['gpus']} GPU(s), ran as {world} process(es).")
    if stage == "cpt" and "seq_len" in summary and summary["seq_len"] != setup.get("seq_len"):
        notes.append(f"{stage}: the plan is for seq_len {setup.get('seq_len')} but the run used {summary['seq_len']}: "
                     "the plan is stale (`jpadapt plan` redoes it).")
    compute = plan.get("compute")
    if compute and "tokens_seen" in summary and summary["tokens_seen"] != compute["tokens"]:
        notes.append(f"{stage}: the plan counts {compute['tokens']:,} training tokens, the run trained on "
                     f"{summary['tokens_seen']:,} (packing, padding or a changed step count).")
    return notes
