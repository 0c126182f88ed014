"""The evaluate stage's report: every model side by side (bits per byte, the benchmark suite, generations).

    write_report(stage_dir)     # reads results.json, generations.jsonl; writes report.md, report.html,
                                # bits_per_byte.png and tasks.png
    stage_blocks(stage_dir)     # the same content as blocks + plot files, for the run report

results.json layout (written by stages/evaluate/__init__.py):
    {"settings": {evaluate section, "seed", "device"},
     "heldout": {lang: {"documents", "chars", "bytes"}},
     "models": [{"name", "kind", "source", "tokenizer", "adapter", "quantization", "dtype", "vocab_size",
                 "positions", "window", "stride", "seconds": {"load", "lm", "tasks", "generate", "lm_eval"?}}],
     "lm": {model: {lang: {"tokens", "bytes", "nats", "loss", "ppl", "bits_per_byte"}}},
     "tasks": {"definitions": {task: {eval.tasks.TaskSpec.describe(), "items", "chance", "majority"}},
               "results": {model: {task: {shots: {metric: {"value", "total", "ci_low", "ci_high", "correct"?}}}}}},
     "lm_eval": {model: eval.harness.run_harness_tasks(...) without "samples" (those are in lm_eval_samples.jsonl)}}
Every task metric can be recomputed from predictions.jsonl: multiple choice from each choice's log-likelihood
and length, generative from the saved generation and gold answers (eval.tasks.metric_values, the task's Scoring).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from eval.suite import headline, language_averages
from pipeline import reportkit as kit
from pipeline.reportkit import Bullets, Heading, Paragraph, Plot, Section, SectionContext, Table
from stages.cpt.report import LANG_COLORS, LANG_NAMES

TITLE = "Evaluation"
BPB_PLOT = "bits_per_byte.png"
TASKS_PLOT = "tasks.png"
KIND_NOTES = {
    "base": "the model before any training",
    "extended": "extend-vocab output: new token rows initialized, not trained",
    "cpt": "continued-pretraining output",
    "sft": "the base it was tuned on + the LoRA adapter",
    "extra": "extra folder from evaluate.extra_models",
}
PROMPT_CHARS = 80
HARNESS_NOTES = [
    ("Each task's prompt, few-shot count, stop sequences and metric are those of the harness named in its row "
     "(`prompt` column; `jpadapt` = jpadapt's own shorter prompt). Multiple choice is scored by the log-likelihood "
     "of each choice as a continuation of the prompt (acc = argmax of the sum, acc_norm = argmax per character); "
     "generative tasks by greedy generation cut at the task's stop sequences, then the harness's answer "
     "extraction (JSQuAD exact match / char F1, MGSM and GSM8K the final number)."),
    ("Differences from the harness: a start token (BOS, else EOS) always comes first; nothing is truncated (a "
     "prompt longer than the model's positions is an error); few-shot examples are drawn per question with the run "
     "seed, JNLI's and JSQuAD's from the evaluation split itself (their train splits are not bundled), never the "
     "question itself or, for JSQuAD, its article; HellaSwag is a fixed 1,000-item subset (eval/tasks.py)."),
    ("Intervals are 95%: Wilson score intervals for 0/1 metrics, the normal interval of the mean for char F1. "
     "Averages are the plain mean of each language's headline metrics. Chance = the expected accuracy of a "
     "uniform guess. The bundled Japanese corpus holds JSQuAD's Wikipedia paragraphs: a model trained on it has "
     "read JSQuAD's contexts."),
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
                                note=", with every prediction behind the task scores in predictions.jsonl")


def overview_line(ctx: SectionContext) -> str | None:
    """The run report's Overview line (StageSpec.overview_line): what cpt did on the tasks, per language."""
    return task_verdict(_results(ctx.stage_dir))


def task_verdict(results: dict[str, Any]) -> str | None:
    """One line: the task averages of cpt against the model it started from (else the last pipeline model
    against base), per language, with the number of tasks."""
    names = [m["name"] for m in results["models"] if m["kind"] != "extra"]
    if len(names) < 2:
        return None
    after = "cpt" if "cpt" in names else names[-1]
    before = names[names.index(after) - 1]
    old, new = language_averages(results["tasks"], before), language_averages(results["tasks"], after)
    parts = []
    for lang in LANG_NAMES:
        if lang in old and lang in new:
            delta = new[lang][0] - old[lang][0]
            word = "gained" if delta > 0 else "lost" if delta < 0 else "unchanged"
            parts.append(f"{LANG_NAMES[lang]} tasks {word} {abs(delta):.3f} ({old[lang][0]:.3f} -> {new[lang][0]:.3f}, "
                         f"mean of {new[lang][1]})")
    return f"{after} vs {before}: " + "; ".join(parts) if parts else None


