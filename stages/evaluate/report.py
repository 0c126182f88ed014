"""The evaluate stage's report: every model side by side (bits per byte, JGLUE, generations).

    write_report(stage_dir)     # reads results.json, predictions.jsonl, generations.jsonl; writes report.md,
                                # report.html, bits_per_byte.png and jglue.png
    stage_blocks(stage_dir)     # the same content as blocks + plot files, for the run report

results.json layout (written by stages/evaluate/__init__.py):
    {"settings": {evaluate section, "seed", "device"},
     "heldout": {lang: {"documents", "chars", "bytes"}},
     "models": [{"name", "kind", "source", "tokenizer", "adapter", "quantization", "dtype", "vocab_size",
                 "positions", "window", "stride", "seconds": {"load", "lm", "jglue", "generate"}}],
     "lm": {model: {lang: {"tokens", "bytes", "nats", "loss", "ppl", "bits_per_byte"}}},
     "jglue": {"baselines": {task: {"items", "chance", "majority"}},
               "results": {model: {task: {shots: {"acc"|"acc_norm": {"correct", "total", "accuracy", "ci_low",
                                                                     "ci_high"}}}}}}}
Every accuracy can be recomputed from predictions.jsonl (each choice's log-likelihood and length).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from pipeline import reportkit as kit
from pipeline.reportkit import Bullets, Heading, Paragraph, Plot, Section, SectionContext, Table
from stages.cpt.report import LANG_COLORS, LANG_NAMES

TITLE = "Evaluation"
BPB_PLOT = "bits_per_byte.png"
JGLUE_PLOT = "jglue.png"
TASK_NAMES = {"jcommonsenseqa": "JCommonsenseQA", "jnli": "JNLI"}
KIND_NOTES = {
    "base": "the model before any training",
    "extended": "extend-vocab output: new token rows initialized, not trained",
    "cpt": "continued-pretraining output",
    "sft": "the base it was tuned on + the LoRA adapter",
    "extra": "extra folder from evaluate.extra_models",
}
PROMPT_CHARS = 80
HARNESS_NOTES = [
    ("Scoring follows lm-evaluation-harness's multiple-choice definition: the log-likelihood of each choice as a "
     "continuation of the prompt (the prompt's trailing space moved onto the choice, tokens of the whole string "
     "after the prompt's tokens); acc = argmax of the summed log-likelihood, acc_norm = argmax of log-likelihood "
     "per character of the choice (the harness's acc_norm)."),
    ("Differences from the harness: a start token (BOS, else EOS) always comes first, as context (the harness adds "
     "BOS only for some models), and nothing is truncated: a prompt longer than the model's positions is an error."),
    ("Few-shot examples are solved examples drawn with the run seed: JCommonsenseQA's from its train split, JNLI's "
     "from its valid split (its train split is not bundled), never the question itself."),
    ("95% confidence intervals are Wilson score intervals of the accuracy over the items scored; chance = the "
     "expected accuracy of a uniform guess, majority = always answering the commonest label."),
]


def write_report(stage_dir: Path) -> None:
    blocks, files = stage_blocks(stage_dir)
    for block in blocks:
        if isinstance(block, Plot):
            (stage_dir / files[id(block)]).write_bytes(block.png)
    kit.write_text(stage_dir / "report.md", kit.render_markdown(blocks, files))
    kit.write_text(stage_dir / "report.html", kit.render_html(blocks, TITLE))


def report_section(ctx: SectionContext) -> Section:
    """The run report's section (StageSpec.report_section): this report, with its two plots linked from report.md."""
    blocks, files = stage_blocks(ctx.stage_dir)
    return kit.stage_report_section(ctx, TITLE, blocks, ("results.json", "generations.jsonl"), files,
                                note=", with every prediction behind the JGLUE scores in predictions.jsonl")


def stage_blocks(stage_dir: Path) -> tuple[list, dict[int, str]]:
    """The report's blocks (title at level 1), and each plot's PNG file name by id(plot), from the stage's files."""
    results = _results(stage_dir)
    bpb, jglue = plot_bits_per_byte(results), plot_jglue(results)
    files = {id(plot): name for name, plot in ((BPB_PLOT, bpb), (JGLUE_PLOT, jglue)) if plot is not None}
    return _blocks(results, kit.read_jsonl(stage_dir / "generations.jsonl"), bpb, jglue), files


def _results(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "results.json").read_text(encoding="utf-8"))


