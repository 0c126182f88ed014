"""Fixtures shared by test modules: the bundled corpora's texts, read once per session."""

from __future__ import annotations

import os
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes on two cores: with torch's default of one OpenMP thread per core each, they fight over
    # the cores and a tiny training loop ran 5x slower (212 s instead of 40 s). One thread each keeps both
    # busy. Set before torch is imported; the training workers a test launches inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

from tests.helpers.jsonl import read_texts


@pytest.fixture(scope="session")
def ja_heldout() -> list[str]:
    return read_texts("corpus/ja_heldout.jsonl")


@pytest.fixture(scope="session")
def en_heldout() -> list[str]:
    return read_texts("corpus/en_heldout.jsonl")
