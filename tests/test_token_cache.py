"""data/token_cache.py and the sharded side of data/mixture.py: prepared shards tokenized in parallel datatrove
tasks, one token file per shard, read back as one corpus whose stream is the single-process one, token for token.

The tokenizer is the tests' small byte-level BPE, saved to a folder as cpt saves the model's; the corpus is short
lines of the bundled Japanese training text, split into uneven shards.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data.executor import ExecutorSettings
from data.mixture import (
    TOKEN_INDEX,
    ConcatenatedTokens,
    LanguageStream,
    Mixture,
    load_token_cache,
    tokenize_corpus,
)
from data.token_cache import TokenizeShards, build_token_cache
from pipeline.errors import JpadaptError
from tests.helpers.jsonl import read_texts
from tests.helpers.tiny import byte_bpe_tokenizer

# Uneven shards, one of them a single document; the empty text is skipped like tokenize_corpus skips it.
SPLITS = (0, 37, 38, 90, 131)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    lines = (line.strip()[:120] for text in read_texts("corpus/ja_train.jsonl") for line in text.split("\n"))
    kept = [line for line in lines if line][:160]
    return kept[:50] + [""] + kept[50:]


@pytest.fixture(scope="module")
def tokenizer_dir(texts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = byte_bpe_tokenizer(texts)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from tokenizer.hf import load_hf_tokenizer

    return load_hf_tokenizer(tokenizer_dir)


def write_shards(folder: Path, texts: list[str], splits: tuple[int, ...]) -> list[Path]:
    """Prepared train shards as prepare writes them: JSONL records with a "text", in shard order."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [*splits, len(texts)]
    shards = []
    for k, (start, stop) in enumerate(itertools.pairwise(bounds)):
        shard = folder / f"train-{k:05d}.jsonl"
        with open(shard, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": f"d{i}", "text": texts[i]}, ensure_ascii=False) + "\n"
                         for i in range(start, stop))
        shards.append(shard)
    return shards


def build(shards: list[Path], folder: Path, tokenizer_dir: Path, tokenizer, workers: int, **kwargs):
    return build_token_cache(shards, folder, tokenizer_dir, bos_id=tokenizer.bos_token_id,
                             eos_id=tokenizer.eos_token_id, settings=ExecutorSettings(workers=workers),
                             work_dir=folder.parent / "work" / folder.name, **kwargs)


def stream(corpus) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(corpus.tokens[0 : corpus.n_tokens]), np.asarray(corpus.offsets)


