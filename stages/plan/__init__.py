"""Stage `plan`: will cpt, sft and evaluate fit on the configured GPU, and what will they cost?

Reads only the YAML (and the model's config.json when no preset is named): no weights, no GPU. Outputs, in
`runs/<name>/stages/plan/`:
    plan.json   every memory term in bytes with its formula, compute, time, cost, verdict, advice, per stage
    plan.md     the same as tables
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.planner.plan import planned_keys
from pipeline.stage import StageContext, StageSpec, lazy


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    from pipeline.models import model_inputs

    return model_inputs(cfg.model, config_only=True) if cfg.model.preset is None else {}


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    from pipeline.planner.plan import plan_pipeline, write_outputs

    plans = plan_pipeline(cfg)
    write_outputs(plans, ctx.out_dir)
    for plan in plans:
        ctx.log.info("%s: %.1f GiB per GPU, %s on %s", plan.stage, plan.memory.gpu_bytes / 2**30,
                     "fits" if plan.fits else "does NOT fit", plan.gpu.key)
    return {plan.stage: f"{plan.memory.gpu_bytes / 2**30:.1f} GiB/GPU, {'fits' if plan.fits else 'does not fit'}"
            for plan in plans}


SPEC = StageSpec(
    name="plan",
    run=run,
    description="per-GPU memory, FLOPs, time and cost of cpt, sft and evaluate: will it fit?",
    params=planned_keys(),
    inputs=_inputs,
    outputs=("plan.json", "plan.md"),
    report_section=lazy("stages.plan.report:report_section"),
)
