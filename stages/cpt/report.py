"""The cpt stage's report: forgetting curves (Japanese and English bits per byte over training) and run facts.

    write_report(stage_dir)     # reads summary.json, forgetting.jsonl, metrics.jsonl; writes report.md,
                                # report.html and forgetting.png
    stage_blocks(stage_dir)     # the same blocks, for the run report (pipeline/run_report.py)
    verdict(evals)              # "English forgot +0.123 bits/byte (...); Japanese gained ..." from forgetting.jsonl

Every number printed comes from those three files, so a test can recompute the report from the run directory.
Bits per byte is the headline (comparable across vocabularies); loss per token is shown beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import reportkit as kit
from pipeline.reportkit import Bullets, Heading, Paragraph, Plot, Section, SectionContext, Table

LANG_NAMES = {"ja": "Japanese", "en": "English"}
LANG_COLORS = {"ja": "#c0392b", "en": "#3b5b92"}
PLOT = "forgetting.png"
TITLE = "Continued pretraining"


def read_outputs(stage_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """summary.json, forgetting.jsonl and metrics.jsonl of a cpt stage folder."""
    summary = json.loads((stage_dir / "summary.json").read_text(encoding="utf-8"))
    return summary, kit.read_jsonl(stage_dir / "forgetting.jsonl"), kit.read_jsonl(stage_dir / "metrics.jsonl")


def stage_blocks(stage_dir: Path) -> list:
    """The report's blocks (plot included) from a cpt stage folder: what the run report shows for cpt."""
    summary, evals, steps = read_outputs(stage_dir)
    return build_blocks(summary, evals, steps, plot_curves(evals, steps))


def write_report(stage_dir: Path) -> None:
    summary, evals, steps = read_outputs(stage_dir)
    plot = plot_curves(evals, steps)
    (stage_dir / PLOT).write_bytes(plot.png)
    blocks = build_blocks(summary, evals, steps, plot)
    kit.write_text(stage_dir / "report.md", kit.render_markdown(blocks, {id(plot): PLOT}))
    kit.write_text(stage_dir / "report.html", kit.render_html(blocks, TITLE))


def overview_line(ctx: SectionContext) -> str | None:
    """The run report's Overview line for cpt (StageSpec.overview_line): the forgetting verdict."""
    return verdict(kit.read_jsonl(ctx.stage_dir / "forgetting.jsonl"))


def report_section(ctx: SectionContext) -> Section:
    """The run report's section (StageSpec.report_section of cpt): this report, the plot linked from report.md."""
    blocks = stage_blocks(ctx.stage_dir)
    return kit.stage_report_section(ctx, TITLE, blocks, ("summary.json", "forgetting.jsonl", "metrics.jsonl"),
                                kit.saved_plot(ctx.stage_dir, blocks, PLOT))


# ---------------------------------------------------------------------------------------------- content


def languages(evals: list[dict[str, Any]]) -> list[str]:
    return [lang for lang in LANG_NAMES if evals and lang in evals[0]]


def endpoints(evals: list[dict[str, Any]], lang: str) -> tuple[float, float]:
    """Bits per byte of the base model (the step-0 evaluation, before any training) and at the end."""
    return evals[0][lang]["bits_per_byte"], evals[-1][lang]["bits_per_byte"]


def verdict(evals: list[dict[str, Any]]) -> str | None:
    """What the run did to each language, in one line, from forgetting.jsonl alone:
    "English forgot +0.123 bits/byte (1.234 -> 1.357); Japanese gained 0.456 bits/byte (3.210 -> 2.754)".
    None with fewer than two evaluations or without both languages at the first and the last."""
    if len(evals) < 2 or any(lang not in evals[0] or lang not in evals[-1] for lang in ("en", "ja")):
        return None
    # Bits per byte up is worse: English up is what the run forgot, Japanese down is what it gained.
    english = _movement("English", *endpoints(evals, "en"), ("forgot +", "improved by "))
    japanese = _movement("Japanese", *endpoints(evals, "ja"), ("lost ", "gained "))
    return f"{english}; {japanese}"


