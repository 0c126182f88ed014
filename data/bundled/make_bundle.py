"""Regenerate the bundled data files from the shared source snapshot and public GitHub snapshots (provenance,
not library code).

Run from the repository root:

    python data/bundled/make_bundle.py [--src ../shared/data] [--repos /work/.mirror]

It checks the sha256 of every source file against the values recorded below (SOURCE_SHA256: as in
../shared/data/SOURCES.md; REPO_SHA256: files read with `git show HEAD:<path>` from the bare git snapshots
under --repos, whose HEAD must be the commit recorded in REPOS), rewrites every bundled data file under
data/bundled/ (plain copies, xz copies, seeded samples, and evaluation sets converted to the layout of the
Hugging Face datasets that lm-evaluation-harness reads) and MANIFEST.json, and prints the statistics that
data/bundled/SOURCES.md reports. The output is deterministic: same sources, same seed -> byte-identical files.

Sampling rules:
* corpus/ja_train.jsonl: ~3 MB of whole records, stratified by (source, genre): each stratum gets
  the same fraction of its bytes (at least one record), records taken in seeded random order.
* corpus/en_train.jsonl: ~1.5 MB, stratified the same way by genre, but the unit is the document
  (`id`): a chosen book keeps all its parts, in order.
* corpus/en_pretrain.jsonl: the rest of the source's English train records (the complement of en_train, in
  file order): more English for pretraining the small English model of bench/forgetting.py.
* instruct/ja_instruct_train.jsonl: 1000 of 3000 records, seeded.
* eval/gsm8k/train_fewshot.jsonl: the first 250 lines of GSM8K train.jsonl (the few-shot pool).
* eval/hellaswag/hellaswag_val.jsonl: 1000 of the 10042 validation items,
  sorted(random.Random(SEED).sample(range(10042), 1000)), in original order.
Each sampler gets its own random.Random(SEED), and sampled lines of the shared snapshot are written in original
file order, byte-for-byte as read (no JSON re-serialization); so are GSM8K's test file and few-shot lines.
The other evaluation sets are converted record by record (JSON lines, UTF-8, ensure_ascii=False):
* eval/jglue/jsquad-v1.3/valid-v1.3.jsonl: JSQuAD v1.3 valid, whole, one record per question (Rakuten/JGLUE
  layout: id, title, context, question, answers {text, answer_start}, is_impossible).
* eval/mgsm/mgsm_ja.jsonl (250 test items) and eval/mgsm/mgsm_ja_train.jsonl (the 8 Japanese exemplars of
  mgsm/exemplars.py, read with ast, never executed): juletxara/mgsm layout.
* eval/xwinograd/xwinograd_ja.jsonl (sentence1, sentence2, answer: polm-stability/xwinograd-ja layout) and
  eval/xwinograd/xwinograd_en.jsonl (sentence with "_", option1, option2, answer: Muennighoff/xwinograd
  layout), from the jp and en rows of dataset.tsv; the pronoun's token span is located in the raw sentence.
* eval/hellaswag/hellaswag_val.jsonl: ind (position in hellaswag_val.jsonl), query, choices, label.
* eval/arc/arc_{easy,challenge}_test.jsonl and eval/openbookqa/openbookqa_test.jsonl: whole test splits from
  mosaicml/llm-foundry's copies, in the allenai/ai2_arc and allenai/openbookqa layouts (choices lettered by
  position, as the copies keep no labels).

Not written by this script (hand-maintained, committed): NOTICE and LICENSE files of the tokenizer
and instruct folders, the NOTICE files of eval/hellaswag, eval/xwinograd and eval/mgsm, and SOURCES.md.
eval/jglue/LICENSE is copied from the shared snapshot (and as eval/arc/LICENSE: ARC is CC BY-SA 4.0 too); the
LICENSE files of eval/mgsm, eval/gsm8k, eval/xwinograd, eval/hellaswag and eval/openbookqa from the GitHub
snapshots.
"""

from __future__ import annotations

import argparse
import ast
import bz2
import hashlib
import json
import lzma
import random
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

