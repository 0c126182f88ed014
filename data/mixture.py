"""Token data for continued pretraining: a tokenized-corpus cache and a resumable Japanese/English block mixture.

    ja = load_token_file(cache / "ja") or tokenize_corpus(ja_texts, tokenizer, cache / "ja", bos_id=1, eos_id=2)
    en = load_token_file(cache / "en") or tokenize_corpus(en_texts, tokenizer, cache / "en", bos_id=1, eos_id=2)
    mixture = Mixture(LanguageStream(ja, seed, salt=0), LanguageStream(en, seed, salt=1), 0.1, 2048, seed)
    indices = shard_indices(step, micro, rank, world=8, micro_batch=4, grad_accum=2)
    batch = mixture.blocks(indices)  # (4, 2048) int64

Cache: `tokenize_corpus` writes `{prefix}.tokens` (uint32, every document as [bos] + ids + [eos], back to back),
`{prefix}.offsets` (int64 document boundaries) and `{prefix}.json` (sizes and ids). The json is written last,
so its presence marks a complete entry; `load_token_file` maps the files read-only, or says None for an
entry to rebuild. The cache key (tokenizer, corpus) is the caller's business: one prefix per key.
A corpus may also be several entries in one folder (one per prepared shard, written in parallel by
`data/token_cache.py`): `write_token_index` lists them in order in `{folder}/index.json`, written last, and
`load_token_cache` reads them back as one `TokenFile` (`concatenate_token_files`), without copying their tokens
into memory; a folder without its index (a build killed halfway) is not a cache entry.

Stream: each language is an endless token stream, epoch e = all its documents in the seeded order
`default_rng([seed, salt, e]).permutation(n_docs)`, concatenated. Give the two languages different salts so
they are shuffled independently.

Mixture: block i is `seq_len` consecutive tokens of ONE language's stream (documents packed back to back and
split at block edges; the EOS between documents comes from the token file). Whether it is English follows a
Bresenham sequence with a seeded phase, so every prefix of n blocks holds n * replay_ratio English blocks
within less than one block. Block i is a pure function of (token files, seed, replay_ratio, seq_len, i): no
state is carried between blocks, so resuming a run needs only the next block index (what the training worker
stores in its checkpoints), and any rank can compute any block.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import JpadaptError

TOKEN_DTYPE = np.uint32
OFFSET_DTYPE = np.int64
FORMAT_VERSION = 1
TOKEN_INDEX = "index.json"
# Per-epoch lookup tables cost 16 bytes per document; reads move forward, so the current epoch and the one
# a block may straddle into are all that is ever needed.
EPOCHS_CACHED = 2


# ------------------------------------------------------------------------------------------------ token files


@dataclass(frozen=True)
class TokenFile:
    """One language's tokenized corpus: all documents concatenated, each as [bos?] + ids + [eos]."""

    tokens: np.ndarray | ConcatenatedTokens  # uint32 memmap (read-only), or several joined; length n_tokens
    offsets: np.ndarray  # int64, n_docs + 1 entries; document d = tokens[offsets[d]:offsets[d + 1]]

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _file(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def tokenize_corpus(
    texts: Iterable[str],
    tokenizer: Any,
    prefix: Path,
    *,
    bos_id: int | None,
    eos_id: int,
    batch_size: int = 1000,
    total: int | None = None,
    desc: str = "tokenize",
    progress: bool = True,
    allow_empty: bool = False,
) -> TokenFile:
    """Tokenize `texts` into the cache entry `prefix` (streaming to disk) and return it mapped read-only.

    Arguments:
        texts: one string per document; texts that encode to no tokens (empty ones) are skipped.
        tokenizer: a transformers fast tokenizer; called on `batch_size` texts at a time without special
            tokens (its Rust backend encodes a batch on all cores).
        prefix: the entry's path without suffix; its folder is created.
        bos_id: put before every document, or None for none (e.g. Qwen has no BOS).
        eos_id: put after every document: the separator between packed documents.
        total: the number of texts, when known, for the progress bar.
        progress: show a progress bar (on a terminal); parallel tasks that each write an entry do not.
        allow_empty: write an entry with no documents instead of refusing it (one shard of a larger corpus,
            whose texts all encode to nothing); `load_token_file(prefix, allow_empty=True)` loads it.
    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Remove the marker first: a run that dies below must not leave an old json vouching for new files.
    _file(prefix, ".json").unlink(missing_ok=True)
    tokens_path, offsets_path = _file(prefix, ".tokens"), _file(prefix, ".offsets")
    n_docs = n_tokens = 0
    with open(_temporary(tokens_path), "wb") as tokens_out, open(_temporary(offsets_path), "wb") as offsets_out:
        np.zeros(1, dtype=OFFSET_DTYPE).tofile(offsets_out)
        bar = tqdm(total=total, desc=desc, unit="doc", disable=None if progress else True, leave=False)
        with bar:
            for batch in _batches(texts, batch_size):
                ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
                flat, ends = _pack([doc for doc in ids if doc], bos_id, eos_id)
                flat.astype(TOKEN_DTYPE).tofile(tokens_out)
                (ends + n_tokens).tofile(offsets_out)
                n_docs += len(ends)
                n_tokens += len(flat)
                bar.update(len(batch))
    if n_docs == 0 and not allow_empty:
        for path in (tokens_path, offsets_path):
            _temporary(path).unlink()
        raise JpadaptError(f"{prefix}: no documents to tokenize (the corpus is empty or all its texts are empty)")
    os.replace(_temporary(tokens_path), tokens_path)
    os.replace(_temporary(offsets_path), offsets_path)
    _write_metadata(prefix, n_docs=n_docs, n_tokens=n_tokens, bos_id=bos_id, eos_id=eos_id)
    token_file = load_token_file(prefix, allow_empty=allow_empty)
    assert token_file is not None, f"{prefix}: the entry just written does not load"
    return token_file


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch


def _pack(docs: list[list[int]], bos_id: int | None, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one int64 array [bos] + ids + [eos] each, and the end offset of each document in it."""
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    specials = [eos_id] if bos_id is None else [bos_id, eos_id]
    ids = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
    _check_ids(np.concatenate([ids, np.array(specials, dtype=np.int64)]))
    ends = np.cumsum(lengths + len(specials))
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    body = np.ones(len(flat), dtype=bool)
    body[ends - 1] = False
    flat[ends - 1] = eos_id
    if bos_id is not None:
        starts = ends - lengths - 2
        body[starts] = False
        flat[starts] = bos_id
    flat[body] = ids
    return flat, ends


def _check_ids(ids: np.ndarray) -> None:
    limit = np.iinfo(TOKEN_DTYPE).max
    if len(ids) and (ids.min() < 0 or ids.max() > limit):
        raise ValueError(f"token ids must lie in [0, {limit}], got {ids.min()}..{ids.max()}")


def _write_metadata(prefix: Path, **sizes_and_ids: int | None) -> None:
    metadata = {"format": FORMAT_VERSION, "dtype": np.dtype(TOKEN_DTYPE).name, **sizes_and_ids}
    path = _file(prefix, ".json")
    _temporary(path).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(_temporary(path), path)


def load_token_file(prefix: Path, *, allow_empty: bool = False) -> TokenFile | None:
    """The complete cache entry at `prefix` mapped read-only, or None when it is absent, incomplete or stale.

    An entry with no documents is None unless `allow_empty` (then its arrays are empty, not mapped).
    """
    try:
        metadata = json.loads(_file(prefix, ".json").read_text(encoding="utf-8"))
        n_docs, n_tokens = int(metadata["n_docs"]), int(metadata["n_tokens"])
        if metadata["format"] != FORMAT_VERSION or metadata["dtype"] != np.dtype(TOKEN_DTYPE).name:
            return None
        tokens_path, offsets_path = _file(prefix, ".tokens"), _file(prefix, ".offsets")
        expected = {
            tokens_path: n_tokens * np.dtype(TOKEN_DTYPE).itemsize,
            offsets_path: (n_docs + 1) * np.dtype(OFFSET_DTYPE).itemsize,
        }
        if n_docs < (0 if allow_empty else 1) or any(path.stat().st_size != size for path, size in expected.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if n_docs == 0:  # numpy cannot map an empty file
        return None if n_tokens else TokenFile(tokens=np.zeros(0, TOKEN_DTYPE), offsets=np.zeros(1, OFFSET_DTYPE))
    tokens = np.memmap(tokens_path, dtype=TOKEN_DTYPE, mode="r", shape=(n_tokens,))
    offsets = np.memmap(offsets_path, dtype=OFFSET_DTYPE, mode="r", shape=(n_docs + 1,))
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        return None
    return TokenFile(tokens=tokens, offsets=offsets)


class ConcatenatedTokens:
    """The token arrays of several entries as one read-only uint32 array, without copying them into memory.

    Supports what `LanguageStream` and callers do with `TokenFile.tokens`: `len`, an integer, a slice with step 1
    and an integer array of positions (gathered from the memory-mapped parts, returned as a new array).
    """

    dtype = np.dtype(TOKEN_DTYPE)

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [part for part in parts if len(part)]
        lengths = np.array([len(part) for part in self.parts], dtype=np.int64)
        self.ends = np.cumsum(lengths)  # part p holds positions [ends[p] - lengths[p], ends[p])
        self.starts = self.ends - lengths

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ConcatenatedTokens: slices must have step 1")
            return self._take(np.arange(start, max(start, stop), dtype=np.int64))
        positions = np.asarray(key)
        if positions.dtype.kind not in "iu":
            raise IndexError(f"ConcatenatedTokens: index with integers or slices, got {positions.dtype}")
        if positions.ndim == 0:
            return self._take(positions.reshape(1))[0]
        return self._take(positions.astype(np.int64))

    def _take(self, positions: np.ndarray) -> np.ndarray:
        n, shape = len(self), positions.shape
        positions = positions.reshape(-1)
        positions = np.where(positions < 0, positions + n, positions)
        if len(positions) and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"ConcatenatedTokens: positions must lie in [0, {n}), got {positions.min()}..{positions.max()}")
        part = np.searchsorted(self.ends, positions, side="right")
        local = positions - self.starts[part]
        out = np.empty(len(positions), dtype=TOKEN_DTYPE)
        # Group the positions by part (a block of a shuffled stream crosses a few documents, so a few parts).
        order = np.argsort(part, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(part[order])) + 1):
            if len(group):
                out[group] = self.parts[part[group[0]]][local[group]]
        return out.reshape(shape)


