"""The `prepare` pipeline for one language: read, clean, filter, deduplicate, split and shard, streaming.

Per document, in this order (the first rule that fires removes it and is counted):

    normalize -> empty -> too_short / too_long -> low_japanese_ratio (ja only)
              -> exact_duplicate -> near_duplicate -> split -> write

Held-out files are read before training files and share the dedup indexes with them, so a training document
that repeats a held-out one is removed (decontamination) and also counted under `decontamination`.
Without held-out files each document's split is a seeded hash of its id (or text), so records sharing an id
always share a split. Output: `<out_dir>/<lang>/{train,heldout}-NNNNN.jsonl`, byte-identical for identical
input, settings and seed. Memory: one document at a time plus the dedup indexes (see data/dedup.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from data.dedup import ExactDedup, NearDedup
from data.readers import SKIP_KINDS, Document, iter_documents
from data.text import japanese_ratio, normalize
from pipeline.config import CorpusConfig, PrepareConfig
from pipeline.errors import JpadaptError

RULES = ("empty", "too_short", "too_long", "low_japanese_ratio", "exact_duplicate", "near_duplicate")
SPLITS = ("train", "heldout")
# Documents per duplicate rule named in the stats, so a user can look at what dedup removed.
DUPLICATE_EXAMPLES = 5
_SHARD_NAME = re.compile(r"(train|heldout)-\d{5}\.jsonl")


def prepare_language(
    lang: str,
    corpus: CorpusConfig,
    train_files: list[Path],
    heldout_files: list[Path],
    opts: PrepareConfig,
    seed: int,
    out_dir: Path,
    display_name: Callable[[Path], str] = lambda p: p.name,
) -> dict:
    """Clean one language's corpus into JSONL shards under `out_dir/lang`; return its statistics.

    Arguments:
        lang: "ja" (gets the Japanese-ratio filter) or another code; names the output folder and errors.
        corpus: the data.<lang> section (text/id fields, format, text unit).
        train_files, heldout_files: resolved input files; held-out ones are read first.
        opts: the prepare section (normalization, filters, dedup, split, shard size, on_error).
        seed: decides the hash split and the MinHash permutations.
        out_dir: the stage's output folder.
        display_name: how a file is named in ids, stats and messages (never an absolute path, so outputs are
            reproducible across machines).
    """
    directory = _fresh_output_dir(out_dir / lang)
    writers = {split: ShardWriter(directory, split, max_bytes=opts.shard_size_mb * 2**20) for split in SPLITS}
    run = _LanguageRun(lang, corpus, opts, seed, "files" if heldout_files else "split", writers)
    sources = [(path, "heldout") for path in heldout_files] + [(path, "train") for path in train_files]
    try:
        for path, source in sources:
            run.read_file(path, source, display_name(path))
    finally:
        for writer in run.writers.values():
            writer.close()
    stats = run.stats()
    _check_outcome(lang, stats)
    return stats


def heldout_by_hash(key: str, seed: int, fraction: float) -> bool:
    """Seeded, uniform, platform-independent coin: True for about `fraction` of all keys."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --------------------------------------------------------------------------------------------- one language


