"""Streaming document readers for JSONL, plain text and Parquet corpora (JSONL and text may be .gz/.xz).

`iter_documents` yields one `Document` at a time and never holds a file in memory (except a plain-text file
read with text_unit "file", which is one document anyway). A bad record either stops the run with a
`JpadaptError` naming file and line (on_error="fail") or is counted by kind in `skipped` and passed over
(on_error="skip"). Kinds: not_utf8, invalid_json, not_an_object, missing_text, text_not_string.
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import zstandard

from pipeline.config import CorpusConfig
from pipeline.errors import JpadaptError

OnError = Literal["fail", "skip"]
SKIP_KINDS = ("not_utf8", "invalid_json", "not_an_object", "missing_text", "text_not_string")

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".parquet": "parquet"}
OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".zst": lambda path, mode: _ZstdLines(path)}
SUPPORTED = ".jsonl, .json, .txt (each optionally .gz, .xz or .zst), .parquet"

# Rows per Parquet batch: bounds memory at ~512 documents whatever the row group size.
PARQUET_BATCH_ROWS = 512
_BOM = b"\xef\xbb\xbf"
# JSON may spell a lone UTF-16 surrogate ("\ud800"), which Python decodes but no UTF-8 file can hold.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# What a truncated or corrupt compressed stream raises while reading (BadGzipFile is an OSError).
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
_JSON_TYPES[float] = _JSON_TYPES[int]


class _ZstdLines:
    """The lines of a .zst file of one or more frames. zstandard's stream reader ends quietly inside a cut
    frame (a truncated file would lose its tail unnoticed); here a frame that never ends raises."""

    CHUNK = 1 << 20

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> _ZstdLines:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[bytes]:
        pending = b""
        for data in self._decompressed():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if pending:
            yield pending

    def _decompressed(self) -> Iterator[bytes]:
        decompressor = zstandard.ZstdDecompressor()
        frame, in_frame = decompressor.decompressobj(), False
        while chunk := self._file.read(self.CHUNK):
            while chunk:
                yield frame.decompress(chunk)
                in_frame = True
                chunk = b""
                if frame.eof:  # the next frame starts in what this one did not use
                    chunk, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
        if in_frame:
            raise EOFError("the last zstd frame is cut off")


@dataclass(frozen=True)
class Document:
    text: str
    fields: dict[str, Any]  # the record's other fields (JSONL/Parquet); {} for plain text
    origin: str  # "file.jsonl:17", "file.txt:3" (first line of the document) or "file.parquet:row 5"


def iter_documents(
    path: Path,
    corpus: CorpusConfig,
    on_error: OnError,
    skipped: Counter,
    name: str | None = None,
) -> Iterator[Document]:
    """Yield the documents of one corpus file, streaming.

    Arguments:
        path: the file; its format comes from `corpus.format` or, for "auto", from the suffix.
        corpus: text_field / text_unit / format settings of this corpus.
        on_error: "fail" raises JpadaptError on the first bad record; "skip" counts it in `skipped`.
        skipped: counter of skipped records by kind (updated in place).
        name: how the file is named in origins and error messages (default: the path as given).
    """
    name = str(path) if name is None else name
    fmt, compression = detect_format(path, corpus.format)
    with _open_binary(path, name, compression) as stream:
        if fmt == "parquet":
            yield from _parquet_documents(stream, name, corpus.text_field, on_error, skipped)
            return
        lines = _numbered_lines(stream, name)
        if fmt == "jsonl":
            yield from _jsonl_documents(lines, name, corpus.text_field, on_error, skipped)
        else:
            yield from _text_documents(lines, name, corpus.text_unit, on_error, skipped)


def detect_format(path: Path, fmt: str) -> tuple[str, str | None]:
    """(format, compression suffix or None) of `path`; `fmt` is the configured format or "auto"."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in OPENERS else None
    inner = suffixes[-1] if suffixes else ""
    if fmt == "auto":
        if inner not in FORMAT_BY_SUFFIX:
            shown = (inner + (compression or "")) or "(none)"
            raise JpadaptError(
                f"{path}: cannot tell the format from the suffix {shown!r}; supported: {SUPPORTED}; "
                "or set the corpus format (jsonl, text, parquet)"
            )
        fmt = FORMAT_BY_SUFFIX[inner]
    if fmt == "parquet" and compression:
        raise JpadaptError(
            f"{path}: Parquet files cannot be {compression}-compressed (Parquet compresses its columns itself)"
        )
    return fmt, compression


# --------------------------------------------------------------------------------------------- byte streams


@contextmanager
def _open_binary(path: Path, name: str, compression: str | None) -> Iterator[IO[bytes]]:
    opener = OPENERS.get(compression, open)
    try:
        stream = opener(path, "rb")
    except OSError as exc:
        raise JpadaptError(f"{name}: cannot open: {exc.strerror or exc}") from None
    with stream:
        yield stream