SEED = 20261124
JA_TRAIN_BYTES = 3_000_000
EN_TRAIN_BYTES = 1_500_000
INSTRUCT_TRAIN_RECORDS = 1000
HELLASWAG_RECORDS = 1000
GSM8K_FEWSHOT_RECORDS = 250
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
# ARC is CC BY-SA 4.0 like JGLUE: its legal code is the same text as JGLUE's LICENSE.
PLAIN_COPIES = {"eval/jglue/LICENSE": "eval/jglue/LICENSE", "eval/arc/LICENSE": "eval/jglue/LICENSE"}

# Written for jpadapt and kept in the bundle folder itself; listed in MANIFEST.json as they are.
OWN_FILES = ["eval/prompts.jsonl"]

HAND_MAINTAINED = [
    "SOURCES.md",
    "tokenizers/llama2/NOTICE", "tokenizers/llama2/LICENSE",
    "tokenizers/llama3/NOTICE", "tokenizers/llama3/LICENSE",
    "tokenizers/qwen/NOTICE", "tokenizers/llm-jp/NOTICE", "tokenizers/mistral/NOTICE",
    "instruct/NOTICE", "corpus/NOTICE", "eval/hellaswag/NOTICE", "eval/xwinograd/NOTICE", "eval/mgsm/NOTICE",
    "eval/arc/NOTICE", "eval/openbookqa/NOTICE",
]

LLM_FOUNDRY_DATA = "scripts/eval/local_data/"

# Public GitHub repositories, read from bare git snapshots under --repos: repo -> (git dir, commit of HEAD).
REPOS = {
    "yahoojapan/JGLUE": ("yahoojapan+JGLUE/repo", "6f071c09316baae89c3d083a90985b4b1cb9968c"),
    "google-research/url-nlp": ("google-research+url-nlp/repo", "452a21ad3dae5668c06ceeac21ff073e1e40f9be"),
    "openai/grade-school-math": ("openai+grade-school-math/repo", "3101c7d5072418e28b9008a6636bde82a006892c"),
    "yandex-research/crosslingual_winograd": (
        "yandex-research+crosslingual_winograd/repo", "d2cfbbf7dc8f4ec66381e9651f9f5633c2df848d"),
    "klosax/hellaswag_text_data": ("klosax+hellaswag_text_data/repo", "1105d370f8340eac3c63a91fd1fa58e8999f9505"),
    "rowanz/hellaswag": ("rowanz+hellaswag/repo/.git", "a29ff8e9a04bba4bd6588223785ce105328adc57"),
    "mosaicml/llm-foundry": ("mosaicml+llm-foundry/repo", "8c8dd48f72168c5d51e2f7b151595892a8fba43d"),
}

# sha256 of every file read from those snapshots (at the commits above).
REPO_SHA256 = {
    ("yahoojapan/JGLUE", "datasets/jsquad-v1.3/valid-v1.3.json"):
        "fb0a57a35281ff03bbe7f0e878cff5b577985fbe6fcb242e7e8ddb63d1c0ab11",
    ("google-research/url-nlp", "mgsm/mgsm_ja.tsv"): "59a2b50debe77981fd784cb3b2bef1505e3abf2a37116dc9d7a366ab029b4637",
    ("google-research/url-nlp", "mgsm/exemplars.py"): "239dda1557bb2ba76b71e5ef744ddd0b454da0b453e5f8b909498ceff690a919",
    ("google-research/url-nlp", "mgsm/LICENSE"): "c97deeeca4ae375a0334bc7f7af5f707aabfcec959c53c783b9f8771d28fd5b3",
    ("openai/grade-school-math", "grade_school_math/data/test.jsonl"):
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    ("openai/grade-school-math", "grade_school_math/data/train.jsonl"):
        "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    ("openai/grade-school-math", "LICENSE"): "86bbb73e855821d7c401912fd4bf82e34313e6e3b6fd6f909f2b6cc9e209a53b",
    ("yandex-research/crosslingual_winograd", "dataset.tsv"):
        "2c4cdad50f7a35523ce16f4437b7d5c814ebf7a49ad10f618468eeb32f08a873",
    ("yandex-research/crosslingual_winograd", "LICENSE"):
        "78ddba068c88410424844d42c411b8d948d7ee6646be91bd58ddebe21b371280",
    ("klosax/hellaswag_text_data", "hellaswag_val_full.txt.bz2"):
        "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
    ("rowanz/hellaswag", "LICENSE"): "7fa4c79209aed73ac82176cae51eb565ae0f33cf4108b380121c7731953f415f",
    ("mosaicml/llm-foundry", LLM_FOUNDRY_DATA + "world_knowledge/arc_easy.jsonl"):
        "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5",
    ("mosaicml/llm-foundry", LLM_FOUNDRY_DATA + "world_knowledge/arc_challenge.jsonl"):
        "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636",
    ("mosaicml/llm-foundry", LLM_FOUNDRY_DATA + "commonsense_reasoning/openbook_qa.jsonl"):
        "adb2e5c7f8db810ddad4d6b2bf53dcc86dcc545499f7aafcaf42a8e179476c09",
    ("mosaicml/llm-foundry", "LICENSE"): "6000cff1fc348ff57108619330c26d67d596bf44c68661c749a6c561cdc3fb4f",
}

