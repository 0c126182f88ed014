"""The prepare library: readers, normalization, Japanese ratio, dedup, split, shards, stats, errors, memory."""

from __future__ import annotations

import gzip
import json
import lzma
import random
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data.dedup import SHINGLE_BLOCK, banding, character_shingles, minhash, signature_parameters
from data.prepare import RULES, ShardWriter, heldout_by_hash, prepare_language
from data.readers import SKIP_KINDS, iter_documents
from data.seed import set_seed
from data.text import japanese_ratio, normalize
from pipeline.config import CorpusConfig, PrepareConfig
from pipeline.errors import JpadaptError
from tests.helpers.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
KANA = [chr(c) for c in range(0x3041, 0x3097)]
KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def corpus(**overrides) -> CorpusConfig:
    return CorpusConfig(train=["unused"], **overrides)


def options(**overrides) -> PrepareConfig:
    """Prepare settings; one worker (tasks run in this process) unless a test asks for more."""
    dedup = overrides.pop("dedup", {})
    overrides.setdefault("workers", 1)
    return PrepareConfig(**overrides, dedup={**PrepareConfig().dedup.model_dump(), **dedup})


def japanese_text(rng: random.Random, chars: int) -> str:
    """Random kana/kanji sentences: unique texts that pass the Japanese-ratio filter and share few 5-grams."""
    sentences = []
    while sum(map(len, sentences)) < chars:
        sentences.append("".join(rng.choices(KANA + KANJI, k=rng.randint(15, 40))) + "。")
    return "".join(sentences)[:chars]


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n"
                     for record in records)
    return path


def read_docs(path: Path, on_error: str = "fail", **corpus_fields) -> tuple[list, Counter]:
    skipped: Counter = Counter()
    return list(iter_documents(path, corpus(**corpus_fields), on_error, skipped)), skipped


def read_split(out: Path, lang: str, split: str) -> list[dict]:
    return read_jsonl(*sorted((out / lang).glob(f"{split}-*.jsonl")))


# --------------------------------------------------------------------------------------------- readers


def test_jsonl_reader_yields_text_other_fields_and_origin(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "\xe4\xb8\x80", "id": 7, "meta": {"a": 1}}\n\n  \n{"text": "two", "x": null}\n'
    )
    docs, skipped = read_docs(path)
    assert [(d.text, d.fields, d.origin) for d in docs] == [
        ("一", {"id": 7, "meta": {"a": 1}}, f"{path}:1"),
        ("two", {"x": None}, f"{path}:4"),
    ]
    assert not skipped


@pytest.mark.parametrize(
    "suffix, opener", [(".jsonl.gz", gzip.open), (".json.xz", lzma.open), (".JSONL.GZ", gzip.open),
                       (".jsonl.zst", zstandard.open)]
)
def test_compressed_jsonl_is_decompressed_while_streaming(tmp_path, suffix, opener):
    path = tmp_path / f"c{suffix}"
    with opener(path, "wt", encoding="utf-8") as f:
        f.write('{"text": "あ"}\n{"text": "い", "id": "b"}\n')
    docs, _ = read_docs(path)
    assert [(d.text, d.origin) for d in docs] == [("あ", f"{path}:1"), ("い", f"{path}:2")]


def test_custom_text_field_and_explicit_format(tmp_path):
    path = write_jsonl(tmp_path / "c.data", [{"content": "本文", "text": "other"}])
    docs, _ = read_docs(path, text_field="content", format="jsonl")
    assert docs[0].text == "本文" and docs[0].fields == {"text": "other"}


TEXT_FILE = "first para\r\nstill first\r\n\r\n\r\nsecond para\n  \nthird\n"


@pytest.mark.parametrize(
    "unit, expected",
    [
        ("paragraph", [("first para\r\nstill first", 1), ("second para", 5), ("third", 7)]),
        ("line", [("first para", 1), ("still first", 2), ("second para", 5), ("third", 7)]),
        ("file", [(TEXT_FILE.rstrip("\n"), 1)]),
    ],
)
def test_text_units(tmp_path, unit, expected):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT_FILE.encode())
    docs, _ = read_docs(path, text_unit=unit)
    assert [(d.text, d.origin) for d in docs] == [(text, f"{path}:{line}") for text, line in expected]
    assert all(d.fields == {} for d in docs)