@pytest.fixture(scope="module")
def reference(texts, tokenizer, tmp_path_factory):
    """Today's single-process cache: one tokenize_corpus call over all the texts."""
    prefix = tmp_path_factory.mktemp("single") / "ja"
    return tokenize_corpus(texts, tokenizer, prefix, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def shards(texts, tmp_path_factory) -> list[Path]:
    return write_shards(tmp_path_factory.mktemp("prepared") / "ja", texts, SPLITS)


@pytest.fixture(scope="module")
def parallel(shards, tokenizer_dir, tokenizer, tmp_path_factory):
    return build(shards, tmp_path_factory.mktemp("parallel") / "ja", tokenizer_dir, tokenizer, workers=2)


@pytest.fixture(scope="module")
def serial(shards, tokenizer_dir, tokenizer, tmp_path_factory):
    return build(shards, tmp_path_factory.mktemp("serial") / "ja", tokenizer_dir, tokenizer, workers=1)


def folder_of(corpus) -> Path:
    return Path(corpus.tokens.parts[0].filename).parent


# ------------------------------------------------------------------------------------------------- the cache


def test_two_workers_equal_one_worker_and_the_single_process_stream(parallel, serial, reference, tokenizer, texts):
    expected_tokens, expected_offsets = stream(reference)
    for corpus in (parallel, serial):
        tokens, offsets = stream(corpus)
        np.testing.assert_array_equal(tokens, expected_tokens)
        np.testing.assert_array_equal(offsets, expected_offsets)
        assert (corpus.n_docs, corpus.n_tokens) == (len(texts) - 1, reference.n_tokens)
    # And the ids are the tokenizer's own, [bos] + ids + [eos] per document.
    first = texts[0]
    assert tokens[offsets[0] : offsets[1]].tolist() == (
        [tokenizer.bos_token_id] + tokenizer(first, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    )
    # One token file per shard, byte for byte the same from 1 and 2 workers, listed in order by the index.
    one, two = folder_of(serial), folder_of(parallel)
    index = json.loads((two / TOKEN_INDEX).read_text())
    assert [part["name"] for part in index["parts"]] == [f"train-{k:05d}" for k in range(len(SPLITS))]
    assert [part["n_docs"] for part in index["parts"]] == [37, 1, 52 - 1, 41, len(texts) - 131]
    assert (index["n_docs"], index["n_tokens"]) == (reference.n_docs, reference.n_tokens)
    names = sorted(p.name for p in two.iterdir())
    assert names == sorted(p.name for p in one.iterdir())
    assert names == sorted([TOKEN_INDEX] + [f"train-{k:05d}{s}" for k in range(5) for s in (".json", ".offsets", ".tokens")])
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_several_shards_give_the_mixture_blocks_of_one_shard(parallel, reference, texts, tokenizer_dir, tokenizer,
                                                            tmp_path):
    single = build(write_shards(tmp_path / "prepared", texts, (0,)), tmp_path / "one" / "ja", tokenizer_dir,
                   tokenizer, workers=1)
    en = tokenize_corpus(texts[:7][::-1], tokenizer, tmp_path / "en", bos_id=tokenizer.bos_token_id,
                         eos_id=tokenizer.eos_token_id)
    seq_len, n = 32, 1200

    def blocks(ja):
        mixture = Mixture(LanguageStream(ja, 3, salt=0), LanguageStream(en, 3, salt=1), 0.25, seq_len, seed=3)
        return mixture.blocks(range(n))

    # texts[50] is the empty one: this second shard holds no document, a token file of none.
    with_empty = build(write_shards(tmp_path / "prepared-empty", texts, (0, 50, 51, 100)), tmp_path / "e" / "ja",
                       tokenizer_dir, tokenizer, workers=1)
    index = json.loads((tmp_path / "e" / "ja" / TOKEN_INDEX).read_text())
    assert [part["n_docs"] for part in index["parts"]] == [50, 0, 49, len(texts) - 100]
    expected = blocks(reference)
    assert 0.75 * n * seq_len > 2 * reference.n_tokens, "the blocks should cross Japanese epochs"
    for corpus in (single, with_empty, parallel):
        np.testing.assert_array_equal(blocks(corpus), expected)
    # Resuming mid-run from the sharded corpus reads the same blocks too.
    fresh = Mixture(LanguageStream(parallel, 3, salt=0), LanguageStream(en, 3, salt=1), 0.25, seq_len, seed=3)
    np.testing.assert_array_equal(fresh.blocks(range(917, n)), expected[917:])


def test_a_worker_reloads_the_tokenizer_when_the_folder_changes(texts, tmp_path):
    folder = tmp_path / "tokenizer"
    byte_bpe_tokenizer(texts, vocab_size=400).save_pretrained(str(folder))
    task = TokenizeShards((), tmp_path / "cache", folder, bos_id=0, eos_id=1)
    first = task._tokenizer()
    assert len(first) == 400 and task._tokenizer() is first  # kept for the worker's next task
    byte_bpe_tokenizer(texts, vocab_size=300).save_pretrained(str(folder))  # a later run, the same folder
    assert len(task._tokenizer()) == 300


def test_concatenated_tokens_read_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, size, dtype=np.uint32) for size in (5, 1, 0, 9, 3)]
    joined = ConcatenatedTokens(parts)
    whole = np.concatenate(parts)
    assert len(joined) == len(whole) == 18 and joined.shape == (18,)
    positions = rng.integers(0, 18, (4, 7))
    np.testing.assert_array_equal(joined[positions], whole[positions])
    for key in (slice(0, 18), slice(3, 7), slice(5, 6), slice(10, 4), slice(-4, None)):
        np.testing.assert_array_equal(joined[key], whole[key])
    assert joined[6] == whole[6] and joined[-1] == whole[-1]
    for bad in (18, [0, 18], [-19]):
        with pytest.raises(IndexError):
            joined[bad]
    assert len(ConcatenatedTokens([])) == 0


# ----------------------------------------------------------------------------------------- interruptions


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix in (".tokens", ".offsets", ".json")}