# Evaluation sets built from the snapshots: logical name -> builder name (see BUILDERS); all xz-compressed.
REPO_PLAN = {
    "eval/jglue/jsquad-v1.3/valid-v1.3.jsonl": "jsquad_valid",
    "eval/mgsm/mgsm_ja.jsonl": "mgsm_test",
    "eval/mgsm/mgsm_ja_train.jsonl": "mgsm_train",
    "eval/gsm8k/test.jsonl": "gsm8k_test",
    "eval/gsm8k/train_fewshot.jsonl": "gsm8k_fewshot",
    "eval/xwinograd/xwinograd_ja.jsonl": "xwinograd_ja",
    "eval/xwinograd/xwinograd_en.jsonl": "xwinograd_en",
    "eval/hellaswag/hellaswag_val.jsonl": "hellaswag_val",
    "eval/arc/arc_easy_test.jsonl": "arc_easy_test",
    "eval/arc/arc_challenge_test.jsonl": "arc_challenge_test",
    "eval/openbookqa/openbookqa_test.jsonl": "openbookqa_test",
}

# License texts copied unchanged from the snapshots, beside the data, not listed in MANIFEST.json.
REPO_COPIES = {
    "eval/mgsm/LICENSE": ("google-research/url-nlp", "mgsm/LICENSE"),
    "eval/gsm8k/LICENSE": ("openai/grade-school-math", "LICENSE"),
    "eval/xwinograd/LICENSE": ("yandex-research/crosslingual_winograd", "LICENSE"),
    "eval/hellaswag/LICENSE": ("rowanz/hellaswag", "LICENSE"),
    # OpenBookQA is Apache-2.0 (AI2), the license of the repository its copy comes from: the same text.
    "eval/openbookqa/LICENSE": ("mosaicml/llm-foundry", "LICENSE"),
}


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