def stage_blocks(stage_dir: Path) -> tuple[list, dict[int, str]]:
    """The report's blocks (title at level 1), and each plot's PNG file name by id(plot), from the stage's files."""
    results = _results(stage_dir)
    bpb, tasks = plot_bits_per_byte(results), plot_tasks(results)
    files = {id(plot): name for name, plot in ((BPB_PLOT, bpb), (TASKS_PLOT, tasks)) if plot is not None}
    return _blocks(results, kit.read_jsonl(stage_dir / "generations.jsonl"), bpb, tasks), files


def _results(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "results.json").read_text(encoding="utf-8"))


def _blocks(results: dict[str, Any], generations: list[dict[str, Any]], bpb: Plot | None,
            tasks: Plot | None) -> list:
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
    if results["tasks"]["definitions"]:
        blocks += [Heading("Benchmark suite", level + 1), suite_table(results)]
        if tasks is not None:
            blocks.append(tasks)
        blocks += [Heading("Every metric", level + 2), metrics_table(results), Bullets(HARNESS_NOTES)]
    if any(results.get("lm_eval", {}).values()):
        blocks += [Heading("lm-evaluation-harness tasks", level + 1), harness_table(results)]
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
        old, new = language_averages(results["tasks"], before), language_averages(results["tasks"], after)
        for lang in LANG_NAMES:
            if lang in old and lang in new:
                parts.append(f"{LANG_NAMES[lang]} task average {old[lang][0]:.3f} -> {new[lang][0]:.3f} "
                             f"({new[lang][0] - old[lang][0]:+.3f})")
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


def _cell(m: dict[str, Any]) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def _task_names(results: dict[str, Any]) -> list[str]:
    """Tasks in suite order: Japanese first, then English, each in the order the settings list them."""
    definitions = results["tasks"]["definitions"]
    return sorted(definitions, key=lambda t: list(LANG_NAMES).index(definitions[t]["lang"]))


def suite_table(results: dict[str, Any]) -> Table:
    """Tasks x models on each task's headline metric with 95% intervals; the change each stage made (each model
    minus the one before it in pipeline order); per-language averages."""
    definitions, per_model = results["tasks"]["definitions"], results["tasks"]["results"]
    names = [m["name"] for m in results["models"]]
    pipeline = [m["name"] for m in results["models"] if m["kind"] != "extra"]
    steps = list(itertools.pairwise(pipeline))
    header = ["task", "prompt", "shots", "metric", "items", *names, *(f"Δ {b}" for _, b in steps), "chance"]
    rows = []
    for task in _task_names(results):
        d = definitions[task]
        picked = {n: headline(definitions, per_model.get(n, {}), task) for n in names}
        first = next((p for p in picked.values() if p is not None), None)
        if first is None:
            continue
        shots, metric, _ = first
        value = {n: p[2]["value"] for n, p in picked.items() if p is not None}
        rows.append([f"{d['title']} ({LANG_NAMES[d['lang']]}) `{task}`", d["harness"], shots, metric,
                     str(d["items"]), *(_cell(p[2]) if p else "–" for p in picked.values()),
                     *(f"{value[b] - value[a]:+.3f}" if a in value and b in value else "–" for a, b in steps),
                     "–" if d["chance"] is None else f"{d['chance']:.3f}"])
    for lang in LANG_NAMES:
        averages = {n: language_averages(results["tasks"], n).get(lang) for n in names}
        if not any(averages.values()):
            continue
        count = next(a[1] for a in averages.values() if a)
        rows.append([f"**{LANG_NAMES[lang]} average** ({count} tasks)", "", "", "headline", "",
                     *(f"{a[0]:.3f}" if a else "–" for a in averages.values()),
                     *(f"{averages[b][0] - averages[a][0]:+.3f}" if averages[a] and averages[b] else "–"
                       for a, b in steps), ""])
    numeric = [False] * 4 + [True] * (len(header) - 4)
    return Table(header, rows, numeric)


