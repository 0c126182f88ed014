"""Bundled data (data/bundled) and its access module data/assets.py."""

from __future__ import annotations

import hashlib
import json
import lzma
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from data import assets
from pipeline.errors import JpadaptError
from tests.helpers.jsonl import read_jsonl, read_texts

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "data" / "bundled"
MAX_BUNDLE_BYTES = 25 * 1024 * 1024

# Line bytes per (source, genre) of the full shared ja_train.jsonl (10140674 bytes, 592 records).
JA_TRAIN_ORIGINAL = {
    ("aozora", "children"): 832688,
    ("aozora", "criticism"): 542299,
    ("aozora", "essay"): 1316230,
    ("aozora", "fiction"): 2846954,
    ("aozora", "folklore"): 114278,
    ("aozora", "poetry"): 512394,
    ("aozora", "popular_fiction"): 1668056,
    ("e-gov-law (2013 snapshot)", "legal"): 1357045,
    ("wikipedia-ja (via JGLUE JSQuAD v1.3 test contexts)", "encyclopedia"): 366432,
    ("wikipedia-ja (via JGLUE JSQuAD v1.3 valid contexts)", "encyclopedia"): 584298,
}
EN_TRAIN_GENRES = {"children", "drama", "fiction", "nonfiction", "speech"}

