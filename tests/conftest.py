"""Fixtures shared by test modules: the bundled corpora's texts, read once per session."""

from __future__ import annotations

import json
import lzma

import pytest

from data.assets import stored_path


def read_texts(name: str) -> list[str]:
    """The "text" field of every record of a bundled corpus, e.g. "corpus/ja_heldout.jsonl"."""
    with lzma.open(stored_path(name), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def ja_heldout() -> list[str]:
    return read_texts("corpus/ja_heldout.jsonl")


@pytest.fixture(scope="session")
def en_heldout() -> list[str]:
    return read_texts("corpus/en_heldout.jsonl")
