"""A pipeline step for tests/test_executors.py: module-level, so Slurm and Ray workers can unpickle it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.errors import JpadaptError

BAD_RECORD = "x.jsonl:3: bad record"


class WriteRank:
    """Each task writes `rank_N.json` into `out`: its rank, the world size, JPADAPT_TEST_ENV and, on Ray, the
    node addresses datatrove gives it. It appends a line to `ran_N` whenever it starts. `fail_rank` raises our
    error, once rank `fail_after` has written its output when that is given (so that a test knows which task had
    finished when the failure cancelled the rest, however loaded the machine); `slow_rank` sleeps first (a task
    still running when another fails)."""

    def __init__(self, out: Path, fail_rank: int | None = None, slow_rank: int | None = None,
                 fail_after: int | None = None) -> None:
        self.out, self.fail_rank, self.slow_rank, self.fail_after = out, fail_rank, slow_rank, fail_after

    def __repr__(self) -> str:
        return f"WriteRank(fail_rank={self.fail_rank}, slow_rank={self.slow_rank})"

    def __call__(self, data: Any, rank: int, world_size: int) -> None:
        with (self.out / f"ran_{rank}").open("a") as ran:
            ran.write("ran\n")
        if rank == self.fail_rank:
            deadline = time.monotonic() + 30
            while self.fail_after is not None and not (self.out / f"rank_{self.fail_after}.json").exists():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            raise JpadaptError(BAD_RECORD)
        if rank == self.slow_rank:
            time.sleep(60)
        record = {"rank": rank, "world_size": world_size, "env": os.environ.get("JPADAPT_TEST_ENV"),
                  "ray_nodes": os.environ.get("RAY_NODELIST")}
        (self.out / f"rank_{rank}.json").write_text(json.dumps(record))


def outputs(out: Path) -> dict[int, dict]:
    """rank -> what that task wrote."""
    return {int(path.stem.split("_")[1]): json.loads(path.read_text()) for path in out.glob("rank_*.json")}


def runs(out: Path) -> dict[int, int]:
    """rank -> how many times the task started."""
    return {int(path.name.split("_")[1]): len(path.read_text().splitlines()) for path in out.glob("ran_*")}
