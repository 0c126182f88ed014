"""The `prepare` work for one language, as datatrove tasks: read, clean, filter, deduplicate, split, write.

Per document, in this order (the first rule that fires removes it and is counted):

    normalize -> empty -> too_short / too_long -> low_japanese_ratio (ja only)
              -> exact_duplicate -> near_duplicate -> split -> write

Steps, each a set of tasks on the configured executor (data/executor.py), with their files in a work folder
that is deleted when the language is done:

    scan     one task per group of input files: read, normalize, filter, split; write the surviving documents
             to a task table and their exact hashes and MinHash signatures (data/dedup.py, step 1)
    pairs    one task per LSH band (+1 for exact hashes): candidate pairs from the sorted signatures (step 2)
    cluster  one task: verified clusters; which documents go (step 3)
    write    one task per group of input files: the kept documents as `<split>-FFFFF-KKKKK.jsonl`, FFFFF the
             input file's number (held-out files first, then training files, in the order given)

A file is read by one task and its outputs are named after it, and every dedup decision depends only on input
order, so the outputs are byte-identical for any number of tasks and workers, on any executor. A rerun after a
crash skips the tasks that finished (datatrove's completion markers).

Held-out documents win: a training document that repeats (or nearly repeats) a held-out one is removed and
counted under `decontamination`, never the held-out one. Without held-out files each document's split is a
seeded hash of its id (or text), so records sharing an id always share a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from data.readers import SKIP_KINDS, Document, iter_documents
from data.text import japanese_ratio, normalize
from pipeline.config import EXECUTOR_KEYS, CorpusConfig, PrepareConfig
from pipeline.errors import JpadaptError

RULES = ("empty", "too_short", "too_long", "low_japanese_ratio", "exact_duplicate", "near_duplicate")
FILTER_RULES = RULES[:4]
SPLITS = ("train", "heldout")
# Tasks when prepare.tasks is not set: one per file up to this many. Each pairs task merges one file per scan
# task, all open at once: 10,000 input files as 10,000 tasks would exceed the usual limit of 1,024 open files.
DEFAULT_MAX_TASKS = 256
# Documents per duplicate rule named in the stats, so a user can look at what dedup removed.
DUPLICATE_EXAMPLES = 5


@dataclass(frozen=True)
class InputFile:
    index: int  # position in the language's input order: held-out files first
    path: str
    name: str  # as origins, stats and messages name it (never an absolute path: outputs stay reproducible)
    split: str  # "heldout" or "train": which list of the config it came from
    size: int


def prepare_language(
    lang: str,
    corpus: CorpusConfig,
    train_files: list[Path],
    heldout_files: list[Path],
    opts: PrepareConfig,
    seed: int,
    out_dir: Path,
    display_name: Callable[[Path], str] = lambda p: p.name,
    work_dir: Path | None = None,
    log: logging.Logger | None = None,
) -> dict:
    """Clean one language's corpus into JSONL shards under `out_dir/lang`; return its statistics.

    Arguments:
        lang: "ja" (gets the Japanese-ratio filter) or another code; names the output folder and errors.
        corpus: the data.<lang> section (text/id fields, format, text unit).
        train_files, heldout_files: resolved input files; held-out ones come first in input order.
        opts: the prepare section (rules, dedup, split, shard size, on_error, and where the tasks run).
        seed: decides the hash split and the MinHash functions.
        out_dir: the stage's output folder.
        display_name: how a file is named in ids, stats and messages.
        work_dir: the language's scratch folder (default `out_dir/.work/lang`); an interrupted run's folder is
            picked up where it stopped if it was made for the same files and task count.
        log: where the steps say what they run.
    """
    # data.dedup and data.executor import datatrove (~0.4 s), which the stages that only read prepared shards
    # through this module (prepared_shards, prepared_texts) should not pay: they are imported where used.
    from data.dedup import CharMinhashSignature, ClusterDuplicates, FindPairs, banding
    from data.executor import ExecutorSettings, run_tasks

    # Absolute paths: tasks run in other processes (a forkserver keeps the working directory it started in).
    out_dir = out_dir.resolve()
    files = [
        InputFile(index, str(path.resolve()), display_name(path), split, path.stat().st_size)
        for index, (path, split) in enumerate([(p, "heldout") for p in heldout_files] + [(p, "train") for p in train_files])
    ]
    identity = {"lang": lang, "corpus": corpus.model_dump(mode="json"), "seed": seed}
    work = _work_dir((work_dir or out_dir / ".work" / lang).resolve(), files, opts, identity)
    output = out_dir / lang
    output.mkdir(parents=True, exist_ok=True)
    settings = ExecutorSettings.from_config(opts)
    tasks = _assign(files, opts.tasks)
    dedup = opts.dedup
    band = banding(dedup.threshold, dedup.num_perm) if dedup.near else None
    heldout_source = "files" if heldout_files else "split"

    def step(name: str, pipeline: list[Any], count: int) -> None:
        run_tasks(f"{lang} {name}", pipeline, count, settings, work / "logs" / name, log)

    scan = ScanFiles(str(work), lang, corpus, opts, seed, heldout_source, tasks, files, band is not None)
    signatures = [CharMinhashSignature(str(work), band, dedup.ngram, seed)] if band else []
    step("scan", [scan, *signatures], len(tasks))
    if dedup.exact or dedup.near:
        pairs = FindPairs(str(work), band, dedup.exact)
        step("pairs", [pairs], pairs.tasks)
        step("cluster", [ClusterDuplicates(str(work), len(tasks), dedup.threshold, band.hashes if band else 0,
                                           DUPLICATE_EXAMPLES)], 1)
    step("write", [WriteShards(str(work), str(output), tasks, files, opts.shard_size_mb * 2**20)], len(tasks))
    stats = _merge_stats(work, files, len(tasks), heldout_source)
    _check_outcome(lang, stats)
    shutil.rmtree(work)
    with suppress(OSError):  # `.work/` itself, once no language is left in it
        work.parent.rmdir()
    return stats


def heldout_by_hash(key: str, seed: int, fraction: float) -> bool:
    """Seeded, uniform, platform-independent coin: True for about `fraction` of all keys."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --------------------------------------------------------------------------------------------- tasks


