"""Benchmark-suite numbers: per-task metrics with 95% intervals, and per-language averages over a suite.

    metrics = multiple_choice_metrics(scores, items)          # {"acc": {...}, "acc_norm": {...}}
    metrics = generative_metrics(("exact_match", "char_f1"), per_item_values)
    averages = language_averages(results["tasks"], "cpt")      # {"ja": (mean, tasks), "en": ...}

Every metric is {"value", "total", "ci_low", "ci_high"} (+ "correct" for 0/1 metrics): a 0/1 metric's interval is
the Wilson score interval, a graded one's (char F1) the normal interval of the mean, clipped to [0, 1].
A language's average is the plain mean of its tasks' headline metrics (the first of each task's `metrics`), as the
Japanese leaderboards average their tasks, at each task's first evaluated shot count.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from eval.multiple_choice import Z95, accuracy, wilson_interval


def multiple_choice_metrics(scores: list[Any], items: list[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, normalized in (("acc", False), ("acc_norm", True)):
        a = asdict(accuracy(scores, items, normalized=normalized))
        out[name] = {"value": a["accuracy"], "correct": a["correct"], "total": a["total"], "ci_low": a["ci_low"],
                     "ci_high": a["ci_high"]}
    return out


def generative_metrics(names: tuple[str, ...], per_item: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        values = [item[name] for item in per_item]
        total = len(values)
        if all(v in (0.0, 1.0) for v in values):
            correct = int(sum(values))
            low, high = wilson_interval(correct, total)
            out[name] = {"value": correct / total if total else math.nan, "correct": correct, "total": total,
                         "ci_low": low, "ci_high": high}
            continue
        mean = math.fsum(values) / total
        half = Z95 * statistics.stdev(values) / math.sqrt(total) if total > 1 else math.nan
        out[name] = {"value": mean, "total": total, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half)}
    return out


def headline(definitions: dict[str, Any], results: dict[str, Any], task: str) -> tuple[str, str, dict] | None:
    """(shots, metric name, metric) of a task's headline number for one model's results, or None."""
    per_shots = results.get(task)
    if not per_shots:
        return None
    shots = next(iter(per_shots))
    metric = definitions[task]["metrics"][0]
    return shots, metric, per_shots[shots][metric]


def language_averages(tasks: dict[str, Any], model: str) -> dict[str, tuple[float, int]]:
    """Per language: (mean headline metric over the language's tasks, number of tasks) for `model`."""
    definitions, results = tasks["definitions"], tasks["results"].get(model, {})
    values: dict[str, list[float]] = {}
    for task, definition in definitions.items():
        picked = headline(definitions, results, task)
        if picked is not None:
            values.setdefault(definition["lang"], []).append(picked[2]["value"])
    return {lang: (math.fsum(v) / len(v), len(v)) for lang, v in values.items()}
