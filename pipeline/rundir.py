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

A committed stage folder is never written again: later stages only read their prerequisites' outputs, and a rerun
writes a new `.partial` folder that replaces the old one by rename. That is why another run directory may share
its files through hard links (`link_stage`, the reuse of a stage with the same fingerprint by `jpadapt sweep`).
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
from pipeline.stage import ATTEMPT, LOG, MANIFEST, PARTIAL_SUFFIX


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


@dataclass
class Attempt:
    """What `attempt.json` says about an unfinished or failed attempt. Whether it is still running is not
    read from here: a pid outlives its process (the system reuses it), the run directory's lock does not."""

    fingerprint: str
    started: str
    pid: int
    host: str
    status: str  # running | failed | crashed | interrupted
    error: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Attempt:
        """A damaged or foreign attempt.json still means an attempt that did not finish."""
        try:
            return cls(**data) if isinstance(data, dict) else cls.unknown()
        except TypeError:
            return cls.unknown()

    @classmethod
    def unknown(cls) -> Attempt:
        return cls("", "?", -1, "?", "running")

    def describe(self) -> str:
        if self.status == "running":
            return f"attempt started {self.started} (pid {self.pid}) ended without finishing"
        detail = f": {self.error}" if self.error else ""
        return f"attempt started {self.started} {self.status}{detail}"


# What the runner, `status` and the reports read from a manifest; one missing or of the wrong type, and the stage
# is not committed (it runs again) rather than a KeyError in every command that looks at it.
_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fingerprint": str, "finished": str, "duration_s": (int, float), "config": dict, "inputs": dict,
    "upstream": dict, "outputs": dict, "summary": dict, "environment": dict, "state": dict,
}


def manifest_problem(data: Any) -> str | None:
    """Why `data` is not the manifest of a committed stage, or None when it is."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    if data.get("status") != "done":
        return f"has status {data.get('status')!r}, not 'done'"
    missing = [key for key, kind in _MANIFEST_FIELDS.items() if not isinstance(data.get(key), kind)]
    if missing:
        return f"lacks {', '.join(missing)} (or has the wrong type)"
    for rel, entry in data["outputs"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
            return f"has no sha256 and size for output {rel}"
    return None


def link_stage(source: Path, work: Path, manifest: dict[str, Any]) -> None:
    """Put the outputs a committed stage folder's manifest lists, and its log, into `work` (a `.partial` folder):
    a hard link per file, or a copy where the filesystem refuses one (`work` on another filesystem, a filesystem
    without hard links). Sharing the files is safe because neither folder is ever written again (module docstring)."""
    names = [*manifest["outputs"], *([LOG] if (source / LOG).is_file() else [])]
    for rel in names:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / rel, target)
        except OSError:  # EXDEV across filesystems, EPERM or EMLINK where links are not allowed
            shutil.copy2(source / rel, target)


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
        """The committed manifest, or None when the stage has none or its manifest is damaged."""
        manifest = read_json(self.stage_dir(stage) / MANIFEST)
        return manifest if manifest_problem(manifest) is None else None

    def manifest_damage(self, stage: str) -> str | None:
        """What is wrong with a stage folder's manifest.json, when the folder has one that is not valid."""
        path = self.stage_dir(stage) / MANIFEST
        if not path.exists():
            return None
        problem = manifest_problem(read_json(path))
        if problem is None:
            return None
        return f"{path} {problem}: the stage counts as not finished and runs again"

    def attempt(self, stage: str) -> Attempt | None:
        data = read_json(self.partial_dir(stage) / ATTEMPT)
        if data is None:
            return None if not self.partial_dir(stage).exists() else Attempt.unknown()
        return Attempt.from_json(data)

    def attempt_running(self, attempt: Attempt | None) -> bool:
        """An attempt is running while some other command holds this run directory's lock: every command that
        runs stages holds it until it exits, and the system releases it when that process dies, however it dies.
        (A pid check would be fooled by the pid's next owner.)"""
        return attempt is not None and attempt.status == "running" and self.locked_elsewhere()

    def locked_elsewhere(self) -> bool:
        if self._lock_handle is not None:
            return False
        try:
            handle = (self.root / ".lock").open("rb")  # read-only: this must work on a read-only run directory
        except OSError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

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
