"""eval/harness.py without the `lm-eval` extra: importing it is cheap, and running a task is a clear error that
says how to install the extra. Runs whether or not lm_eval is installed (an import of it is made to fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eval.harness import MISSING, harness_available, run_harness_tasks
from pipeline.errors import JpadaptError

REPO = Path(__file__).resolve().parents[1]


def test_without_lm_eval_running_a_task_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    assert not harness_available()
    with pytest.raises(JpadaptError) as err:
        run_harness_tasks(object(), object(), ["jcqa_local"], None, None, 1, None, 0)
    assert str(err.value).startswith(MISSING)
    assert 'pip install -e ".[lm-eval]"' in str(err.value)


def test_importing_the_module_imports_neither_torch_nor_lm_eval():
    code = "import sys, eval.harness; print(sorted({'torch', 'lm_eval'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