def concatenate_token_files(files: Sequence[TokenFile]) -> TokenFile:
    """Several entries as one corpus: their documents in order, exactly as if one `tokenize_corpus` call had
    written them all. A single entry comes back as is; for several, the tokens stay in their memory-mapped files
    and only the document offsets (8 bytes per document, as `LanguageStream` keeps per document anyway) are
    joined in memory."""
    nonempty = [file for file in files if file.n_docs]
    if len(nonempty) == 1:
        return nonempty[0]
    bases = np.cumsum([0] + [file.n_tokens for file in nonempty], dtype=np.int64)
    offsets = np.concatenate(
        [np.zeros(1, dtype=OFFSET_DTYPE)]
        + [np.asarray(file.offsets[1:], dtype=OFFSET_DTYPE) + base for file, base in zip(nonempty, bases[:-1])]
    )
    return TokenFile(tokens=ConcatenatedTokens([file.tokens for file in nonempty]), offsets=offsets)


def write_token_index(folder: Path, parts: dict[str, TokenFile], *, bos_id: int | None, eos_id: int) -> None:
    """Mark the entries `folder/<name>` (complete, in corpus order) as one corpus: the index is written last."""
    index = {
        "format": FORMAT_VERSION,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "n_docs": sum(part.n_docs for part in parts.values()),
        "n_tokens": sum(part.n_tokens for part in parts.values()),
        "parts": [{"name": name, "n_docs": part.n_docs, "n_tokens": part.n_tokens} for name, part in parts.items()],
    }
    path = folder / TOKEN_INDEX
    _temporary(path).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(_temporary(path), path)


