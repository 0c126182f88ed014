"""The prepare stage end to end through the CLI, on the bundled data and on a constructed dedup case."""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from data.assets import stored_path
from tests.helpers.cli import jpadapt, run_cli
from tests.helpers.jsonl import read_jsonl

STAGE = Path("runs/demo/stages/prepare")


def bundled_records(name: str) -> list[dict]:
    return read_jsonl(stored_path(name))


def output_records(run: Path, lang: str, split: str) -> list[dict]:
    return read_jsonl(*sorted((run / lang).glob(f"{split}-*.jsonl")))


def output_hashes(run: Path) -> dict[str, str]:
    return {
        p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in {"manifest.json", "log.txt"}
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("demo")
    result = jpadapt("prepare", cwd=cwd)  # a real process, end to end
    assert result.returncode == 0, result.stderr
    return cwd


def test_bundled_counts_match_the_sources(demo_run: Path) -> None:
    stats = json.loads((demo_run / STAGE / "stats.json").read_text())["languages"]
    for lang in ("ja", "en"):
        train, heldout = bundled_records(f"corpus/{lang}_train.jsonl"), bundled_records(f"corpus/{lang}_heldout.jsonl")
        removed = sum(stats[lang]["removed"].values())
        assert stats[lang]["input"]["records"] == len(train) + len(heldout)
        assert stats[lang]["splits"]["heldout"]["documents"] == len(heldout)  # the bundled corpora are clean
        assert stats[lang]["splits"]["train"]["documents"] == len(train) - removed
        out = output_records(demo_run / STAGE, lang, "heldout")
        assert [r["id"] for r in out] == [r["id"] for r in heldout]
        assert out[0]["text"] == unicodedata.normalize("NFKC", heldout[0]["text"]).strip()
        assert stats[lang]["splits"]["heldout"]["chars"] == sum(len(r["text"]) for r in out)
        assert stats[lang]["splits"]["heldout"]["bytes"] == sum(
            p.stat().st_size for p in (demo_run / STAGE / lang).glob("heldout-*.jsonl")
        )


def test_rerun_from_scratch_is_byte_identical(demo_run: Path) -> None:
    before = output_hashes(demo_run / STAGE)
    manifest = json.loads((demo_run / STAGE / "manifest.json").read_text())
    assert {path: entry["sha256"] for path, entry in manifest["outputs"].items()} == before
    shutil.rmtree(demo_run / "runs")
    assert run_cli("prepare", cwd=demo_run).returncode == 0
    assert output_hashes(demo_run / STAGE) == before


def test_dedup_and_decontamination_through_the_stage(tmp_path: Path) -> None:
    heldout = bundled_records("corpus/ja_heldout.jsonl")
    train = bundled_records("corpus/ja_train.jsonl")
    victim = train[3]["text"]
    cut = victim.rfind("。", 0, len(victim) - 200) + 1
    near_copy = victim[:cut] + "この一文だけが書き換えられた。" + victim[cut:]
    extra = [
        {"id": "leak", "text": heldout[5]["text"]},  # a held-out document in the training data
        {"id": "copy", "text": train[10]["text"]},  # an exact copy of a training document
        {"id": "near", "text": near_copy},
        {"id": "short", "text": "短い。"},
        {"id": "english", "text": "This paragraph is English, not Japanese, and should be filtered out. " * 3},
    ]
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in extra))
    result = run_cli("prepare", "data.ja.train=[bundled:corpus/ja_train.jsonl, extra.jsonl]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ja = json.loads((tmp_path / STAGE / "stats.json").read_text())["languages"]["ja"]
    assert {k: v for k, v in ja["removed"].items() if v} == {
        "exact_duplicate": 2, "near_duplicate": 1, "too_short": 1, "low_japanese_ratio": 1,
    }
    assert ja["decontamination"] == {"exact_duplicate_of_heldout": 1, "near_duplicate_of_heldout": 0}
    assert ja["splits"]["train"]["documents"] == len(train)
    kept_ids = {r["id"] for r in output_records(tmp_path / STAGE, "ja", "train")}
    assert not kept_ids & {"leak", "copy", "near", "short", "english"}


def test_split_mode_keeps_documents_together(tmp_path: Path) -> None:
    result = run_cli(
        "prepare", "data.ja.heldout=[]", "data.en.heldout=[]", "prepare.heldout_fraction=0.3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / STAGE / "stats.json").read_text())["languages"]
    assert stats["en"]["heldout_source"] == "split"
    train_ids = {r["id"] for r in output_records(tmp_path / STAGE, "en", "train")}
    heldout_ids = {r["id"] for r in output_records(tmp_path / STAGE, "en", "heldout")}
    assert train_ids and heldout_ids and not train_ids & heldout_ids  # parts of a book share a split
    ja = stats["ja"]["splits"]
    share = ja["heldout"]["documents"] / (ja["heldout"]["documents"] + ja["train"]["documents"])
    assert 0.2 < share < 0.4
