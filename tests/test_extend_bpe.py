"""tokenizer/extend_bpe.py: Qwen and LLaMA-3 extended by 2,000 Japanese merges learned on part of the bundled corpus.

Checked on the written tokenizer.json, loaded by `tokenizers` and by transformers: old ids and added tokens kept,
new entries reached through merges, round trips, English untouched, Japanese shorter, and the exactness of
appending merges (token counts on the training text follow from the learned merge counts).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer

from data.assets import materialize_dir
from pipeline.errors import JpadaptError
from tests.helpers.jsonl import read_texts
from tokenizer.extend_bpe import BpeExtension, extend_byte_level_bpe, touches_japanese, training_pieces
from tokenizer.load import _bytes_to_unicode

NEW_TOKENS = 2000
TRAIN_RECORDS = 60  # of 176 (about 340,000 of 1,013,000 characters): 2,000 merges in about 2 s
BASES = ("qwen", "llama3")
_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def spelled(vocab_string: str) -> bytes:
    return bytes(_BYTE_OF_CHAR[c] for c in vocab_string)


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def ja_train() -> list[str]:
    return read_texts("corpus/ja_train.jsonl")[:TRAIN_RECORDS]


@dataclass
class Extended:
    name: str
    base_dir: Path
    out_dir: Path
    ext: BpeExtension
    base: Tokenizer
    new: Tokenizer


def extend(name: str, texts: list[str], out_dir: Path, **kwargs) -> Extended:
    base_dir = materialize_dir(f"tokenizers/{name}")
    ext = extend_byte_level_bpe(base_dir / "tokenizer.json", texts, NEW_TOKENS, out_dir, **kwargs)
    shutil.copy(base_dir / "tokenizer_config.json", out_dir)  # as the stage does
    return Extended(
        name,
        base_dir,
        out_dir,
        ext,
        Tokenizer.from_file(str(base_dir / "tokenizer.json")),
        Tokenizer.from_file(str(out_dir / "tokenizer.json")),
    )


@pytest.fixture(scope="module", params=BASES)
def extended(request, ja_train, tmp_path_factory) -> Extended:
    return extend(request.param, ja_train, tmp_path_factory.mktemp(request.param))


def test_writes_only_tokenizer_json_and_reports_the_new_ids(extended, ja_train, tmp_path):
    ext = extended.ext
    base = read_json(extended.base_dir / "tokenizer.json")
    assert ext.base_size == 1 + max(t["id"] for t in base["added_tokens"])  # 151669 Qwen, 128256 LLaMA-3
    assert ext.new_ids == list(range(ext.base_size, ext.base_size + NEW_TOKENS))
    assert len(ext.new_tokens) == len(ext.counts) == NEW_TOKENS
    assert len(set(ext.new_tokens)) == NEW_TOKENS
    assert all(touches_japanese(t) for t in ext.new_tokens)
    assert min(ext.counts) >= 1  # what they add up to: test_appending_is_exact_on_the_training_words
    assert 0 < ext.seconds < 30
    assert sorted(p.name for p in extended.out_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_old_ids_added_tokens_and_pipeline_are_kept(extended):
    base = read_json(extended.base_dir / "tokenizer.json")
    new = read_json(extended.out_dir / "tokenizer.json")
    ext = extended.ext
    # Everything but the vocabulary and the merges is the base's: normalizer, pre-tokenizer, decoder,
    # post-processor, added tokens, model options (LLaMA-3's ignore_merges included).
    assert {k: v for k, v in new.items() if k != "model"} == {k: v for k, v in base.items() if k != "model"}
    options = {k: v for k, v in base["model"].items() if k not in ("vocab", "merges")}
    assert {k: v for k, v in new["model"].items() if k not in ("vocab", "merges")} == options

    vocab, base_vocab = new["model"]["vocab"], base["model"]["vocab"]
    assert all(vocab[token] == i for token, i in base_vocab.items())
    # Besides the new entries: the added tokens, under their own ids (else tokenizers would renumber them).
    added = {t["content"]: t["id"] for t in base["added_tokens"]}
    extra = {token: i for token, i in vocab.items() if token not in base_vocab}
    assert {token: i for token, i in extra.items() if i < ext.base_size} == added
    new_entries = {i: token for token, i in extra.items() if i >= ext.base_size}
    assert sorted(new_entries) == ext.new_ids
    assert [spelled(new_entries[i]) for i in ext.new_ids] == ext.new_tokens

    # Loaded: every id of the base means what it meant, and the added tokens are the same (special flags too).
    assert all(extended.new.id_to_token(i) == extended.base.id_to_token(i) for i in range(ext.base_size))
    assert extended.new.get_added_tokens_decoder() == extended.base.get_added_tokens_decoder()
    assert extended.new.get_vocab_size() == ext.base_size + NEW_TOKENS


def test_merges_are_appended_in_the_base_format_one_per_new_token(extended):
    base = read_json(extended.base_dir / "tokenizer.json")["model"]["merges"]
    model = read_json(extended.out_dir / "tokenizer.json")["model"]
    merges, vocab = model["merges"], model["vocab"]
    assert merges[: len(base)] == base
    appended = merges[len(base) :]
    assert len(appended) == NEW_TOKENS
    assert all(type(m) is type(base[0]) for m in appended)  # LLaMA-3 "a b" strings, Qwen [a, b] lists
    for new_id, merge in zip(extended.ext.new_ids, appended):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        assert vocab[left + right] == new_id
        assert vocab[left] < new_id and vocab[right] < new_id  # parts exist before: learned order kept


def test_new_tokens_are_reached_through_merges(extended, ja_train):
    new, ext = extended.new, extended.ext
    # A new token that is whole UTF-8, encoded on its own, comes out as itself; for LLaMA-3 this also holds
    # with ignore_merges off, so it is the merges that reach it, not the whole-word lookup.
    tokenizers = [new]
    if extended.name == "llama3":
        without = read_json(extended.out_dir / "tokenizer.json")
        without["model"]["ignore_merges"] = False
        tokenizers.append(Tokenizer.from_str(json.dumps(without)))
    whole = [(i, t.decode("utf-8")) for i, t in zip(ext.new_ids, ext.new_tokens) if _utf8(t)]
    assert len(whole) > 0.97 * NEW_TOKENS  # the rest end or start inside a character (LLaMA-3 'し' + E3 81)
    for tokenizer in tokenizers:
        ids = [e.ids for e in tokenizer.encode_batch([text for _, text in whole], add_special_tokens=False)]
        assert ids == [[i] for i, _ in whole]
    # Inside running text, nearly all of them occur (the others are merged further wherever they are made).
    produced = {i for ids in encode(new, ja_train) for i in ids}
    assert len(produced & set(ext.new_ids)) > 0.95 * NEW_TOKENS


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("name", BASES)
def test_appending_is_exact_on_the_training_words(name, ja_train, tmp_path):
    """Without morpheme cuts the training pieces are the tokenizer's own pre-tokens, so if the appended merges act
    as during learning, the extended tokenizer saves exactly one token per merge application on them."""
    run = extend(name, ja_train, tmp_path, morpheme_boundaries=False)
    before = sum(map(len, encode(run.base, ja_train)))
    after = sum(map(len, encode(run.new, ja_train)))
    assert after == before - sum(run.ext.counts)


def test_morpheme_cuts_keep_merges_inside_morphemes():
    """Qwen: 私は|東|京|大学|の|学生|です and 、|友|達|と|映|画|を見|に行|きました; MeCab: 私 は 東京 大学 の 学生
    です 。 昨日 、 友達 と 映画 を 見 に 行き まし た 。 Pieces break at token boundaries that are morpheme
    boundaries; に行|きました cannot break (に行 spans に|行き); one-token pieces hold no pair."""
    tokenizer = Tokenizer.from_file(str(materialize_dir("tokenizers/qwen") / "tokenizer.json"))
    text = "私は東京大学の学生です。昨日、友達と映画を見に行きました。"

    def pieces(cut: bool) -> list[list[str]]:
        found = training_pieces(tokenizer, [text], cut, progress=False)
        return [[spelled(tokenizer.id_to_token(i)).decode() for i in piece] for piece in found]

    assert pieces(True) == [["東", "京"], ["友", "達"], ["映", "画"], ["に行", "きました"]]
    assert pieces(False) == [
        ["私は", "東", "京", "大学", "の", "学生", "です"],
        ["。", "昨日"],
        ["、", "友", "達", "と", "映", "画", "を見", "に行", "きました"],
    ]


def test_round_trip_on_held_out_text(extended, ja_heldout, en_heldout):
    texts = ja_heldout + en_heldout
    decoded = extended.new.decode_batch(encode(extended.new, texts), skip_special_tokens=False)
    assert decoded == texts


def test_english_is_untouched(extended, en_heldout):
    before, after = encode(extended.base, en_heldout), encode(extended.new, en_heldout)
    tokens = sum(map(len, before))
    changed = sum((Counter(b) - Counter(a)).total() for b, a in zip(before, after))
    assert changed / tokens < 0.01  # measured: 0 of 184,241 (Qwen) and 183,959 (LLaMA-3) tokens
    chars = sum(map(len, en_heldout))
    assert chars / sum(map(len, after)) == pytest.approx(chars / tokens, rel=0.01)
    # In a mixed text, only the Japanese tokens change.
    mixed = "He wrote 「しなければならない」 twice."
    before_ids, after_ids = encode(extended.base, [mixed])[0], encode(extended.new, [mixed])[0]
    assert len(after_ids) < len(before_ids)
    assert after_ids[:3] == before_ids[:3] and after_ids[-3:] == before_ids[-3:]  # He, wrote, 「 / 」, twice, .


def test_japanese_held_out_needs_fewer_tokens(extended, ja_heldout):
    before = sum(map(len, encode(extended.base, ja_heldout)))
    after = sum(map(len, encode(extended.new, ja_heldout)))
    assert after < 0.95 * before  # measured: -8.3% Qwen, -8.2% LLaMA-3 (2,000 tokens, 60 training records)


def test_transformers_loads_the_same_tokenizer(extended, ja_heldout, en_heldout):
    hf = AutoTokenizer.from_pretrained(str(extended.out_dir))
    texts = [t[:3000] for t in ja_heldout[:20] + en_heldout[:3]] + ["Pythonで書かれた映画館のプログラム"]
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in texts] == encode(extended.new, texts)
    assert len(hf) == extended.ext.base_size + NEW_TOKENS
    config = read_json(extended.base_dir / "tokenizer_config.json")
    assert hf.chat_template == config["chat_template"]
    assert hf.eos_token == config["eos_token"]
    assert hf.eos_token_id == extended.base.token_to_id(config["eos_token"])
    messages = [{"role": "user", "content": "映画館へ行きました"}]
    chat = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert set(chat) & set(extended.ext.new_ids) and hf.decode(chat).count("映画館へ行きました") == 1


@pytest.mark.parametrize(
    ("raw", "japanese"),
    [
        ("日本".encode(), True),
        ("日".encode()[:2], True),  # E6 97: U+65C0–U+65FF, kanji only
        ("。".encode(), True),
        ("ｶ".encode(), True),  # halfwidth katakana
        (b"abc", False),
        ("é".encode()[:1], False),
        ("—".encode()[:2], False),  # E2 80: general punctuation
        ("🍣".encode()[:2], False),
        ("日".encode()[1:] + b"a", False),  # the tail of an unknown character
    ],
)
def test_touches_japanese(raw, japanese):
    assert touches_japanese(raw) is japanese


def test_rejects_a_tokenizer_that_is_not_byte_level(tmp_path):
    # A SentencePiece-style BPE (Metaspace '▁' for spaces), as transformers converts LLaMA-2 and Mistral.
    sp_like = Tokenizer(models.BPE({"▁": 0, "a": 1, "▁a": 2}, [("▁", "a")]))
    sp_like.pre_tokenizer = pre_tokenizers.Metaspace()
    sp_like.decoder = decoders.Metaspace()
    path = tmp_path / "tokenizer.json"
    sp_like.save(str(path))
    with pytest.raises(JpadaptError, match=rf"^tokenizer file {re.escape(str(path))}: not a byte-level BPE"):
        extend_byte_level_bpe(path, ["日本語"], 10, tmp_path)
    path.write_text("{ not json", encoding="utf-8")
    with pytest.raises(JpadaptError, match="cannot read it as JSON"):
        extend_byte_level_bpe(path, ["日本語"], 10, tmp_path)


def test_rejects_more_new_tokens_than_the_corpus_supports(ja_train, tmp_path):
    base = materialize_dir("tokenizers/qwen") / "tokenizer.json"
    message = r"^the Japanese corpus supports only \d+ new tokens \(asked for 50000\); lower extend_vocab.new_tokens"
    with pytest.raises(JpadaptError, match=message):
        extend_byte_level_bpe(base, ja_train[:3], 50000, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