# sha256 of the full source files in shared/data/SOURCES.md: these must be bundled whole.
FULL_COPIES = {
    "corpus/ja_heldout.jsonl": "fa2fdf8ad16fd8412cc2184735ce8197cdf81fd42f9e15248749ebbe8ab66e06",
    "corpus/en_heldout.jsonl": "ba15a43cc84282918afb441189a0c6e2fcec88a7bb2f69195f2a9d1109932a9a",
    "eval/jglue/jcommonsenseqa-v1.3/train-v1.3.json": "9b55fae5ecb3aedd6f8ce5bc09196c3b629864668ec6c18eee4d65c0aa48229e",
    "eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json": "0d8d76f3bfa0d174866939882faccdd01fbc2bcd5a76c43748ba0c40a7b3b8d4",
    "eval/jglue/jnli-v1.3/valid-v1.3.json": "ca0353efc7c2eebfb6de4e13f16295053c8b1ee65e7b0849190c90426fbc495f",
    "instruct/ja_instruct_heldout.jsonl": "6de7ed49c0e2f3ef088fe7411217be0c1a5eff155a79216ba3fbc643c1ffe9ec",
    "tokenizers/qwen/tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizers/llama3/tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    # GitHub openai/grade-school-math @3101c7d5 grade_school_math/data/test.jsonl, copied byte for byte
    "eval/gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}

# Evaluation sets built by make_bundle.py from GitHub snapshots: records and field order (Hugging Face layouts).
EVAL_SETS = {
    "eval/jglue/jsquad-v1.3/valid-v1.3.jsonl": (4442, ["id", "title", "context", "question", "answers", "is_impossible"]),
    "eval/mgsm/mgsm_ja.jsonl": (250, ["question", "answer", "answer_number", "equation_solution"]),
    "eval/mgsm/mgsm_ja_train.jsonl": (8, ["question", "answer", "answer_number", "equation_solution"]),
    "eval/gsm8k/test.jsonl": (1319, ["question", "answer"]),
    "eval/gsm8k/train_fewshot.jsonl": (250, ["question", "answer"]),
    "eval/xwinograd/xwinograd_ja.jsonl": (959, ["sentence1", "sentence2", "answer"]),
    "eval/xwinograd/xwinograd_en.jsonl": (2325, ["sentence", "option1", "option2", "answer"]),
    "eval/hellaswag/hellaswag_val.jsonl": (1000, ["ind", "query", "choices", "label"]),
    "eval/arc/arc_easy_test.jsonl": (2376, ["id", "question", "choices", "answerKey"]),
    "eval/arc/arc_challenge_test.jsonl": (1172, ["id", "question", "choices", "answerKey"]),
    "eval/openbookqa/openbookqa_test.jsonl": (500, ["id", "question_stem", "choices", "answerKey"]),
}
EVAL_LICENSES = {
    "eval/mgsm/LICENSE": "Creative Commons Attribution 4.0 International",
    "eval/gsm8k/LICENSE": "Copyright (c) 2021 OpenAI",
    "eval/xwinograd/LICENSE": "Apache License",
    "eval/hellaswag/LICENSE": "Copyright (c) 2019 Rowan Zellers",
    "eval/arc/LICENSE": "Attribution-ShareAlike 4.0 International",
    "eval/openbookqa/LICENSE": "Apache License",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JPADAPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest() -> dict[str, dict]:
    return json.loads((BUNDLE / "MANIFEST.json").read_text(encoding="utf-8"))["files"]


def jsonl(path: Path) -> list[dict]:
    return read_jsonl(path)


def test_manifest_lists_stored_files_and_bundle_is_small() -> None:
    files = manifest()
    assert assets.bundled_names() == sorted(files) and len(files) == 19 + len(EVAL_SETS)  # + eval/prompts.jsonl
    for name, entry in files.items():
        assert entry["stored"] in (name, name + ".xz")
        assert assets.stored_path(name) == BUNDLE / entry["stored"]
        assert assets.stored_path(name).is_file(), name
    text = (BUNDLE / "MANIFEST.json").read_text(encoding="utf-8")
    assert text == json.dumps({"files": files}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    total = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert total <= MAX_BUNDLE_BYTES


def test_full_copies_are_the_shared_originals() -> None:
    files = manifest()
    for name, sha in FULL_COPIES.items():
        assert files[name]["sha256"] == sha, name


def test_uncompressed_stored_files_match_manifest() -> None:
    for name, entry in manifest().items():
        if not entry["stored"].endswith(".xz"):
            path = assets.materialize(name)
            assert path == assets.stored_path(name)
            assert path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"], name


def test_license_notices_beside_llama_files() -> None:
    llama2 = "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc."
    llama3 = "Meta Llama 3 is licensed under the Meta Llama 3 Community License, Copyright"
    assert llama2 in (BUNDLE / "tokenizers/llama2/NOTICE").read_text(encoding="utf-8")
    assert llama3 in (BUNDLE / "tokenizers/llama3/NOTICE").read_text(encoding="utf-8")
    for folder in ("llama2", "llama3", "qwen", "llm-jp", "mistral"):
        assert (BUNDLE / "tokenizers" / folder / "LICENSE").stat().st_size > 5000, folder


def test_materialize_decompresses_verifies_and_reuses(cache: Path) -> None:
    name = "corpus/ja_heldout.jsonl"
    entry = manifest()[name]
    path = assets.materialize(name)
    assert path.name == "ja_heldout.jsonl" and path.is_relative_to(cache)
    assert path.parent.name == entry["sha256"][:16]
    assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
    mtime = path.stat().st_mtime_ns
    assert assets.materialize(name) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["ja_heldout.jsonl"]  # no temp files left


def test_cache_dir_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JPADAPT_CACHE", str(tmp_path / "a"))
    assert assets.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("JPADAPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "jpadapt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "jpadapt"


def test_cached_file_of_wrong_size_is_rebuilt(cache: Path) -> None:
    name = "eval/jglue/jnli-v1.3/valid-v1.3.json"
    path = assets.materialize(name)
    path.write_bytes(b'{"truncated": ')
    assert assets.materialize(name) == path
    assert sha256_file(path) == manifest()[name]["sha256"]


def _bad_xz_bytes(good: bytes) -> bytes:
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def _other_content(good: bytes) -> bytes:
    # A valid xz stream whose content differs by one byte: only the sha256 check can catch it.
    data = bytearray(lzma.decompress(good))
    data[100] ^= 0x01
    return lzma.compress(bytes(data))


@pytest.mark.parametrize("corrupt", [_bad_xz_bytes, _other_content])
def test_corrupt_stored_file_raises(corrupt, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json"
    root = tmp_path / "bundled"
    stored = root / manifest()[name]["stored"]
    stored.parent.mkdir(parents=True)
    shutil.copyfile(BUNDLE / "MANIFEST.json", root / "MANIFEST.json")
    stored.write_bytes(corrupt((BUNDLE / manifest()[name]["stored"]).read_bytes()))
    monkeypatch.setattr(assets, "ASSET_ROOT", root)
    with pytest.raises(JpadaptError, match="valid-v1.3.json"):
        assets.materialize(name)
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []


def test_unknown_names_suggest_close_ones(cache: Path) -> None:
    with pytest.raises(JpadaptError, match="corpus/ja_train.jsonl"):
        assets.materialize("corpus/ja_train.json")
    with pytest.raises(JpadaptError, match="tokenizers/qwen"):
        assets.materialize_dir("tokenizers/qwne")
    with pytest.raises(JpadaptError, match="unknown"):
        assets.stored_path("nothing-like-it")


def test_materialize_dir_qwen_loads_with_tokenizers(cache: Path) -> None:
    from tokenizers import Tokenizer

    folder = assets.materialize_dir("tokenizers/qwen")
    assert folder.name.startswith("tokenizers__qwen-") and folder.parent == cache / "assets" / "dirs"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = folder / "tokenizer_config.json"
    assert sha256_file(config) == manifest()["tokenizers/qwen/tokenizer_config.json"]["sha256"]
    # a copy, not a link: writing into the folder must not touch the checked-in file
    assert not config.samefile(assets.stored_path("tokenizers/qwen/tokenizer_config.json"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "吾輩は猫である。"
    assert tok.decode(tok.encode(text).ids) == text
    assert assets.materialize_dir("tokenizers/qwen/") == folder


def test_materialize_dir_repairs_incomplete_folder(cache: Path) -> None:
    folder = assets.materialize_dir("tokenizers/llama3")
    (folder / "tokenizer.model").unlink()
    assert assets.materialize_dir("tokenizers/llama3") == folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp or old folders


def test_llama3_tiktoken_rank_file(cache: Path) -> None:
    lines = assets.materialize("tokenizers/llama3/tokenizer.model").read_bytes().splitlines()
    assert len(lines) == 128000
    assert [int(line.split()[1]) for line in (lines[0], lines[-1])] == [0, 127999]


@pytest.mark.parametrize(
    "name, size",
    [("tokenizers/llama2/tokenizer.model", 32000), ("tokenizers/mistral/tokenizer.model", 32000),
     ("tokenizers/llm-jp/tokenizer.model", 98452)],
)
def test_sentencepiece_models(name: str, size: int) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(assets.materialize(name)))
    assert sp.get_piece_size() == size
    text = "吾輩は猫である。名前はまだ無い。"
    assert sp.decode(sp.encode(text)) == text


def test_ja_train_sample_keeps_every_source_and_genre(cache: Path) -> None:
    path = assets.materialize("corpus/ja_train.jsonl")
    sizes: dict[tuple[str, str], int] = defaultdict(int)
    with path.open("rb") as f:
        for line in f:
            rec = json.loads(line)
            assert rec["text"] and rec["id"]
            sizes[(rec["source"], rec["genre"])] += len(line)
    assert set(sizes) == set(JA_TRAIN_ORIGINAL)
    total, original = sum(sizes.values()), sum(JA_TRAIN_ORIGINAL.values())
    assert 2_500_000 <= total <= 3_500_000
    for key, size in JA_TRAIN_ORIGINAL.items():
        assert abs(sizes[key] / total - size / original) < 0.02, key


def test_en_train_sample_keeps_whole_documents(cache: Path) -> None:
    recs = jsonl(assets.materialize("corpus/en_train.jsonl"))
    parts: dict[str, list[int]] = defaultdict(list)
    order: list[str] = []
    for rec in recs:
        if not order or order[-1] != rec["id"]:
            assert rec["id"] not in parts, f"{rec['id']} is not contiguous"
            order.append(rec["id"])
        parts[rec["id"]].append(rec["part"])
        assert rec["n_parts"] == len([r for r in recs if r["id"] == rec["id"]])
    assert all(p == list(range(len(p))) for p in parts.values())
    assert {rec["genre"] for rec in recs} == EN_TRAIN_GENRES
    assert any(len(p) > 1 for p in parts.values())


def test_en_pretrain_is_the_rest_of_the_english_train_file(cache: Path) -> None:
    """bench/forgetting.py pretrains on en_train + en_pretrain: together the whole source file, no record twice,
    nothing from the held-out side."""
    train = assets.materialize("corpus/en_train.jsonl").read_bytes().splitlines()
    rest = assets.materialize("corpus/en_pretrain.jsonl").read_bytes().splitlines()
    heldout_ids = {json.loads(line)["id"] for line in assets.materialize("corpus/en_heldout.jsonl").read_bytes().splitlines()}
    assert not set(train) & set(rest)
    assert len(train) + len(rest) == 87
    assert not {json.loads(line)["id"] for line in rest} & heldout_ids
    assert {json.loads(line)["id"] for line in rest}.isdisjoint({json.loads(line)["id"] for line in train})


@pytest.mark.parametrize("name", sorted(EVAL_SETS))
def test_eval_sets_records_and_fields(name: str) -> None:
    count, fields = EVAL_SETS[name]
    assert manifest()[name]["stored"] == name + ".xz"
    recs = jsonl(assets.stored_path(name))
    assert len(recs) == count
    assert all(list(rec) == fields for rec in recs)
    for rec in recs:
        for field in fields:
            if field not in ("answers", "choices", "ind", "label", "answer_number", "is_impossible", "answer",
                             "equation_solution"):
                assert isinstance(rec[field], str) and rec[field], (name, field)


def test_eval_licenses_and_notices() -> None:
    for path, text in EVAL_LICENSES.items():
        assert text in (BUNDLE / path).read_text(encoding="utf-8"), path
    for folder in ("hellaswag", "xwinograd", "mgsm", "arc", "openbookqa"):
        assert (BUNDLE / "eval" / folder / "NOTICE").stat().st_size > 500, folder


def test_jsquad_valid_answers_sit_at_answer_start() -> None:
    recs = jsonl(assets.stored_path("eval/jglue/jsquad-v1.3/valid-v1.3.jsonl"))
    assert len({rec["id"] for rec in recs}) == len(recs)
    for rec in recs:
        # JGLUE's context form is "title [SEP] paragraph"; answer_start counts from its beginning.
        assert rec["context"].startswith(rec["title"] + " [SEP] ")
        assert rec["is_impossible"] is False and rec["question"]
        answers = rec["answers"]
        assert list(answers) == ["text", "answer_start"] and answers["text"]
        assert len(answers["text"]) == len(answers["answer_start"])
        for text, start in zip(answers["text"], answers["answer_start"]):
            assert isinstance(start, int) and rec["context"][start:start + len(text)] == text, rec["id"]


def test_jsquad_valid_paragraphs_in_corpus_as_documented() -> None:
    """SOURCES.md: 357 of the 1145 JSQuAD valid paragraphs (1369 of 4442 questions) occur verbatim in the bundled
    Japanese corpus: 356 in ja_train, which holds 22 of JSQuAD valid's 59 articles, and one boilerplate line in
    ja_heldout. JSQuAD scores of a model trained on ja_train are contaminated."""
    recs = jsonl(assets.stored_path("eval/jglue/jsquad-v1.3/valid-v1.3.jsonl"))
    train = "\0".join(read_texts("corpus/ja_train.jsonl"))
    heldout = "\0".join(read_texts("corpus/ja_heldout.jsonl"))
    paragraph = {rec["id"]: rec["context"].split(" [SEP] ", 1)[1] for rec in recs}
    paragraphs = set(paragraph.values())
    in_train = {p for p in paragraphs if p in train}
    in_heldout = {p for p in paragraphs if p in heldout}
    assert (len(in_train), len(in_heldout), len(in_train | in_heldout), len(paragraphs)) == (356, 1, 357, 1145)
    assert in_heldout == {"企業・団体の名称、個人の肩書は当時のもの。出典："}
    assert sum(p in in_train | in_heldout for p in paragraph.values()) == 1369
    assert len({rec["title"] for rec in recs if paragraph[rec["id"]] in in_train}) == 22


def test_mgsm_ja_test_and_exemplars() -> None:
    test = jsonl(assets.stored_path("eval/mgsm/mgsm_ja.jsonl"))
    assert all(rec["answer"] is None and rec["equation_solution"] is None for rec in test)
    assert all(type(rec["answer_number"]) is int for rec in test)
    assert test[0]["answer_number"] == 18 and max(rec["answer_number"] for rec in test) == 276000
    train = jsonl(assets.stored_path("eval/mgsm/mgsm_ja_train.jsonl"))
    assert [rec["answer_number"] for rec in train] == [11, 29, 39, 9, 33, 8, 8, 5]
    for rec in train:
        assert rec["question"].startswith("問題：") and rec["answer"].startswith("ステップごとの答え：")
        last = re.findall(r"\d+", rec["answer"])[-1]
        assert type(rec["answer_number"]) is int and rec["answer_number"] == int(last), rec["answer"]
        assert isinstance(rec["equation_solution"], str) and rec["equation_solution"].endswith(f"= {last}.")
    assert not {rec["question"] for rec in train} & {rec["question"] for rec in test}


def test_gsm8k_test_and_fewshot_pool() -> None:
    test = jsonl(assets.stored_path("eval/gsm8k/test.jsonl"))
    pool = jsonl(assets.stored_path("eval/gsm8k/train_fewshot.jsonl"))
    for rec in test + pool:
        assert re.search(r"\n#### -?[\d,.]+$", rec["answer"]), rec["answer"][-40:]
    assert test[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert pool[0]["question"].startswith("Natalia sold clips to 48 of her friends in April")
    assert not {rec["question"] for rec in pool} & {rec["question"] for rec in test}


def _differing_spans(a: str, b: str) -> tuple[str, str, str, str]:
    """(common prefix, part of a, part of b, common suffix)."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return a[:i], a[i:len(a) - j], b[i:len(b) - j], a[len(a) - j:]


def test_xwinograd_ja_pairs_differ_only_in_the_substituted_mention() -> None:
    recs = jsonl(assets.stored_path("eval/xwinograd/xwinograd_ja.jsonl"))
    for rec in recs:
        prefix, one, two, suffix = _differing_spans(rec["sentence1"], rec["sentence2"])
        assert one and two and len(one) <= 20 and len(two) <= 20, rec
        # The differing parts are the two candidates (less any shared edge), both mentioned in the shared text.
        assert one in prefix + "\0" + suffix and two in prefix + "\0" + suffix, rec
        assert rec["answer"] in ("1", "2")
    assert 400 < sum(rec["answer"] == "1" for rec in recs) < 560


def test_xwinograd_en_blank_and_options() -> None:
    recs = jsonl(assets.stored_path("eval/xwinograd/xwinograd_en.jsonl"))
    assert all(rec["sentence"].count("_") == 1 and rec["answer"] in ("1", "2") for rec in recs)
    assert all(re.search(r"(?<!\w)_(?!\w)", rec["sentence"]) for rec in recs)  # "_" stands for whole words
    first = recs[0]
    assert first["sentence"] == "The city councilmen refused the demonstrators a permit because _ feared violence."
    assert (first["option1"], first["option2"], first["answer"]) == ("The city councilmen", "the demonstrators", "1")
    # The options are spans of the sentence, except one row whose second candidate contains the pronoun itself.
    outside = [rec for rec in recs if rec["option1"] not in rec["sentence"] or rec["option2"] not in rec["sentence"]]
    assert [rec["option2"] for rec in outside] == ["their mothers"]


def test_hellaswag_sample() -> None:
    recs = jsonl(assets.stored_path("eval/hellaswag/hellaswag_val.jsonl"))
    inds = [rec["ind"] for rec in recs]
    assert inds == sorted(set(inds)) and 0 <= inds[0] and inds[-1] < 10042
    assert inds == sorted(random.Random(20261124).sample(range(10042), 1000))
    for rec in recs:
        assert type(rec["label"]) is int and rec["label"] in range(4)
        assert len(rec["choices"]) == 4 and all(isinstance(c, str) and c for c in rec["choices"])
        assert ": " in rec["query"] and rec["query"] == rec["query"].strip()
    assert all(sum(rec["label"] == k for rec in recs) > 200 for k in range(4))
