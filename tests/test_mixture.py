"""data/mixture.py: the token-file cache, the shuffled language streams and the Japanese/English block mixture.

The tokenizer is a small BPE trained here on lines of the bundled corpora; expected stream contents are built
in the tests directly from the documented permutations, independently of the module's lookup tables.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.mixture import (
    TOKEN_DTYPE,
    LanguageStream,
    Mixture,
    load_token_file,
    shard_indices,
    tokenize_corpus,
)
from pipeline.errors import JpadaptError
from tests.helpers.jsonl import read_texts

BOS, EOS = 0, 1
RATIOS = (0.0, 0.1, 0.25, 0.5)


def corpus_lines(name: str, count: int) -> list[str]:
    """The first `count` non-empty lines of a bundled corpus, at most 200 characters each (small and fast)."""
    lines = (line.strip()[:200] for text in read_texts(name) for line in text.split("\n"))
    return [line for line in lines if line][:count]


@pytest.fixture(scope="module")
def ja_texts() -> list[str]:
    return corpus_lines("corpus/ja_train.jsonl", 300)


@pytest.fixture(scope="module")
def en_texts() -> list[str]:
    return corpus_lines("corpus/en_train.jsonl", 200)


@pytest.fixture(scope="module")
def tokenizer(ja_texts, en_texts) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False)
    backend.train_from_iterator(ja_texts + en_texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    return tok


@pytest.fixture(scope="module")
def ja_file(tokenizer, ja_texts, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("cache") / "ja"
    return tokenize_corpus(ja_texts, tokenizer, prefix, bos_id=BOS, eos_id=EOS, batch_size=64)


@pytest.fixture(scope="module")
def en_file(tokenizer, en_texts, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("cache") / "en"
    return tokenize_corpus(en_texts, tokenizer, prefix, bos_id=BOS, eos_id=EOS, batch_size=64)


def make_mixture(ja_file, en_file, ratio: float, *, seq_len: int = 16, seed: int = 0) -> Mixture:
    ja = LanguageStream(ja_file, seed, salt=0)
    en = LanguageStream(en_file, seed, salt=1)
    return Mixture(ja, en, ratio, seq_len, seed)


def documents(token_file) -> list[list[int]]:
    offsets = token_file.offsets
    return [token_file.tokens[offsets[d] : offsets[d + 1]].tolist() for d in range(token_file.n_docs)]


# ------------------------------------------------------------------------------------------------ token files


@pytest.mark.parametrize("bos_id", [BOS, None])
def test_documents_equal_direct_tokenizer_calls(tokenizer, ja_texts, tmp_path, bos_id):
    # Empty texts in between are skipped; a batch size that does not divide the count tests the seams.
    texts = ja_texts[:20] + ["", ""] + ja_texts[20:45] + [""]
    token_file = tokenize_corpus(texts, tokenizer, tmp_path / "c" / "ja", bos_id=bos_id, eos_id=EOS, batch_size=7)
    head = [] if bos_id is None else [bos_id]
    expected = [head + tokenizer(t, add_special_tokens=False)["input_ids"] + [EOS] for t in texts if t]
    assert documents(token_file) == expected
    assert (token_file.n_docs, token_file.n_tokens) == (45, sum(map(len, expected)))
    assert token_file.offsets[0] == 0 and token_file.offsets[-1] == token_file.n_tokens
    assert token_file.tokens.dtype == TOKEN_DTYPE
    assert tokenizer.decode(documents(token_file)[3], skip_special_tokens=True).replace(" ", "") == texts[3].replace(
        " ", ""
    )
    metadata = json.loads((tmp_path / "c" / "ja.json").read_text())
    assert metadata["n_docs"] == 45 and metadata["n_tokens"] == token_file.n_tokens
    assert (metadata["bos_id"], metadata["eos_id"], metadata["dtype"]) == (bos_id, EOS, "uint32")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ja.json", "ja.offsets", "ja.tokens"]


def test_load_token_file_round_trip_and_incomplete_entries(tokenizer, ja_texts, tmp_path):
    prefix = tmp_path / "ja"
    assert load_token_file(prefix) is None
    written = tokenize_corpus(ja_texts[:30], tokenizer, prefix, bos_id=BOS, eos_id=EOS)
    loaded = load_token_file(prefix)
    assert loaded is not None and documents(loaded) == documents(written)
    assert not loaded.tokens.flags.writeable

    tokens_path = tmp_path / "ja.tokens"
    tokens_path.write_bytes(tokens_path.read_bytes()[:-4])
    assert load_token_file(prefix) is None

    tokenize_corpus(ja_texts[:30], tokenizer, prefix, bos_id=BOS, eos_id=EOS)
    (tmp_path / "ja.json").unlink()
    assert load_token_file(prefix) is None


def test_retokenizing_replaces_an_entry(tokenizer, ja_texts, en_texts, tmp_path):
    tokenize_corpus(ja_texts[:30], tokenizer, tmp_path / "x", bos_id=BOS, eos_id=EOS)
    tokenize_corpus(en_texts[:5], tokenizer, tmp_path / "x", bos_id=None, eos_id=EOS)
    loaded = load_token_file(tmp_path / "x")
    assert loaded is not None and loaded.n_docs == 5 and documents(loaded)[0][0] != BOS


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_empty_corpus_is_a_user_error(tokenizer, tmp_path, texts):
    with pytest.raises(JpadaptError, match="empty"):
        tokenize_corpus(texts, tokenizer, tmp_path / "nothing", bos_id=BOS, eos_id=EOS)
    assert load_token_file(tmp_path / "nothing") is None
    assert list(tmp_path.iterdir()) == []


def test_ids_beyond_uint32_are_refused(tmp_path):
    def huge_tokenizer(batch, **kwargs):
        return {"input_ids": [[2**32] for _ in batch]}

    with pytest.raises(ValueError, match="token ids"):
        tokenize_corpus(["a"], huge_tokenizer, tmp_path / "x", bos_id=None, eos_id=EOS)


# ----------------------------------------------------------------------------------------------------- stream


def explicit_stream(token_file, seed: int, salt: int, epochs: int) -> np.ndarray:
    docs = documents(token_file)
    orders = [np.random.default_rng([seed, salt, e]).permutation(len(docs)) for e in range(epochs)]
    return np.array([token for order in orders for d in order for token in docs[d]], dtype=np.int64)


def test_reads_across_epochs_equal_the_explicit_concatenation(tokenizer, ja_texts, tmp_path):
    tiny = tokenize_corpus(ja_texts[:5], tokenizer, tmp_path / "tiny", bos_id=BOS, eos_id=EOS)
    expected = explicit_stream(tiny, seed=3, salt=1, epochs=3)
    n = tiny.n_tokens
    reads = [(0, n), (n - 5, 10), (2 * n - 1, 2), (1, 3 * n - 1), (n, 0), (7, 1)]
    # Epochs 2, 0, 1 out of order: the two-epoch cache is evicted and rebuilt on the way.
    reads += [(2 * n + 3, n - 10), (0, 17), (n + 2, 40), (3, 2 * n)]
    stream = LanguageStream(tiny, seed=3, salt=1)
    for start, length in reads:
        got = stream.read(start, length)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected[start : start + length], err_msg=f"read({start}, {length})")


def test_each_epoch_holds_every_document_once(ja_file):
    stream = LanguageStream(ja_file, seed=0, salt=0)
    epoch = stream.read(5 * ja_file.n_tokens, ja_file.n_tokens)
    assert epoch[0] == BOS and epoch[-1] == EOS
    pieces = np.split(epoch, np.flatnonzero(epoch == EOS)[:-1] + 1)
    assert sorted(piece.tolist() for piece in pieces) == sorted(documents(ja_file))


def test_seed_salt_and_epoch_change_the_order(ja_file):
    def first_tokens(seed, salt, epoch=0):
        return LanguageStream(ja_file, seed, salt).read(epoch * ja_file.n_tokens, 200).tolist()

    assert first_tokens(0, 0) == first_tokens(0, 0)
    assert len({str(first_tokens(*args)) for args in [(0, 0), (1, 0), (0, 1), (0, 0, 1)]}) == 4


# ---------------------------------------------------------------------------------------------------- mixture


@pytest.mark.parametrize("ratio", RATIOS)
def test_realized_ratio_is_exact_to_one_block(ja_file, en_file, ratio):
    mixture = make_mixture(ja_file, en_file, ratio)
    assert mixture.realized_ratio(0) == 0.0
    langs = [mixture.lang_of(i) for i in range(3000)]
    for n in [1, 2, 3, 7, 10, 99, 100, 1000, 2999, 3000]:
        assert langs[:n].count("en") == mixture.en_blocks_before(n)
        assert abs(mixture.realized_ratio(n) - ratio) < 1 / n
    # Far out, where a float computation of n * r + phase would have lost the low bits.
    for n in [10**15 + 3, 2**62 + 1]:
        exact = Fraction(n) * Fraction(ratio) + Fraction(mixture.phase)
        assert mixture.en_blocks_before(n) == math.floor(exact)


def test_bresenham_formula_and_seeded_phase(ja_file, en_file):
    mixture = make_mixture(ja_file, en_file, 0.25, seed=5)
    phase = np.random.default_rng([5, 7]).random()
    assert mixture.phase == phase
    assert [mixture.en_blocks_before(n) for n in range(50)] == [math.floor(n * 0.25 + phase) for n in range(50)]
    other = make_mixture(ja_file, en_file, 0.25, seed=6)
    assert [mixture.lang_of(i) for i in range(40)] != [other.lang_of(i) for i in range(40)]


def test_ratio_zero_is_all_japanese_and_needs_no_english(ja_file):
    mixture = Mixture(LanguageStream(ja_file, 0, 0), None, 0.0, 16, seed=0)
    assert {mixture.block(i).lang for i in range(100)} == {"ja"}
    assert mixture.en_blocks_before(100) == 0


def test_blocks_are_consecutive_reads_of_their_language_stream(ja_file, tokenizer, en_texts, tmp_path):
    en_file = tokenize_corpus(en_texts[:10], tokenizer, tmp_path / "en", bos_id=BOS, eos_id=EOS)
    seq_len, n = 24, 300
    mixture = make_mixture(ja_file, en_file, 0.25, seq_len=seq_len)
    streams = {"ja": LanguageStream(ja_file, 0, salt=0), "en": LanguageStream(en_file, 0, salt=1)}
    taken = {"ja": [], "en": []}
    for i in range(n):
        block = mixture.block(i)
        assert block.tokens.shape == (seq_len,) and block.tokens.dtype == np.int64
        taken[block.lang].append(block.tokens)
    for lang, blocks in taken.items():
        # Packed back to back: a language's blocks, in order, are its stream from position 0 (several epochs).
        np.testing.assert_array_equal(np.concatenate(blocks), streams[lang].read(0, len(blocks) * seq_len))
    assert len(taken["en"]) * seq_len > en_file.n_tokens, "the test should cross an English epoch"
    np.testing.assert_array_equal(mixture.blocks(range(n)), np.stack([mixture.block(i).tokens for i in range(n)]))
    assert mixture.blocks([]).shape == (0, seq_len)


def test_resuming_at_any_block_index_continues_the_same_run(ja_file, en_file):
    continuous = make_mixture(ja_file, en_file, 0.1, seq_len=32).blocks(range(400))
    for resume_at in [0, 1, 137, 399]:
        fresh = make_mixture(ja_file, en_file, 0.1, seq_len=32)
        np.testing.assert_array_equal(fresh.blocks(range(resume_at, 400)), continuous[resume_at:])
    # Out of order (as ranks read), still the same blocks.
    order = np.random.default_rng(0).permutation(400)
    np.testing.assert_array_equal(make_mixture(ja_file, en_file, 0.1, seq_len=32).blocks(order), continuous[order])


def test_seed_changes_the_blocks(ja_file, en_file):
    first = make_mixture(ja_file, en_file, 0.0, seed=0).blocks(range(20))
    second = make_mixture(ja_file, en_file, 0.0, seed=1).blocks(range(20))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_zero_one_is_refused(ja_file, en_file, ratio):
    with pytest.raises(ValueError, match="replay_ratio"):
        make_mixture(ja_file, en_file, ratio)


def test_english_stream_required_for_positive_ratio(ja_file):
    with pytest.raises(ValueError, match="English"):
        Mixture(LanguageStream(ja_file, 0, 0), None, 0.1, 16, seed=0)


# ----------------------------------------------------------------------------------------------------- shards


def test_shard_indices_partition_each_step():
    world, micro_batch, grad_accum = 3, 2, 4
    per_step = world * micro_batch * grad_accum
    for step in range(3):
        shards = {
            (rank, micro): shard_indices(step, micro, rank, world=world, micro_batch=micro_batch, grad_accum=grad_accum)
            for rank in range(world)
            for micro in range(grad_accum)
        }
        for rank in range(world):
            others = {i for (r, _), indices in shards.items() if r != rank for i in indices}
            mine = {i for (r, _), indices in shards.items() if r == rank for i in indices}
            assert not mine & others
        every = sorted(i for indices in shards.values() for i in indices)
        assert every == list(range(step * per_step, (step + 1) * per_step))


def test_shard_indices_refuses_out_of_range_positions():
    with pytest.raises(ValueError):
        shard_indices(0, 4, 0, world=2, micro_batch=1, grad_accum=4)
    with pytest.raises(ValueError):
        shard_indices(0, 0, 2, world=2, micro_batch=1, grad_accum=4)
