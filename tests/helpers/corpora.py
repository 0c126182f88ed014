"""Small slices of the bundled corpora, written as JSONL for stage tests that train (cpt, the run report, sweeps)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.jsonl import read_texts

# name -> (bundled corpus, documents): enough text for a few training steps and a held-out evaluation.
SLICES = {"ja_train": ("corpus/ja_train.jsonl", 24), "ja_heldout": ("corpus/ja_heldout.jsonl", 6),
          "en_train": ("corpus/en_train.jsonl", 4), "en_heldout": ("corpus/en_heldout.jsonl", 3)}
# English records are whole books: a slice of each keeps the corpora small.
MAX_CHARS = 20_000


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_corpus_slices(root: Path) -> dict[str, list[str]]:
    """`root/<name>.jsonl` for each slice ({"id", "text"} records); returns the texts by slice name."""
    texts = {}
    for name, (bundled, count) in SLICES.items():
        texts[name] = [text[:MAX_CHARS] for text in read_texts(bundled)[:count]]
        write_jsonl(root / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": t} for i, t in enumerate(texts[name])])
    return texts


def data_section(root: Path) -> dict[str, dict[str, str]]:
    """The pipeline YAML's `data` section for the slices written in `root`."""
    return {lang: {"train": str(root / f"{lang}_train.jsonl"), "heldout": str(root / f"{lang}_heldout.jsonl")}
            for lang in ("ja", "en")}