def test_text_xz(tmp_path):
    path = tmp_path / "t.txt.xz"
    with lzma.open(path, "wb") as f:
        f.write("段落一\n\n段落二\n".encode())
    assert [d.text for d in read_docs(path)[0]] == ["段落一", "段落二"]


def test_parquet_reader(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({"id": ["a", "b", "c"], "text": ["一", None, "三"], "n": [1, 2, 3]})
    pq.write_table(table, path, row_group_size=2)
    with pytest.raises(JpadaptError, match=r'p\.parquet:row 2: "text" is null, not a string'):
        read_docs(path)
    docs, skipped = read_docs(path, on_error="skip")
    assert [(d.text, d.fields, d.origin) for d in docs] == [
        ("一", {"id": "a", "n": 1}, f"{path}:row 1"),
        ("三", {"id": "c", "n": 3}, f"{path}:row 3"),
    ]
    assert skipped == Counter(text_not_string=1)


def test_parquet_without_text_column_lists_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(JpadaptError, match=r'p\.parquet: no "text" column \(columns: body, id\)'):
        read_docs(path)


@pytest.mark.parametrize(
    "line, kind, message",
    [
        ('{"text": "a" "b"}', "invalid_json", "invalid JSON: Expecting ',' delimiter"),
        (b'{"text": "ok \xff"}', "not_utf8", "not valid UTF-8 (byte 14 of the line"),
        ('{"body": "a", "id": 1}', "missing_text", 'no "text" field (fields: body, id)'),
        ('["text"]', "not_an_object", "expected a JSON object, got an array"),
        ('{"text": 5}', "text_not_string", '"text" is a number, not a string'),
        ('{"text": "bad \\ud800 half"}', "not_utf8", "not valid Unicode"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, kind, message):
    path = tmp_path / "corpus.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(b'{"text": "good"}\n' + raw + b"\n")
    with pytest.raises(JpadaptError) as error:
        read_docs(path)
    assert str(error.value).startswith(f"{path}:2: {message}")
    assert "\n" not in str(error.value)
    docs, skipped = read_docs(path, on_error="skip")
    assert [d.text for d in docs] == ["good"] and skipped == Counter({kind: 1})


def test_surrogate_pairs_are_fine(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ['{"text": "emoji \\ud83d\\ude00"}'])
    assert read_docs(path)[0][0].text == "emoji \U0001f600"


def test_skip_mode_counts_each_kind(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'{"text": "keep 1"}\n{bad\n{"x": 1}\n\xfe\xff\n3\n{"text": null}\n{"text": "keep 2"}\n{"text": [1]}\n[]\n'
    )
    docs, skipped = read_docs(path, on_error="skip")
    assert [d.origin.rsplit(":", 1)[1] for d in docs] == ["1", "7"]
    assert skipped == Counter(invalid_json=1, missing_text=1, not_utf8=1, not_an_object=2, text_not_string=2)


def test_non_utf8_text_file_names_file_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("一行目\n二行目\n".encode() + b"bad \x80 byte\n")
    with pytest.raises(JpadaptError, match=r"t\.txt:3: not valid UTF-8 \(byte 5 of the line"):
        read_docs(path)
    docs, skipped = read_docs(path, on_error="skip", text_unit="line")
    assert [d.text for d in docs] == ["一行目", "二行目"] and skipped == Counter(not_utf8=1)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(JpadaptError, match=r"missing\.jsonl: cannot open: No such file"):
        read_docs(tmp_path / "missing.jsonl")
    with pytest.raises(JpadaptError, match=r"c\.csv: cannot tell the format .*supported: \.jsonl, \.json, \.txt"):
        read_docs(tmp_path / "c.csv")
    with pytest.raises(JpadaptError, match=r"Parquet files cannot be \.gz-compressed"):
        read_docs(tmp_path / "p.parquet.gz")
    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-30])
    with pytest.raises(JpadaptError, match=r"c\.jsonl\.gz: cannot read line \d+ \(corrupt or truncated"):
        read_docs(corrupt)
    corrupt_zst = tmp_path / "c.jsonl.zst"
    corrupt_zst.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 100)[:-30])
    with pytest.raises(JpadaptError, match=r"c\.jsonl\.zst: cannot read line \d+ \(corrupt or truncated"):
        read_docs(corrupt_zst)
    not_parquet = tmp_path / "n.parquet"
    not_parquet.write_bytes(b"not parquet")
    with pytest.raises(JpadaptError, match=r"n\.parquet: not a readable Parquet file"):
        read_docs(not_parquet)


