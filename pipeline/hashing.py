"""Content hashes for fingerprints: canonical JSON, files (cached by size and mtime), and the source code a
stage imports, found by following its import statements."""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
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
    """sha256 of files keyed by (size, mtime_ns, inode, ctime_ns), persisted as JSON, so multi-GB shards and
    checkpoints are read once rather than at every `status` or `run`.

    Size and mtime alone miss a same-size edit whose mtime was put back (`touch -r`, `rsync -t`, a careful
    attacker); setting the mtime changes the ctime, which no user-level call can set, and a file replaced by
    another has another inode. `verify=True` ignores the cache and re-hashes every file (`status --verify`).
    """

    def __init__(self, path: Path, verify: bool = False):
        self.path = path
        self.verify = verify
        self._entries: dict[str, list] = {}
        self._dirty = False
        if path.exists() and not verify:
            try:
                self._entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache only costs re-hashing
            if not isinstance(self._entries, dict):
                self._entries = {}

    def sha256(self, path: Path) -> str:
        key, identity = _identity(path)
        cached = self._entries.get(key)
        if not self.verify and isinstance(cached, list) and len(cached) == 5 and cached[:4] == identity:
            return cached[4]
        value = sha256_file(path)
        self._entries[key] = [*identity, value]
        self._dirty = True
        return value

    def remember(self, path: Path, sha256: str) -> None:
        """Record a hash known without reading the file: a hard link to (or a copy of) a file whose hash was just
        checked against a manifest (a stage reused from another run directory, pipeline/runner.py)."""
        key, identity = _identity(path)
        self._entries[key] = [*identity, sha256]
        self._dirty = True

    def describe(self, path: Path) -> dict[str, Any]:
        """{sha256, size} as recorded in manifests."""
        return {"sha256": self.sha256(path), "size": path.stat().st_size}

    def save(self) -> None:
        """Best effort: the cache only saves time, and a read-only run directory (a finished run on a read-only
        mount, a colleague's results) must still answer `status` and `report`."""
        if not self._dirty:
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._entries, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        self._dirty = False


def _identity(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


# The folder holding jpadapt's top-level packages (pipeline/, data/, stages/, ...): a module is first-party when
# its top-level package or module lies here.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CodeClosure:
    """What a stage's code is: the first-party modules it imports, transitively, with the source digest of each,
    and the third-party top-level modules they import."""

    modules: dict[str, str]
    third_party: frozenset[str]


def module_file(module: str) -> Path | None:
    """The source file of a first-party module (`a/b.py` or `a/b/__init__.py`), found without importing it."""
    base = SOURCE_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_closure(roots: list[str]) -> CodeClosure:
    """Follow every `import` statement (at module level and inside functions: stages import heavy libraries
    lazily) from the root modules through first-party code. Importing `a.b.c` runs `a` and `a.b` too, so parent
    packages are part of the closure. A training worker is started by module name (`-m stages.cpt.worker`), not
    imported: the stage names it as a root (`StageSpec.worker`, the same name it launches)."""
    pending = list(roots)
    modules: dict[str, str] = {}
    third_party: set[str] = set()
    while pending:
        name = pending.pop()
        if name in modules:
            continue
        file = module_file(name)
        if file is None:
            raise ValueError(f"cannot locate first-party module {name!r}")
        stat = file.stat()
        modules[name], imports = _read_module(str(file), name, stat.st_mtime_ns, stat.st_size)
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        for imported in imports:
            if module_file(imported) is not None:
                pending.append(imported)
            elif module_file(imported.split(".")[0]) is None:
                third_party.add(imported.split(".")[0])
    stdlib = set(sys.stdlib_module_names)
    return CodeClosure(dict(sorted(modules.items())), frozenset(m for m in third_party if m not in stdlib))


@functools.lru_cache(maxsize=4096)
def _read_module(file: str, module: str, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """(sha256 of the source, modules it imports); cached by mtime and size, since every stage's closure
    shares most of its files."""
    source = Path(file).read_bytes()
    return hashlib.sha256(source).hexdigest(), tuple(_imports(source, module, file.endswith("__init__.py")))


def _imports(source: bytes, module: str, is_package: bool) -> list[str]:
    """Module names a source file imports. `from a import b` names `a.b` when that is a module, else `a`."""
    names = []
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")]
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:`: annotations' imports never run."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending += node.orelse
            continue
        pending += ast.iter_child_nodes(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


@functools.cache
def distributions_of(top_level: str) -> tuple[str, ...]:
    """The installed distributions that provide a top-level module (`yaml` -> PyYAML)."""
    return tuple(sorted(set(_packages_distributions().get(top_level, ()))))


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()