def _blocks(results: dict[str, Any], generations: list[dict[str, Any]], bpb: Plot | None,
            jglue: Plot | None) -> list:
    level = 1
    blocks: list = [Heading(TITLE, level), Bullets(model_lines(results))]
    changes = change_lines(results)
    if changes:
        blocks += [Heading("What each stage did", level + 1), Bullets(changes)]
    if results["lm"] and any(results["lm"].values()):
        blocks += [Heading("Held-out text: bits per byte", level + 1), Paragraph(heldout_sentence(results)),
                   lm_table(results)]
        if bpb is not None:
            blocks.append(bpb)
        blocks.append(Paragraph(
            "Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the text: comparable between "
            "models with different vocabularies (base vs extended). Loss (nats per token) and perplexity = "
            "exp(loss) depend on the tokenizer: compare them only between models that share one."))
    if results["jglue"]["baselines"]:
        blocks += [Heading("JGLUE", level + 1), jglue_table(results)]
        if jglue is not None:
            blocks.append(jglue)
        blocks.append(Bullets(HARNESS_NOTES))
    if generations:
        blocks += [Heading("Generations", level + 1),
                   Paragraph(f"Greedy answers (up to {results['settings']['max_new_tokens']} new tokens) to "
                             f"{len(generations)} fixed prompts. Instruction prompts are rendered with the model's "
                             "chat template, or the Japanese instruction template when it has none; completions "
                             f"follow the start token. Prompts are cut to {PROMPT_CHARS} characters here; – marks an empty "
                             "answer (only whitespace or an immediate end of text)."),
                   generation_table(generations, [m["name"] for m in results["models"]])]
    blocks += [Heading("Time", level + 1), Bullets(time_lines(results))]
    return blocks


# ---------------------------------------------------------------------------------------------- content


def model_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for m in results["models"]:
        extras = [KIND_NOTES.get(m["kind"], m["kind"]), f"vocabulary {m['vocab_size']:,}", m["dtype"]]
        if m.get("quantization"):
            extras.append(f"base loaded {m['quantization']} 4-bit as trained")
        source = f"{m['source']} + adapter {m['adapter']}" if m.get("adapter") else m["source"]
        lines.append(f"{m['name']}: {'; '.join(extras)} ({source})")
    return lines


def change_lines(results: dict[str, Any]) -> list[str]:
    """Each model against the one before it in pipeline order: the effect of that stage."""
    names = [m["name"] for m in results["models"] if m["kind"] != "extra"]
    lines = []
    for before, after in itertools.pairwise(names):
        parts = []
        for lang in LANG_NAMES:
            a = results["lm"].get(before, {}).get(lang)
            b = results["lm"].get(after, {}).get(lang)
            if a and b:
                delta = b["bits_per_byte"] - a["bits_per_byte"]
                parts.append(f"{LANG_NAMES[lang]} bits/byte {a['bits_per_byte']:.4f} -> {b['bits_per_byte']:.4f} "
                             f"({delta:+.4f}, {delta / a['bits_per_byte']:+.1%})")
        for task, per_shots in results["jglue"]["results"].get(after, {}).items():
            for shots, metrics in per_shots.items():
                old = results["jglue"]["results"].get(before, {}).get(task, {}).get(shots)
                if old:
                    parts.append(f"{TASK_NAMES[task]} {shots}-shot acc {old['acc']['accuracy']:.3f} -> "
                                 f"{metrics['acc']['accuracy']:.3f}")
        if parts:
            lines.append(f"{before} -> {after}: " + "; ".join(parts))
    return lines


def heldout_sentence(results: dict[str, Any]) -> str:
    s = results["settings"]
    data = ", ".join(f"{LANG_NAMES[lang]} {d['documents']} documents, {d['chars']:,} characters, {d['bytes']:,} bytes"
                     for lang, d in results["heldout"].items())
    windows = sorted({(m["window"], m["stride"]) for m in results["models"]})
    window = "; ".join(f"window {w} tokens, stride {st}" for w, st in windows)
    return (f"prepare's held-out text ({data}); sliding {window}, each token scored once with the start token "
            f"first. Caps: max_documents {s['max_documents']}, max_chars {s['max_chars']} per language.")


def lm_table(results: dict[str, Any]) -> Table:
    langs = [lang for lang in LANG_NAMES if lang in results["heldout"]]
    header = ["model"]
    for lang in langs:
        header += [f"{LANG_NAMES[lang]} bits/byte", f"{LANG_NAMES[lang]} loss", f"{LANG_NAMES[lang]} ppl",
                   f"{LANG_NAMES[lang]} tokens"]
    rows = []
    for m in results["models"]:
        row = [m["name"]]
        for lang in langs:
            r = results["lm"][m["name"]][lang]
            row += [f"{r['bits_per_byte']:.4f}", f"{r['loss']:.4f}", _ppl(r["ppl"]), f"{r['tokens']:,}"]
        rows.append(row)
    return Table(header, rows, [False] + [True] * (len(header) - 1))


def _ppl(value: float) -> str:
    return f"{value:.4g}" if value < 1e6 else f"{value:.3e}"


def _accuracy_cell(a: dict[str, Any]) -> str:
    return f"{a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


