"""Opt-in (`pytest -m slow`, about 10 minutes on 2 CPU cores): bench/forgetting.py's finding on a reduced budget.

A small LLaMA is pretrained on English only, then the real cpt stage continues it on Japanese with replay_ratio 0
and 0.25 at equal Japanese tokens, two seeds each. Without replay English must be forgotten more than with it in
every seed (the seeds' ranges do not overlap); and Japanese must improve in every run.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_forgetting", ROOT / "bench" / "forgetting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_replay_limits_english_forgetting(tmp_path: Path) -> None:
    bench = _bench()
    base_spec = bench.BaseSpec(steps=200, eval_every=100)
    cpt = bench.CptSpec(ja_steps=60)
    base, results, table = bench.experiment(tmp_path, [0, 0.25], [1, 2], base_spec, cpt, say=lambda line: None)

    english = [point["en"]["bits_per_byte"] for point in base["curve"]]
    assert english[-1] < english[0] - 0.5, "pretraining did not teach the model English"
    no_replay, replay = table["equal_ja"]
    assert no_replay["en_forgetting"] > 0, "without replay English should get worse"
    # Beyond the seed spread: every seed without replay forgot more English than every seed with it.
    without = [results[name]["en_forgetting"] for name in no_replay["runs"]]
    with_replay = [results[name]["en_forgetting"] for name in replay["runs"]]
    assert min(without) > max(with_replay), (without, with_replay)
    assert all(result["ja_gain"] > 0 for result in results.values())
    # The table's numbers are the runs' own: recompute one from forgetting.jsonl's first and last points.
    runs = [results[name] for name in no_replay["runs"]]
    assert no_replay["en_forgetting"] == pytest.approx(statistics.fmean(r["en_final"] - r["en_base"] for r in runs))
