"""SentencePiece vocabulary extension (LLaMA-2, Mistral, llm-jp): ids kept, pieces reachable, English untouched."""

from __future__ import annotations

from pathlib import Path

import fugashi
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from data.assets import materialize
from pipeline.errors import JpadaptError
from tests.helpers.jsonl import read_texts
from tokenizer.extend_sp import (
    MORPHEME_DELIMITER,
    extend_sentencepiece,
    has_japanese,
    morpheme_segmented,
    read_model,
    select_for_bpe,
    training_lines,
    write_sentencepiece_folder,
)


@pytest.fixture(scope="module")
def ja_train() -> list[str]:
    return read_texts("corpus/ja_train.jsonl")


@pytest.fixture(scope="module")
def heldout(ja_heldout: list[str], en_heldout: list[str]) -> dict[str, list[str]]:
    return {"ja": ja_heldout, "en": en_heldout}


def base_file(name: str) -> Path:
    return materialize(f"tokenizers/{name}/tokenizer.model")


@pytest.fixture(scope="module")
def llama2_2k(ja_train: list[str], tmp_path_factory: pytest.TempPathFactory):
    model, ext = extend_sentencepiece(base_file("llama2"), ja_train, 2000, algorithm="bpe", morpheme_pretokenize=True)
    folder = tmp_path_factory.mktemp("llama2-2k")
    write_sentencepiece_folder(model, folder, None)
    return model, ext, folder


def chars_per_token(sp: spm.SentencePieceProcessor, docs: list[str]) -> float:
    return sum(map(len, docs)) / sum(len(ids) for ids in sp.encode(docs))


def test_base_pieces_keep_ids_and_new_pieces_follow(llama2_2k) -> None:
    model, ext, _ = llama2_2k
    base = read_model(base_file("llama2"))
    assert len(model.pieces) == 32000 + 2000
    assert [(p.piece, p.score, p.type) for p in model.pieces[:32000]] == [(p.piece, p.score, p.type) for p in base.pieces]
    assert model.trainer_spec.byte_fallback and model.normalizer_spec == base.normalizer_spec
    assert ext.base_size == 32000 and ext.new_ids == list(range(32000, 34000))
    new = model.pieces[32000:]
    assert [p.piece for p in new] == ext.new_pieces
    assert all(has_japanese(p.piece) and p.type == 1 for p in new)
    # Above every base score, in decreasing order: the first candidate merges first.
    top = max(p.score for p in base.pieces)
    scores = [p.score for p in new]
    assert min(scores) > top and scores == sorted(scores, reverse=True)


def test_new_pieces_are_used_and_round_trip(llama2_2k, heldout: dict[str, list[str]]) -> None:
    model, _, _ = llama2_2k
    sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    base = spm.SentencePieceProcessor(model_file=str(base_file("llama2")))
    for lang, docs in heldout.items():
        ids = sp.encode(docs)
        assert sp.decode(ids) == docs, lang
    used = {i for ids in sp.encode(heldout["ja"]) for i in ids if i >= 32000}
    assert len(used) > 1500  # most of the new pieces are reachable on unseen text
    assert chars_per_token(sp, heldout["ja"]) > 1.15 * chars_per_token(base, heldout["ja"])
    assert sp.encode(heldout["en"]) == base.encode(heldout["en"])  # identical English ids


def test_hugging_face_folder_gives_sentencepiece_ids(llama2_2k, heldout: dict[str, list[str]]) -> None:
    model, _, folder = llama2_2k
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for lang, docs in heldout.items():
        got = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
        assert got == sp.encode(docs), lang  # merges ranked by piece score, as SentencePiece merges
    assert hf.get_vocab_size() == 34000
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer("日本語", add_special_tokens=True)["input_ids"][0] == 1  # LLaMA-2 adds <s>
    assert tokenizer.eos_token == "</s>" and tokenizer.unk_token == "<unk>"


