"""Load a tokenizer by bundled name or path, as a `TokenizerBackend` (see `tokenizer/backend.py`).

    load_tokenizer("llama2")                         # bundled: llama2, llama3, qwen, llm-jp, mistral
    load_tokenizer("runs/demo/extend-vocab/tokenizer")  # a folder: tokenizer.json, else tokenizer.model
    load_tokenizer("path/to/llama3/tokenizer.model")  # a tiktoken rank file (LLaMA-3 pattern by default)

Three backends, one per library: SentencePiece `.model` files, Hugging Face `tokenizer.json` files and tiktoken
rank files. A file's format is told by its content, not its name: LLaMA-3 ships its tiktoken ranks as
`tokenizer.model`, the same name as a SentencePiece model.

Spans. Every backend first tries to derive the character spans from the tokens themselves: when the tokens'
bytes, concatenated, spell the text (lossless tokenizers: byte-level BPE, tiktoken, SentencePiece with the
identity normalizer, possibly after one dummy-prefix space), the spans follow from per-id tables with a few
numpy operations per text. Otherwise (a normalizer changed the text, an `<unk>` swallowed characters) the
library's own alignment is used: SentencePiece's proto output, or the `tokenizers` offsets. The proto output costs
over 10x SentencePiece's plain encoding (one Python object per piece), the offsets half of `tokenizers`' encoding,
and the offsets put a SentencePiece-style dummy-prefix '▁' on the first character, against the `EncodedText`
contract. Besides the protocol, every backend has `path` (the file loaded) and `unk_id` (None if it has none).

Nothing here downloads: a spec that is neither a bundled name nor an existing path is an error, never a Hub id.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tiktoken
from tokenizers import Tokenizer

from data.assets import materialize_dir
from pipeline.config import BUNDLED_TOKENIZERS
from pipeline.errors import JpadaptError
from tokenizer.backend import EncodedText, TokenizerBackend

BUNDLED: tuple[str, ...] = BUNDLED_TOKENIZERS

# Pre-tokenization regexes of the tiktoken rank files (from the models' own tokenizer code). They differ only in
# digits: LLaMA-3 groups up to 3 digits, Qwen splits every digit.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Files looked for in a folder, in order of preference: a Hugging Face folder or a vocabulary-extension output
# may hold both, and tokenizer.json then describes the tokenizer completely (added tokens included).
FOLDER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model")
_OTHER_SUFFIXES: tuple[str, ...] = (".model", ".tiktoken")  # e.g. llm-jp-tokenizer-100k.ver3.1.model

_SPACE_MARK = "\u2581"  # '▁', SentencePiece's escaped space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")
_SNIFF_BYTES = 4096


def _threads() -> int:
    """Cores this process may run on (a container's CPU set can be smaller than the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# Per-vocabulary tables


@dataclass(frozen=True)
class VocabTables:
    """Everything per id that the backends and span computation need, derived once from `token_bytes`."""

    token_bytes: list[bytes]
    byte_fallback: np.ndarray  # bool
    special: np.ndarray  # bool
    n_bytes: np.ndarray  # int64, len(token_bytes[i])
    n_chars: np.ndarray  # int64, UTF-8 lead bytes in the token: characters that start inside it
    starts_mid_char: np.ndarray  # bool, the first byte is a continuation byte (0b10xxxxxx)
    leading_space: np.ndarray  # bool, the first byte is b" "
    flat: np.ndarray  # uint8, all tokens' bytes concatenated in id order
    flat_start: np.ndarray  # int64, where each id's bytes start in `flat`


def build_tables(token_bytes: list[bytes], byte_fallback: np.ndarray, special: np.ndarray) -> VocabTables:
    flat = np.frombuffer(b"".join(token_bytes), dtype=np.uint8)
    n_bytes = np.fromiter(map(len, token_bytes), dtype=np.int64, count=len(token_bytes))
    flat_start = np.zeros(len(token_bytes), dtype=np.int64)
    np.cumsum(n_bytes[:-1], out=flat_start[1:])
    is_lead = (flat & 0xC0) != 0x80
    leads_before = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum(is_lead, out=leads_before[1:])
    nonempty = n_bytes > 0
    # First byte of each token; the appended 0 only serves empty tokens at the end, which `nonempty` masks.
    first_byte = np.append(flat, np.uint8(0))[flat_start]
    return VocabTables(
        token_bytes=token_bytes,
        byte_fallback=byte_fallback.astype(bool),
        special=special.astype(bool),
        n_bytes=n_bytes,
        n_chars=leads_before[flat_start + n_bytes] - leads_before[flat_start],
        starts_mid_char=nonempty & ((first_byte & 0xC0) == 0x80),
        leading_space=nonempty & (first_byte == 0x20),
        flat=flat,
        flat_start=flat_start,
    )


# ---------------------------------------------------------------------------------------------------------------
# Spans


def spans_if_spelled(ids: np.ndarray, text: str, tables: VocabTables, compare_bytes: bool) -> np.ndarray | None:
    """Character spans of `ids` if their bytes spell `text` (after at most one dummy-prefix space), else None.

    Counting lead bytes per token gives the character offsets without touching the text: a token starting
    inside a character (a byte-fallback piece, a byte-level fragment) starts at that character, so all the
    fragments of one character share its span. With `compare_bytes` the spelled bytes are compared with the
    text (for tokenizers whose normalizer may rewrite it); without, only the character count is checked.
    """
    if len(ids) == 0:
        return np.zeros((0, 2), dtype=np.int64) if not text else None
    n_chars = tables.n_chars[ids]
    ends = np.cumsum(n_chars)
    extra = int(ends[-1]) - len(text)  # 1 = a dummy-prefix space the text does not have
    if extra not in (0, 1) or (extra == 1 and not tables.leading_space[ids[0]]):
        return None
    if compare_bytes and not _spells(ids, text, tables, extra):
        return None
    spans = np.empty((len(ids), 2), dtype=np.int64)
    spans[:, 0] = ends - n_chars - tables.starts_mid_char[ids]
    spans[:, 1] = ends
    if extra:
        spans -= 1
        np.maximum(spans, 0, out=spans)  # the dummy space itself covers no character: (0, 0)
    return spans


def _spells(ids: np.ndarray, text: str, tables: VocabTables, extra: int) -> bool:
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    n_bytes = tables.n_bytes[ids]
    ends = np.cumsum(n_bytes)
    if int(ends[-1]) != len(raw) + extra:
        return False
    # Index in `flat` of every spelled byte: each token's first byte in `flat`, then the following ones.
    index = np.repeat(tables.flat_start[ids] - (ends - n_bytes), n_bytes) + np.arange(ends[-1])
    spelled = tables.flat[index]
    return bool(np.array_equal(spelled[extra:], raw))


def byte_to_char_spans(text: str, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """UTF-8 byte offsets into `text` -> character spans; a span starting inside a character starts at it."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    is_lead = (raw & 0xC0) != 0x80
    leads_before = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum(is_lead, out=leads_before[1:])
    inside_char = np.append(~is_lead, False)
    spans = np.empty((len(begin), 2), dtype=np.int64)
    spans[:, 0] = leads_before[begin] - inside_char[begin]
    spans[:, 1] = leads_before[end]
    return spans


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece


@dataclass(eq=False)
class SentencePieceBackend:
    """A SentencePiece `.model` (LLaMA-2, Mistral, llm-jp, and vocabulary extensions of them)."""

    processor: spm.SentencePieceProcessor = field(repr=False)
    name: str
    source: str
    path: Path
    kind: str = "sentencepiece"

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def unk_id(self) -> int:
        """`<unk>` is no special token: encode produces it for characters the model cannot spell."""
        return self.processor.unk_id()

    @cached_property
    def tables(self) -> VocabTables:
        sp = self.processor
        size = sp.vocab_size()
        pieces = [sp.IdToPiece(i) for i in range(size)]
        special = np.fromiter((sp.IsControl(i) for i in range(size)), dtype=bool, count=size)
        is_byte = np.fromiter((sp.IsByte(i) for i in range(size)), dtype=bool, count=size)
        token_bytes = []
        for i, piece in enumerate(pieces):
            if special[i] or sp.IsUnknown(i):
                token_bytes.append(b"")
            elif is_byte[i]:
                token_bytes.append(bytes([int(piece[3:5], 16)]))  # '<0xE5>'
            else:
                # User-defined pieces are matched literally in the text, so they are text, not specials.
                token_bytes.append(piece.replace(_SPACE_MARK, " ").encode("utf-8"))
        return build_tables(token_bytes, is_byte, special)

    @property
    def token_bytes(self) -> list[bytes]:
        return self.tables.token_bytes

    @property
    def byte_fallback(self) -> np.ndarray:
        return self.tables.byte_fallback

    @property
    def special(self) -> np.ndarray:
        return self.tables.special

    @cached_property
    def pieces_spell_text(self) -> bool:
        """True when the pieces spell the text itself (plus a leading dummy space): no normalization rules, no
        whitespace squeezing, the dummy space (if any) in front. Then spans come from piece lengths."""
        from sentencepiece import sentencepiece_model_pb2  # needs protobuf, a declared dependency

        model = sentencepiece_model_pb2.ModelProto.FromString(self.processor.serialized_model_proto())
        norm = model.normalizer_spec
        return not (
            norm.precompiled_charsmap
            or norm.normalization_rule_tsv
            or norm.remove_extra_whitespaces
            or model.trainer_spec.treat_whitespace_as_suffix
        )

    def encode_batch(self, texts: list[str]) -> list[EncodedText]:
        texts = list(texts)
        id_lists = self.processor.encode(texts, add_bos=False, add_eos=False, num_threads=_threads())
        out: list[EncodedText | None] = [None] * len(texts)
        aligned_by_library: list[int] = []
        for i, (text, id_list) in enumerate(zip(texts, id_lists)):
            ids = np.array(id_list, dtype=np.int64)
            spans = None
            # <unk> spells nothing but covers characters: only SentencePiece knows which.
            if self.pieces_spell_text and not (ids == self.unk_id).any():
                spans = spans_if_spelled(ids, text, self.tables, compare_bytes=False)
            if spans is None:
                aligned_by_library.append(i)
            else:
                out[i] = EncodedText(ids, spans)
        if aligned_by_library:
            protos = self.processor.encode(
                [texts[i] for i in aligned_by_library],
                add_bos=False,
                add_eos=False,
                return_type="proto",
                num_threads=_threads(),
            )
            for i, proto in zip(aligned_by_library, protos):
                out[i] = sp_proto_encoding(proto, texts[i], self.tables.byte_fallback)
        return out  # type: ignore[return-value]

    def decode_batch(self, ids: list[np.ndarray]) -> list[str]:
        return self.processor.decode([np.asarray(x).tolist() for x in ids], num_threads=_threads())


def sp_proto_encoding(proto, text: str, is_byte: np.ndarray) -> EncodedText:
    """Ids and character spans from SentencePiece's `SentencePieceText` (byte offsets into the original text).

    SentencePiece gives a character split into byte pieces to its last piece; the earlier pieces have
    begin == end. They get that character's span, as `EncodedText` requires.
    """
    pieces = proto.pieces
    n = len(pieces)
    ids = np.fromiter((p.id for p in pieces), dtype=np.int64, count=n)
    begin = np.fromiter((p.begin for p in pieces), dtype=np.int64, count=n)
    end = np.fromiter((p.end for p in pieces), dtype=np.int64, count=n)
    waiting = is_byte[ids] & (begin == end)
    if waiting.any():
        covers = np.where(begin < end, np.arange(n), n)
        next_covering = np.minimum.accumulate(covers[::-1])[::-1]
        take = waiting & (next_covering < n)
        begin[take] = begin[next_covering[take]]
        end[take] = end[next_covering[take]]
    return EncodedText(ids, byte_to_char_spans(text, begin, end))


def _load_sentencepiece(path: Path, name: str, source: str) -> SentencePieceBackend:
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise JpadaptError(
            f"tokenizer file {path}: not a tokenizer.json, tiktoken rank file or SentencePiece model "
            f"(sentencepiece: {exc})"
        ) from exc
    return SentencePieceBackend(processor, name=name, source=source, path=path)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used by every byte-level BPE vocabulary (LLaMA-3, Qwen)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


_BYTE_OF_CHAR: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass(frozen=True)
class HFDecoding:
    """What a vocabulary string stands for in decoded text, read off the tokenizer.json `decoder`."""

    byte_level: bool = False  # ByteLevel: each character is one byte
    byte_fallback: bool = False  # ByteFallback: '<0xE5>' is byte 0xE5
    replacements: tuple[tuple[str, str], ...] = ()  # Metaspace / Replace: '▁' -> ' '

    def token_bytes(self, token: str) -> bytes:
        if self.byte_fallback and (m := _BYTE_PIECE.fullmatch(token)):
            return bytes([int(m.group(1), 16)])
        if self.byte_level:
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in token)
            except KeyError:
                return token.encode("utf-8")  # as the ByteLevel decoder does with a token outside its alphabet
        for old, new in self.replacements:
            token = token.replace(old, new)
        return token.encode("utf-8")


def parse_decoder(decoder: dict | None, path: Path) -> HFDecoding:
    """Interpret the per-token steps of a `decoder`; steps after Fuse act on the joined text's edges only (the
    Strip of SentencePiece conversions removes the dummy-prefix space) and do not change what a token means."""
    if decoder is None:
        steps = []  # no decoder: tokens are joined as they are
    elif decoder.get("type") == "Sequence":
        steps = decoder.get("decoders", [])
    else:
        steps = [decoder]
    byte_level = byte_fallback = False
    replacements: list[tuple[str, str]] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Fuse":
            break
        if kind == "ByteLevel":
            byte_level = True
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Metaspace":
            replacements.append((step.get("replacement", _SPACE_MARK), " "))
        elif kind == "Replace" and "String" in step.get("pattern", {}):
            replacements.append((step["pattern"]["String"], step["content"]))
        elif kind != "Strip":
            raise JpadaptError(
                f"tokenizer file {path}: decoder step {kind!r} is not supported "
                "(supported: byte-level BPE and SentencePiece-style tokenizers: ByteLevel, Metaspace, "
                "Replace with a string, ByteFallback, Fuse, Strip)"
            )
    return HFDecoding(byte_level, byte_fallback, tuple(replacements))


@dataclass(eq=False)
class HFTokenizersBackend:
    """A Hugging Face `tokenizer.json` (LLaMA-3, Qwen, or a SentencePiece model converted by transformers)."""

    tokenizer: Tokenizer = field(repr=False)
    decoding: HFDecoding
    name: str
    source: str
    path: Path
    kind: str
    unk_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tables.token_bytes)

    @cached_property
    def tables(self) -> VocabTables:
        tk = self.tokenizer
        vocab = tk.get_vocab(with_added_tokens=True)
        added = tk.get_added_tokens_decoder()
        size = max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        tokens: list[str | None] = [None] * size
        for token, i in vocab.items():
            tokens[i] = token
        token_bytes: list[bytes] = []
        special = np.zeros(size, dtype=bool)
        byte_fallback = np.zeros(size, dtype=bool)
        for i, token in enumerate(tokens):
            if i in added:
                # Added tokens are matched on the raw text, so they stand for their content, not byte-level text.
                special[i] = added[i].special
                token_bytes.append(b"" if added[i].special else added[i].content.encode("utf-8"))
            elif token is None:
                special[i] = True  # an id no token has: never produced
                token_bytes.append(b"")
            else:
                byte_fallback[i] = self.decoding.byte_fallback and _BYTE_PIECE.fullmatch(token) is not None
                token_bytes.append(self.decoding.token_bytes(token))
        if self.unk_id is not None:
            # Converted SentencePiece files list <unk> as a special added token, but the model produces it for
            # what it cannot spell (without byte fallback): it is no special token, as in SentencePiece.
            special[self.unk_id] = False
        return build_tables(token_bytes, byte_fallback, special)

    @property
    def token_bytes(self) -> list[bytes]:
        return self.tables.token_bytes

    @property
    def byte_fallback(self) -> np.ndarray:
        return self.tables.byte_fallback

    @property
    def special(self) -> np.ndarray:
        return self.tables.special

    def encode_batch(self, texts: list[str]) -> list[EncodedText]:
        texts = list(texts)
        # encode_batch_fast skips offset tracking; offsets are fetched only for texts the tokens do not spell.
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        out: list[EncodedText | None] = [None] * len(texts)
        aligned_by_library: list[int] = []
        for i, (text, encoding) in enumerate(zip(texts, encodings)):
            ids = np.array(encoding.ids, dtype=np.int64)
            spans = spans_if_spelled(ids, text, self.tables, compare_bytes=True)
            if spans is None:
                aligned_by_library.append(i)
            else:
                out[i] = EncodedText(ids, spans)
        if aligned_by_library:
            redone = self.tokenizer.encode_batch([texts[i] for i in aligned_by_library], add_special_tokens=False)
            for i, encoding in zip(aligned_by_library, redone):
                spans = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
                out[i] = EncodedText(np.array(encoding.ids, dtype=np.int64), spans)
        return out  # type: ignore[return-value]

    def decode_batch(self, ids: list[np.ndarray]) -> list[str]:
        return self.tokenizer.decode_batch([np.asarray(x).tolist() for x in ids], skip_special_tokens=False)


def _load_hf_json(path: Path, name: str, source: str) -> HFTokenizersBackend:
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text)
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 errors
        raise JpadaptError(f"tokenizer file {path}: not a valid JSON file ({exc})") from exc
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for content it cannot read
        raise JpadaptError(f"tokenizer file {path}: not a Hugging Face tokenizer.json ({exc})") from exc
    model = config.get("model") or {}
    decoding = parse_decoder(config.get("decoder"), path)
    # The backend encodes plain text: no truncation or padding saved in the file, and special tokens written in
    # the text are text (like tiktoken's encode_ordinary and SentencePiece's control pieces).
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.encode_special_tokens = True
    unk_id = model.get("unk_id")
    if unk_id is None and model.get("unk_token") is not None:
        unk_id = tokenizer.token_to_id(model["unk_token"])
    kind = "byte-level-bpe" if decoding.byte_level and model.get("type") == "BPE" else "hf"
    return HFTokenizersBackend(tokenizer, decoding, name=name, source=source, path=path, kind=kind, unk_id=unk_id)


# ---------------------------------------------------------------------------------------------------------------
# tiktoken


@dataclass(eq=False)
class TiktokenBackend:
    """A tiktoken rank file (LLaMA-3's `tokenizer.model`): byte-level BPE with a fixed pre-tokenization regex."""

    encoding: tiktoken.Encoding = field(repr=False)
    ranks: dict[bytes, int] = field(repr=False)
    name: str
    source: str
    path: Path
    kind: str = "tiktoken"
    unk_id: int | None = None  # byte-level: every text can be spelled

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @cached_property
    def tables(self) -> VocabTables:
        size = self.encoding.n_vocab
        token_bytes = [b""] * size
        for token, rank in self.ranks.items():
            token_bytes[rank] = token
        # A rank file has no special tokens; a rank missing from the file (none in LLaMA-3's) is never produced.
        missing = np.ones(size, dtype=bool)
        missing[list(self.ranks.values())] = False
        return build_tables(token_bytes, np.zeros(size, dtype=bool), missing)

    @property
    def token_bytes(self) -> list[bytes]:
        return self.tables.token_bytes

    @property
    def byte_fallback(self) -> np.ndarray:
        return self.tables.byte_fallback

    @property
    def special(self) -> np.ndarray:
        return self.tables.special

    def encode_batch(self, texts: list[str]) -> list[EncodedText]:
        texts = list(texts)
        id_lists = self.encoding.encode_ordinary_batch(texts, num_threads=_threads())
        out = []
        for i, (text, id_list) in enumerate(zip(texts, id_lists)):
            ids = np.array(id_list, dtype=np.int64)
            spans = spans_if_spelled(ids, text, self.tables, compare_bytes=False)
            if spans is None:  # tiktoken is lossless (lone surrogates become U+FFFD, one character too)
                raise RuntimeError(f"tokenizer {self.name}: tiktoken's tokens do not spell text #{i}")
            out.append(EncodedText(ids, spans))
        return out

    def decode_batch(self, ids: list[np.ndarray]) -> list[str]:
        return self.encoding.decode_batch([np.asarray(x).tolist() for x in ids], num_threads=_threads())


def read_rank_file(path: Path) -> dict[bytes, int]:
    """Parse "base64-token rank" lines. Not `tiktoken.load.load_tiktoken_bpe`: it caches the content in a temp
    folder keyed by the path string and returns that copy even after the file at the path has changed."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise JpadaptError(f"{path}:{lineno}: not a tiktoken rank line 'base64-token rank': {line[:60]!r}") from exc
    return ranks


def _load_tiktoken(path: Path, name: str, source: str, pattern: str) -> TiktokenBackend:
    ranks = read_rank_file(path)
    if len(set(ranks.values())) != len(ranks):
        raise JpadaptError(f"tiktoken rank file {path}: several tokens share a rank")
    try:
        encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except ValueError as exc:
        raise JpadaptError(f"tiktoken rank file {path}: {exc}") from exc
    return TiktokenBackend(encoding, ranks, name=name, source=source, path=path)


# ---------------------------------------------------------------------------------------------------------------
# Resolving a spec


def load_tokenizer(spec: str, name: str | None = None, *, tiktoken_pattern: str = LLAMA3_PATTERN,
                   source: str | None = None) -> TokenizerBackend:
    """A bundled tokenizer by name, or one from a path: a folder, a tokenizer.json, a SentencePiece model or a
    tiktoken rank file (encoded with `tiktoken_pattern`; use QWEN_PATTERN for Qwen's qwen.tiktoken).

    Bundled names win over same-named folders in the working directory; write "./qwen" for the folder.
    `name` defaults to the bundled name, else the path's stem (its folder's name for "tokenizer.*" files).
    `source` is what metrics record as its origin; default "bundled:NAME" or `spec`. Stages pass a name that
    stays true after their folder is committed (a path into `<stage>.partial/` would not).
    """
    if spec in BUNDLED:
        file = tokenizer_file_in(materialize_dir(f"tokenizers/{spec}"))
        return _load_file(file, name or spec, source or f"bundled:{spec}", tiktoken_pattern)
    path = Path(spec).expanduser()
    if not path.exists():
        raise JpadaptError(
            f"tokenizer {spec!r}: not a bundled name ({', '.join(BUNDLED)}) and no such file or folder"
        )
    file = tokenizer_file_in(path) if path.is_dir() else path
    return _load_file(file, name or default_name(path), source or spec, tiktoken_pattern)


def default_name(path: Path) -> str:
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.stem == "tokenizer" else path.stem


def tokenizer_file_in(folder: Path) -> Path:
    """tokenizer.json, else tokenizer.model, else the folder's only *.model / *.tiktoken file."""
    for filename in FOLDER_FILES:
        if (folder / filename).is_file():
            return folder / filename
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _OTHER_SUFFIXES)
    if len(others) == 1:
        return others[0]
    contents = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    listing = ", ".join(contents[:20]) + (f", ... ({len(contents)} entries)" if len(contents) > 20 else "")
    raise JpadaptError(
        f"tokenizer folder {folder}: no {' or '.join(FOLDER_FILES)}"
        + (f" and {len(others)} *.model/*.tiktoken files to choose from" if others else "")
        + f" (it contains: {listing or 'nothing'})"
    )


def sniff_format(path: Path) -> str:
    """"tokenizer.json", "tiktoken" or "sentencepiece", from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise JpadaptError(f"tokenizer file {path}: cannot read ({exc.strerror})") from exc
    if not head:
        raise JpadaptError(f"tokenizer file {path}: the file is empty")
    if head.lstrip().startswith(b"{"):
        return "tokenizer.json"
    if _RANK_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return "tiktoken"
    return "sentencepiece"  # a protobuf binary; loading it is the real check


def _load_file(path: Path, name: str, source: str, tiktoken_pattern: str) -> TokenizerBackend:
    fmt = sniff_format(path)
    if fmt == "tokenizer.json":
        return _load_hf_json(path, name, source)
    if fmt == "tiktoken":
        return _load_tiktoken(path, name, source, tiktoken_pattern)
    return _load_sentencepiece(path, name, source)
