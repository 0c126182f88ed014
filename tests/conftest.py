"""Fixtures shared by test modules: the bundled corpora's texts, read once per session."""

from __future__ import annotations

import pytest

from tests.helpers.jsonl import read_texts


@pytest.fixture(scope="session")
def ja_heldout() -> list[str]:
    return read_texts("corpus/ja_heldout.jsonl")


@pytest.fixture(scope="session")
def en_heldout() -> list[str]:
    return read_texts("corpus/en_heldout.jsonl")