def _numbered_lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) pairs; a corrupt compressed stream becomes a JpadaptError."""
    lineno = 0
    try:
        for lineno, raw in enumerate(stream, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]  # editors on Windows write a UTF-8 byte order mark; it is not text
            yield lineno, raw
    except _READ_ERRORS as exc:
        raise JpadaptError(f"{name}: cannot read line {lineno + 1} (corrupt or truncated file?): {exc}") from None


class _Problems:
    """Raise or count one bad record, as on_error says."""

    def __init__(self, on_error: OnError, skipped: Counter) -> None:
        self.on_error = on_error
        self.skipped = skipped

    def report(self, kind: str, message: str) -> None:
        if self.on_error == "fail":
            raise JpadaptError(message)
        self.skipped[kind] += 1


def _decode(raw: bytes, where: str, problems: _Problems) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = f"byte {exc.start + 1} of the line: 0x{raw[exc.start]:02x}"
        problems.report("not_utf8", f"{where}: not valid UTF-8 ({bad})")
        return None


# --------------------------------------------------------------------------------------------- JSONL


def _jsonl_documents(
    lines: Iterable[tuple[int, bytes]], name: str, text_field: str, on_error: OnError, skipped: Counter
) -> Iterator[Document]:
    problems = _Problems(on_error, skipped)
    for lineno, raw in lines:
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        line = _decode(raw, where, problems)
        if line is None:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.report("invalid_json", f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        # Surrogate pairs (emoji in ASCII-escaped JSON) are fine; the full check runs only on lines with one.
        if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(record):
            problems.report("not_utf8", f"{where}: not valid Unicode: a \\uD800-\\uDFFF escape without its pair")
            continue
        document = _record_document(record, where, text_field, problems)
        if document is not None:
            yield document


def _has_lone_surrogate(record: Any) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _record_document(record: Any, where: str, text_field: str, problems: _Problems) -> Document | None:
    """Check one JSONL/Parquet record found at `where`; None when it was reported as bad."""
    if not isinstance(record, dict):
        problems.report("not_an_object", f"{where}: expected a JSON object, got {_json_type(record)}")
        return None
    if text_field not in record:
        fields = ", ".join(record) or "none"
        problems.report("missing_text", f'{where}: no "{text_field}" field (fields: {fields})')
        return None
    text = record[text_field]
    if not isinstance(text, str):
        problems.report("text_not_string", f'{where}: "{text_field}" is {_json_type(text)}, not a string')
        return None
    fields = {key: value for key, value in record.items() if key != text_field}
    return Document(text=text, fields=fields, origin=where)


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------- plain text


def _text_documents(
    lines: Iterable[tuple[int, bytes]], name: str, unit: str, on_error: OnError, skipped: Counter
) -> Iterator[Document]:
    """Documents of a UTF-8 text file: the whole file, blank-line-separated paragraphs, or single lines.

    A line that is not UTF-8 is dropped when skipping (the rest of its paragraph is kept).
    """
    problems = _Problems(on_error, skipped)
    block: list[str] = []
    first_line = 0
    for lineno, raw in lines:
        line = _decode(raw, f"{name}:{lineno}", problems)
        if line is None:
            continue
        if unit != "file" and not line.strip():
            if block:
                yield _text_document(block, name, first_line)
                block = []
            continue
        if not block:
            first_line = lineno
        block.append(line)
        if unit == "line":
            yield _text_document(block, name, first_line)
            block = []
    if block:
        yield _text_document(block, name, first_line)


def _text_document(lines: list[str], name: str, first_line: int) -> Document:
    return Document(text="".join(lines).rstrip("\r\n"), fields={}, origin=f"{name}:{first_line}")


# --------------------------------------------------------------------------------------------- Parquet


def _parquet_documents(
    stream: IO[bytes], name: str, text_field: str, on_error: OnError, skipped: Counter
) -> Iterator[Document]:
    import pyarrow  # imported here: only Parquet corpora need it, and it takes ~0.2 s to load
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(stream)
    except pyarrow.ArrowException as exc:
        raise JpadaptError(f"{name}: not a readable Parquet file: {exc}") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise JpadaptError(f'{name}: no "{text_field}" column (columns: {", ".join(columns) or "none"})')
    problems = _Problems(on_error, skipped)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1  # 1-based like line numbers
                where = f"{name}:row {row}"
                document = _record_document(record, where, text_field, problems)
                if document is not None:
                    yield document
    except pyarrow.ArrowException as exc:
        raise JpadaptError(f"{name}: cannot read row {row + 1} (corrupt file?): {exc}") from None