class Snapshots:
    """Files of the public GitHub snapshots, each checked against REPO_SHA256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for repo, (git_dir, commit) in REPOS.items():
            head = self._git(repo, "rev-parse", "HEAD").decode().strip()
            if head != commit:
                sys.exit(f"{root / git_dir}: HEAD is {head}, this script was written for {repo} @{commit}")

    def _git(self, repo: str, *args: str) -> bytes:
        git_dir = self.root / REPOS[repo][0]
        proc = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, check=False)
        if proc.returncode:
            sys.exit(f"git --git-dir={git_dir} {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout

    def read(self, repo: str, path: str) -> bytes:
        data = self._git(repo, "show", f"HEAD:{path}")
        want = REPO_SHA256[(repo, path)]
        if sha256(data) != want:
            sys.exit(f"{repo}:{path}: sha256 {sha256(data)} != {want} recorded in REPO_SHA256")
        return data


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def build_jsquad_valid(snap: Snapshots, notes: list[str]) -> bytes:
    """One record per question, in file order (the source is one JSON document, SQuAD v1.1 nesting)."""
    doc = json.loads(snap.read("yahoojapan/JGLUE", "datasets/jsquad-v1.3/valid-v1.3.json"))
    records, misplaced, contexts = [], 0, 0
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            contexts += 1
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = {"text": [a["text"] for a in qa["answers"]],
                           "answer_start": [a["answer_start"] for a in qa["answers"]]}
                misplaced += sum(context[s:s + len(t)] != t for t, s in zip(answers["text"], answers["answer_start"]))
                records.append({"id": qa["id"], "title": article["title"], "context": context,
                                "question": qa["question"], "answers": answers, "is_impossible": qa["is_impossible"]})
    sep = sum(" [SEP] " in r["context"] for r in records)
    notes.append(f"jsquad valid: {len(records)} questions, {contexts} paragraphs, {len(doc['data'])} articles; "
                 f"{sep} contexts in 'title [SEP] paragraph' form; {misplaced} answers not at answer_start; "
                 f"{sum(r['is_impossible'] for r in records)} impossible")
    return jsonl_bytes(records)


def jsquad_paragraph(context: str) -> str:
    """The Wikipedia paragraph of a JSQuAD context ("title [SEP] paragraph")."""
    return context.split(" [SEP] ", 1)[-1]


def mgsm_test_records(snap: Snapshots) -> list[dict]:
    text = snap.read("google-research/url-nlp", "mgsm/mgsm_ja.tsv").decode("utf-8")
    records = []
    for line in text.splitlines():
        question, number = line.split("\t")
        records.append({"question": question, "answer": None, "answer_number": int(number.replace(",", "")),
                        "equation_solution": None})
    return records


def build_mgsm_test(snap: Snapshots, notes: list[str]) -> bytes:
    records = mgsm_test_records(snap)
    notes.append(f"mgsm ja test: {len(records)} items")
    return jsonl_bytes(records)


def literal_assignments(source: bytes) -> dict[str, object]:
    """Module-level `NAME = <literal>` assignments of a Python file, read with ast (the file is never executed)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def last_number(text: str) -> int:
    return int(re.findall(r"\d[\d,]*", text)[-1].replace(",", ""))


def build_mgsm_train(snap: Snapshots, notes: list[str]) -> bytes:
    """The 8 Japanese exemplars, as juletxara/mgsm's train split builds them from exemplars.py."""
    values = literal_assignments(snap.read("google-research/url-nlp", "mgsm/exemplars.py"))
    exemplars = values["MGSM_EXEMPLARS"]["ja"]
    numbers, equations = values["EXEMPLAR_NUMBER_ANSWERS"], values["EXEMPLAR_EQUATION_SOLUTIONS"]
    records = []
    for key in sorted(exemplars, key=int):
        ex, k = exemplars[key], int(key) - 1
        if last_number(ex["a"]) != numbers[k]:
            sys.exit(f"mgsm ja exemplar {key}: last number of the answer != EXEMPLAR_NUMBER_ANSWERS {numbers[k]}")
        records.append({"question": ex["q"], "answer": ex["a"], "answer_number": numbers[k],
                        "equation_solution": equations[k]})
    notes.append(f"mgsm ja exemplars: {len(records)}; answer_number = last number of each answer for all")
    return jsonl_bytes(records)


def build_gsm8k_test(snap: Snapshots, notes: list[str]) -> bytes:
    data = snap.read("openai/grade-school-math", "grade_school_math/data/test.jsonl")
    notes.append(f"gsm8k test: {len(data.splitlines())} lines, whole file")
    return data


def build_gsm8k_fewshot(snap: Snapshots, notes: list[str]) -> bytes:
    lines = snap.read("openai/grade-school-math", "grade_school_math/data/train.jsonl").splitlines(keepends=True)
    notes.append(f"gsm8k train few-shot pool: first {GSM8K_FEWSHOT_RECORDS} of {len(lines)} lines")
    return b"".join(lines[:GSM8K_FEWSHOT_RECORDS])


# NLTK's tokenizer writes a straight double quote as `` (opening) or '' (closing).
TOKEN_FORMS = {"``": ('"', "“"), "''": ('"', "”")}
NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", "'", "''", "n't", ")"}


