"""JSON-lines files as tests read them: every line one record, nothing skipped."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from data.assets import stored_path


def read_jsonl(*paths: Path | str) -> list[dict]:
    """The records of one or more JSONL files (.xz too), in order. Every line must be a JSON value: a blank or
    broken line fails the test instead of being skipped."""
    records = []
    for path in map(Path, paths):
        if path.suffix == ".xz":
            with lzma.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
        records += [json.loads(line) for line in text.splitlines()]
    return records


def read_texts(name: str) -> list[str]:
    """The "text" field of every record of a bundled corpus, e.g. "corpus/ja_heldout.jsonl"."""
    return [record["text"] for record in read_jsonl(stored_path(name))]
