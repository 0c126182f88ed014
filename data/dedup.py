"""Exact and near-duplicate detection for `prepare`, on disk, in datatrove's four MinHash steps.

1. signatures (one task per corpus task): `CharMinhashSignature`, datatrove's signature step over character
   n-grams (Japanese has no spaces; datatrove's word tokenizers would need spaCy + Sudachi and give word
   shingles). Each band of the signature goes to `sigs/bucket_BBB/RRRRR.minhash.sig`, sorted, as datatrove
   writes it; the whole signature also goes to `full/RRRRR.bin` so that candidates can be verified. The exact
   text hash is written the same way, as a one-band signature (`ExactHashWriter`).
2. buckets (one task per band, plus one for the exact hashes): datatrove's `MinhashDedupBuckets` merges the
   sorted band files of all tasks from disk and writes candidate pairs (`find_pairs`).
3. clusters (one task): `cluster_duplicates` verifies each near candidate against the full signatures (an LSH
   band match alone is a candidate, not a duplicate), joins the pairs into clusters and decides which document
   of a cluster stays: held-out documents first, then the earliest in input order. This replaces datatrove's
   cluster step, which keeps whichever document a union-by-size happens to make the root: a training copy could
   then survive in place of the held-out original.
4. filter: the caller's write step drops the documents listed in `remove/RRRRR.bin`.

Every decision depends only on the documents, their input order and the seed, never on how many tasks or
workers there were. Memory: steps 1, 2 and 4 hold one document (or one signature per task file) at a time;
step 3 holds the documents that have a candidate pair, not the corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

# Shingles hashed per block when computing one signature: a block is a (shingles x hashes) uint64 matrix,
# 8,192 x 126 x 8 B = 8 MB, whatever the document length (a 2-million-character document takes 245 blocks).
SHINGLE_BLOCK = 8192
# The band layout is chosen to weight a missed duplicate 9 times a wasted candidate check: every candidate
# is verified against the full signature, so a false positive costs one comparison, a false negative a
# duplicate left in. With 128 permutations and threshold 0.8 that is 14 bands of 9 rows (126 hashes), which
# proposes 87% of the pairs exactly at the threshold and 97% at 0.85.
LSH_WEIGHTS = (0.1, 0.9)
# Rules as written into `remove/*.bin`.
RULE_CODES = {"exact_duplicate": 1, "near_duplicate": 2}
RULE_NAMES = {code: rule for rule, code in RULE_CODES.items()}
# What the cluster step knows of each document that passed the filters (written by the scan step, one row
# per document in the task's order): input file, record number in it, split (0 held-out, 1 train), characters,
# and the byte offset of its line in the task's document table.
META = np.dtype([("file", "<u4"), ("record", "<u8"), ("split", "u1"), ("chars", "<u8"), ("offset", "<u8")])
SPLIT_CODES = {"heldout": 0, "train": 1}
REMOVAL = np.dtype([("doc", "<u4"), ("rule", "u1"), ("of_rank", "<u4"), ("of_doc", "<u4")])
# Exact hashes as a one-band "signature" of two 60-bit halves: datatrove's 64-bit signature files hold values
# below 2**61 - 1.
EXACT_MASK = (1 << 60) - 1
EXACT_ROW = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("doc", "<u4")])


@dataclass(frozen=True)
class Banding:
    """How the near-duplicate signature is cut: `bands` bands of `rows` hashes each."""

    bands: int
    rows: int

    @property
    def hashes(self) -> int:
        return self.bands * self.rows


def banding(threshold: float, num_perm: int) -> Banding:
    """The bands x rows layout (using at most `num_perm` hashes) that minimises the weighted probability of
    missing a pair at or above `threshold` and of proposing one below it (LSH_WEIGHTS)."""
    similarity = np.linspace(0, 1, 2001)
    best: tuple[float, int, int] | None = None
    for bands in range(2, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            proposed = 1 - (1 - similarity**rows) ** bands
            below, above = similarity < threshold, similarity >= threshold
            false_positive = np.trapezoid(proposed[below], similarity[below]) if below.sum() > 1 else 0.0
            false_negative = np.trapezoid(1 - proposed[above], similarity[above]) if above.sum() > 1 else 0.0
            error = LSH_WEIGHTS[0] * false_positive + LSH_WEIGHTS[1] * false_negative
            if best is None or error < best[0] - 1e-12:
                best = (error, bands, rows)
    assert best is not None
    return Banding(bands=best[1], rows=best[2])


def exact_hash(text: str) -> tuple[int, int]:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") & EXACT_MASK, int.from_bytes(digest[8:], "little") & EXACT_MASK


# --------------------------------------------------------------------------------------------- 1. signatures


def character_shingles(text: str, ngram: int) -> np.ndarray:
    """The character n-grams of `text`, one 64-bit hash per position (the whole text if it is shorter).

    A polynomial hash over Unicode code points, computed for all positions at once, then mixed with the
    SplitMix64 finalizer so that neighbouring n-grams give unrelated values. Repeated n-grams are not removed:
    a minimum does not change with repeats, and removing them (a sort) cost more than it saved."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(ngram, len(points))
    positions = len(points) - width + 1
    hashes = np.zeros(positions, dtype=np.uint64)
    for offset in range(width):
        hashes = hashes * np.uint64(1_000_003) + points[offset : offset + positions]
    hashes ^= hashes >> np.uint64(30)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(27)
    hashes *= np.uint64(0x94D049BB133111EB)
    hashes ^= hashes >> np.uint64(31)
    return hashes