def token_offsets(sentence: str, tokens: list[str]) -> list[tuple[int, int]] | None:
    """Character span of each token in `sentence` (tokens in order, whitespace between); None if they do not fit."""
    spans, pos = [], 0
    for token in tokens:
        while pos < len(sentence) and sentence[pos].isspace():
            pos += 1
        for form in (token, *TOKEN_FORMS.get(token, ())):
            if sentence.startswith(form, pos):
                spans.append((pos, pos + len(form)))
                pos += len(form)
                break
        else:
            return None
    return spans


def detokenize_en(tokens: list[str]) -> str:
    """Tokens joined with spaces, none before punctuation or clitics ('s, n't, ...)."""
    out = ""
    for token in tokens:
        glue = not out or token in NO_SPACE_BEFORE or (token.startswith("'") and token != "``")
        out += token if glue else " " + token
    return out.replace("``", '"').replace("''", '"')


def xwinograd_rows(snap: Snapshots, lang: str) -> list[list]:
    text = snap.read("yandex-research/crosslingual_winograd", "dataset.tsv").decode("utf-8")
    rows = []
    for line in text.splitlines():
        cols = line.split("\t")
        if cols[0] == lang:
            rows.append([cols[3], json.loads(cols[4]), json.loads(cols[5]), json.loads(cols[6])])
    return rows


def pronoun_span(sentence: str, tokens: list[str], pronoun: list, english: bool) -> tuple[str, str, bool]:
    """(text before, text after) the pronoun's token span, and whether both were cut from the raw sentence (else
    rebuilt from the tokens: joined without spaces for Japanese, detokenize_en for English)."""
    start, end = pronoun[1]
    spans = token_offsets(sentence, tokens)
    if spans is not None and sentence[spans[start][0]:spans[end - 1][1]] == pronoun[0]:
        return sentence[:spans[start][0]], sentence[spans[end - 1][1]:], True
    if not english:
        return "".join(tokens[:start]), "".join(tokens[end:]), False
    before, after = detokenize_en(tokens[:start]), detokenize_en(tokens[end:])
    glued = not after or tokens[end] in NO_SPACE_BEFORE or tokens[end].startswith("'")
    return before + (" " if before else ""), after if glued else " " + after, False


def answer_of(candidates: list) -> str:
    correct = [i for i, c in enumerate(candidates) if c[3]]
    if len(candidates) != 2 or len(correct) != 1:
        sys.exit(f"xwinograd: expected 2 candidates, 1 correct: {candidates}")
    return str(correct[0] + 1)


def build_xwinograd_ja(snap: Snapshots, notes: list[str]) -> bytes:
    records, unjoined, fallback, with_particle = [], 0, 0, 0
    for sentence, tokens, pronoun, candidates in xwinograd_rows(snap, "jp"):
        unjoined += "".join(tokens) != sentence
        with_particle += bool(re.search("[はをにの]", pronoun[0]))  # e.g. 彼を, 彼の, 彼は彼: replaced whole
        before, after, raw = pronoun_span(sentence, tokens, pronoun, english=False)
        fallback += not raw
        records.append({"sentence1": before + candidates[0][0] + after, "sentence2": before + candidates[1][0] + after,
                        "answer": answer_of(candidates)})
    notes.append(f"xwinograd jp: {len(records)} rows; {unjoined} sentences differ from their joined tokens; "
                 f"{fallback} pronoun spans not located in the raw sentence; {with_particle} pronoun spans hold a particle "
                 f"or two pronouns (replaced whole, as the span says)")
    return jsonl_bytes(records)


