"""tokenizer/load.py: every bundled tokenizer through the TokenizerBackend contract of tokenizer/backend.py.

Spans are checked against an independent per-byte Python reference and against the libraries' own alignments
(SentencePiece protos, `tokenizers` offsets); LLaMA-3's tiktoken rank file against its tokenizer.json.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from data.assets import materialize_dir
from pipeline.errors import JpadaptError
from tokenizer.backend import EncodedText
from tokenizer.load import (
    BUNDLED,
    LLAMA3_PATTERN,
    QWEN_PATTERN,
    HFTokenizersBackend,
    SentencePieceBackend,
    TiktokenBackend,
    load_tokenizer,
    sp_proto_encoding,
)

# Kanji outside LLaMA-2's vocabulary (吾 輩 𠮟: byte fallback), a non-BMP character (𠮟, 4 UTF-8 bytes), double
# spaces, newline, tab, an ideographic space, English, digits, fullwidth and halfwidth forms. NFC, as Qwen needs.
MIXED = "吾輩は猫である。名前はまだ無い。\n𠮟られた。  Hello, world! 2024年12月3日 ＡＢＣ１２３ ｶﾀｶﾅ\u3000全角\tタブ 🍣"
EDGE_TEXTS = [MIXED, "Hello 世界", " leading space", "  two spaces", "\n\nnewlines", "", "x", "<s></s>"]

EXPECTED = {  # kind, vocab_size (special and added tokens included)
    "llama2": ("sentencepiece", 32000),
    "mistral": ("sentencepiece", 32000),
    "llm-jp": ("sentencepiece", 98452),
    "llama3": ("byte-level-bpe", 128256),  # 128000 BPE + 256 special
    "qwen": ("byte-level-bpe", 151669),  # 151643 BPE + 26 added (14 special)
}


@pytest.fixture(scope="module")
def backends() -> dict:
    loaded = {name: load_tokenizer(name) for name in BUNDLED}
    loaded["llama3-tiktoken"] = load_tokenizer(
        str(materialize_dir("tokenizers/llama3") / "tokenizer.model"), name="llama3-tiktoken"
    )
    return loaded


def reference_spans(text: str, token_bytes: list[bytes]) -> list[tuple[int, int]]:
    """The EncodedText contract, one byte at a time: a token spans the characters its bytes fall in; bytes of a
    dummy-prefix space (tokens spell b' ' + text) fall in no character."""
    raw = text.encode("utf-8")
    spelled = b"".join(token_bytes)
    assert spelled in (raw, b" " + raw), "tokens do not spell the text"
    char_of_byte = [-1] * (len(spelled) - len(raw))  # the dummy space
    for i, ch in enumerate(text):
        char_of_byte += [i] * len(ch.encode("utf-8"))
    spans, pos = [], 0
    for tb in token_bytes:
        chars = [c for c in char_of_byte[pos : pos + len(tb)] if c >= 0]
        if chars:
            spans.append((chars[0], chars[-1] + 1))
        else:  # covers no character: empty span where it stands
            following = [c for c in char_of_byte[pos:] if c >= 0]
            at = following[0] if following else len(text)
            spans.append((at, at))
        pos += len(tb)
    return spans


def assert_contract(backend, text: str, enc: EncodedText) -> None:
    spans = enc.spans
    assert enc.ids.dtype == np.int64 and spans.dtype == np.int64
    assert spans.shape == (len(enc.ids), 2)
    if len(spans):
        assert (np.diff(spans[:, 0]) >= 0).all() and (np.diff(spans[:, 1]) >= 0).all()
        assert (spans[:, 0] >= 0).all() and (spans[:, 0] <= spans[:, 1]).all() and (spans[:, 1] <= len(text)).all()
    assert not backend.special[enc.ids].any()
    token_bytes = [backend.token_bytes[i] for i in enc.ids]
    assert [tuple(s) for s in spans.tolist()] == reference_spans(text, token_bytes)
    # The rule for whole-character tokens: the covered text is the token, except that SentencePiece's dummy
    # prefix (the tokens spell b" " + text) makes the first token one space longer than the text it covers.
    dummy_prefix = b"".join(token_bytes) == b" " + text.encode("utf-8")
    for k, (tb, (s, e)) in enumerate(zip(token_bytes, spans.tolist())):
        try:
            tb.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a fragment of a character: checked by reference_spans
        if e > s:
            covered = text[s:e].encode("utf-8")
            assert tb == covered or (k == 0 and s == 0 and dummy_prefix and tb == b" " + covered)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_loads_with_its_vocabulary(backends, name):
    backend = backends[name]
    kind, size = EXPECTED[name]
    assert (backend.name, backend.source, backend.kind, backend.vocab_size) == (name, f"bundled:{name}", kind, size)
    assert len(backend.token_bytes) == len(backend.byte_fallback) == len(backend.special) == size


def test_bundled_llama3_is_its_tokenizer_json_and_the_rank_file_loads_as_tiktoken(backends):
    assert isinstance(backends["llama3"], HFTokenizersBackend) and backends["llama3"].path.name == "tokenizer.json"
    rank_file = backends["llama3-tiktoken"]
    assert isinstance(rank_file, TiktokenBackend)
    assert (rank_file.name, rank_file.kind, rank_file.vocab_size) == ("llama3-tiktoken", "tiktoken", 128000)
    assert not rank_file.special.any()
    assert rank_file.token_bytes == backends["llama3"].token_bytes[:128000]


@pytest.mark.parametrize("name", [*BUNDLED, "llama3-tiktoken"])
def test_spans_follow_the_contract_on_mixed_text(backends, name):
    backend = backends[name]
    encoded = backend.encode_batch(EDGE_TEXTS)
    assert len(encoded) == len(EDGE_TEXTS)
    for text, enc in zip(EDGE_TEXTS, encoded):
        assert_contract(backend, text, enc)
    assert backend.decode_batch([e.ids for e in encoded]) == EDGE_TEXTS


def test_fragments_of_one_character_share_its_span(backends):
    llama2 = backends["llama2"]
    enc = llama2.encode_batch(["猫は吾𠮟"])[0]
    # '▁' dummy prefix, 猫, は, then 吾 as 3 byte pieces and 𠮟 as 4.
    assert enc.ids.tolist() == [29871, 234, 143, 174, 30449, 232, 147, 193, 243, 163, 177, 162]
    assert enc.spans.tolist() == [[0, 0]] + [[0, 1]] * 3 + [[1, 2]] + [[2, 3]] * 3 + [[3, 4]] * 4
    llama3 = backends["llama3"]
    enc = llama3.encode_batch(["吾輩"])[0]
    assert [llama3.token_bytes[i] for i in enc.ids] == [b"\xe5\x90\xbe", b"\xe8\xbc", b"\xa9"]
    assert enc.spans.tolist() == [[0, 1], [1, 2], [1, 2]]


def test_byte_fallback_pieces(backends):
    llama2 = backends["llama2"]
    assert llama2.encode_batch(["吾"])[0].ids.tolist() == [29871, 232, 147, 193]
    assert [llama2.token_bytes[i] for i in (232, 147, 193)] == [b"\xe5", b"\x90", b"\xbe"]
    assert np.flatnonzero(llama2.byte_fallback).tolist() == list(range(3, 259))
    assert [llama2.token_bytes[i] for i in range(3, 259)] == [bytes([b]) for b in range(256)]
    assert np.flatnonzero(backends["llm-jp"].byte_fallback).tolist() == list(range(8, 264))
    assert not backends["qwen"].byte_fallback.any() and not backends["llama3"].byte_fallback.any()


def test_special_and_unknown_tokens(backends):
    llama2, qwen, llama3 = backends["llama2"], backends["qwen"], backends["llama3"]
    assert np.flatnonzero(llama2.special).tolist() == [1, 2]  # <s> </s>; <unk> can be produced
    assert (llama2.unk_id, llama2.token_bytes[0], llama2.token_bytes[1]) == (0, b"", b"")
    assert llama2.token_bytes[29871] == b" " and llama2.token_bytes[15043] == b" Hello"
    assert np.flatnonzero(llama3.special).tolist() == list(range(128000, 128256))
    assert qwen.special.sum() == 14 and qwen.special[151643] and not qwen.special[151667]
    assert qwen.token_bytes[151667] == b"<think>"  # a non-special added token: text, matched literally
    # Special tokens written in a text are text, as in tiktoken's encode_ordinary.
    for backend, marker in ((llama3, "<|begin_of_text|>"), (qwen, "<|endoftext|>"), (llama2, "<s>")):
        text = f"a {marker} b"
        enc = backend.encode_batch([text])[0]
        assert not backend.special[enc.ids].any()
        assert_contract(backend, text, enc)


def test_round_trip_on_japanese_heldout(backends, ja_heldout):
    results = {}
    for name in ("llama2", "mistral", "llama3", "qwen", "llm-jp", "llama3-tiktoken"):
        backend = backends[name]
        decoded = backend.decode_batch([e.ids for e in backend.encode_batch(ja_heldout)])
        results[name] = sum(d == t for d, t in zip(decoded, ja_heldout))
    # llm-jp's normalizer is the identity too: it round-trips this NFC corpus.
    assert results == {name: len(ja_heldout) for name in results}


def test_tiktoken_rank_file_matches_tokenizer_json(backends, ja_heldout, en_heldout):
    texts = ja_heldout + en_heldout
    from_json = backends["llama3"].encode_batch(texts)
    from_ranks = backends["llama3-tiktoken"].encode_batch(texts)
    for a, b in zip(from_json, from_ranks):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.spans, b.spans)


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_byte_level_spans_equal_tokenizers_offsets(backends, ja_heldout, name):
    backend = backends[name]
    plain = Tokenizer.from_file(str(backend.path))
    for text, ours, theirs in zip(ja_heldout, backend.encode_batch(ja_heldout), plain.encode_batch(ja_heldout)):
        assert ours.ids.tolist() == theirs.ids
        assert ours.spans.tolist() == [list(o) for o in theirs.offsets]


@pytest.mark.parametrize("name", ["llama2", "mistral", "llm-jp"])
def test_sentencepiece_spans_equal_its_proto_alignment(backends, ja_heldout, en_heldout, name):
    backend = backends[name]
    assert backend.pieces_spell_text  # identity normalizer: spans come from piece lengths
    texts = ja_heldout + en_heldout + EDGE_TEXTS
    protos = backend.processor.encode(texts, return_type="proto")
    for text, ours, proto in zip(texts, backend.encode_batch(texts), protos):
        theirs = sp_proto_encoding(proto, text, backend.byte_fallback)
        assert np.array_equal(ours.ids, theirs.ids) and np.array_equal(ours.spans, theirs.spans)


def test_qwen_nfc_normalizer_falls_back_to_tokenizers_offsets(backends):
    """Where NFC rewrites the text, the tokens do not spell it and the spans are `tokenizers`' own offsets."""
    qwen = backends["qwen"]
    plain = Tokenizer.from_file(str(qwen.path))
    texts = [
        "豈\uf900x",  # U+F900 -> U+8C48: same length in characters and bytes, other bytes
        "cafe\u0301 au lait",  # e + combining acute -> é
        " \u0958 x",  # U+0958 -> U+0915 U+093C: one character more, which a dummy-prefix space would explain
    ]
    for text, enc in zip(texts, qwen.encode_batch(texts)):
        assert b"".join(qwen.token_bytes[i] for i in enc.ids) == unicodedata.normalize("NFC", text).encode()
        assert enc.spans.tolist() == [list(o) for o in plain.encode(text, add_special_tokens=False).offsets]


