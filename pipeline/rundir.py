"""The run directory `<output_dir>/<run.name>/` and the life cycle of one stage attempt.

    runs/demo/
      config.yaml                  resolved YAML of the last command
      .lock                        held while a command runs stages
      .cache/hashes.json           file hashes by (size, mtime)
      stages/prepare/              committed: outputs + manifest.json + log.txt
      stages/prepare.partial/      an attempt in progress, or one that died: attempt.json says which

A stage writes only into `<stage>.partial/`. On success the manifest is written there and the folder is renamed
into place, so a committed stage folder always holds a complete, successful run. An attempt that crashes or is
killed leaves its `.partial` folder behind, and the stage reads as incomplete until it is run again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import JpadaptError
from pipeline.stage import ATTEMPT, MANIFEST, PARTIAL_SUFFIX


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, ensure_ascii=False, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(-1, 0) would ask about every process, not one
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Attempt:
    """What `attempt.json` says about an unfinished or failed attempt."""

    fingerprint: str
    started: str
    pid: int
    host: str
    status: str  # running | failed | crashed | interrupted
    error: str | None = None

    @property
    def alive(self) -> bool:
        return self.status == "running" and self.host == socket.gethostname() and pid_alive(self.pid)

    def describe(self) -> str:
        if self.status == "running":
            return f"attempt started {self.started} (pid {self.pid}) ended without finishing"
        detail = f": {self.error}" if self.error else ""
        return f"attempt started {self.started} {self.status}{detail}"


class RunDir:
    def __init__(self, root: Path):
        self.root = root
        self._lock_handle = None

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_dir(self, stage: str) -> Path:
        return self.stages / stage

    def partial_dir(self, stage: str) -> Path:
        return self.stages / f"{stage}{PARTIAL_SUFFIX}"

    def manifest(self, stage: str) -> dict[str, Any] | None:
        manifest = read_json(self.stage_dir(stage) / MANIFEST)
        return manifest if manifest and manifest.get("status") == "done" else None

    def attempt(self, stage: str) -> Attempt | None:
        data = read_json(self.partial_dir(stage) / ATTEMPT)
        if data is None:
            return None if not self.partial_dir(stage).exists() else Attempt("", "?", -1, "?", "running")
        return Attempt(**data)

    # ------------------------------------------------------------------ locking

    def lock(self) -> None:
        """One command at a time per run directory: two writers would corrupt manifests."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / ".lock").open("a+")
        except OSError as exc:  # a file in the way, a read-only disk, no permission
            raise JpadaptError(f"run.output_dir: cannot write the run directory {self.root} ({exc.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JpadaptError(f"{self.root}: another jpadapt command is running here ({holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # ------------------------------------------------------------------ attempt life cycle

    def begin(self, stage: str, fingerprint: str, keep_partial: bool) -> tuple[Path, bool]:
        """Create (or, for a resumable stage with the same fingerprint, reuse) the work directory."""
        self.stages.mkdir(parents=True, exist_ok=True)
        self._remove_trash(stage)
        work = self.partial_dir(stage)
        previous = self.attempt(stage)
        resuming = keep_partial and previous is not None and previous.fingerprint == fingerprint
        if work.exists() and not resuming:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        self._write_attempt(stage, Attempt(fingerprint, now_iso(), os.getpid(), socket.gethostname(), "running"))
        return work, resuming

    def fail(self, stage: str, status: str, error: str | None) -> None:
        attempt = self.attempt(stage)
        if attempt is not None:
            attempt.status, attempt.error = status, error
            self._write_attempt(stage, attempt)

    def commit(self, stage: str, manifest: dict[str, Any]) -> Path:
        """Write the manifest into the work directory and swap it into place with renames."""
        work = self.partial_dir(stage)
        write_json_atomic(work / MANIFEST, manifest)
        (work / ATTEMPT).unlink()
        final = self.stage_dir(stage)
        trash = self.stages / f"{stage}.trash-{os.getpid()}-{time.monotonic_ns()}"
        if final.exists():
            os.replace(final, trash)
        os.replace(work, final)
        shutil.rmtree(trash, ignore_errors=True)
        return final

    def _write_attempt(self, stage: str, attempt: Attempt) -> None:
        write_json_atomic(self.partial_dir(stage) / ATTEMPT, attempt.__dict__)

    def _remove_trash(self, stage: str) -> None:
        for trash in self.stages.glob(f"{stage}.trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