def build_xwinograd_en(snap: Snapshots, notes: list[str]) -> bytes:
    records, fallback, detok_differs, roundtrip_differs = [], 0, 0, 0
    for sentence, tokens, pronoun, candidates in xwinograd_rows(snap, "en"):
        before, after, raw = pronoun_span(sentence, tokens, pronoun, english=True)
        fallback += not raw
        detok_differs += detokenize_en(tokens) != sentence
        roundtrip_differs += before + pronoun[0] + after != sentence
        if "_" in before + after:
            sys.exit(f"xwinograd en: '_' in the sentence itself: {sentence}")
        records.append({"sentence": before + "_" + after, "option1": candidates[0][0], "option2": candidates[1][0],
                        "answer": answer_of(candidates)})
    notes.append(f"xwinograd en: {len(records)} rows; pronoun located in the raw sentence for {len(records) - fallback} "
                 f"(else tokens joined); substituting the pronoun back differs from the sentence column for "
                 f"{roundtrip_differs}; plain detokenization (spaces, none before punctuation) would differ for "
                 f"{detok_differs}")
    return jsonl_bytes(records)


def build_hellaswag_val(snap: Snapshots, notes: list[str]) -> bytes:
    text = bz2.decompress(snap.read("klosax/hellaswag_text_data", "hellaswag_val_full.txt.bz2")).decode("utf-8")
    lines = text.split("\n")
    if lines[-1] != "" or (len(lines) - 1) % 6:
        sys.exit("hellaswag_val_full.txt: expected 6 lines per item and a final newline")
    items = [lines[i:i + 6] for i in range(0, len(lines) - 1, 6)]
    keep = sorted(random.Random(SEED).sample(range(len(items)), HELLASWAG_RECORDS))
    records = [{"ind": i, "query": items[i][0], "choices": items[i][2:6], "label": int(items[i][1])} for i in keep]
    notes.append(f"hellaswag val: {len(records)} of {len(items)} items, indices {keep[0]}..{keep[-1]}; labels "
                 + ", ".join(f"{k}: {sum(r['label'] == k for r in records)}" for k in range(4)))
    return jsonl_bytes(records)


def llm_foundry_rows(snap: Snapshots, path: str) -> list[dict]:
    rows = [json.loads(line) for line in snap.read("mosaicml/llm-foundry", LLM_FOUNDRY_DATA + path).splitlines()]
    for number, row in enumerate(rows, 1):
        if set(row) != {"query", "choices", "gold"} or not 0 <= row["gold"] < len(row["choices"]):
            sys.exit(f"{path}:{number}: expected query, choices and a gold index into them")
    return rows


def labelled_choices(texts: list[str]) -> dict[str, list[str]]:
    """The Hugging Face layout's choices; the copy keeps no labels, so they are lettered A, B, ... by position."""
    return {"text": texts, "label": [chr(ord("A") + i) for i in range(len(texts))]}


def build_ai2_test(snap: Snapshots, notes: list[str], path: str, id_prefix: str, question_field: str,
                   query_prefix: str = "") -> bytes:
    """The Hugging Face layout of AI2's multiple-choice sets (id, question field, choices {text, label},
    answerKey: allenai/ai2_arc, allenai/openbookqa `main`) from llm-foundry's copy, whose query is
    `query_prefix` + the question."""
    records = []
    for number, row in enumerate(llm_foundry_rows(snap, path)):
        if not row["query"].startswith(query_prefix):
            sys.exit(f"{path}:{number + 1}: the query does not start with {query_prefix!r}")
        choices = labelled_choices(row["choices"])
        records.append({"id": f"{id_prefix}-test-{number}", question_field: row["query"][len(query_prefix):],
                        "choices": choices, "answerKey": choices["label"][row["gold"]]})
    keys = Counter(r["answerKey"] for r in records)
    notes.append(f"{path}: {len(records)} questions; answer keys " + ", ".join(f"{k}: {keys[k]}" for k in sorted(keys)))
    return jsonl_bytes(records)


BUILDERS = {
    "jsquad_valid": build_jsquad_valid,
    "mgsm_test": build_mgsm_test,
    "mgsm_train": build_mgsm_train,
    "gsm8k_test": build_gsm8k_test,
    "gsm8k_fewshot": build_gsm8k_fewshot,
    "xwinograd_ja": build_xwinograd_ja,
    "xwinograd_en": build_xwinograd_en,
    "hellaswag_val": build_hellaswag_val,
    "arc_easy_test": lambda snap, notes: build_ai2_test(
        snap, notes, "world_knowledge/arc_easy.jsonl", "ARC-Easy", "question", "Question: "),
    "arc_challenge_test": lambda snap, notes: build_ai2_test(
        snap, notes, "world_knowledge/arc_challenge.jsonl", "ARC-Challenge", "question", "Question: "),
    "openbookqa_test": lambda snap, notes: build_ai2_test(
        snap, notes, "commonsense_reasoning/openbook_qa.jsonl", "openbookqa", "question_stem"),
}