def _movement(language: str, base: float, final: float, words: tuple[str, str]) -> str:
    """words[0] when bits per byte rose, words[1] when it fell; a change that rounds to 0.000 is "unchanged"."""
    change = final - base
    numbers = f"({base:.3f} -> {final:.3f})"
    if f"{abs(change):.3f}" == "0.000":
        return f"{language} unchanged {numbers}"
    word = words[0] if change > 0 else words[1]
    return f"{language} {word}{abs(change):.3f} bits/byte {numbers}"


def change_lines(evals: list[dict[str, Any]]) -> list[str]:
    """First vs last evaluation, per language: what the run did to each."""
    if len(evals) < 2:
        return []
    lines = []
    for lang in languages(evals):
        before, after = endpoints(evals, lang)
        lines.append(f"{LANG_NAMES[lang]} bits per byte: {before:.4f} at step {evals[0]['step']} -> {after:.4f} at "
                     f"step {evals[-1]['step']} ({after - before:+.4f}, {(after - before) / before:+.1%})")
    return lines


def eval_table(evals: list[dict[str, Any]]) -> Table:
    langs = languages(evals)
    header = ["step", "tokens"]
    for lang in langs:
        header += [f"{LANG_NAMES[lang]} bits/byte", f"{LANG_NAMES[lang]} loss"]
    rows = []
    for record in evals:
        row = [str(record["step"]), f"{record['tokens']:,}"]
        for lang in langs:
            row += [f"{record[lang]['bits_per_byte']:.4f}", f"{record[lang]['loss']:.4f}"]
        rows.append(row)
    return Table(header, rows, [True] * len(header))


def setup_lines(summary: dict[str, Any]) -> list[str]:
    by_lang = summary["tokens_by_language"]
    extended = summary.get("extended_from")
    return [
        (f"{summary['steps']:,} optimizer steps x {summary['global_batch_sequences']} sequences x "
         f"{summary['seq_len']} tokens = {summary['tokens_seen']:,} tokens "
         f"(Japanese {by_lang['ja']:,}, English {by_lang['en']:,})"),
        (f"English replay: configured {summary['replay_ratio']:.2%}, realized {summary['realized_en_share']:.2%} "
         "of the training tokens"),
        (f"{summary['world_size']} process(es) on {summary['accelerator']}, DeepSpeed ZeRO-{summary['zero_stage']}, "
         f"{summary['precision']}"),
        "model: " + ("the extend-vocab output (grown vocabulary)" if extended else "the configured base model"),
    ]


def speed_lines(summary: dict[str, Any]) -> list[str]:
    peak = summary["peak_memory"]
    check = summary.get("consolidation_check") or {}
    lines = [
        (f"{summary['tokens_per_s']:,.0f} tokens/s over {summary['train_seconds']:.1f} s of training "
         f"({summary['wall_seconds']:.1f} s wall, evaluations and checkpoints included)"),
        f"peak memory per process: {peak['bytes'] / 2**30:.2f} GiB ({peak['kind']})",
    ]
    if check:
        lines.append(f"consolidated model/ reloaded with transformers: logits within {check['max_abs_logit_diff']:.2g} "
                     f"of the engine's on {check['probe_tokens']} probe tokens (tolerance {check['tolerance']:g})")
    return lines


def vocab_saving(tokens_by_language: dict[str, int], efficiency: dict[str, dict[str, Any]],
                 params: int | None) -> dict[str, Any]:
    """What the extended vocabulary saved this run: the text it trained on, spelled with the base tokenizer,
    would have taken more tokens (per language, by the held-out ratio of base to extended tokens)."""
    trained = sum(tokens_by_language.values())
    base = 0.0
    for lang, tokens in tokens_by_language.items():
        row = efficiency.get(f"{lang}_heldout")
        base += tokens * (row["base_tokens"] / row["extended_tokens"] if row else 1.0)
    saving: dict[str, Any] = {"tokens_trained": trained, "base_tokens_for_same_text": round(base),
                              "token_saving_share": 1 - trained / base if base else 0.0}
    if params is not None:
        saving["model_params"] = params
        saving["flops_saved"] = 6 * params * (base - trained)
    return saving