def _assign(files: list[InputFile], tasks: int | None) -> list[list[int]]:
    """Input files per task: `tasks` (default: one per file, at most DEFAULT_MAX_TASKS) groups of about equal
    bytes, largest file first. Which task reads a file never changes what is written, only how long it takes."""
    count = max(1, min(tasks or DEFAULT_MAX_TASKS, len(files)))
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for file in sorted(files, key=lambda f: (-f.size, f.index)):
        lightest = loads.index(min(loads))
        groups[lightest].append(file.index)
        loads[lightest] += file.size
    return [sorted(group) for group in groups if group]


def _work_dir(work: Path, files: list[InputFile], opts: PrepareConfig, identity: dict[str, Any]) -> Path:
    """The scratch folder, kept from an interrupted run made for the same files, settings and task count (the
    tasks' files depend on it), else made anew."""
    settings = opts.model_dump(mode="json", exclude=set(EXECUTOR_KEYS) - {"tasks"})
    plan = {"files": [[f.path, f.size] for f in files], "settings": settings, **identity}
    plan_file = work / "plan.json"
    if work.exists():
        try:
            same = json.loads(plan_file.read_text(encoding="utf-8")) == plan
        except (OSError, ValueError):
            same = False
        if same:
            return work
        shutil.rmtree(work)
    work.mkdir(parents=True)
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    return work