def jglue_table(results: dict[str, Any]) -> Table:
    jglue = results["jglue"]
    rows = []
    for task, base in jglue["baselines"].items():
        for m in results["models"]:
            for shots, metrics in jglue["results"][m["name"]].get(task, {}).items():
                rows.append([TASK_NAMES[task], f"{shots}-shot", m["name"], _accuracy_cell(metrics["acc"]),
                             _accuracy_cell(metrics["acc_norm"]), f"{metrics['acc']['correct']}/{metrics['acc']['total']}"])
        rows.append([TASK_NAMES[task], "baseline", "chance / majority", f"{base['chance']:.3f}",
                     f"{base['majority']:.3f}", str(base["items"])])
    return Table(["task", "shots", "model", "acc [95% CI]", "acc_norm [95% CI]", "correct (acc)"], rows,
                 [False, False, False, True, True, True])


def generation_table(generations: list[dict[str, Any]], models: list[str]) -> Table:
    rows = []
    for g in generations:
        prompt = g["prompt"] if not g["input"] else f"{g['prompt']} / {g['input']}"
        rows.append([g["id"], kit.text_cell(kit.shorten(kit.one_line(prompt), PROMPT_CHARS)), kit.text_cell(g["reference"]),
                     *(kit.text_cell(g["outputs"].get(name, "")) for name in models)])
    return Table(["prompt id", "prompt", "reference", *models], rows, [False] * (3 + len(models)))


def time_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for m in results["models"]:
        s = m["seconds"]
        lines.append(f"{m['name']}: {sum(s.values()):.1f} s (load {s['load']:.1f}, bits/byte {s['lm']:.1f}, "
                     f"JGLUE {s['jglue']:.1f}, generations {s['generate']:.1f}) on {results['settings']['device']}")
    return lines


# ---------------------------------------------------------------------------------------------- plots


def plot_bits_per_byte(results: dict[str, Any]) -> Plot | None:
    langs = [lang for lang in LANG_NAMES if lang in results["heldout"]]
    names = [m["name"] for m in results["models"]]
    if not langs or not names:
        return None
    labels, families = kit.plot_labels(names)
    with kit.plot_style(families):
        fig, ax = kit.figure(max(6.0, 1.3 * len(names) + 2), 3.8)
        width = 0.8 / len(langs)
        x = np.arange(len(names))
        for i, lang in enumerate(langs):
            values = [results["lm"][n][lang]["bits_per_byte"] for n in names]
            bars = ax.bar(x + (i - (len(langs) - 1) / 2) * width, values, width * 0.95,
                          color=LANG_COLORS[lang], label=f"{LANG_NAMES[lang]} held-out")
            ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
        ax.set_xticks(x, [labels[n] for n in names])
        ax.set_ylabel("bits per byte (lower is better)")
        ax.margins(y=0.15)
        ax.legend(frameon=False, loc="lower right")
        fig.suptitle("Held-out bits per byte by model")
        image = kit.png(fig)
    return Plot(image, "Bits per byte of each model on the Japanese and English held-out text",
                "Bits per byte on the held-out text, per model (lower is better).")


def plot_jglue(results: dict[str, Any]) -> Plot | None:
    jglue = results["jglue"]
    tasks = list(jglue["baselines"])
    names = [m["name"] for m in results["models"]]
    if not tasks or not names:
        return None
    shots = sorted({int(k) for per_task in jglue["results"].values() for t in per_task.values() for k in t})
    colors = colormaps["viridis"](np.linspace(0.15, 0.85, len(shots)))
    labels, families = kit.plot_labels(names)
    with kit.plot_style(families):
        fig, axes = kit.figure(max(6.0, (1.2 * len(names) + 1.5) * len(tasks)), 3.8, ncols=len(tasks))
        axes = np.atleast_1d(axes)
        for ax, task in zip(axes, tasks):
            width = 0.8 / len(shots)
            x = np.arange(len(names))
            for i, (k, color) in enumerate(zip(shots, colors)):
                accs = [jglue["results"][n][task][str(k)]["acc"] for n in names]
                values = [a["accuracy"] for a in accs]
                errors = [[v - a["ci_low"] for v, a in zip(values, accs)],
                          [a["ci_high"] - v for v, a in zip(values, accs)]]
                ax.bar(x + (i - (len(shots) - 1) / 2) * width, values, width * 0.95, yerr=errors, capsize=3,
                       color=color, label=f"{k}-shot acc")
            base = jglue["baselines"][task]
            ax.axhline(base["chance"], color="#555555", ls="--", lw=1, label="chance")
            ax.axhline(base["majority"], color="#c0392b", ls=":", lw=1.2, label="majority")
            ax.set_xticks(x, [labels[n] for n in names])
            ax.set_ylim(0, 1)
            ax.set_title(f"{TASK_NAMES[task]} ({base['items']} items)")
            ax.set_ylabel("accuracy (95% CI)")
        handles, texts = axes[0].get_legend_handles_labels()
        fig.legend(handles, texts, loc="outside lower center", ncols=len(texts), frameon=False)
        fig.suptitle("JGLUE accuracy by model")
        image = kit.png(fig)
    return Plot(image, "JGLUE accuracy of each model with 95% intervals, chance and majority lines",
                "JGLUE accuracy (acc) per model with 95% Wilson intervals; dashed: chance, dotted: majority.")