def saving_lines(saving: dict[str, Any]) -> list[str]:
    lines = [(f"the {saving['tokens_trained']:,} tokens trained spell text that the base tokenizer would need "
             f"{saving['base_tokens_for_same_text']:,} tokens for ({100 * saving['token_saving_share']:.1f}% fewer "
             "tokens for the same text)")]
    if "flops_saved" in saving:
        lines.append(f"at 6 x N x D with N = {saving['model_params']:,} parameters: "
                     f"{kit.fmt_flops(saving['flops_saved'])} FLOPs saved")
    return lines


def build_blocks(summary: dict[str, Any], evals: list[dict[str, Any]], steps: list[dict[str, Any]], plot: Plot) -> list:
    blocks: list = [Heading(TITLE, 1), Bullets(setup_lines(summary))]
    blocks.append(Heading("Forgetting curve", 2))
    line = verdict(evals)
    if line:
        blocks.append(Paragraph(f"Verdict: {line}."))
    blocks.append(plot)
    changes = change_lines(evals)
    if changes:
        blocks.append(Bullets(changes))
    blocks += [
        Paragraph("Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the held-out text: "
                  "comparable between models with different vocabularies. Loss is per token (nats)."),
        eval_table(evals),
    ]
    if summary.get("vocab_saving"):
        blocks += [Heading("Vocabulary extension", 2), Bullets(saving_lines(summary["vocab_saving"]))]
    if steps:
        blocks += [Heading("Training", 2),
                   Bullets([(f"loss {steps[0]['loss']:.4f} at step {steps[0]['step']} -> {steps[-1]['loss']:.4f} "
                             f"at step {steps[-1]['step']}"), *speed_lines(summary)])]
    return blocks


# ---------------------------------------------------------------------------------------------- plot


def plot_curves(evals: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Plot:
    with kit.plot_style():
        # 15 x 4.2 in: three panels of 5 x 4.2 in, wide enough for legible tick labels at 100 dpi.
        fig, (ja, en, loss) = kit.figure(15, 4.2, ncols=3)
        for lang, ax in (("ja", ja), ("en", en)):
            if lang in languages(evals):
                draw_language(ax, lang, [(f"{LANG_NAMES[lang]} held-out", evals, LANG_COLORS[lang])])
        if steps:
            loss.plot([s["tokens"] for s in steps], [s["loss"] for s in steps], color="#555555", lw=1)
        loss.set(title="Training loss (nats/token, JA+EN mixture)", xlabel="training tokens", ylabel="loss")
        loss.grid(alpha=0.3)
        image = kit.png(fig)
    return Plot(image, "forgetting curves",
                "Left and middle: Japanese and English held-out bits per byte against the training tokens seen, at "
                "every evaluation; dashed: the base model (the evaluation at step 0). Right: training loss per step.")


def draw_language(ax: Any, lang: str, runs: list[tuple[str, list[dict[str, Any]], str]]) -> None:
    """One language's held-out bits per byte against training tokens: a line per (label, evals, colour), and each
    run's base-model level (its step-0 evaluation) as a dashed reference line, drawn once when runs share it."""
    bases: list[float] = []
    for label, evals, color in runs:
        ax.plot([e["tokens"] for e in evals], [e[lang]["bits_per_byte"] for e in evals], marker="o", color=color,
                label=label)
        if evals[0][lang]["bits_per_byte"] not in bases:
            bases.append(evals[0][lang]["bits_per_byte"])
    for i, level in enumerate(bases):
        ax.axhline(level, color="#888888", ls="--", lw=1, label="base model" if i == 0 else None)
    ax.set(title=f"{LANG_NAMES[lang]} bits per byte (lower is better)", xlabel="training tokens",
           ylabel="bits per byte")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
