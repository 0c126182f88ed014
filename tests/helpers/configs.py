"""A prepare-only pipeline on 40 short Japanese documents: seconds, in process; for CLI and hardening tests."""

from __future__ import annotations

import json
from pathlib import Path


def small_config(tmp_path: Path, ja_lines: list[bytes], extra: str = "") -> Path:
    (tmp_path / "ja.jsonl").write_bytes(b"".join(ja_lines))
    config = (
        "# test pipeline\nrun:\n  name: t\n  output_dir: runs\n"
        "data:\n  ja:\n    train: ja.jsonl\n"
        "prepare:\n  min_chars: 5\n  heldout_fraction: 0.5\n" + extra
    )
    path = tmp_path / "p.yaml"
    path.write_text(config, encoding="utf-8")
    return path


def doc(text: str, id_: str) -> bytes:
    return (json.dumps({"id": id_, "text": text}, ensure_ascii=False) + "\n").encode()


GOOD = [doc(f"これは{i}番目の文書です。日本語の文章がここに続きます。" * 3, f"d{i}") for i in range(40)]
