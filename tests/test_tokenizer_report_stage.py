"""The tokenizer report through the CLI: the pipeline stage on the bundled demo and the ad-hoc command.

The figures are checked against the tokenizer libraries called directly on the run directory's files, so
every number the report prints can be reproduced from what the run left behind.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from data.assets import materialize, materialize_dir
from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli, state_of
from tests.helpers.jsonl import read_jsonl

STAGE = Path("runs/demo/stages/tokenizer-report")
PREPARED = Path("runs/demo/stages/prepare")
REFERENCE = {"llama2": 0.81, "mistral": 0.87, "llama3": 1.31, "qwen": 1.37, "llm-jp": 1.73}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("demo")
    result = jpadapt("tokenizer-report", cwd=cwd)  # a real process, end to end
    assert result.returncode == 0, result.stderr
    assert "prepare: running" in result.stdout  # the prerequisite ran first
    return cwd


def records(paths: list[Path]) -> list[dict]:
    return read_jsonl(*paths)


def test_layout_and_every_tokenizer_side_by_side(demo: Path) -> None:
    metrics = json.loads((demo / STAGE / "metrics.json").read_text())
    assert set(metrics["corpora"]) == {"ja_heldout", "en_heldout"}
    assert set(metrics["corpora"]["ja_heldout"]) == {"documents", "chars", "bytes", "morphemes"}
    assert list(metrics["tokenizers"]) == ["llama2", "mistral", "llama3", "qwen", "llm-jp", "extended"]
    ja = metrics["tokenizers"]["qwen"]["ja_heldout"]
    for key in ("tokens", "chars_per_token", "bytes_per_token", "tokens_per_morpheme", "byte_fallback_rate",
                "partial_char_rate", "continued_morpheme_rate", "boundary_precision", "boundary_recall",
                "boundary_f1", "tokens_per_char", "kanji_single_token_distinct_rate",
                "kanji_single_token_occurrence_rate", "joyo_coverage", "vocab_japanese_share", "renyi_efficiency",
                "roundtrip_failures", "relative_tokens", "relative_compute", "training_flops", "chars_per_context"):
        assert key in ja, key
    assert set(ja["groups"]) >= {"genre:fiction", "source:aozora"}
    for name, expected in REFERENCE.items():  # NFKC-normalized text: within 0.03 of the raw-text reference
        assert abs(metrics["tokenizers"][name]["ja_heldout"]["chars_per_token"] - expected) < 0.03, name
    assert "reference" in " ".join(metrics["notes"])


def test_token_counts_reproduce_from_the_run_directory(demo: Path) -> None:
    """Recount tokens of the prepared held-out with the libraries themselves."""
    metrics = json.loads((demo / STAGE / "metrics.json").read_text())
    texts = [r["text"] for r in records(sorted((demo / PREPARED / "ja").glob("heldout-*.jsonl")))]
    sp = spm.SentencePieceProcessor(model_file=str(materialize("tokenizers/llama2/tokenizer.model")))
    qwen = Tokenizer.from_file(str(materialize_dir("tokenizers/qwen") / "tokenizer.json"))
    llama2 = metrics["tokenizers"]["llama2"]["ja_heldout"]
    assert llama2["tokens"] == sum(len(ids) for ids in sp.encode(texts))
    assert llama2["chars"] == sum(len(t) for t in texts)
    assert llama2["chars_per_token"] == llama2["chars"] / llama2["tokens"]
    qwen_tokens = sum(len(e.ids) for e in qwen.encode_batch(texts, add_special_tokens=False))
    assert metrics["tokenizers"]["qwen"]["ja_heldout"]["tokens"] == qwen_tokens
    assert metrics["tokenizers"]["qwen"]["ja_heldout"]["relative_tokens"] == qwen_tokens / llama2["tokens"]
    assert metrics["tokenizers"]["qwen"]["ja_heldout"]["training_flops"] == 6 * 7_000_000_000 * qwen_tokens
    byte_pieces = sum(sum(1 for i in ids if sp.is_byte(i)) for ids in sp.encode(texts))
    assert llama2["byte_fallback_rate"] == byte_pieces / llama2["tokens"]


def test_csv_and_markdown_agree_with_metrics(demo: Path) -> None:
    metrics = json.loads((demo / STAGE / "metrics.json").read_text())
    with (demo / STAGE / "metrics.csv").open(encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["group"] == ""]
    assert len(rows) == 12  # 6 tokenizers (5 bundled + extended) x 2 corpora
    for row in rows:
        assert float(row["chars_per_token"]) == metrics["tokenizers"][row["tokenizer"]][row["corpus"]]["chars_per_token"]
    md = (demo / STAGE / "report.md").read_text(encoding="utf-8")
    llm_jp = metrics["tokenizers"]["llm-jp"]["ja_heldout"]
    assert f"| llm-jp | 98,452 | {llm_jp['tokens']:,} | {llm_jp['chars_per_token']:.2f} |" in md
    html = (demo / STAGE / "report.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 4


def test_rerun_is_a_no_op_and_rebuild_is_byte_identical(demo: Path) -> None:
    again = run_cli("tokenizer-report", cwd=demo)
    assert "tokenizer-report: up to date" in again.stdout and "Nothing to do" in again.stdout
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (demo / STAGE).iterdir()
              if p.name not in {"manifest.json", "log.txt"}}
    shutil.rmtree(demo / "runs")
    assert run_cli("tokenizer-report", cwd=demo).returncode == 0
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (demo / STAGE).iterdir()
                      if p.name not in {"manifest.json", "log.txt"}}


def test_changing_a_report_key_does_not_rerun_prepare(demo: Path) -> None:
    status = run_cli("status", "tokenizer_report.baseline=qwen", cwd=demo)
    assert state_of(status.stdout, "prepare") == "up to date"
    assert state_of(status.stdout, "tokenizer-report") == "stale"
    assert "tokenizer_report.baseline: 'llama2' -> 'qwen'" in status.stdout


def test_bad_tokenizer_in_the_yaml_fails_before_any_work(tmp_path: Path) -> None:
    result = run_cli("tokenizer-report", "tokenizer_report.tokenizers={mine: ./nope}",
                     "tokenizer_report.baseline=mine", cwd=tmp_path)
    assert_one_line_error(result, "tokenizer_report.tokenizers.mine: file not found: ./nope")
    assert not (tmp_path / "runs" / "demo" / "stages" / "prepare").exists()


def test_compare_tokenizers_matches_the_reference_on_raw_text(tmp_path: Path) -> None:
    result = run_cli("compare-tokenizers", "--corpus", "bundled:corpus/ja_heldout.jsonl", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    measured = {name: round(per["ja_heldout"]["chars_per_token"], 2) for name, per in metrics["tokenizers"].items()}
    assert measured == REFERENCE
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "metrics.json", "report.html",
                                                                   "report.md"]


def test_compare_tokenizers_on_a_user_corpus_and_a_user_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("吾輩は猫である。名前はまだ無い。\n\nどこで生れたかとんと見当がつかぬ。\n", encoding="utf-8")
    folder = materialize_dir("tokenizers/qwen")
    result = run_cli("compare-tokenizers", "--corpus", "mine.txt", "--tokenizer", "llama2",
                     "--tokenizer", f"myqwen={folder}", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["corpora"]["mine"]["documents"] == 2  # paragraphs of a plain text file
    assert set(metrics["tokenizers"]) == {"llama2", "myqwen"}
    assert metrics["settings"]["baseline"] == "llama2"
    assert metrics["notes"] == []  # no reference figures for a user corpus


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--corpus", "missing.jsonl"], "--corpus missing.jsonl: file not found"),
        (["--corpus", "bundled:corpus/ja_heldout.jsonl", "--tokenizer", "gpt9"], "tokenizer 'gpt9': not a bundled name"),
        (["--corpus", "bundled:corpus/ja_heldout.jsonl", "--baseline", "x"], "--baseline 'x' is not one of"),
        (["--corpus", "bundled:corpus/ja_heldout.jsonl", "--context-length", "0"], "expected a positive integer"),
    ],
)
def test_compare_tokenizers_bad_input(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli("compare-tokenizers", *args, "--out", "out", cwd=tmp_path), fragment)
    assert not (tmp_path / "out").exists()