@dataclass(frozen=True)
class ScanFiles:
    """Scan task: read its input files in order, normalize and filter each document, decide its split, and
    write what survives to the task's document table (`docs/`, `meta/`) and its exact hash (`exact/`); yield
    the documents to the signature step. Counts go to `stats/scan-RRRRR.json`."""

    work_dir: str
    lang: str
    corpus: CorpusConfig
    opts: PrepareConfig
    seed: int
    heldout_source: str  # "files" or "split"
    tasks: list[list[int]]
    files: list[InputFile]
    signatures: bool

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        from datatrove.data import Document as DatatroveDocument

        from data.dedup import ExactHashWriter

        work = Path(self.work_dir)
        table = _TaskTable(work, rank)
        exact = ExactHashWriter(work, rank) if self.opts.dedup.exact else None
        counts = _ScanCounts()
        try:
            for index in self.tasks[rank]:
                file = self.files[index]
                for record, document in enumerate(self._documents(Path(file.path), file.name, counts)):
                    counts.records[index] = record + 1
                    text = normalize(document.text, self.opts.normalization)
                    rule = self._filter(text)
                    if rule is not None:
                        counts.removed[rule] += 1
                        continue
                    doc_split = file.split if self.heldout_source == "files" else self._hash_split(document, text)
                    doc = table.add(document, text, index, record, doc_split)
                    if exact is not None:
                        exact.add(text)
                    if self.signatures:
                        yield DatatroveDocument(text=text, id=str(doc))
        finally:
            table.close()
        if exact is not None:
            exact.close()
        counts.save(work / "stats" / f"scan-{rank:05d}.json", self.tasks[rank])

    def _documents(self, path: Path, name: str, counts: _ScanCounts) -> Iterator[Document]:
        return iter_documents(path, self.corpus, self.opts.on_error, counts.skipped, name=name)

    def _filter(self, text: str) -> str | None:
        opts = self.opts
        if not text:
            return "empty"
        if len(text) < opts.min_chars:
            return "too_short"
        if len(text) > opts.max_chars:
            return "too_long"
        if self.lang == "ja" and japanese_ratio(text) < opts.min_japanese_ratio:
            return "low_japanese_ratio"
        return None

    def _hash_split(self, document: Document, text: str) -> str:
        id_field = self.corpus.id_field
        # A null id is "no id": str(None) would put every id-less record under the one key "None".
        has_id = id_field is not None and document.fields.get(id_field) is not None
        key = str(document.fields[id_field]) if has_id else text
        return "heldout" if heldout_by_hash(key, self.seed, self.opts.heldout_fraction) else "train"


