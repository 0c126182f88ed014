"""The cpt token cache of one language: each prepared train shard tokenized by a datatrove task into its own
token file, read back as one corpus.

    corpus = load_token_cache(folder) or build_token_cache(shards, folder, tokenizer_dir, bos_id=1, eos_id=2,
                                                           settings=ExecutorSettings.from_config(cfg.prepare))
    stream = LanguageStream(corpus, seed, salt=0)

Layout of `folder` (one language of one cache entry; the caller keys the entry by content):

    <shard stem>.tokens / .offsets / .json   one `data.mixture` token file per prepared shard, written atomically
                                             (temporary names, then renames, its json last)
    index.json                               the shards in order with their sizes, written last of all: without
                                             it (a run killed while tokenizing) the folder is not a cache entry

The tasks run on the prepare stage's executor (`data/executor.py`: this machine, Slurm or Ray); task `rank` of
`tasks` tokenizes shards[rank::tasks], each task loading the tokenizer from the saved folder, and writes
datatrove's completion markers to `work_dir`. A rerun after a kill skips the finished tasks, and within the
others every shard whose token file is already complete.

The corpus read back (`concatenate_token_files`) holds the shards' documents in shard order, each packed as
`tokenize_corpus` packs it, so its token stream is the one a single `tokenize_corpus` call over
`prepared_texts(shards)` writes, token for token; the tokens stay in their memory-mapped files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.executor import ExecutorSettings, incomplete_ranks, run_tasks
from data.mixture import TOKEN_INDEX, TokenFile, load_token_cache, load_token_file, tokenize_corpus, write_token_index
from data.prepare import prepared_texts
from pipeline.errors import JpadaptError

# Texts per tokenizer call: as `tokenize_corpus` calls it (the ids do not depend on it).
BATCH_SIZE = 1000


def part_prefix(folder: Path, shard: Path) -> Path:
    """Where the token file of one prepared shard goes (`train-00003.jsonl` -> `folder/train-00003`)."""
    return folder / shard.stem


@dataclass(frozen=True)
class TokenizeShards:
    """A datatrove pipeline step: task `rank` of `world_size` tokenizes shards[rank::world_size], each into its own
    token file, skipping those already complete. Picklable: it travels to the workers by value."""

    shards: tuple[Path, ...]
    folder: Path
    tokenizer_dir: Path
    bos_id: int | None
    eos_id: int
    trust_remote_code: bool = False
    batch_size: int = BATCH_SIZE

    def __call__(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        tokenizer = None
        for shard in self.shards[rank::world_size]:
            prefix = part_prefix(self.folder, shard)
            if load_token_file(prefix, allow_empty=True) is not None:
                continue  # an earlier, interrupted attempt finished this one
            if tokenizer is None:
                tokenizer = self._tokenizer()
            tokenize_corpus(prepared_texts([shard]), tokenizer, prefix, bos_id=self.bos_id, eos_id=self.eos_id,
                            batch_size=self.batch_size, progress=False, allow_empty=True)

    def _tokenizer(self) -> Any:
        # The transformers tokenizer, called as `tokenize_corpus` always calls it: the same ids as one process.
        # Loading it costs about a second, so a worker process keeps the last one for its next tasks; keyed by the
        # folder's content, since a later run may save another tokenizer to the same folder.
        from pipeline.hashing import sha256_file
        from tokenizer.hf import load_hf_tokenizer

        key = (str(self.tokenizer_dir), self.trust_remote_code,
               tuple((p.name, sha256_file(p)) for p in sorted(self.tokenizer_dir.iterdir()) if p.is_file()))
        if _LOADED.get("key") != key:
            _LOADED.clear()
            _LOADED.update(key=key, tokenizer=load_hf_tokenizer(self.tokenizer_dir, key="the cpt tokenizer",
                                                                trust_remote_code=self.trust_remote_code))
        return _LOADED["tokenizer"]


# This process's last loaded tokenizer: {"key": ..., "tokenizer": ...}.
_LOADED: dict[str, Any] = {}


def build_token_cache(
    shards: Sequence[Path],
    folder: Path,
    tokenizer_dir: Path,
    *,
    bos_id: int | None,
    eos_id: int,
    settings: ExecutorSettings,
    work_dir: Path,
    tasks: int | None = None,
    trust_remote_code: bool = False,
    step: str = "tokenize",
    log: logging.Logger | None = None,
) -> TokenFile:
    """Tokenize `shards` into `folder` in parallel tasks and return the corpus, mapped read-only.

    Arguments:
        shards: prepared JSONL shards ("text" per record), in corpus order.
        folder: this language's folder of the cache entry; created.
        tokenizer_dir: a saved tokenizer folder (what the tasks load).
        bos_id, eos_id: as for `tokenize_corpus`.
        settings: the executor the tasks run on.
        work_dir: a folder for the tasks' completion markers and logs (`<work_dir>/tasks-N`).
        tasks: at most this many tasks (None: one per shard).
        step: names the work in progress bars and errors.
    """
    if not shards:
        raise JpadaptError(f"{step}: no shards to tokenize")
    folder.mkdir(parents=True, exist_ok=True)
    # Remove the index first: a run that dies below must not leave an old index vouching for new files.
    (folder / TOKEN_INDEX).unlink(missing_ok=True)
    count = max(1, min(len(shards), tasks or len(shards)))
    logging_dir = work_dir / f"tasks-{count}"  # markers are per rank, and a rank's shards depend on the count
    _forget_unfinished(shards, folder, logging_dir, count)
    task = TokenizeShards(tuple(shards), folder, tokenizer_dir, bos_id, eos_id, trust_remote_code)
    run_tasks(step, [task], count, settings, logging_dir, log)
    parts = []
    for shard in shards:
        part = load_token_file(part_prefix(folder, shard), allow_empty=True)
        if part is None:
            raise JpadaptError(f"{step}: the tasks finished but {part_prefix(folder, shard)} is incomplete")
        parts.append((shard, part))
    if sum(part.n_docs for _, part in parts) == 0:
        raise JpadaptError(f"{step}: no documents to tokenize (the shards are empty or all their texts are empty)")
    write_token_index(folder, {part_prefix(folder, shard).name: part for shard, part in parts},
                      bos_id=bos_id, eos_id=eos_id)
    corpus = load_token_cache(folder)
    assert corpus is not None, f"{folder}: the cache entry just written does not load"
    return corpus


def _forget_unfinished(shards: Sequence[Path], folder: Path, logging_dir: Path, tasks: int) -> None:
    """Drop the completion marker of a task whose token files are not all complete (deleted, or truncated by
    hand), so that it runs again: the markers only ever skip work that is really there."""
    done = set(range(tasks)) - set(incomplete_ranks(logging_dir, tasks))
    for rank in done:
        if any(load_token_file(part_prefix(folder, shard), allow_empty=True) is None for shard in shards[rank::tasks]):
            (logging_dir / "completions" / f"{rank:05d}").unlink(missing_ok=True)