def load_token_cache(folder: Path) -> TokenFile | None:
    """The entries `folder`'s index lists, as one corpus in their order; None when the index is absent (an
    unfinished build), or an entry is missing, incomplete or not the size the index says."""
    try:
        index = json.loads((folder / TOKEN_INDEX).read_text(encoding="utf-8"))
        if index["format"] != FORMAT_VERSION or index["dtype"] != np.dtype(TOKEN_DTYPE).name:
            return None
        parts = []
        for entry in index["parts"]:
            part = load_token_file(folder / entry["name"], allow_empty=True)
            if part is None or (part.n_docs, part.n_tokens) != (entry["n_docs"], entry["n_tokens"]):
                return None
            parts.append(part)
        expected = (int(index["n_docs"]), int(index["n_tokens"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    corpus = concatenate_token_files(parts)
    if corpus.n_docs == 0 or (corpus.n_docs, corpus.n_tokens) != expected:
        return None
    return corpus


# ----------------------------------------------------------------------------------------------------- stream


@dataclass(frozen=True)
class _Epoch:
    """Where each document of one epoch sits: the k-th document in epoch order ends at stream position
    ends[k] (relative to the epoch start), and position p inside it is token p + shift[k] of the file."""

    ends: np.ndarray
    shift: np.ndarray


class LanguageStream:
    """One language's corpus as an endless token stream: epoch after epoch, each a fresh seeded shuffle."""

    def __init__(self, tokens: TokenFile, seed: int, salt: int):
        self.file = tokens
        self.seed = seed
        self.salt = salt
        self._lengths = np.diff(np.asarray(tokens.offsets))
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()

    @property
    def epoch_length(self) -> int:
        return self.file.n_tokens

    def order(self, epoch: int) -> np.ndarray:
        """The documents of `epoch` in stream order."""
        return np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.file.n_docs)

    def read(self, start: int, length: int) -> np.ndarray:
        """Stream tokens [start, start + length) as int64, across as many epoch boundaries as needed."""
        if start < 0 or length < 0:
            raise ValueError(f"start and length must be non-negative, got {start} and {length}")
        out = np.empty(length, dtype=np.int64)
        done = 0
        while done < length:
            epoch, begin = divmod(start + done, self.epoch_length)
            count = min(length - done, self.epoch_length - begin)
            out[done : done + count] = self._read_epoch(epoch, begin, count)
            done += count
        return out

    def _read_epoch(self, epoch: int, begin: int, count: int) -> np.ndarray:
        table = self._epoch(epoch)
        positions = np.arange(begin, begin + count, dtype=np.int64)
        slot = np.searchsorted(table.ends, positions, side="right")
        return self.file.tokens[positions + table.shift[slot]].astype(np.int64)

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        order = self.order(epoch)
        ends = np.cumsum(self._lengths[order])
        table = _Epoch(ends=ends, shift=self.file.offsets[order] - (ends - self._lengths[order]))
        self._epochs[epoch] = table
        if len(self._epochs) > EPOCHS_CACHED:
            self._epochs.popitem(last=False)
        return table


# ---------------------------------------------------------------------------------------------------- mixture


@dataclass(frozen=True)
class Block:
    tokens: np.ndarray  # int64, length seq_len
    lang: str  # "ja" or "en"


class Mixture:
    """Blocks of `seq_len` tokens, each from one language, English for a `replay_ratio` share of the blocks.

    English blocks are placed by `en_blocks_before(n) = floor(n * r + phase) - floor(phase)`, computed in exact
    rational arithmetic (the float ratio and phase are exact binary fractions), so it is the same on every
    machine for any n and never drifts: any n consecutive-from-zero blocks hold n * r English blocks to within
    one block. The phase is seeded so that runs with different seeds place English blocks differently.
    """

    def __init__(self, ja: LanguageStream, en: LanguageStream | None, replay_ratio: float, seq_len: int, seed: int):
        if not 0 <= replay_ratio < 1:
            raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
        if en is None and replay_ratio > 0:
            raise ValueError(f"replay_ratio {replay_ratio} needs an English stream, got None")
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.ja, self.en = ja, en
        self.replay_ratio, self.seq_len, self.seed = replay_ratio, seq_len, seed
        self.phase = float(np.random.default_rng([seed, 7]).random())
        # n * r + phase = (n * ratio_num + phase_num) / denominator, all Python ints.
        ratio, phase = Fraction(replay_ratio), Fraction(self.phase)
        self._denominator = math.lcm(ratio.denominator, phase.denominator)
        self._ratio_num = ratio.numerator * (self._denominator // ratio.denominator)
        self._phase_num = phase.numerator * (self._denominator // phase.denominator)

    def en_blocks_before(self, n: int) -> int:
        """How many of blocks [0, n) are English."""
        if n < 0:
            raise ValueError(f"block count must be non-negative, got {n}")
        return (n * self._ratio_num + self._phase_num) // self._denominator - self._phase_num // self._denominator

    def lang_of(self, i: int) -> str:
        return "en" if self.en_blocks_before(i + 1) > self.en_blocks_before(i) else "ja"

    def block(self, i: int) -> Block:
        english = self.en_blocks_before(i)
        if self.en_blocks_before(i + 1) > english:
            assert self.en is not None  # replay_ratio > 0, checked in __init__
            return Block(self.en.read(english * self.seq_len, self.seq_len), "en")
        return Block(self.ja.read((i - english) * self.seq_len, self.seq_len), "ja")

    def blocks(self, indices: Sequence[int]) -> np.ndarray:
        """The tokens of the given blocks, shape (len(indices), seq_len), int64."""
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self.block(i).tokens
        return out

    def realized_ratio(self, n: int) -> float:
        """English tokens / all tokens among blocks [0, n) (blocks are equally long); 0.0 for n == 0."""
        return self.en_blocks_before(n) / n if n else 0.0


def shard_indices(step: int, micro: int, rank: int, *, world: int, micro_batch: int, grad_accum: int) -> list[int]:
    """Block indices of micro batch `micro` of optimizer step `step` on data-parallel rank `rank`.

    Step s consumes exactly blocks [s * G, (s + 1) * G), G = micro_batch * world * grad_accum, and the ranks'
    blocks are disjoint; so the next block index after step s is (s + 1) * G whatever the layout.
    """
    if not 0 <= micro < grad_accum or not 0 <= rank < world or step < 0 or micro_batch < 1:
        raise ValueError(
            f"need step >= 0, 0 <= micro < grad_accum, 0 <= rank < world and micro_batch >= 1; got step={step}, "
            f"micro={micro}, grad_accum={grad_accum}, rank={rank}, world={world}, micro_batch={micro_batch}"
        )
    first = ((step * grad_accum + micro) * world + rank) * micro_batch
    return list(range(first, first + micro_batch))
