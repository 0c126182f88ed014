"""The extend-vocab stage through the CLI: its figures reproduce from the run directory, the model folder holds
the base rows unchanged and mean-initialized new rows, and bad input fails before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.config import DEFAULT_CONFIG, load_config
from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli, state_of
from tests.helpers.jsonl import read_jsonl

STAGE = Path("runs/demo/stages/extend-vocab")
PREPARED = Path("runs/demo/stages/prepare")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("demo")
    result = jpadapt("extend-vocab", cwd=cwd)  # a real process, end to end
    assert result.returncode == 0, result.stderr
    return cwd


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def texts(folder: Path, split: str) -> list[str]:
    return [record["text"] for record in read_jsonl(*sorted(folder.glob(f"{split}-*.jsonl")))]


def test_outputs_and_the_report_reproduce_from_the_run_directory(demo: Path) -> None:
    from stages.extend_vocab import EXAMPLES
    from stages.extend_vocab.report import render_report

    stage = demo / STAGE
    summary = read_json(stage / "summary.json")
    tokens = read_json(stage / "new_tokens.json")
    assert (stage / "report.md").read_text(encoding="utf-8") == render_report(summary, tokens["tokens"], EXAMPLES)
    assert summary["base_size"] == 32000 and summary["new_tokens"] == 16000
    assert [t["id"] for t in tokens["tokens"]] == list(range(32000, 48000))
    # Issue target on the bundled held-out: LLaMA-2 + 16,000 -> >= 1.6x Japanese chars/token, English unchanged.
    ja, en = summary["efficiency"]["ja_heldout"], summary["efficiency"]["en_heldout"]
    assert ja["chars_per_token_ratio"] >= 1.6
    assert en["base_tokens"] == en["extended_tokens"]
    assert summary["invariants"]["en"]["documents_with_changed_ids"] == 0
    assert all(row["roundtrip_failures"] == 0 for row in summary["invariants"].values())


def test_token_counts_match_the_libraries(demo: Path) -> None:
    stage = demo / STAGE
    summary = read_json(stage / "summary.json")
    comparison = read_json(stage / "comparison" / "metrics.json")
    extended = Tokenizer.from_file(str(stage / "tokenizer" / "tokenizer.json"))
    for lang in ("ja", "en"):
        docs = texts(demo / PREPARED / lang, "heldout")
        count = sum(len(e.ids) for e in extended.encode_batch(docs, add_special_tokens=False))
        row = summary["efficiency"][f"{lang}_heldout"]
        assert row["extended_tokens"] == count == comparison["tokenizers"]["extended"][f"{lang}_heldout"]["tokens"]
        assert row["extended_chars_per_token"] == sum(map(len, docs)) / count
    # Counts of new tokens in the training text, and the pieces each replaces.
    records = read_json(stage / "new_tokens.json")["tokens"]
    train = texts(demo / PREPARED / "ja", "train")
    ids = np.concatenate([e.ids for e in extended.encode_batch(train, add_special_tokens=False)])
    histogram = np.bincount(ids, minlength=48000)
    assert [r["count"] for r in records] == [int(histogram[r["id"]]) for r in records]


def test_cpt_trains_the_extended_model_and_reports_what_the_vocabulary_saved(demo: Path) -> None:
    """cpt starts from model/ (48,000 rows) with the extended tokenizer; changing cpt's settings never reruns
    extend-vocab; the tokens saved are the trained tokens respelled with the base tokenizer."""
    from pipeline.launch import free_port

    result = jpadapt("cpt", "cpt.max_steps=2", "cpt.eval_every=2", "cpt.save_every=2", "cpt.eval_chars=2000",
                     f"cpt.master_port={free_port()}", cwd=demo)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "extend-vocab: up to date" in result.stdout
    cpt = demo / "runs/demo/stages/cpt"
    assert read_json(cpt / "model" / "config.json")["vocab_size"] == 48000
    assert (cpt / "model" / "new_tokens.json").read_bytes() == (demo / STAGE / "new_tokens.json").read_bytes()
    summary, efficiency = read_json(cpt / "summary.json"), read_json(demo / STAGE / "summary.json")["efficiency"]
    by_lang = summary["tokens_by_language"]
    assert by_lang["ja"] + by_lang["en"] == 2 * 8 * 128 and by_lang["en"] in (128, 256)  # 16 blocks, replay 0.1
    base = sum(by_lang[lang] * efficiency[f"{lang}_heldout"]["base_tokens"] / efficiency[f"{lang}_heldout"]["extended_tokens"]
               for lang in ("ja", "en"))
    saving = summary["vocab_saving"]
    assert saving["base_tokens_for_same_text"] == round(base)
    assert saving["flops_saved"] == pytest.approx(6 * saving["model_params"] * (base - 2 * 8 * 128))
    assert f"{saving['base_tokens_for_same_text']:,} tokens" in (cpt / "report.md").read_text(encoding="utf-8")


def test_model_folder_keeps_base_rows_and_means_new_ones(demo: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import load_causal_lm

    folder = demo / STAGE / "model"
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model.config.vocab_size == 48000 and 48000 % 64 == 0
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    cfg = load_config(DEFAULT_CONFIG)
    base = load_causal_lm(cfg.model, seed=cfg.run.seed)  # the same seeded random model the stage built
    old = base.get_input_embeddings().weight.detach()
    new = model.get_input_embeddings().weight.detach()
    assert torch.equal(new[:32000], old)
    for record in read_json(folder / "new_tokens.json")["tokens"][::997]:
        expected = old[record["base_pieces"]].mean(dim=0)
        assert torch.allclose(new[record["id"]], expected, atol=1e-6), record
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == 48000
    assert max(tokenizer("東京都の私たちはこうして話した。")["input_ids"]) >= 32000


def test_tokenizer_report_adds_the_extended_tokenizer(demo: Path) -> None:
    result = run_cli("tokenizer-report", "tokenizer_report.tokenizers={llama2: llama2}", cwd=demo)
    assert result.returncode == 0, result.stderr
    metrics = read_json(demo / "runs/demo/stages/tokenizer-report/metrics.json")
    assert list(metrics["tokenizers"]) == ["llama2", "extended"]
    summary = read_json(demo / STAGE / "summary.json")
    assert metrics["tokenizers"]["extended"]["ja_heldout"]["tokens"] == summary["efficiency"]["ja_heldout"]["extended_tokens"]


def test_a_forced_rerun_gives_byte_identical_outputs(demo: Path) -> None:
    before = read_json(demo / STAGE / "manifest.json")["outputs"]
    result = run_cli("extend-vocab", "--force", cwd=demo)
    assert result.returncode == 0, result.stderr
    after = read_json(demo / STAGE / "manifest.json")["outputs"]
    assert {k: v["sha256"] for k, v in after.items()} == {k: v["sha256"] for k, v in before.items()}
    assert "model/model.safetensors" in after and "tokenizer/tokenizer.model" in after


def test_two_run_directories_write_the_same_bytes_and_name_no_attempt_folder(tmp_path: Path) -> None:
    """runs/a and runs/b, same settings: extend-vocab's and tokenizer-report's outputs are byte-identical, so the
    fingerprints downstream agree. The comparison named the extended tokenizer by the folder it was written in,
    `runs/a/stages/extend-vocab.partial/tokenizer` (gone after the commit, and different per run directory), and
    the base by the cache file it resolved to; tokenizer-report named it `runs/a/stages/extend-vocab/tokenizer`."""
    from pipeline.config import load_config
    from pipeline.fingerprint import outputs_digest
    from pipeline.runner import Pipeline

    small = ["extend_vocab.new_tokens=200", "extend_vocab.max_training_chars=200000", "prepare.dedup.near=false",
             "tokenizer_report.tokenizers={llama2: llama2}", "tokenizer_report.max_documents=20",
             "cpt.enabled=false", "sft.enabled=false", "evaluate.enabled=false"]
    for name in ("a", "b"):
        result = run_cli("tokenizer-report", f"run.name={name}", *small, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    runs = tmp_path / "runs"
    comparison = read_json(runs / "a" / "stages/extend-vocab/comparison/metrics.json")
    sources = {name: info["source"] for name, info in comparison["tokenizer_info"].items()}
    assert sources == {"base": "bundled:llama2", "extended": "stages/extend-vocab/tokenizer"}
    assert (runs / "a" / sources["extended"] / "tokenizer.json").is_file()  # true after the commit
    report = read_json(runs / "a" / "stages/tokenizer-report/metrics.json")
    assert report["tokenizer_info"]["extended"]["source"] == "stages/extend-vocab/tokenizer"
    for stage in ("extend-vocab", "tokenizer-report"):
        outputs = {name: read_json(runs / name / "stages" / stage / "manifest.json")["outputs"] for name in "ab"}
        assert {k: v["sha256"] for k, v in outputs["a"].items()} == {k: v["sha256"] for k, v in outputs["b"].items()}
        for rel in outputs["a"]:
            if rel.endswith((".json", ".csv", ".md", ".html")):
                text = (runs / "a" / "stages" / stage / rel).read_text(encoding="utf-8")
                assert ".partial/" not in text and "runs/a" not in text and str(tmp_path) not in text, rel
    # What the stages downstream hash: extend-vocab's outputs digest, and tokenizer-report's whole fingerprint.
    digests = {name: outputs_digest(read_json(runs / name / "stages/extend-vocab/manifest.json")) for name in "ab"}
    assert digests["a"] == digests["b"]
    with_cpt = [override for override in small if override != "cpt.enabled=false"]
    states = {name: Pipeline(load_config(None, [f"run.name={name}", f"run.output_dir={runs}", *with_cpt]))
              .status("cpt").current for name in "ab"}
    assert states["a"] == states["b"] and states["a"]["upstream"]["extend-vocab"] == digests["a"]
    fingerprints = {name: read_json(runs / name / "stages/tokenizer-report/manifest.json")["fingerprint"]
                    for name in "ab"}
    assert fingerprints["a"] == fingerprints["b"]


def test_byte_level_base_grows_qwen_rows(tmp_path: Path) -> None:
    """Qwen: new ids start after the added tokens (151,669) inside the model's spare rows (151,936)."""
    result = run_cli(
        "extend-vocab", "model.tokenizer=qwen", "model.from_config.vocab_size=151936",
        "model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
        "extend_vocab.new_tokens=1500", "extend_vocab.max_training_chars=200000", "cpt.enabled=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    stage = tmp_path / STAGE
    records = read_json(stage / "new_tokens.json")["tokens"]
    assert [r["id"] for r in records] == list(range(151669, 151669 + 1500))
    config = read_json(stage / "model" / "config.json")
    assert config["vocab_size"] == math.ceil((151669 + 1500) / 64) * 64
    from safetensors.torch import load_file

    weight = load_file(str(stage / "model" / "model.safetensors"))["model.embed_tokens.weight"]
    first = records[0]
    assert torch.allclose(weight[first["id"]], weight[first["base_pieces"]].mean(dim=0), atol=1e-6)
    assert "chat_template" in read_json(stage / "tokenizer" / "tokenizer_config.json")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model.from_config.vocab_size=1000"], ["vocabulary (1,000 embedding rows) does not match", "32,000 ids"]),
        (["model.tokenizer=llm-jp", "model.from_config.vocab_size=98452"], ["unigram SentencePiece", "algorithm: unigram"]),
        (["extend_vocab.new_tokens=400000"], ["supports only", "asked for 400000"]),
        (["extend_vocab.new_tokens=0"], ["extend_vocab.new_tokens", "greater than 0"]),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    result = run_cli("extend-vocab", *overrides, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / STAGE).exists()
    status = run_cli("status", *overrides, cwd=tmp_path)
    if status.returncode == 0:
        assert state_of(status.stdout, "extend-vocab") in {"incomplete", "never run"}


def test_unknown_tokenizer_kind(tmp_path: Path) -> None:
    folder = tmp_path / "wordpiece"
    folder.mkdir()
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "日": 1, "本": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    result = run_cli("extend-vocab", f"model.tokenizer={folder}", cwd=tmp_path)
    assert_one_line_error(result, "unknown base tokenizer kind", "SentencePiece", "byte-level BPE")