# --------------------------------------------------------------------------------------------- text


def test_normalize():
    assert normalize("ＡＢＣ１２３", "NFKC") == "ABC123"
    assert normalize("ｶﾀｶﾅ", "NFKC") == "カタカナ"
    assert normalize("  a\r\nb\rc\n\n", "NFKC") == "a\nb\nc"
    assert normalize("ＡＢＣ\r\nｶﾀ", "none") == "ＡＢＣ\nｶﾀ"
    assert normalize("ｶﾞ", "NFC") == "ｶﾞ"  # NFC keeps compatibility characters
    assert normalize("が", "NFD") == "か\u3099"
    assert normalize("a  b\n\n\nc", "NFKC") == "a  b\n\n\nc"  # inner whitespace untouched


@pytest.mark.parametrize(
    "text, ratio",
    [
        ("あいう abc", 3 / 6),
        ("漢字カナ、。", 1.0),
        ("ｶﾀｶﾅ ー々〆〇", 1.0),
        ("abc", 0.0),
        ("", 0.0),
        (" \n\u3000\t", 0.0),  # no visible character at all
        ("\u3000あ a", 0.5),  # the ideographic space is whitespace: it counts on neither side
        ("㐀豈ㇰ1", 3 / 4),  # ext A, compatibility ideograph, phonetic extension
        ("한국어漢", 1 / 4),  # Hangul is not Japanese
    ],
)
def test_japanese_ratio(text, ratio):
    assert japanese_ratio(text) == pytest.approx(ratio)


# --------------------------------------------------------------------------------------------- dedup


def test_character_shingles_hash_every_ngram():
    text = "あいうえおあいうえおか"
    distinct = {text[i : i + 5] for i in range(len(text) - 4)}
    shingles = character_shingles(text, 5)
    assert len(shingles) == len(text) - 4 and len(set(shingles.tolist())) == len(distinct) == 6
    assert len(character_shingles("あい", 5)) == 1  # shorter than the n-gram: the whole text is one shingle
    assert not set(character_shingles("あいう", 3)) & set(character_shingles("あいえ", 3))


def near_dup_case(seed: int = 0) -> tuple[str, str, str]:
    """A ~2 KB Japanese text, the same with its last sentence rewritten, and an unrelated text."""
    rng = random.Random(seed)
    original = japanese_text(rng, 700)  # 700 kana/kanji = 2,100 UTF-8 bytes
    changed = original[: original.rstrip("。").rfind("。") + 1] + "最後の文だけを書き換えました。"
    return original, changed, japanese_text(rng, 700)


def jaccard(a: str, b: str, n: int = 5) -> float:
    grams = [{text[i : i + n] for i in range(len(text) - n + 1)} for text in (a, b)]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


def test_minhash_estimates_jaccard_and_is_seeded():
    original, changed, unrelated = near_dup_case()
    a, b = signature_parameters(256, seed=1)
    sketch = {name: minhash(character_shingles(text, 5), a, b) for name, text in
              (("original", original), ("changed", changed), ("unrelated", unrelated))}
    assert abs(np.mean(sketch["original"] == sketch["changed"]) - jaccard(original, changed)) < 0.08
    assert np.mean(sketch["original"] == sketch["unrelated"]) < 0.05
    again = minhash(character_shingles(changed, 5), *signature_parameters(256, seed=1))
    other = minhash(character_shingles(changed, 5), *signature_parameters(256, seed=2))
    assert (again == sketch["changed"]).all() and not (other == sketch["changed"]).all()


