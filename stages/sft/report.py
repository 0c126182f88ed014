"""The sft stage's report: what was tuned and on what, the loss curves, and greedy answers before and after.

    write_report(stage_dir)     # reads summary.json, metrics.jsonl, eval.jsonl, generations.jsonl; writes report.md,
                                # report.html (self-contained, plot inline) and loss.png
    stage_blocks(stage_dir)     # the same blocks, for the run report (pipeline/run_report.py)

Every number printed comes from those four files, so a test can recompute the report from the run directory.
eval.jsonl and generations.jsonl may be missing or empty: the report then leaves out what they would have shown.
Loss is nats per response token throughout: prompt tokens carry no loss, so they are not in the denominator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import reportkit as kit
from pipeline.reportkit import Bullets, Heading, Paragraph, Plot, Section, SectionContext, Table

PLOT = "loss.png"
INPUT_CHARS = 120  # a held-out input can be a whole article; the table shows its start
QUANTIZATION = {
    "nf4": "NF4 4-bit base with double quantization (QLoRA)",
    "none": "none, the base is loaded unquantized (plain LoRA)",
}
PROMPT_FORMATS = {
    "chat_template": "the tokenizer's chat template",
    "template": "the jpadapt Japanese instruction template",
}


def read_outputs(stage_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]],
                                             list[dict[str, Any]]]:
    """summary.json, metrics.jsonl, eval.jsonl and generations.jsonl of an sft stage folder."""
    summary = json.loads((stage_dir / "summary.json").read_text(encoding="utf-8"))
    return (summary, kit.read_jsonl(stage_dir / "metrics.jsonl"), kit.read_jsonl(stage_dir / "eval.jsonl"),
            kit.read_jsonl(stage_dir / "generations.jsonl"))


def stage_blocks(stage_dir: Path) -> list:
    """The report's blocks (plot included) from an sft stage folder: what the run report shows for sft."""
    summary, steps, evals, generations = read_outputs(stage_dir)
    return build_blocks(summary, steps, evals, generations, plot_loss(steps, evals))


def write_report(stage_dir: Path) -> None:
    summary, steps, evals, generations = read_outputs(stage_dir)
    plot = plot_loss(steps, evals)
    (stage_dir / PLOT).write_bytes(plot.png)
    blocks = build_blocks(summary, steps, evals, generations, plot)
    kit.write_text(stage_dir / "report.md", kit.render_markdown(blocks, {id(plot): PLOT}))
    kit.write_text(stage_dir / "report.html", kit.render_html(blocks, title(summary)))


def report_section(ctx: SectionContext) -> Section:
    """The run report's section (StageSpec.report_section of sft): this report, the plot linked from report.md."""
    blocks = stage_blocks(ctx.stage_dir)
    return kit.stage_report_section(ctx, "Instruction tuning", blocks,
                                ("summary.json", "metrics.jsonl", "eval.jsonl", "generations.jsonl"),
                                kit.saved_plot(ctx.stage_dir, blocks, PLOT))


def title(summary: dict[str, Any]) -> str:
    return "Instruction tuning (LoRA)" if summary["quantization"] == "none" else "Instruction tuning (QLoRA)"


def build_blocks(summary: dict[str, Any], steps: list[dict[str, Any]], evals: list[dict[str, Any]],
                 generations: list[dict[str, Any]], plot: Plot) -> list:
    blocks: list = [Heading(title(summary), 1),
                    Heading("Setup", 2), Bullets(setup_lines(summary)),
                    Heading("Data", 2), Bullets(data_lines(summary)),
                    Heading("Loss", 2), plot]
    changes = loss_lines(steps, evals)
    if changes:
        blocks.append(Bullets(changes))
    blocks.append(Paragraph("Loss = mean negative log-likelihood in nats per response token; prompt tokens carry no "
                            "loss."))
    if evals:
        blocks += [Paragraph("Held-out loss at step 0 is the base model's: LoRA's B matrices start at zero."),
                   eval_table(evals)]
    if generations:
        blocks += [Heading("Generations", 2),
                   Paragraph(f"Greedy answers to {len(generations)} held-out prompts. Base model = the same model "
                             f"without the adapter; tuned = with it. Inputs are cut to {INPUT_CHARS} characters."),
                   generation_table(generations)]
    blocks += [Heading("Speed and memory", 2), Bullets(speed_lines(summary))]
    return blocks


def setup_lines(summary: dict[str, Any]) -> list[str]:
    lora = summary["lora"]
    quantization = summary["quantization"]
    prompt_format = summary["prompt_format"]
    return [
        f"base model: {summary['base_model']}",
        f"quantization: {QUANTIZATION.get(quantization, quantization)}; compute precision {summary['precision']}",
        (f"LoRA r={lora['r']}, alpha={lora['alpha']} (scale alpha/r = {lora['alpha'] / lora['r']:g}), "
         f"dropout {lora['dropout']:g}, on {', '.join(lora['target_modules'])}"),
        trainable_line(summary),
        f"optimizer: {summary['optimizer']}",
        f"{summary['world_size']} process(es) on {summary['accelerator']}, DeepSpeed ZeRO-{summary['zero_stage']}",
        (f"prompt format: {PROMPT_FORMATS.get(prompt_format, prompt_format)}, saved with the adapter's tokenizer so "
         "inference builds the same prompts"),
    ]