def signature_parameters(hashes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-shift hash functions h(x) = (a*x + b) >> 32 over 64-bit words: odd `a`, any `b`, from the seed."""
    generator = np.random.default_rng(seed)
    a = generator.integers(0, 2**63, size=hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = generator.integers(0, 2**63, size=hashes, dtype=np.uint64)
    return a, b


def minhash(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (uint32, one value per hash function) of a set of shingle hashes."""
    mins = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    block = np.empty((min(len(shingles), SHINGLE_BLOCK), len(a)), dtype=np.uint64)
    for start in range(0, len(shingles), SHINGLE_BLOCK):
        rows = block[: min(SHINGLE_BLOCK, len(shingles) - start)]
        # In place, and the shift after the minimum (it keeps order): three passes over the block instead of five.
        np.multiply.outer(shingles[start : start + SHINGLE_BLOCK], a, out=rows)
        rows += b
        np.minimum(mins, rows.min(axis=0), out=mins)
    return (mins >> np.uint64(32)).astype(np.uint32)


class CharacterTokenizer(WordTokenizer):
    """Characters as datatrove's "words", so that its n-grams are character n-grams."""

    def word_tokenize(self, text: str) -> list[str]:
        return list(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class CharMinhashSignature(MinhashDedupSignature):
    """datatrove's signature step over character n-grams, hashed vectorised and in blocks (datatrove's own builds
    one shingles x hashes matrix per document), also writing each whole signature to `full/RRRRR.bin`."""

    name = "MinHash signatures of character n-grams"

    def __init__(self, work_dir: str, band: Banding, ngram: int, seed: int) -> None:
        config = MinhashConfig(n_grams=ngram, num_buckets=band.bands, hashes_per_bucket=band.rows, seed=seed,
                               hash_config=HashConfig(precision=32))
        super().__init__(output_folder=f"{work_dir}/sigs", config=config, language=CharacterTokenizer())
        self.work_dir, self.ngram = work_dir, ngram
        self._a, self._b = signature_parameters(band.hashes, seed)
        self._full: IO[bytes] | None = None

    def get_shingles(self, text: str) -> np.ndarray:
        return character_shingles(text, self.ngram)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        signature = minhash(shingles, self._a, self._b)
        self._full.write(signature.tobytes())
        return [band.tolist() for band in np.split(signature, self.config.num_buckets)]

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        full = Path(self.work_dir) / "full"
        full.mkdir(parents=True, exist_ok=True)
        with open(full / f"{rank:05d}.bin", "wb") as self._full:
            super().run(data, rank, world_size)


class ExactHashWriter:
    """Writes a task's exact text hashes as a one-band signature file in datatrove's format
    (`exact/bucket_000/RRRRR.minhash.sig`), sorted when closed, so that the same bucket step finds identical
    texts. Rows go to the file as they come; only the sort holds them in memory (20 bytes a document)."""

    def __init__(self, work_dir: Path, rank: int) -> None:
        self.path = work_dir / "exact" / "bucket_000" / f"{rank:05d}.minhash.sig"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._row = np.zeros(1, dtype=EXACT_ROW)
        self._count = 0

    def add(self, text: str) -> None:
        self._row[0] = (*exact_hash(text), self._count)
        self._file.write(self._row.tobytes())
        self._count += 1

    def close(self) -> None:
        self._file.close()
        records = np.fromfile(self.path, dtype=EXACT_ROW)
        records.sort(order=list(EXACT_ROW.names))
        records.tofile(self.path)


# --------------------------------------------------------------------------------------------- 2. buckets


@dataclass(frozen=True)
class FindPairs:
    """Bucket task: ranks 0..bands-1 merge one band of every task's signatures; with exact dedup on, the last
    rank merges the exact hashes. Writes `pairs/near/*.dups` and `pairs/exact/*.dups` (datatrove's format)."""

    work_dir: str
    band: Banding | None
    exact: bool

    @property
    def tasks(self) -> int:
        return (self.band.bands if self.band else 0) + int(self.exact)

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        _allow_open_files()

        if self.band is not None and rank < self.band.bands:
            config = MinhashConfig(num_buckets=self.band.bands, hashes_per_bucket=self.band.rows,
                                   hash_config=HashConfig(precision=32))
            step = MinhashDedupBuckets(f"{self.work_dir}/sigs", f"{self.work_dir}/pairs/near", config=config)
            step.run(None, rank=rank, world_size=self.band.bands)
            return
        config = MinhashConfig(num_buckets=1, hashes_per_bucket=2, hash_config=HashConfig(precision=64))
        MinhashDedupBuckets(f"{self.work_dir}/exact", f"{self.work_dir}/pairs/exact", config=config).run(None, 0, 1)


def _allow_open_files() -> None:
    """A bucket task holds one signature file of every scan task open: raise this process's soft limit on open
    files to the hard limit (often 1,024 soft, far more hard), as far as the system allows."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------------------------- 3. clusters


@dataclass(frozen=True)
class ClusterDuplicates:
    """The one cluster task: which documents go, under which rule, and what they duplicate.

    A document is an `exact_duplicate` when an earlier document (held-out first, then input order) has the same
    text, else a `near_duplicate` when it shares a cluster of verified near pairs with an earlier document.
    Writes `remove/RRRRR.bin` (REMOVAL rows sorted by document) for every corpus task and `dedup.json`.
    """

    work_dir: str
    tasks: int
    threshold: float
    hashes: int
    examples: int

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        work = Path(self.work_dir)
        meta = [task_meta(work, task) for task in range(self.tasks)]
        exact_groups, clusters = _UnionFind(), _UnionFind()
        for a, b in _pairs(work / "pairs" / "exact"):
            exact_groups.union(a, b)
            clusters.union(a, b)
        full = [self._signatures(work, task) for task in range(self.tasks)]
        for a, b in _pairs(work / "pairs" / "near"):
            if _similarity(full, a, b) >= self.threshold:
                clusters.union(a, b)
        removals = _removals(meta, exact_groups, clusters)
        self._write(work, meta, removals)

    def _signatures(self, work: Path, task: int) -> np.ndarray:
        path = work / "full" / f"{task:05d}.bin"
        if not path.exists() or path.stat().st_size == 0:
            return np.zeros((0, self.hashes), dtype=np.uint32)
        return np.memmap(path, dtype=np.uint32, mode="r").reshape(-1, self.hashes)

    def _write(self, work: Path, meta: list[np.ndarray], removals: list[tuple[tuple[int, int], str, tuple[int, int]]]) -> None:
        by_task: dict[int, list[tuple[int, int, int, int]]] = {task: [] for task in range(self.tasks)}
        counts = {rule: 0 for rule in RULE_CODES}
        decontaminated = {f"{rule}_of_heldout": 0 for rule in RULE_CODES}
        examples: dict[str, list[tuple[int, int, int, int]]] = {rule: [] for rule in RULE_CODES}
        for (task, doc), rule, (of_task, of_doc) in removals:  # in document order: examples are the first ones
            by_task[task].append((doc, RULE_CODES[rule], of_task, of_doc))
            counts[rule] += 1
            if meta[task]["split"][doc] == SPLIT_CODES["train"] and meta[of_task]["split"][of_doc] == SPLIT_CODES["heldout"]:
                decontaminated[f"{rule}_of_heldout"] += 1
            if len(examples[rule]) < self.examples:
                examples[rule].append((task, doc, of_task, of_doc))
        (work / "remove").mkdir(parents=True, exist_ok=True)
        for task, rows in by_task.items():
            np.array(sorted(rows), dtype=REMOVAL).tofile(work / "remove" / f"{task:05d}.bin")
        summary = {
            "removed": counts,
            "decontamination": decontaminated,
            "duplicate_examples": {
                rule: [{"document": origin_of(work, meta, task, doc), "duplicate_of": origin_of(work, meta, of_task, of_doc)}
                       for task, doc, of_task, of_doc in rows]
                for rule, rows in examples.items()
            },
        }
        (work / "dedup.json").write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")


def task_meta(work: Path, task: int) -> np.ndarray:
    """A scan task's META rows, memory-mapped: the cluster step looks up only the documents in pairs."""
    path = work / "meta" / f"{task:05d}.bin"
    return np.memmap(path, dtype=META, mode="r") if path.stat().st_size else np.zeros(0, dtype=META)


def _pairs(folder: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Distinct candidate pairs ((task, doc), (task, doc)) from datatrove's .dups files (4 x uint32 each)."""
    files = sorted(folder.glob("*.dups")) if folder.is_dir() else []
    arrays = [np.fromfile(path, dtype="<u4").reshape(-1, 4) for path in files]
    rows = np.unique(np.concatenate(arrays), axis=0) if arrays and sum(len(a) for a in arrays) else np.zeros((0, 4), "<u4")
    return [((int(r[0]), int(r[1])), (int(r[2]), int(r[3]))) for r in rows]


def _similarity(full: list[np.ndarray], a: tuple[int, int], b: tuple[int, int]) -> float:
    return float(np.mean(full[a[0]][a[1]] == full[b[0]][b[1]]))


def _removals(meta: list[np.ndarray], exact_groups: _UnionFind, clusters: _UnionFind) -> list[tuple[tuple[int, int], str, tuple[int, int]]]:
    """(document, rule, document it duplicates) for every document that goes, in keep-priority order."""

    def priority(node: tuple[int, int]) -> tuple[int, int, int]:
        row = meta[node[0]][node[1]]
        return int(row["split"]), int(row["file"]), int(row["record"])

    first_of_exact = {root: min(members, key=priority) for root, members in exact_groups.groups().items()}
    removals = []
    for members in clusters.groups().values():
        members = sorted(members, key=priority)
        keeper = members[0]
        for node in members[1:]:
            earliest_same_text = first_of_exact.get(exact_groups.find(node)) if node in exact_groups else None
            if earliest_same_text is not None and earliest_same_text != node:
                removals.append((node, "exact_duplicate", earliest_same_text))
            else:
                removals.append((node, "near_duplicate", keeper))
    removals.sort(key=lambda removal: priority(removal[0]))
    return removals


class _UnionFind:
    """Disjoint sets of (task, document) nodes, holding only the nodes that were joined."""

    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def __contains__(self, node: tuple[int, int]) -> bool:
        return node in self.parent

    def find(self, node: tuple[int, int]) -> tuple[int, int]:
        root = node
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while node != root:  # path compression
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def groups(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        members: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for node in list(self.parent):
            members.setdefault(self.find(node), []).append(node)
        return members


def origin_of(work: Path, meta: list[np.ndarray], task: int, doc: int) -> str:
    """The origin ("file.jsonl:17") of a document, read from its task's document table."""
    with open(work / "docs" / f"{task:05d}.jsonl", "rb") as table:
        table.seek(int(meta[task]["offset"][doc]))
        origin, _ = split_table_line(table.readline())
    return origin


def table_line(origin: str, output_line: bytes) -> bytes:
    """A document table line: the origin as a JSON string, a tab, then the output record's JSON line. JSON
    writes a tab inside a string as \\t, so the first tab byte is the separator."""
    return json.dumps(origin, ensure_ascii=False).encode("utf-8") + b"\t" + output_line


def split_table_line(line: bytes) -> tuple[str, bytes]:
    origin, _, output_line = line.partition(b"\t")
    return json.loads(origin), output_line