def jsquad_corpus_overlap(jsquad: bytes, corpus: bytes) -> tuple[int, int, int]:
    """JSQuAD valid paragraphs found verbatim in a corpus record, their questions, and all paragraphs."""
    texts = "\0".join(json.loads(line)["text"] for line in corpus.splitlines())
    records = [json.loads(line) for line in jsquad.splitlines()]
    paragraphs = {jsquad_paragraph(r["context"]) for r in records}
    found = {p for p in paragraphs if p in texts}
    return len(found), sum(jsquad_paragraph(r["context"]) in found for r in records), len(paragraphs)

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("../shared/data"))
    ap.add_argument("--repos", type=Path, default=Path("/work/.mirror"),
                    help="folder of the bare git snapshots named in REPOS")
    args = ap.parse_args()
    src: Path = args.src
    for rel, want in SOURCE_SHA256.items():
        got = sha256((src / rel).read_bytes())
        if got != want:
            sys.exit(f"{src / rel}: sha256 {got} != {want} recorded in SOURCES.md")
    snap = Snapshots(args.repos)

    manifest: dict[str, dict] = {}
    print("| logical name | bytes | sha256 | stored | stored bytes | stored sha256 |")
    print("|---|---|---|---|---|---|")
    samples = []
    written: dict[str, bytes] = {}

    def write(name: str, data: bytes, compress: bool) -> None:
        stored = name + ".xz" if compress else name
        blob = lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET) if compress else data
        out = OUT / stored
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob)
        written[name] = data
        manifest[name] = {"sha256": sha256(data), "bytes": len(data), "stored": stored}
        print(f"| {name} | {len(data)} | {sha256(data)} | {stored} | {len(blob)} | {sha256(blob)} |")

    for name, (rel, compress, sampler) in PLAN.items():
        data = (src / rel).read_bytes()
        if sampler:
            before = data.splitlines(keepends=True)
            after = sample(sampler, before)
            data = b"".join(after)
            samples.append((name, before, after))
        write(name, data, compress)
    notes: list[str] = []
    for name, builder in REPO_PLAN.items():
        write(name, BUILDERS[builder](snap, notes), True)
    for dst, rel in PLAIN_COPIES.items():
        shutil.copyfile(src / rel, OUT / dst)
    for dst, (repo, path) in REPO_COPIES.items():
        (OUT / dst).parent.mkdir(parents=True, exist_ok=True)
        (OUT / dst).write_bytes(snap.read(repo, path))
    for name in OWN_FILES:
        data = (OUT / name).read_bytes()
        manifest[name] = {"sha256": sha256(data), "bytes": len(data), "stored": name}

    text = json.dumps({"files": manifest}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    (OUT / "MANIFEST.json").write_text(text, encoding="utf-8")
    for name, before, after in samples:
        print_stats(name, before, after)
    print("\n" + "\n".join(f"* {note}" for note in notes))
    for corpus in ("corpus/ja_train.jsonl", "corpus/ja_heldout.jsonl"):
        found, questions, paragraphs = jsquad_corpus_overlap(written["eval/jglue/jsquad-v1.3/valid-v1.3.jsonl"],
                                                             written[corpus])
        print(f"* JSQuAD valid paragraphs found verbatim in a {corpus} record: {found} of {paragraphs}"
              f" ({questions} questions)")
    missing = [p for p in HAND_MAINTAINED if not (OUT / p).is_file()]
    if missing:
        print(f"\nwarning: hand-maintained files missing: {', '.join(missing)}", file=sys.stderr)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    print(f"\ntotal size of {OUT}: {total} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
