"""Regenerate the bundled data files from the shared source snapshot (provenance, not library code).

Run from the repository root:

    python data/bundled/make_bundle.py [--src ../shared/data]

It checks the sha256 of every source file against the values recorded in ../shared/data/SOURCES.md,
rewrites every bundled data file under data/bundled/ (plain copies, xz copies, and seeded samples)
and MANIFEST.json, and prints the sampling statistics that data/bundled/SOURCES.md reports.
The output is deterministic: same sources, same seed -> byte-identical files.

Sampling rules:
* corpus/ja_train.jsonl: ~3 MB of whole records, stratified by (source, genre): each stratum gets
  the same fraction of its bytes (at least one record), records taken in seeded random order.
* corpus/en_train.jsonl: ~1.5 MB, stratified the same way by genre, but the unit is the document
  (`id`): a chosen book keeps all its parts, in order.
* corpus/en_pretrain.jsonl: the rest of the source's English train records (the complement of en_train, in
  file order): more English for pretraining the small English model of bench/forgetting.py.
* instruct/ja_instruct_train.jsonl: 1000 of 3000 records, seeded.
Each sampler gets its own random.Random(SEED), and sampled lines are written in original file
order, byte-for-byte as read (no JSON re-serialization). Everything else is copied whole.

Not written by this script (hand-maintained, committed): NOTICE and LICENSE files of the tokenizer
and instruct folders, and SOURCES.md. eval/jglue/LICENSE is copied from the source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

SEED = 20261124
JA_TRAIN_BYTES = 3_000_000
EN_TRAIN_BYTES = 1_500_000
INSTRUCT_TRAIN_RECORDS = 1000
XZ_PRESET = 9 | lzma.PRESET_EXTREME

OUT = Path(__file__).resolve().parent

# Source sha256 as recorded in shared/data/SOURCES.md: a changed source must be noticed, not bundled.
SOURCE_SHA256 = {
    "tokenizers/llama2/tokenizer.model": "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
    "tokenizers/llama3/tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    "tokenizers/llama3/tokenizer.json": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
    "tokenizers/llama3/tokenizer_config.json": "c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf",
    "tokenizers/qwen/tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizers/qwen/tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
    "tokenizers/llm-jp/llm-jp-tokenizer-100k.ver3.1.model": "e4a4443f017ce00a1f1eb8432c3cda47227fa713964458f9f53499357421b45d",
    "tokenizers/mistral/tokenizer.model.v1": "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
    "corpus/ja_train.jsonl": "e0b0ac2c81067f1aee3fa8f601d0b89d1fd6dbe0b057b03cc79f491d1b95bbf7",
    "corpus/ja_heldout.jsonl": "fa2fdf8ad16fd8412cc2184735ce8197cdf81fd42f9e15248749ebbe8ab66e06",
    "corpus/en_train.jsonl": "73429e4273f53d09cee1f3c3679f26397f820abceb1b3e27e6ee16cc84baaa6a",
    "corpus/en_heldout.jsonl": "ba15a43cc84282918afb441189a0c6e2fcec88a7bb2f69195f2a9d1109932a9a",
    "eval/jglue/LICENSE": "3b2890eacd851373001c4a14623458e3adaf1b1967939aa9c38a318e28d61c00",
    "eval/jglue/jcommonsenseqa-v1.3/train-v1.3.json": "9b55fae5ecb3aedd6f8ce5bc09196c3b629864668ec6c18eee4d65c0aa48229e",
    "eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json": "0d8d76f3bfa0d174866939882faccdd01fbc2bcd5a76c43748ba0c40a7b3b8d4",
    "eval/jglue/jnli-v1.3/valid-v1.3.json": "ca0353efc7c2eebfb6de4e13f16295053c8b1ee65e7b0849190c90426fbc495f",
    "instruct/ja_instruct_train.jsonl": "6082588d9c1ea7de69fd822b252d020e06b67e5cad9f017b755dfbe52f92916b",
    "instruct/ja_instruct_heldout.jsonl": "6de7ed49c0e2f3ef088fe7411217be0c1a5eff155a79216ba3fbc643c1ffe9ec",
}

# logical name -> (source path, compress?, sampler name or None)
PLAN: dict[str, tuple[str, bool, str | None]] = {
    "tokenizers/llama2/tokenizer.model": ("tokenizers/llama2/tokenizer.model", False, None),
    "tokenizers/mistral/tokenizer.model": ("tokenizers/mistral/tokenizer.model.v1", False, None),
    "tokenizers/llm-jp/tokenizer.model": ("tokenizers/llm-jp/llm-jp-tokenizer-100k.ver3.1.model", False, None),
    "tokenizers/llama3/tokenizer.json": ("tokenizers/llama3/tokenizer.json", True, None),
    "tokenizers/llama3/tokenizer.model": ("tokenizers/llama3/tokenizer.model", True, None),
    "tokenizers/llama3/tokenizer_config.json": ("tokenizers/llama3/tokenizer_config.json", False, None),
    "tokenizers/qwen/tokenizer.json": ("tokenizers/qwen/tokenizer.json", True, None),
    "tokenizers/qwen/tokenizer_config.json": ("tokenizers/qwen/tokenizer_config.json", False, None),
    "corpus/ja_train.jsonl": ("corpus/ja_train.jsonl", True, "ja_train"),
    "corpus/ja_heldout.jsonl": ("corpus/ja_heldout.jsonl", True, None),
    "corpus/en_train.jsonl": ("corpus/en_train.jsonl", True, "en_train"),
    "corpus/en_pretrain.jsonl": ("corpus/en_train.jsonl", True, "en_pretrain"),
    "corpus/en_heldout.jsonl": ("corpus/en_heldout.jsonl", True, None),
    "eval/jglue/jcommonsenseqa-v1.3/train-v1.3.json": ("eval/jglue/jcommonsenseqa-v1.3/train-v1.3.json", True, None),
    "eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json": ("eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json", True, None),
    "eval/jglue/jnli-v1.3/valid-v1.3.json": ("eval/jglue/jnli-v1.3/valid-v1.3.json", True, None),
    "instruct/ja_instruct_train.jsonl": ("instruct/ja_instruct_train.jsonl", True, "instruct_train"),
    "instruct/ja_instruct_heldout.jsonl": ("instruct/ja_instruct_heldout.jsonl", True, None),
}

# Copied beside the data, not listed in MANIFEST.json.
PLAIN_COPIES = {"eval/jglue/LICENSE": "eval/jglue/LICENSE"}

# Written for jpadapt and kept in the bundle folder itself; listed in MANIFEST.json as they are.
OWN_FILES = ["eval/prompts.jsonl"]

HAND_MAINTAINED = [
    "SOURCES.md",
    "tokenizers/llama2/NOTICE", "tokenizers/llama2/LICENSE",
    "tokenizers/llama3/NOTICE", "tokenizers/llama3/LICENSE",
    "tokenizers/qwen/NOTICE", "tokenizers/llm-jp/NOTICE", "tokenizers/mistral/NOTICE",
    "instruct/NOTICE", "corpus/NOTICE",
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pick_to_quota(units: list[tuple[object, int]], quota: float, rng: random.Random) -> set:
    """Seeded greedy pick of (key, size) units whose sizes sum close to quota; at least one unit."""
    order = list(units)
    rng.shuffle(order)
    chosen: set = set()
    total = 0
    for key, size in order:
        # Take a unit if the stratum is still empty or if taking it lands closer to the quota.
        if not chosen or abs(total + size - quota) < abs(total - quota):
            chosen.add(key)
            total += size
    return chosen


def stratified_lines(lines: list[bytes], target: int, unit_key, stratum_key) -> list[bytes]:
    """Lines of whole units (records or documents), each stratum at the same byte fraction."""
    recs = [json.loads(line) for line in lines]
    fraction = target / sum(len(line) for line in lines)
    unit_size: dict[str, int] = defaultdict(int)
    unit_stratum: dict[str, tuple] = {}
    for i, (line, rec) in enumerate(zip(lines, recs)):
        unit = unit_key(i, rec)
        unit_size[unit] += len(line)
        unit_stratum.setdefault(unit, stratum_key(rec))
    strata: dict[tuple, list[tuple[str, int]]] = defaultdict(list)
    for unit, size in unit_size.items():  # dicts keep first-seen (file) order
        strata[unit_stratum[unit]].append((unit, size))
    rng = random.Random(SEED)
    chosen: set = set()
    for stratum in sorted(strata):
        units = strata[stratum]
        chosen |= pick_to_quota(units, fraction * sum(s for _, s in units), rng)
    return [line for i, (line, rec) in enumerate(zip(lines, recs)) if unit_key(i, rec) in chosen]


def sample(kind: str, lines: list[bytes]) -> list[bytes]:
    if kind == "ja_train":
        return stratified_lines(lines, JA_TRAIN_BYTES, lambda i, r: i, lambda r: (r["source"], r["genre"]))
    if kind == "en_train":
        return stratified_lines(lines, EN_TRAIN_BYTES, lambda i, r: r["id"], lambda r: (r["source"], r["genre"]))
    if kind == "en_pretrain":
        kept = set(sample("en_train", lines))
        return [line for line in lines if line not in kept]
    if kind == "instruct_train":
        keep = set(random.Random(SEED).sample(range(len(lines)), INSTRUCT_TRAIN_RECORDS))
        return [line for i, line in enumerate(lines) if i in keep]
    raise ValueError(kind)


def share_table(lines: list[bytes]) -> dict[tuple[str, str], list[int]]:
    """(source, genre) -> [records, documents, bytes]."""
    table: dict[tuple[str, str], list] = defaultdict(lambda: [0, set(), 0])
    for line in lines:
        rec = json.loads(line)
        row = table[(rec.get("source", "-"), rec.get("genre", "-"))]
        row[0] += 1
        row[1].add(rec.get("id"))
        row[2] += len(line)
    return {k: [v[0], len(v[1]), v[2]] for k, v in sorted(table.items())}


def print_stats(name: str, before: list[bytes], after: list[bytes]) -> None:
    tb, ta = share_table(before), share_table(after)
    nb, na = sum(map(len, before)), sum(map(len, after))
    print(f"\n#### {name}: {len(after)} of {len(before)} records, {na} of {nb} bytes\n")
    print("| source | genre | records | docs | bytes | share before | share after |")
    print("|---|---|---|---|---|---|---|")
    for key, (r, d, b) in tb.items():
        ra, da, ba = ta.get(key, [0, 0, 0])
        print(f"| {key[0]} | {key[1]} | {ra}/{r} | {da}/{d} | {ba}/{b} | {100 * b / nb:.1f}% | {100 * ba / na:.1f}% |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()
    src: Path = args.src
    for rel, want in SOURCE_SHA256.items():
        got = sha256((src / rel).read_bytes())
        if got != want:
            sys.exit(f"{src / rel}: sha256 {got} != {want} recorded in SOURCES.md")

    manifest: dict[str, dict] = {}
    print("| logical name | bytes | sha256 | stored | stored bytes | stored sha256 |")
    print("|---|---|---|---|---|---|")
    samples = []
    for name, (rel, compress, sampler) in PLAN.items():
        data = (src / rel).read_bytes()
        if sampler:
            before = data.splitlines(keepends=True)
            after = sample(sampler, before)
            data = b"".join(after)
            samples.append((name, before, after))
        stored = name + ".xz" if compress else name
        blob = lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET) if compress else data
        out = OUT / stored
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob)
        manifest[name] = {"sha256": sha256(data), "bytes": len(data), "stored": stored}
        print(f"| {name} | {len(data)} | {sha256(data)} | {stored} | {len(blob)} | {sha256(blob)} |")
    for dst, rel in PLAIN_COPIES.items():
        shutil.copyfile(src / rel, OUT / dst)
    for name in OWN_FILES:
        data = (OUT / name).read_bytes()
        manifest[name] = {"sha256": sha256(data), "bytes": len(data), "stored": name}

    text = json.dumps({"files": manifest}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    (OUT / "MANIFEST.json").write_text(text, encoding="utf-8")
    for name, before, after in samples:
        print_stats(name, before, after)
    missing = [p for p in HAND_MAINTAINED if not (OUT / p).is_file()]
    if missing:
        print(f"\nwarning: hand-maintained files missing: {', '.join(missing)}", file=sys.stderr)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    print(f"\ntotal size of {OUT}: {total} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