def trainable_line(summary: dict[str, Any]) -> str:
    trainable, total = summary["trainable_params"], summary["total_params"]
    line = (f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}), "
            f"{summary['lora_params']:,} of them in the LoRA matrices")
    new_rows = summary.get("new_token_rows", 0)
    if new_rows:
        line += f"; {new_rows:,} new token rows train too"
    return line


def data_lines(summary: dict[str, Any]) -> list[str]:
    data = summary["data"]
    examples = data["examples"]
    packing = (f"packing on: {summary['sequences_per_epoch']:,} sequences of up to {summary['max_seq_len']} tokens "
               f"per epoch" if summary["packing"]
               else f"packing off: {summary['sequences_per_epoch']:,} sequences per epoch, one example each")
    return [
        (f"{examples:,} examples: {data['kept']:,} kept, {data['truncated']:,} truncated to max_seq_len "
         f"{summary['max_seq_len']} ({data['truncated'] / examples:.1%}), {data['dropped']:,} dropped (nothing of "
         f"their answer fits); the longest kept example has {data['max_tokens']:,} tokens"),
        (f"{data['tokens']:,} tokens, {data['response_tokens']:,} of them response tokens that carry the loss "
         f"({data['response_tokens'] / data['tokens']:.1%})"),
        f"{packing}; {summary['padding_share']:.1%} of the positions trained on were padding",
        (f"{summary['steps']:,} optimizer steps x {summary['global_batch_sequences']} sequences = "
         f"{summary['epochs']:.2f} epochs: {summary['tokens_seen']:,} tokens seen, "
         f"{summary['response_tokens_seen']:,} of them response tokens"),
    ]


def loss_lines(steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[str]:
    lines = []
    if steps:
        first, last = steps[0], steps[-1]
        lines.append(f"training loss {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} "
                     f"at step {last['step']}")
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        before, after = first["loss"], last["loss"]
        lines.append(f"held-out loss {before:.4f} at step {first['step']} -> {after:.4f} at step {last['step']} "
                     f"({after - before:+.4f}, {(after - before) / before:+.1%})")
    return lines


def eval_table(evals: list[dict[str, Any]]) -> Table:
    rows = [[str(e["step"]), f"{e['loss']:.4f}", f"{e['response_tokens']:,}", f"{e['examples']:,}"] for e in evals]
    return Table(["step", "held-out loss", "response tokens", "examples"], rows, [True] * 4)


def generation_table(generations: list[dict[str, Any]]) -> Table:
    # A leading number column: the renderer's CSS keeps first cells on one line, which suits a number, not a prompt.
    rows = [[str(i), kit.text_cell(g["instruction"]), kit.text_cell(kit.shorten(kit.one_line(g["input"]), INPUT_CHARS)),
             kit.text_cell(g["reference"]), kit.text_cell(g["base_output"]), kit.text_cell(g["output"])]
            for i, g in enumerate(generations, start=1)]
    return Table(["#", "instruction", "input", "reference", "base model", "tuned"], rows,
                 [True, False, False, False, False, False])


def speed_lines(summary: dict[str, Any]) -> list[str]:
    peak = summary["peak_memory"]
    adapter = summary["adapter_check"]
    lines = [
        (f"{summary['tokens_per_s']:,.0f} tokens/s over {summary['train_seconds']:.1f} s of training "
         f"({summary['wall_seconds']:.1f} s wall, evaluations, generations and saving included)"),
        f"peak memory per process: {peak['bytes'] / 2**30:.2f} GiB ({peak['kind']})",
        (f"adapter reloaded from disk onto the base: max abs logit difference {adapter['max_abs_logit_diff']:.2g} "
         f"on {adapter['probe_tokens']} probe tokens (tolerance {adapter['tolerance']:g})"),
    ]
    merged = summary.get("merged_check")
    if merged:
        lines.append(f"adapter merged into a {merged['dtype']} copy of the base: max abs logit difference "
                     f"{merged['max_abs_logit_diff']:.2g} (tolerance {merged['tolerance']:g})")
    return lines


# ---------------------------------------------------------------------------------------------- plot


def plot_loss(steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> Plot:
    from matplotlib.ticker import MaxNLocator

    # Labels are ASCII, so the default style's DejaVu Sans suffices.
    with kit.plot_style():
        fig, ax = kit.figure(8, 4)
        if steps:
            ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="#999999", lw=1,
                    label="training (per step)")
        if evals:
            ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], color="#c0392b", marker="o",
                    label="held-out")
        ax.set(title="Loss (lower is better)", xlabel="step", ylabel="nats per response token")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 0.5
        if steps or evals:
            ax.legend(frameon=False)
        ax.grid(alpha=0.3)
        image = kit.png(fig)
    return Plot(image, "training and held-out loss per step",
                "Training loss per optimizer step (grey) and held-out loss at each evaluation (red), "
                "both in nats per response token.")