def train_sentencepiece(path: Path, lines: list[str], normalization: str, squeeze_spaces: bool = False) -> Path:
    """A ~300-piece unigram model without byte fallback (so unseen characters are <unk>), in well under a second."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=300, model_type="unigram",
        normalization_rule_name=normalization, remove_extra_whitespaces=squeeze_spaces, byte_fallback=False,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def tiny_lines(ja_heldout) -> list[str]:
    lines = [line for line in ja_heldout[0].splitlines() if line][:200]
    assert "𠮟" not in "".join(lines) and "猫" not in "".join(lines)
    return lines


def test_unknown_pieces_take_sentencepiece_alignment(tmp_path, tiny_lines):
    backend = load_tokenizer(str(train_sentencepiece(tmp_path / "tiny.model", tiny_lines, "identity")))
    assert isinstance(backend, SentencePieceBackend) and backend.name == "tiny" and backend.pieces_spell_text
    assert backend.token_bytes[backend.unk_id] == b"" and not backend.special[backend.unk_id]
    # One unknown character: the dummy-prefix space makes up for it in a character count.
    texts = ["𠮟られた", "𠮟られた猫"]
    for text, enc, unknown_text in zip(texts, backend.encode_batch(texts), (["𠮟"], ["𠮟", "猫"])):
        assert [text[s:e] for s, e in enc.spans[enc.ids == backend.unk_id]] == unknown_text
        proto = backend.processor.encode([text], return_type="proto")[0]
        assert np.array_equal(enc.spans, sp_proto_encoding(proto, text, backend.byte_fallback).spans)


def test_whitespace_squeezing_sentencepiece_takes_its_alignment(tmp_path, tiny_lines):
    model = train_sentencepiece(tmp_path / "squeeze.model", tiny_lines, "identity", squeeze_spaces=True)
    backend = load_tokenizer(str(model))
    assert not backend.pieces_spell_text
    # "▁た▁ら" has as many characters as "た  ら": only the alignment knows that the second space was dropped.
    text = "た  ら"
    enc = backend.encode_batch([text])[0]
    proto = backend.processor.encode([text], return_type="proto")[0]
    assert np.array_equal(enc.spans, sp_proto_encoding(proto, text, backend.byte_fallback).spans)
    assert enc.spans.tolist() == [[0, 0], [0, 1], [1, 3], [3, 4]]  # ▁ た ▁(both spaces) ら


def test_nfkc_sentencepiece_spans_point_into_the_original_text(tmp_path, tiny_lines):
    backend = load_tokenizer(str(train_sentencepiece(tmp_path / "nfkc.model", tiny_lines, "nmt_nfkc")))
    assert not backend.pieces_spell_text
    text = "ＡＢＣ\u3000１２ ㍻です"  # NFKC: ABC, ' ', 12, 平成: pieces of normalized text, spans into the original
    enc = backend.encode_batch([text])[0]
    pieces = [backend.processor.IdToPiece(i) for i in enc.ids.tolist()]
    covered = [text[s:e] for s, e in enc.spans.tolist()]
    assert list(zip(pieces, covered)) == [
        ("▁", ""), ("<unk>", "ＡＢＣ"), ("▁", "\u3000"), ("<unk>", "１２"), ("▁", " "), ("<unk>", "㍻"),
        ("で", "で"), ("す", "す"),
    ]  # fmt: skip


def test_sentencepiece_converted_to_tokenizer_json_matches_the_model(backends, ja_heldout, tmp_path, monkeypatch):
    """A vocabulary-extension stage may save transformers' tokenizer.json of a SentencePiece model (Metaspace,
    byte fallback, '▁' dummy prefix): the same ids, bytes and spans as the .model itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = tmp_path / "llama2-hf"
    AutoTokenizer.from_pretrained(materialize_dir("tokenizers/llama2")).save_pretrained(folder)
    converted = load_tokenizer(str(folder))
    sp = backends["llama2"]
    assert (converted.name, converted.kind, converted.vocab_size) == ("llama2-hf", "hf", 32000)
    assert converted.token_bytes == sp.token_bytes
    assert np.array_equal(converted.byte_fallback, sp.byte_fallback)
    assert np.array_equal(converted.special, sp.special) and converted.unk_id == sp.unk_id == 0
    texts = ja_heldout[:30] + EDGE_TEXTS
    for text, a, b in zip(texts, converted.encode_batch(texts), sp.encode_batch(texts)):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.spans, b.spans)