def test_minhash_of_a_long_text_is_computed_in_blocks():
    text = japanese_text(random.Random(1), 3 * SHINGLE_BLOCK)
    a, b = signature_parameters(64, seed=3)
    shingles = character_shingles(text, 5)
    whole = ((shingles[:, None] * a + b) >> np.uint64(32)).min(axis=0).astype(np.uint32)
    assert len(shingles) > SHINGLE_BLOCK and (minhash(shingles, a, b) == whole).all()


@pytest.mark.parametrize("threshold, num_perm, expected", [(0.8, 128, (14, 9)), (1.0, 128, None), (0.05, 16, None)])
def test_banding_weights_misses_over_wasted_checks(threshold, num_perm, expected):
    band = banding(threshold, num_perm)
    assert band.bands >= 2 and band.hashes <= num_perm
    if expected:
        assert (band.bands, band.rows) == expected


# --------------------------------------------------------------------------------------------- prepare


def test_prepare_filters_dedups_and_counts(tmp_path):
    original, changed, unrelated = near_dup_case()
    records = [
        {"text": original, "id": "o", "genre": "fiction"},
        {"text": "  " + original + "\r\n", "id": "o-copy"},  # the same after normalization
        {"text": changed},
        {"text": unrelated, "id": "u"},
        {"text": "短い。"},
        {"text": "English text that is long enough to pass the length filter, but not Japanese."},
        {"text": " \n "},
        {"text": "長" * 801},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    opts = options(max_chars=800, heldout_fraction=0.5)
    # Neither split may be empty, and the copies go where "o" goes: across splits the held-out copy would stay.
    seed = next(s for s in range(1000) if _both_splits(["o", "u"], s, 0.5) and _same_split(["o", "o-copy", changed], s, 0.5))
    stats = prepare_language("ja", corpus(), [path], [], opts, seed, tmp_path / "out")
    assert stats["removed"] == {
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "low_japanese_ratio": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert stats["input"] == {"files": [{"name": "c.jsonl", "split": "train", "records": 8}], "records": 8}
    assert stats["duplicate_examples"] == {
        "exact_duplicate": [{"document": "c.jsonl:2", "duplicate_of": "c.jsonl:1"}],
        "near_duplicate": [{"document": "c.jsonl:3", "duplicate_of": "c.jsonl:1"}],
    }
    kept = read_split(tmp_path / "out", "ja", "train") + read_split(tmp_path / "out", "ja", "heldout")
    assert sorted(r["id"] for r in kept) == ["o", "u"]
    assert next(r for r in kept if r["id"] == "o") == {"id": "o", "genre": "fiction", "text": original}
    splits = stats["splits"]
    assert splits["train"]["documents"] + splits["heldout"]["documents"] == 2
    assert splits["train"]["chars"] + splits["heldout"]["chars"] == len(original) + len(unrelated)


def kept_texts(out: Path) -> list[str]:
    return [r["text"] for split in ("train", "heldout") for r in read_split(out, "ja", split)]


def test_near_duplicates_are_verified_against_the_threshold(tmp_path):
    # The two texts share about half their 5-grams: a match at threshold 0.2, none at 0.9.
    rng = random.Random(3)
    shared, a_rest, b_rest = (japanese_text(rng, 400) for _ in range(3))
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": shared + a_rest}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": shared + b_rest}, {"text": japanese_text(rng, 400)}])
    for threshold, removed in ((0.2, 1), (0.9, 0)):
        out = tmp_path / f"t{threshold}"
        stats = prepare_language("ja", corpus(), [train], [held], options(dedup={"threshold": threshold}), 1, out)
        assert stats["removed"]["near_duplicate"] == removed
        assert stats["decontamination"]["near_duplicate_of_heldout"] == removed
        assert shared + a_rest in kept_texts(out)  # the held-out document always stays


@pytest.mark.parametrize("threshold, num_perm, seed", [(1.0, 128, 1), (0.99, 16, 2**40), (0.05, 1024, 0)])
def test_near_dedup_accepts_every_valid_setting(tmp_path, threshold, num_perm, seed):
    original, _, unrelated = near_dup_case()
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": original}, {"text": original}, {"text": unrelated}])
    held = write_jsonl(tmp_path / "h.jsonl", [{"text": japanese_text(random.Random(5), 700)}])
    opts = options(dedup={"exact": False, "threshold": threshold, "num_perm": num_perm})
    stats = prepare_language("ja", corpus(), [path], [held], opts, seed, tmp_path / "out")
    assert stats["removed"]["near_duplicate"] == 1
    assert set(kept_texts(tmp_path / "out")) >= {original, unrelated}