@dataclass
class _LanguageRun:
    lang: str
    corpus: CorpusConfig
    opts: PrepareConfig
    seed: int
    heldout_source: str  # "files" or "split"
    writers: dict[str, ShardWriter]
    files: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    removed: Counter = field(default_factory=Counter)
    decontaminated: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=lambda: {"exact_duplicate": [], "near_duplicate": []})
    exact: ExactDedup | None = field(init=False)
    near: NearDedup | None = field(init=False)

    def __post_init__(self) -> None:
        dedup = self.opts.dedup
        self.exact = ExactDedup() if dedup.exact else None
        self.near = NearDedup(dedup.threshold, dedup.num_perm, dedup.ngram, self.seed) if dedup.near else None

    def read_file(self, path: Path, source: str, name: str) -> None:
        documents = iter_documents(path, self.corpus, self.opts.on_error, self.skipped, name=name)
        # disable=None: silent when stderr is not a terminal (CI, logs); leave=False: one bar at a time.
        description = f"prepare {self.lang} {source}: {name}"
        progress = tqdm(documents, desc=description, unit=" docs", disable=None, leave=False)
        records = 0
        for document in progress:
            records += 1
            self.add(document, source)
        self.files.append({"name": name, "split": source, "records": records})

    def add(self, document: Document, source: str) -> None:
        text = normalize(document.text, self.opts.normalization)
        rule = self._filter(text)
        if rule is None:
            # The split is a pure function of the document, so it is known before dedup, which records it
            # with each kept document to recognise duplicates of held-out documents.
            split = source if self.heldout_source == "files" else self._hash_split(document, text)
            rule = self._deduplicate(document.origin, text, split)
            if rule is None:
                self.writers[split].write(_output_record(document, text), len(text))
                return
        self.removed[rule] += 1

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

    def _deduplicate(self, origin: str, text: str, split: str) -> str | None:
        if self.exact is not None:
            kept = self.exact.match_or_add(text, key=origin, tag=split)
            if kept is not None:
                return self._duplicate("exact_duplicate", origin, split, kept.key, kept.tag)
        if self.near is not None:
            # The origin is unique per document and is shared with the exact index (one string, not two).
            kept = self.near.match_or_add(origin, text, tag=split)
            if kept is not None:
                return self._duplicate("near_duplicate", origin, split, kept.key, kept.tag)
        return None

    def _duplicate(self, rule: str, origin: str, split: str, kept_origin: str, kept_split: str) -> str:
        if split == "train" and kept_split == "heldout":
            self.decontaminated[f"{rule}_of_heldout"] += 1
        if len(self.examples[rule]) < DUPLICATE_EXAMPLES:
            self.examples[rule].append({"document": origin, "duplicate_of": kept_origin})
        return rule

    def stats(self) -> dict:
        return {
            "input": {"files": self.files, "records": sum(file["records"] for file in self.files)},
            "skipped_lines": {kind: self.skipped[kind] for kind in SKIP_KINDS},
            "removed": {rule: self.removed[rule] for rule in RULES},
            "decontamination": {
                f"{rule}_of_heldout": self.decontaminated[f"{rule}_of_heldout"]
                for rule in ("exact_duplicate", "near_duplicate")
            },
            "duplicate_examples": self.examples,
            "heldout_source": self.heldout_source,
            "splits": {split: self.writers[split].stats() for split in SPLITS},
        }


def _output_record(document: Document, text: str) -> dict[str, Any]:
    """The input's other fields, then the cleaned "text"; an "id" (the origin, file:line) leads when missing."""
    record = {} if "id" in document.fields else {"id": document.origin}
    record.update(document.fields)
    record["text"] = text
    return record


# --------------------------------------------------------------------------------------------- output


@dataclass
class ShardWriter:
    """Writes one split as `<split>-00000.jsonl`, `-00001`, ...; a shard never exceeds `max_bytes`
    unless a single record does (every shard holds at least one record)."""

    directory: Path
    split: str
    max_bytes: int
    documents: int = 0
    chars: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    _file: IO[bytes] | None = None
    _shard_bytes: int = 0

    def write(self, record: dict[str, Any], chars: int) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        if self._file is not None and self._shard_bytes + len(line) > self.max_bytes:
            self.close()
        if self._file is None:
            self._open_next()
        self._file.write(line)
        self._shard_bytes += len(line)
        self.documents += 1
        self.chars += chars
        self.bytes += len(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def stats(self) -> dict:
        return {"documents": self.documents, "chars": self.chars, "bytes": self.bytes, "shards": list(self.shards)}

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.jsonl"
        # Binary: the bytes are exactly what was encoded (no newline translation, no locale encoding).
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (a shard stays open across writes; close() ends it)
        self.shards.append(name)
        self._shard_bytes = 0


def _json_default(value: Any) -> str:
    """Parquet columns can hold dates, decimals or bytes, which JSON has no type for: write them as text."""
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


def _fresh_output_dir(directory: Path) -> Path:
    """Create `directory`; delete shards a previous run left there (a run with fewer shards would not
    overwrite them, and readers would pick them up). Other files are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        if _SHARD_NAME.fullmatch(path.name):
            path.unlink()
    return directory


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