@pytest.mark.parametrize(("name", "pattern"), [("llama3", LLAMA3_PATTERN), ("qwen", QWEN_PATTERN)])
def test_tiktoken_patterns_are_the_tokenizer_json_split_regexes(name, pattern):
    config = json.loads((materialize_dir(f"tokenizers/{name}") / "tokenizer.json").read_text(encoding="utf-8"))
    assert config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == pattern


def test_folder_resolution_and_default_names(tmp_path):
    llama3 = materialize_dir("tokenizers/llama3")
    only_ranks = tmp_path / "ranks-only"
    only_ranks.mkdir()
    shutil.copyfile(llama3 / "tokenizer.model", only_ranks / "tokenizer.model")
    backend = load_tokenizer(str(only_ranks))
    assert (backend.kind, backend.name, backend.source) == ("tiktoken", "ranks-only", str(only_ranks))
    one_model = tmp_path / "llm-jp-copy"
    one_model.mkdir()
    shutil.copyfile(materialize_dir("tokenizers/llm-jp") / "tokenizer.model", one_model / "ver3.1.model")
    assert load_tokenizer(str(one_model)).vocab_size == 98452
    qwen_json = materialize_dir("tokenizers/qwen") / "tokenizer.json"
    assert load_tokenizer(str(qwen_json), name="q").name == "q"
    qwen_pattern = load_tokenizer(str(only_ranks / "tokenizer.model"), tiktoken_pattern=QWEN_PATTERN)
    assert qwen_pattern.name == "ranks-only"
    # Qwen's pattern splits digits one by one, LLaMA-3's groups up to three.
    assert len(qwen_pattern.encode_batch(["123456"])[0].ids) == 6
    assert len(backend.encode_batch(["123456"])[0].ids) == 2