def _same_split(keys: list[str], seed: int, fraction: float) -> bool:
    return len({heldout_by_hash(key, seed, fraction) for key in keys}) == 1


def _both_splits(keys: list[str], seed: int, fraction: float) -> bool:
    return len({heldout_by_hash(key, seed, fraction) for key in keys}) == 2


def test_prepare_keeps_non_japanese_for_other_languages(tmp_path):
    path = write_jsonl(tmp_path / "en.jsonl", [{"text": f"English document number {i} " * 5} for i in range(40)])
    opts = options(heldout_fraction=0.3, dedup={"near": False})
    stats = prepare_language("en", corpus(), [path], [], opts, 1, tmp_path)
    assert stats["removed"]["low_japanese_ratio"] == 0
    assert stats["splits"]["train"]["documents"] + stats["splits"]["heldout"]["documents"] == 40


def test_output_record_layout(tmp_path):
    rng = random.Random(5)
    texts = [japanese_text(rng, 80) for _ in range(2)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"content": texts[0], "source": "s", "text": "old"}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"content": texts[1], "id": 5}])
    prepare_language("ja", corpus(text_field="content"), [train], [held], options(), 1, tmp_path / "out")
    assert read_split(tmp_path / "out", "ja", "train") == [{"id": "train.jsonl:1", "source": "s", "text": texts[0]}]
    assert read_split(tmp_path / "out", "ja", "heldout") == [{"id": 5, "text": texts[1]}]
    raw = (tmp_path / "out" / "ja" / "train-00001-00000.jsonl").read_bytes()  # file 1: held-out files come first
    assert texts[0].encode() in raw and raw.endswith(b"}\n") and b"\r" not in raw  # UTF-8, not \u escapes


def test_decontamination_removes_train_copies_of_heldout_documents(tmp_path):
    rng = random.Random(11)
    held_texts = [japanese_text(rng, 300) for _ in range(3)]
    train_texts = [japanese_text(rng, 300) for _ in range(3)]
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in held_texts])
    train_records = [{"text": t} for t in train_texts]
    near_copy = held_texts[1][:-5] + "違う文末。"
    train_records += [{"text": held_texts[0]}, {"text": near_copy}, {"text": train_texts[0]}]
    train = write_jsonl(tmp_path / "train.jsonl", train_records)
    stats = prepare_language("ja", corpus(), [train], [held], options(), 1, tmp_path / "out")
    assert stats["heldout_source"] == "files"
    assert [f["name"] for f in stats["input"]["files"]] == ["held.jsonl", "train.jsonl"]
    assert stats["removed"]["exact_duplicate"] == 2 and stats["removed"]["near_duplicate"] == 1
    assert stats["decontamination"] == {"exact_duplicate_of_heldout": 1, "near_duplicate_of_heldout": 1}
    assert [r["text"] for r in read_split(tmp_path / "out", "ja", "train")] == train_texts
    assert [r["text"] for r in read_split(tmp_path / "out", "ja", "heldout")] == held_texts


def split_assignment(tmp_path: Path, path: Path, seed: int, name: str, **opts) -> dict[str, str]:
    out = tmp_path / name
    prepare_language("ja", corpus(), [path], [], options(min_chars=5, dedup={"near": False}, **opts), seed, out)
    return {r["text"]: split for split in ("train", "heldout") for r in read_split(out, "ja", split)}


def test_hash_split_is_deterministic_seeded_and_keeps_ids_together(tmp_path):
    records = [{"text": f"文書その{i}番の本文です。", "id": f"book{i // 4}"} for i in range(2000)]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    first = split_assignment(tmp_path, path, 1, "a", heldout_fraction=0.2)
    assert first == split_assignment(tmp_path, path, 1, "b", heldout_fraction=0.2)
    assert first != split_assignment(tmp_path, path, 2, "c", heldout_fraction=0.2)
    by_book: dict[str, set] = {}
    for record in records:
        by_book.setdefault(record["id"], set()).add(first[record["text"]])
    assert all(len(splits) == 1 for splits in by_book.values())
    assert {split for splits in by_book.values() for split in splits} == {"train", "heldout"}