def test_morpheme_pretokenization_keeps_pieces_inside_morphemes(ja_train: list[str], llama2_2k) -> None:
    _, ext, _ = llama2_2k
    tagger = fugashi.Tagger()
    inside: set[str] = set()
    for line in training_lines(ja_train):
        for node in tagger(line):
            word = node.surface
            inside.update(word[i:j] for i in range(len(word)) for j in range(i + 1, len(word) + 1))
    crossing = [p for p in ext.new_pieces if p.lstrip("\u2581") and p.lstrip("\u2581") not in inside]
    assert crossing == []


def test_morpheme_segmentation_keeps_the_text() -> None:
    line = "吾輩は猫である。 名前は まだ無い。"
    segmented = morpheme_segmented([line])[0]
    assert segmented.replace(MORPHEME_DELIMITER, "") == line
    assert segmented.count(MORPHEME_DELIMITER) >= 8


def test_llama2_plus_16000_meets_the_target(ja_train: list[str], heldout: dict[str, list[str]]) -> None:
    """Issue target: LLaMA-2 + 16,000 Japanese tokens spells Japanese in >= 1.6x the characters per token."""
    model, _ = extend_sentencepiece(base_file("llama2"), ja_train, 16000, algorithm="bpe", morpheme_pretokenize=True)
    sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    base = spm.SentencePieceProcessor(model_file=str(base_file("llama2")))
    assert chars_per_token(sp, heldout["ja"]) / chars_per_token(base, heldout["ja"]) >= 1.6


def test_unigram_base_needs_unigram_candidates(ja_train: list[str]) -> None:
    with pytest.raises(JpadaptError, match="unigram SentencePiece model: set extend_vocab.algorithm: unigram"):
        extend_sentencepiece(base_file("llm-jp"), ja_train[:20], 100, algorithm="bpe", morpheme_pretokenize=False)
    model, ext = extend_sentencepiece(base_file("llm-jp"), ja_train[:60], 300, algorithm="unigram", morpheme_pretokenize=False)
    base = read_model(base_file("llm-jp"))
    assert [p.piece for p in model.pieces[: len(base.pieces)]] == [p.piece for p in base.pieces]
    assert len(ext.new_ids) == 300


def test_unigram_candidates_on_a_bpe_base_bring_their_intermediates(ja_train: list[str]) -> None:
    model, ext = extend_sentencepiece(base_file("llama2"), ja_train[:60], 500, algorithm="unigram", morpheme_pretokenize=False)
    vocab = {p.piece for p in model.pieces}
    for piece in ext.new_pieces:  # every appended piece splits into two symbols the encoder has
        assert len(piece) == 1 or any(
            (len(piece[:i]) == 1 or piece[:i] in vocab) and (len(piece[i:]) == 1 or piece[i:] in vocab)
            for i in range(1, len(piece))
        ), piece


def test_selection_rules() -> None:
    vocab = {"a", "b", "東", "京"}
    # BPE candidates: an unbuildable piece is skipped, not patched.
    assert select_for_bpe(["東京都庁", "東京", "京都"], vocab, 5, add_intermediates=False) == ["東京", "京都"]
    # Unigram candidates: suffixes are added first and count towards the budget.
    assert select_for_bpe(["東京都庁"], vocab, 5, add_intermediates=True) == ["都庁", "京都庁", "東京都庁"]
    assert select_for_bpe(["東京都庁"], vocab, 2, add_intermediates=True) == []
    # An intermediate without a Japanese character would change English text: the candidate is dropped.
    assert select_for_bpe(["東ab"], {"東"}, 5, add_intermediates=True) == []  # would need "ab"


def test_too_many_new_tokens_is_a_clear_error(ja_train: list[str]) -> None:
    with pytest.raises(JpadaptError, match=r"supports only \d+ new tokens .*asked for 50000"):
        extend_sentencepiece(base_file("llama2"), ja_train[:5], 50000, algorithm="bpe", morpheme_pretokenize=True)