def test_unknown_name_is_an_error_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("load_tokenizer tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JpadaptError) as err:
        load_tokenizer("meta-llama/Llama-2-7b-hf")
    assert str(err.value) == (
        "tokenizer 'meta-llama/Llama-2-7b-hf': not a bundled name (llama2, llama3, qwen, llm-jp, mistral) "
        "and no such file or folder"
    )
    with pytest.raises(JpadaptError, match="not a bundled name .* no such file or folder"):
        load_tokenizer(str(tmp_path / "does-not-exist") + "/")


def test_unusable_folders_and_files_are_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(JpadaptError, match=r"empty: no tokenizer.json or tokenizer.model \(it contains: nothing\)"):
        load_tokenizer(str(empty))
    (empty / "config.json").write_text("{}")
    (empty / "weights").mkdir()
    with pytest.raises(JpadaptError, match=r"\(it contains: config.json, weights/\)"):
        load_tokenizer(str(empty))

    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(JpadaptError, match=f"{garbage}: not a tokenizer.json, tiktoken rank file or SentencePiece"):
        load_tokenizer(str(garbage))
    truncated = tmp_path / "tokenizer.json"
    truncated.write_bytes((materialize_dir("tokenizers/qwen") / "tokenizer.json").read_bytes()[:5000])
    with pytest.raises(JpadaptError, match=f"{truncated}: not a valid JSON file"):
        load_tokenizer(str(truncated))
    not_a_tokenizer = tmp_path / "config.json"
    not_a_tokenizer.write_text('{"model_type": "llama"}')
    with pytest.raises(JpadaptError, match=f"{not_a_tokenizer}: not a Hugging Face tokenizer.json"):
        load_tokenizer(str(not_a_tokenizer))
    bad_rank = tmp_path / "bad.tiktoken"
    bad_rank.write_bytes(b"IQ== 0\nIg== 1\nnot base64! 2\n")
    with pytest.raises(JpadaptError, match=f"{bad_rank}:3: not a tiktoken rank line"):
        load_tokenizer(str(bad_rank))
    empty_file = tmp_path / "empty.model"
    empty_file.write_bytes(b"")
    with pytest.raises(JpadaptError, match="the file is empty"):
        load_tokenizer(str(empty_file))