def test_hash_split_share(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"短い文書その{i}です。"} for i in range(2000)])
    for fraction in (0.05, 0.3):
        assignment = split_assignment(tmp_path, path, 1234, f"f{fraction}", heldout_fraction=fraction)
        assert len(assignment) == 2000
        share = sum(split == "heldout" for split in assignment.values()) / 2000
        assert abs(share - fraction) < 0.03


def json_line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def test_shard_writer_rotates_below_the_size_limit(tmp_path):
    writer = ShardWriter(tmp_path, "train-00003", max_bytes=200)
    records = [{"id": i, "text": "あ" * (10 if i != 3 else 40)} for i in range(12)]
    for record in records:
        writer.write(json_line(record), len(record["text"]))
    writer.close()
    names = [shard["name"] for shard in writer.shards]
    assert names == [f"train-00003-{i:05d}.jsonl" for i in range(len(names))] and len(names) > 3
    sizes = [(tmp_path / name).stat().st_size for name in names]
    assert all(size <= 200 for size in sizes) and sizes == [shard["bytes"] for shard in writer.shards]
    assert read_jsonl(*(tmp_path / name for name in names)) == records
    assert sum(shard["documents"] for shard in writer.shards) == 12
    assert sum(shard["chars"] for shard in writer.shards) == 10 * 11 + 40


def test_shard_writer_gives_an_oversized_record_its_own_shard(tmp_path):
    writer = ShardWriter(tmp_path, "heldout-00000", max_bytes=50)
    for text in ("a", "b" * 100, "c"):
        writer.write(json_line({"text": text}), len(text))
    writer.close()
    assert [json.loads((tmp_path / s["name"]).read_text())["text"][0] for s in writer.shards] == ["a", "b", "c"]


def test_prepare_rotates_shards_of_one_mib(tmp_path):
    rng = random.Random(2)
    # 60 documents x 15,000 characters x 3 bytes = 2.7 MB -> three shards of at most 1 MiB.
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": japanese_text(rng, 15_000)} for _ in range(60)])
    stats = prepare_language(
        "ja", corpus(), [path], [], options(shard_size_mb=1, heldout_fraction=0.1, dedup={"near": False}), 3, tmp_path
    )
    train = stats["splits"]["train"]
    assert train["shards"] == ["train-00000-00000.jsonl", "train-00000-00001.jsonl", "train-00000-00002.jsonl"]
    assert all((tmp_path / "ja" / name).stat().st_size <= 2**20 for name in train["shards"])
    # A second run into the same folder with bigger shards leaves no stale shard behind.
    prepare_language("ja", corpus(), [path], [], options(heldout_fraction=0.1, dedup={"near": False}), 3, tmp_path)
    assert sorted(p.name for p in (tmp_path / "ja").iterdir()) == ["heldout-00000-00000.jsonl", "train-00000-00000.jsonl"]


def test_identical_runs_write_identical_bytes(tmp_path):
    rng = random.Random(4)
    records = [{"text": japanese_text(rng, 200), "n": i} for i in range(150)] + [{"text": "重複" * 30}] * 3
    path = write_jsonl(tmp_path / "c.jsonl", records)
    outputs = []
    for name in ("a", "b"):
        stats = prepare_language("ja", corpus(), [path], [], options(heldout_fraction=0.2), 9, tmp_path / name)
        files = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "ja").iterdir())}
        outputs.append((json.dumps(stats, sort_keys=True), files))
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0][0])["removed"]["exact_duplicate"] == 2


def test_every_rule_and_kind_is_listed(tmp_path):
    rng = random.Random(6)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": japanese_text(rng, 100)} for _ in range(60)])
    stats = prepare_language("ja", corpus(), [path], [], options(heldout_fraction=0.3), 1, tmp_path)
    assert list(stats["removed"]) == list(RULES) and list(stats["skipped_lines"]) == list(SKIP_KINDS)
    assert json.loads(json.dumps(stats)) == stats