def test_a_failed_build_is_not_a_cache_and_the_rerun_skips_finished_shards(texts, tokenizer_dir, tokenizer,
                                                                          reference, tmp_path, caplog):
    shards = write_shards(tmp_path / "prepared", texts, SPLITS)
    good = shards[2].read_text(encoding="utf-8")
    shards[2].write_text(good + '{"text": "broken\n', encoding="utf-8")  # a task dies on shard 2
    folder = tmp_path / "cache" / "ja"
    # One worker: the tasks run here one after the other, so ranks 0 and 1 finish and 3 and 4 never start.
    with pytest.raises(JpadaptError, match="tokenize ja"):
        build(shards, folder, tokenizer_dir, tokenizer, workers=1, step="tokenize ja")
    assert load_token_cache(folder) is None and not (folder / TOKEN_INDEX).exists()
    finished = mtimes(folder)
    assert {name.split(".")[0] for name in finished} == {"train-00000", "train-00001"}

    shards[2].write_text(good, encoding="utf-8")
    log = logging.getLogger("test-token-cache")
    with caplog.at_level(logging.INFO, logger=log.name):
        corpus = build(shards, folder, tokenizer_dir, tokenizer, workers=2, step="tokenize ja", log=log)
    assert "5 task(s) on local (2 finished by an earlier attempt)" in caplog.text
    assert {name: t for name, t in mtimes(folder).items() if name in finished} == finished
    np.testing.assert_array_equal(stream(corpus)[0], stream(reference)[0])


def test_a_shard_lost_after_its_task_finished_is_tokenized_again(parallel, shards, tokenizer_dir, tokenizer,
                                                                reference, tmp_path):
    folder = tmp_path / "ja"
    shutil.copytree(folder_of(parallel), folder)
    shutil.copytree(folder_of(parallel).parent / "work", tmp_path / "work")
    assert load_token_cache(folder) is not None
    # As if killed while rewriting shard 3: its tokens are cut short, and the index is gone.
    tokens = folder / "train-00003.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-8])
    assert load_token_cache(folder) is None
    (folder / TOKEN_INDEX).unlink()
    before = mtimes(folder)
    corpus = build(shards, folder, tokenizer_dir, tokenizer, workers=2)
    changed = {name for name, t in mtimes(folder).items() if before.get(name) != t}
    assert changed == {"train-00003.tokens", "train-00003.offsets", "train-00003.json", TOKEN_INDEX}
    np.testing.assert_array_equal(stream(corpus)[0], stream(reference)[0])


def test_an_index_without_its_parts_is_not_a_cache(parallel, tmp_path):
    folder = tmp_path / "ja"
    shutil.copytree(folder_of(parallel), folder)
    assert load_token_cache(folder) is not None
    (folder / "train-00001.json").unlink()
    assert load_token_cache(folder) is None
    assert load_token_cache(tmp_path / "nothing") is None


def test_shards_of_empty_texts_only_are_refused(tokenizer_dir, tokenizer, tmp_path):
    shards = write_shards(tmp_path / "prepared", ["", ""], (0, 1))
    with pytest.raises(JpadaptError, match="no documents"):
        build(shards, tmp_path / "cache" / "ja", tokenizer_dir, tokenizer, workers=1)
    assert load_token_cache(tmp_path / "cache" / "ja") is None


# ------------------------------------------------------------------------------------------------ the stage


def test_cpt_reuses_the_cache_whatever_the_executor_settings(shards, tokenizer_dir, tokenizer, reference, tmp_path,
                                                             caplog):
    from pipeline.config import load_config
    from pipeline.fingerprint import ConfigView
    from stages.cpt import SPEC, _token_files

    prepared = shards[0].parent.parent
    (prepared / "manifest.json").write_text(json.dumps({"outputs": {}}), encoding="utf-8")
    log = logging.getLogger("test-token-cache-stage")
    ctx = SimpleNamespace(run_dir=tmp_path / "run", log=log)

    def token_files(*overrides: str):
        # As the runner hands it to the stage: reading an undeclared key (prepare.workers, say) would raise.
        cfg = ConfigView.of(load_config(None, ["cpt.replay_ratio=0", *overrides]), SPEC)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=log.name):
            return _token_files(cfg, prepared, tokenizer, tokenizer_dir, ctx)["ja"]

    first = token_files("prepare.workers=2")
    assert "ja: 5 task(s) on local" in caplog.text and "from the cache" not in caplog.text
    assert (first.n_docs, first.n_tokens) == (reference.n_docs, reference.n_tokens)
    written = mtimes(first.folder)
    again = token_files("prepare.workers=1", "prepare.tasks=2")
    assert again == first and "ja: tokenized train set from the cache" in caplog.text
    assert "task(s)" not in caplog.text and mtimes(first.folder) == written
    np.testing.assert_array_equal(stream(load_token_cache(first.folder))[0], stream(reference)[0])
    assert os.path.commonpath([first.folder, ctx.run_dir / ".cache" / "cpt-tokens"]) == str(
        ctx.run_dir / ".cache" / "cpt-tokens")
