"""bench/gpu_check.py end to end on the CPU (`--cpu --tiny`), so the one-command GPU check cannot rot while no GPU
is at hand: every part runs the real stages and its section holds numbers; a part that raises is reported and the
others still run. The full run took 272 s on 2 cores shared with other jobs (load ~4; most of it the start-up of
two cpt launches and three sft sides, each a fresh process importing torch, transformers and DeepSpeed); the
broken run 16 s; the same run alone took 1.6 min (bench/results/gpu-cpu.md). It stays in the default suite so that the GPU check cannot rot.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("## 1. cpt", "## 2. sft", "## 3. evaluate", "## 4. planner")


def gpu_check(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--tiny", "--out",
                             str(out), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    report = out / "gpu-cpu.md"
    assert report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, report.read_text(encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"(?m)^(?=## )", text)
    return {title: next(p for p in parts if p.startswith(title)) for title in SECTIONS}


def number_rows(section: str) -> list[str]:
    """Table rows (not the header or the rule) that hold at least one number."""
    return [line for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---") and re.search(r"\|\s*[-+]?[\d,.]+[x%]?\s*\|", line)]


def test_cpu_tiny_run_reports_every_part(tmp_path):
    result, text = gpu_check(tmp_path)
    assert result.returncode == 0, text + result.stderr[-3000:]
    assert "Parts failed: none." in text and "FAILED" not in text
    assert "torch " in text and "CUDA " in text
    found = sections(text)
    cpt, sft, evaluate, planner = (found[title] for title in SECTIONS)
    assert len([r for r in number_rows(cpt) if r.startswith("| cpt ZeRO-")]) == 2
    assert "6·N" in cpt and "12·L·d·s" in cpt
    for label in ("HF Trainer + PEFT QLoRA", "jpadapt sft QLoRA", "jpadapt sft LoRA", "| tokens/s |",
                  "| peak memory |"):
        assert label in sft
    assert len(number_rows(sft)) == 5
    # The CPU against itself: equal to the last bit, every row passes.
    assert len(number_rows(evaluate)) == 3 and evaluate.count("| pass |") == 3
    assert [line.split("|")[1].strip() for line in number_rows(planner)] == [
        "full (cpt ZeRO-0)", "full (cpt ZeRO-2, 1 GPU)", "LoRA (sft)", "QLoRA (sft)"]


def test_a_broken_part_is_reported_and_the_others_run(tmp_path):
    result, text = gpu_check(tmp_path, "--break", "cpt,sft")
    assert result.returncode == 1
    found = sections(text)
    for title in ("## 1. cpt", "## 2. sft"):
        assert "**FAILED**: `RuntimeError`" in found[title] and "broken on purpose" in found[title]
    assert len(number_rows(found["## 3. evaluate"])) == 3  # evaluate still ran
    assert "no measured peak" in found["## 4. planner"]  # the planner ran too, with nothing to compare
    assert "Parts failed: cpt, sft, planner." in text