@dataclass
class _ScanCounts:
    records: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)

    def save(self, path: Path, files: list[int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "records": {str(index): self.records[index] for index in files},
            "skipped": {kind: self.skipped[kind] for kind in SKIP_KINDS},
            "removed": {rule: self.removed[rule] for rule in FILTER_RULES},
        }
        path.write_text(json.dumps(data), encoding="utf-8")


class _TaskTable:
    """A scan task's surviving documents: their output lines (`docs/RRRRR.jsonl`, each behind its origin) and a
    fixed-size row each (`meta/RRRRR.bin`, data/dedup.META) for the cluster and write steps."""

    def __init__(self, work: Path, rank: int) -> None:
        from data.dedup import META

        for folder in ("docs", "meta"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        self._docs = open(work / "docs" / f"{rank:05d}.jsonl", "wb")  # noqa: SIM115 (closed by close())
        self._meta = open(work / "meta" / f"{rank:05d}.bin", "wb")  # noqa: SIM115
        self._row = np.zeros(1, dtype=META)
        self._offset = 0
        self.count = 0

    def add(self, document: Document, text: str, file: int, record: int, split: str) -> int:
        from data.dedup import SPLIT_CODES, table_line

        line = table_line(document.origin, _output_line(document, text))
        self._row[0] = (file, record, SPLIT_CODES[split], len(text), self._offset)
        self._docs.write(line)
        self._meta.write(self._row.tobytes())
        self._offset += len(line)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        self._docs.close()
        self._meta.close()


def _output_line(document: Document, text: str) -> bytes:
    """The input's other fields, then the cleaned "text"; an "id" (the origin, file:line) leads when missing."""
    record: dict[str, Any] = {} if "id" in document.fields else {"id": document.origin}
    record.update(document.fields)
    record["text"] = text
    return (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")


@dataclass(frozen=True)
class WriteShards:
    """Write task: the kept documents of its input files, as `<split>-FFFFF-KKKKK.jsonl` shards of at most
    `max_bytes` (a single larger record gets a shard of its own). Shard sizes go to `stats/write-RRRRR.json`."""

    work_dir: str
    output_dir: str
    tasks: list[list[int]]
    files: list[InputFile]
    max_bytes: int

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        from data.dedup import REMOVAL, SPLIT_CODES, split_table_line, task_meta

        work, output = Path(self.work_dir), Path(self.output_dir)
        for index in self.tasks[rank]:  # a rerun after a crash starts these files' shards over
            for split in SPLITS:
                for stale in output.glob(f"{split}-{index:05d}-*.jsonl"):
                    stale.unlink()
        meta = task_meta(work, rank)
        removed = np.zeros(len(meta), dtype=bool)
        removal_file = work / "remove" / f"{rank:05d}.bin"
        if removal_file.exists():
            removed[np.fromfile(removal_file, dtype=REMOVAL)["doc"]] = True
        split_names = {code: split for split, code in SPLIT_CODES.items()}
        writers: dict[tuple[str, int], ShardWriter] = {}
        with open(work / "docs" / f"{rank:05d}.jsonl", "rb") as table:
            for doc, line in enumerate(table):
                if removed[doc]:
                    continue
                row = meta[doc]
                key = (split_names[int(row["split"])], int(row["file"]))
                if key not in writers:
                    writers[key] = ShardWriter(output, f"{key[0]}-{key[1]:05d}", self.max_bytes)
                writers[key].write(split_table_line(line)[1], int(row["chars"]))
        for writer in writers.values():
            writer.close()
        shards = [shard for writer in writers.values() for shard in writer.shards]
        path = work / "stats" / f"write-{rank:05d}.json"
        path.write_text(json.dumps(shards), encoding="utf-8")


# --------------------------------------------------------------------------------------------- output


@dataclass
class ShardWriter:
    """Writes `<prefix>-00000.jsonl`, `-00001`, ...; a shard never exceeds `max_bytes` unless a single record
    does (every shard holds at least one record)."""

    directory: Path
    prefix: str
    max_bytes: int
    shards: list[dict] = field(default_factory=list)
    _file: IO[bytes] | None = None

    def write(self, line: bytes, chars: int) -> None:
        if self._file is not None and self.shards[-1]["bytes"] + len(line) > self.max_bytes:
            self.close()
        if self._file is None:
            self._open_next()
        self._file.write(line)
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["chars"] += chars
        shard["bytes"] += len(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_next(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.jsonl"
        # Binary: the bytes are exactly what was encoded (no newline translation, no locale encoding).
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (a shard stays open across writes; close() ends it)
        self.shards.append({"name": name, "split": self.prefix.split("-")[0], "documents": 0, "chars": 0, "bytes": 0})


def _json_default(value: Any) -> str:
    """Parquet columns can hold dates, decimals or bytes, which JSON has no type for: write them as text."""
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


# --------------------------------------------------------------------------------------------- statistics


def _merge_stats(work: Path, files: list[InputFile], tasks: int, heldout_source: str) -> dict:
    """stats.json's section for one language, from the tasks' counts; the same for any number of tasks."""
    records: Counter = Counter()
    skipped: Counter = Counter()
    removed: Counter = Counter()
    shards: list[dict] = []
    for rank in range(tasks):
        scan = json.loads((work / "stats" / f"scan-{rank:05d}.json").read_text(encoding="utf-8"))
        records.update({int(index): count for index, count in scan["records"].items()})
        skipped.update(scan["skipped"])
        removed.update(scan["removed"])
        shards += json.loads((work / "stats" / f"write-{rank:05d}.json").read_text(encoding="utf-8"))
    dedup_file = work / "dedup.json"
    dedup = json.loads(dedup_file.read_text(encoding="utf-8")) if dedup_file.exists() else {}
    removed.update(dedup.get("removed", {}))
    decontamination = dedup.get("decontamination", {})
    examples = dedup.get("duplicate_examples", {})
    return {
        "input": {
            "files": [{"name": f.name, "split": f.split, "records": records[f.index]} for f in files],
            "records": sum(records.values()),
        },
        "skipped_lines": {kind: skipped[kind] for kind in SKIP_KINDS},
        "removed": {rule: removed[rule] for rule in RULES},
        "decontamination": {
            f"{rule}_of_heldout": decontamination.get(f"{rule}_of_heldout", 0)
            for rule in ("exact_duplicate", "near_duplicate")
        },
        "duplicate_examples": {rule: examples.get(rule, []) for rule in ("exact_duplicate", "near_duplicate")},
        "heldout_source": heldout_source,
        "splits": {split: _split_stats(shards, split) for split in SPLITS},
    }


def _split_stats(shards: list[dict], split: str) -> dict:
    mine = sorted((shard for shard in shards if shard["split"] == split), key=lambda shard: shard["name"])
    return {
        "documents": sum(shard["documents"] for shard in mine),
        "chars": sum(shard["chars"] for shard in mine),
        "bytes": sum(shard["bytes"] for shard in mine),
        "shards": [shard["name"] for shard in mine],
    }


# --------------------------------------------------------------------------------------------- outcome checks


def _check_outcome(lang: str, stats: dict) -> None:
    """A language must end with training and held-out documents; say why when it does not."""
    where = f"data.{lang}"
    files = stats["input"]["files"]
    records = stats["input"]["records"]
    if records == 0:
        skipped = _nonzero(stats["skipped_lines"])
        also = f"; skipped lines: {skipped}" if skipped else ""
        raise JpadaptError(f"{where}: the corpus is empty (files: {_names(files)}{also})")
    train_files = [file for file in files if file["split"] == "train"]
    if sum(file["records"] for file in train_files) == 0:
        raise JpadaptError(f"{where}: the training files hold no records (files: {_names(train_files)})")
    splits = stats["splits"]
    removed = _nonzero(stats["removed"]) or "nothing removed"
    if splits["train"]["documents"] == 0:
        raise JpadaptError(f"{where}: no training documents left after filtering (read {records} records: {removed})")
    if splits["heldout"]["documents"] == 0:
        if stats["heldout_source"] == "files":
            held = sum(file["records"] for file in files if file["split"] == "heldout")
            raise JpadaptError(
                f"{where}: no held-out documents left after filtering (read {held} held-out records; "
                f"removed overall: {removed})"
            )
        kept = splits["train"]["documents"]
        raise JpadaptError(
            f"{where}: no held-out documents: the hash split sent all {kept} kept documents to train; "
            f"raise prepare.heldout_fraction or give {where}.heldout files"
        )


def _names(files: list[dict]) -> str:
    return ", ".join(file["name"] for file in files) or "none"


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items() if value)


def prepared_shards(prepared: Path, lang: str, split: str) -> list[Path]:
    """The JSONL shards `prepare` wrote for one language and split ("train" or "heldout"), in order."""
    return sorted((prepared / lang).glob(f"{split}-*.jsonl"))


def prepared_texts(shards: list[Path]) -> Iterator[str]:
    """The "text" of every record of prepared shards, streaming (they were validated when written)."""
    for shard in shards:
        with open(shard, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def capped_texts(texts: Iterable[str], max_chars: int | None) -> list[str]:
    """Texts in order until `max_chars` characters, the last one cut to fit (None: all of them)."""
    out, total = [], 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            break
        out.append(text if max_chars is None else text[: max_chars - total])
        total += len(out[-1])
    return out
