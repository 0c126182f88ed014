"""Bundled data files (tokenizers, corpus samples, JGLUE, instructions) as real files on disk.

The files live under `data/bundled/`, some xz-compressed to keep the repository small; MANIFEST.json
maps each logical name (e.g. "tokenizers/qwen/tokenizer.json") to its stored file and to the sha256
and size of its uncompressed content. `materialize` gives a plain file for a name, decompressing into
a cache folder once; `materialize_dir` gives a folder (e.g. for `AutoTokenizer.from_pretrained`).
Where each file comes from and its license: `data/bundled/SOURCES.md`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import JpadaptError

ASSET_ROOT: Path = Path(__file__).resolve().parent / "bundled"

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """$JPADAPT_CACHE if set, else $XDG_CACHE_HOME/jpadapt, else ~/.cache/jpadapt."""
    if os.environ.get("JPADAPT_CACHE"):
        return Path(os.environ["JPADAPT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "jpadapt"
    return Path.home() / ".cache" / "jpadapt"


def _manifest() -> dict[str, dict]:
    # Read on every call (it is small) so that a patched ASSET_ROOT takes effect at once.
    path = ASSET_ROOT / "MANIFEST.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise JpadaptError(f"{path}: cannot read the bundled-asset manifest ({exc})") from exc


def bundled_names() -> list[str]:
    """The logical names listed in MANIFEST.json, sorted."""
    return sorted(_manifest())


def _unknown(kind: str, name: str, known: list[str]) -> JpadaptError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
    return JpadaptError(f"unknown bundled {kind} {name!r}; {hint}")


def _entry(name: str) -> dict:
    files = _manifest()
    if name not in files:
        raise _unknown("asset", name, sorted(files))
    return files[name]


def stored_path(name: str) -> Path:
    """The file as stored in the repository (maybe .xz)."""
    path = ASSET_ROOT / _entry(name)["stored"]
    if not path.is_file():
        raise JpadaptError(f"bundled asset {name!r}: stored file {path} is missing")
    return path


def materialize(name: str) -> Path:
    """A real, uncompressed file holding `name`'s content, named like `name`'s last component."""
    entry = _entry(name)
    stored = stored_path(name)
    if stored.suffix != ".xz":
        return stored
    target = cache_dir() / "assets" / entry["sha256"][:16] / Path(name).name
    # The cache is written atomically and checked when written, so a size check is enough here.
    if target.is_file() and target.stat().st_size == entry["bytes"]:
        return target
    _decompress(stored, target, entry["sha256"], entry["bytes"])
    return target


def _decompress(stored: Path, target: Path, sha256: str, size: int) -> None:
    """Stream-decompress `stored` into `target` via a temp file, checking sha256 and size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        digest, written = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, lzma.open(stored, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
        if digest.hexdigest() != sha256 or written != size:
            raise JpadaptError(
                f"bundled asset {stored}: decompressed content has sha256 {digest.hexdigest()} "
                f"({written} bytes), the manifest says {sha256} ({size} bytes); the file is corrupt"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except (lzma.LZMAError, EOFError) as exc:
        raise JpadaptError(f"bundled asset {stored}: cannot decompress ({exc}); the file is corrupt") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _dir_entries(prefix: str) -> dict[str, dict]:
    files = _manifest()
    entries = {n[len(prefix) + 1:]: e for n, e in sorted(files.items()) if n.startswith(prefix + "/")}
    if not entries:
        folders = sorted({str(Path(n).parent) for n in files})
        raise _unknown("folder", prefix, folders)
    return entries


def _dir_is_complete(folder: Path, entries: dict[str, dict]) -> bool:
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == e["bytes"] for rel, e in entries.items())


def materialize_dir(prefix: str) -> Path:
    """A folder holding every bundled file under `prefix` (e.g. "tokenizers/qwen"), uncompressed."""
    prefix = prefix.strip("/")
    entries = _dir_entries(prefix)
    key = hashlib.sha256("".join(f"{rel}\0{e['sha256']}\n" for rel, e in entries.items()).encode()).hexdigest()
    target = cache_dir() / "assets" / "dirs" / f"{prefix.replace('/', '__')}-{key[:16]}"
    if target.is_dir() and _dir_is_complete(target, entries):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        for rel in entries:
            _place(materialize(f"{prefix}/{rel}"), tmp / rel)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Hard-link cache files (no second copy of a 10 MB tokenizer); copy repository files, so that
    # whoever writes into the folder cannot alter the checked-in file.
    if src.is_relative_to(ASSET_ROOT):
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`, replacing an incomplete `target` if there is one."""
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            pass  # another process removed it meanwhile
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished the same folder first; its content is identical.
        if not target.is_dir():
            raise
