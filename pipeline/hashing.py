"""Content hashes for fingerprints: canonical JSON, files (cached by size and mtime), source code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """The one serialization that is hashed: sorted keys, no whitespace, unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


class HashCache:
    """sha256 of files keyed by (size, mtime_ns), persisted as JSON, so multi-GB shards and checkpoints
    are read once rather than at every `status` or `run`."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, list] = {}
        self._dirty = False
        if path.exists():
            try:
                self._entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache only costs re-hashing

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        cached = self._entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        value = sha256_file(path)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, value]
        self._dirty = True
        return value

    def describe(self, path: Path) -> dict[str, Any]:
        """{sha256, size} as recorded in manifests."""
        return {"sha256": self.sha256(path), "size": path.stat().st_size}

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)
        self._dirty = False


def source_digest(module: str) -> str:
    """sha256 over the Python source of a module, or of every module in a package (sorted by path).

    Located with importlib without importing, so hashing `stages.cpt` never pulls in torch.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot locate module {module!r}")
    origin = Path(spec.origin)
    if spec.submodule_search_locations is None:
        files = [origin]
    else:
        root = origin.parent
        files = sorted(p for p in root.rglob("*.py") if (p.parent / "__init__.py").exists())
    sha = hashlib.sha256()
    for file in files:
        rel = file.name if spec.submodule_search_locations is None else file.relative_to(origin.parent).as_posix()
        sha.update(rel.encode() + b"\0" + file.read_bytes() + b"\0")
    return sha.hexdigest()
