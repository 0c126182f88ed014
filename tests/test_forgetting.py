"""Opt-in (`pytest -m slow`, about 10 minutes on 2 CPU cores): bench/forgetting.py's finding on a reduced budget.

A small LLaMA is pretrained on English only, then the real cpt stage continues it on Japanese with replay_ratio 0
and 0.25 at equal Japanese tokens, two seeds each. Without replay English must be forgotten more than with it in
every seed (the seeds' ranges do not overlap); and Japanese must improve in every run.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    """bench/forgetting.py as a module (bench/ is not a package). Registered in sys.modules before it runs, as
    dataclasses look their module up there."""
    if "bench_forgetting" in sys.modules:
        return sys.modules["bench_forgetting"]
    spec = importlib.util.spec_from_file_location("bench_forgetting", ROOT / "bench" / "forgetting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_forgetting"] = module
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


# ---------------------------------------------------------------------------------------------- the analysis (fast)


def _fake_result(name: str, en_forgetting: float, ja_gain: float) -> dict:
    return {"name": name, "en_forgetting": en_forgetting, "ja_gain": ja_gain, "wall_seconds": 10.0, "en_share": 0.0,
            "ja_tokens": 100, "en_tokens": 0, "en_base": 2.0, "ja_base": 6.0, "en_final": 2.0 + en_forgetting,
            "ja_final": 6.0 - ja_gain}


def test_budgets_share_the_no_replay_runs_and_equal_ja_adds_steps() -> None:
    bench = _bench()
    runs = bench.planned_runs([0, 0.25, 0.5], [1, 2], ja_steps=100)
    assert [(b, r, s, n) for b, r, s, n in runs if r == 0] == [("equal_ja", 0, 1, 100), ("equal_ja", 0, 2, 100)]
    assert {(r, n) for b, r, _, n in runs if b == "equal_ja"} == {(0, 100), (0.25, 134), (0.5, 200)}
    assert {(r, n) for b, r, _, n in runs if b == "equal_steps"} == {(0.25, 100), (0.5, 100)}


def test_aggregate_tells_an_effect_from_seed_noise() -> None:
    bench = _bench()
    forgetting = {(0, 1): 1.0, (0, 2): 1.2, (0.25, 1): 0.20, (0.25, 2): 0.22, (0.5, 1): 0.23, (0.5, 2): 0.19}
    results = {}
    for budget in bench.BUDGETS:
        for (ratio, seed), value in forgetting.items():
            name = bench.run_name(budget, ratio, seed)
            results[name] = _fake_result(name, value, 4.0)
    table = bench.aggregate(results, [0, 0.25, 0.5], [1, 2], ja_steps=10)
    rows = table["equal_ja"]
    assert rows[0]["en_forgetting"] == pytest.approx(1.1) and rows[0]["en_forgetting_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["separated"] and rows[2]["separated"]
    assert not rows[2]["separated_from_previous"]  # 0.21 vs 0.21: no difference
    line = bench.verdict_lines(table)[0]
    assert "+1.100, +0.210, +0.210" in line and "falls monotonically" in line
    rows[2]["en_forgetting"], rows[2]["en_vs_previous"] = 0.3, 0.09  # a rise beyond a 0.0283 spread
    rows[2]["separated_from_previous"] = bench.separated(rows[2], rows[1])
    assert "does NOT fall monotonically" in bench.shape_of(rows)