def metrics_table(results: dict[str, Any]) -> Table:
    """Every metric of every task at every shot count, per model."""
    per_model = results["tasks"]["results"]
    names = [m["name"] for m in results["models"]]
    rows = []
    for task in _task_names(results):
        shots_seen = list(dict.fromkeys(k for n in names for k in per_model.get(n, {}).get(task, {})))
        for shots in shots_seen:
            metrics = next(per_model[n][task][shots] for n in names if shots in per_model.get(n, {}).get(task, {}))
            for metric in metrics:
                cells = [per_model.get(n, {}).get(task, {}).get(shots, {}).get(metric) for n in names]
                rows.append([task, f"{shots}-shot", metric, *(_cell(c) if c else "–" for c in cells),
                             str(metrics[metric]["total"])])
    return Table(["task", "shots", "metric", *names, "items"], rows,
                 [False, False, False] + [True] * (len(names) + 1))


def harness_table(results: dict[str, Any]) -> Table:
    """Tasks run through lm-evaluation-harness itself: every metric it reported, per model."""
    per_model = results["lm_eval"]
    names = [n for n in (m["name"] for m in results["models"]) if n in per_model]
    keys = list(dict.fromkeys((task, metric) for n in names for task, r in per_model[n]["tasks"].items()
                              for metric in r["metrics"]))
    rows = []
    for task, metric in keys:
        cells = []
        for n in names:
            m = per_model[n]["tasks"].get(task, {}).get("metrics", {}).get(metric)
            stderr = m.get("stderr") if m else None
            cells.append("–" if m is None else f"{m['value']:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}"))
        shots = per_model[names[0]]["tasks"].get(task, {}).get("num_fewshot", "")
        rows.append([task, f"{shots}-shot", metric, *cells])
    return Table(["task", "shots", "metric", *(f"{n} (± stderr)" for n in names)], rows,
                 [False, False, False] + [True] * len(names))


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
                     f"tasks {s['tasks']:.1f}, generations {s['generate']:.1f}"
                     + (f", lm-eval {s['lm_eval']:.1f}" if "lm_eval" in s else "")
                     + f") on {results['settings']['device']}")
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


def plot_tasks(results: dict[str, Any]) -> Plot | None:
    definitions, per_model = results["tasks"]["definitions"], results["tasks"]["results"]
    names = [m["name"] for m in results["models"]]
    langs = [lang for lang in LANG_NAMES if any(d["lang"] == lang for d in definitions.values())]
    if not langs or not names:
        return None
    colors = colormaps["viridis"](np.linspace(0.1, 0.9, len(names)))
    tasks_of = {lang: [t for t in _task_names(results) if definitions[t]["lang"] == lang] for lang in langs}
    widest = max(len(t) for t in tasks_of.values())
    labels, families = kit.plot_labels(names)
    with kit.plot_style(families):
        fig, axes = kit.figure(max(7.0, 0.45 * widest * len(names) + 2.5), 3.6 * len(langs), nrows=len(langs))
        axes = np.atleast_1d(axes)
        for ax, lang in zip(axes, langs):
            tasks = tasks_of[lang]
            x = np.arange(len(tasks))
            width = 0.8 / len(names)
            for i, (name, color) in enumerate(zip(names, colors)):
                picked = [headline(definitions, per_model.get(name, {}), t) for t in tasks]
                values = [p[2]["value"] if p else np.nan for p in picked]
                errors = [[v - p[2]["ci_low"] if p else 0 for v, p in zip(values, picked)],
                          [p[2]["ci_high"] - v if p else 0 for v, p in zip(values, picked)]]
                ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width * 0.95, yerr=errors, capsize=2,
                       color=color, label=labels[name])
            for j, t in enumerate(tasks):
                if definitions[t]["chance"] is not None:
                    ax.hlines(definitions[t]["chance"], j - 0.45, j + 0.45, color="#555555", ls="--", lw=1)
            ax.set_xticks(x, [f"{definitions[t]['title']}\n{definitions[t]['metrics'][0]}" for t in tasks])
            ax.set_ylim(0, 1)
            ax.set_ylabel("score (95% CI)")
            ax.set_title(f"{LANG_NAMES[lang]} tasks")
        handles, texts = axes[0].get_legend_handles_labels()
        fig.legend(handles, texts, loc="outside lower center", ncols=len(texts), frameon=False)
        fig.suptitle("Benchmark suite by model (dashed: chance)")
        image = kit.png(fig)
    return Plot(image, "Each task's headline metric per model with 95% intervals, Japanese and English panels",
                "Headline metric of each task per model with 95% intervals; dashed: chance (multiple choice).")