def test_nothing_left_after_filtering_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "短い"}] * 3 + [{"text": "English only. " * 10}] * 2)
    with pytest.raises(JpadaptError) as error:
        prepare_language("ja", corpus(), [path], [], options(), 1, tmp_path / "out")
    message = str(error.value)
    assert message.startswith("data.ja: no training documents left after filtering (read 5 records:")
    assert message.endswith("too_short 3, low_japanese_ratio 2)")


def test_empty_heldout_split_is_an_error(tmp_path):
    rng = random.Random(8)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": japanese_text(rng, 100)} for _ in range(3)])
    with pytest.raises(JpadaptError, match=r"data\.ja: no held-out documents.*heldout_fraction.*data\.ja\.heldout"):
        prepare_language("ja", corpus(), [path], [], options(heldout_fraction=0.001), 1, tmp_path / "out")
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "短い"}])
    with pytest.raises(JpadaptError, match=r"data\.ja: no held-out documents left after filtering \(read 1 held-out"):
        prepare_language("ja", corpus(), [path], [held], options(), 1, tmp_path / "out")


def test_empty_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    broken = write_jsonl(tmp_path / "broken.jsonl", ["{oops"])
    with pytest.raises(JpadaptError, match=r"^data\.ja: the corpus is empty \(files: empty\.jsonl, broken\.jsonl; "
                       r"skipped lines: invalid_json 1\)$"):
        prepare_language("ja", corpus(), [empty, broken], [], options(on_error="skip"), 1, tmp_path / "out")
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": japanese_text(random.Random(1), 100)}])
    with pytest.raises(JpadaptError, match=r"^data\.ja: the training files hold no records \(files: empty\.jsonl\)$"):
        prepare_language("ja", corpus(), [empty], [held], options(), 1, tmp_path / "out")


def test_display_name_is_used_for_ids_and_stats(tmp_path):
    rng = random.Random(9)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": japanese_text(rng, 100)} for _ in range(30)])
    stats = prepare_language(
        "ja", corpus(), [path], [], options(heldout_fraction=0.3), 1, tmp_path / "o", display_name=lambda p: "corpus/x"
    )
    assert stats["input"]["files"][0]["name"] == "corpus/x"
    assert read_split(tmp_path / "o", "ja", "train")[0]["id"].startswith("corpus/x:")


def test_memory_grows_with_kept_documents_not_with_text(tmp_path):
    """Texts are streamed: from N to 8N documents the traced peak grows by the dedup indexes only.

    Measured (N=40 documents of 5,000 characters, near dedup on): peak 7.4 MB for N, 8.4 MB for 8N, while
    the extra 280 documents are 4.2 MB of file and 2.8 MB of str; a version that kept every text in a list
    peaked at 7.5 and 11.7 MB and failed both assertions.
    """
    rng = random.Random(10)
    texts = [japanese_text(rng, 5000) for _ in range(320)]
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in texts[:40]])
    large = write_jsonl(tmp_path / "large.jsonl", [{"text": t} for t in texts])
    del texts
    peaks = []
    for path in (small, large):
        tracemalloc.start()
        prepare_language("ja", corpus(), [path], [], options(), 1, tmp_path / path.stem)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    extra_text = large.stat().st_size - small.stat().st_size
    assert peaks[1] < 1.5 * peaks[0], peaks
    assert peaks[1] - peaks[0] < 0.4 * extra_text, (peaks, extra_text)


# --------------------------------------------------------------------------------------------- seed, imports


def test_set_seed(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torch", type("FakeTorch", (), {"manual_seed": staticmethod(calls.append)}))
    assert set_seed(10, rank=3) == 13
    first = (random.random(), __import__("numpy").random.rand())
    set_seed(10, rank=3)
    assert (random.random(), __import__("numpy").random.rand()) == first and calls == [13, 13]
    monkeypatch.delitem(sys.modules, "torch")
    set_seed(1)
    assert calls == [13, 13]


def test_data_modules_do_not_import_torch():
    code = "import sys, data.prepare, data.seed; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
