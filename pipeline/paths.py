"""Paths written in a pipeline YAML: `bundled:NAME` for files shipped with jpadapt, globs, plain paths.

Relative paths are relative to the working directory, as for any command-line tool.
"""

from __future__ import annotations

import glob
from pathlib import Path

from pipeline.errors import JpadaptError

BUNDLED_PREFIX = "bundled:"


def resolve_path(text: str, key: str) -> Path:
    """One file: `bundled:corpus/ja_train.jsonl` or a path. `key` names the config entry in errors."""
    if text.startswith(BUNDLED_PREFIX):
        from data.assets import stored_path

        try:
            return stored_path(text[len(BUNDLED_PREFIX) :])
        except JpadaptError as exc:
            raise JpadaptError(f"{key}: {exc}") from None
    path = Path(text).expanduser()
    if not path.exists():
        raise JpadaptError(f"{key}: file not found: {text}")
    return path


def resolve_files(patterns: list[str], key: str) -> list[Path]:
    """Expand each entry (bundled name, glob or path) into files; every entry must match something."""
    files: list[Path] = []
    for pattern in patterns:
        if not pattern.startswith(BUNDLED_PREFIX) and glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise JpadaptError(f"{key}: no file matches {pattern!r}")
            files.extend(matches)
        else:
            path = resolve_path(pattern, key)
            if path.is_dir():
                raise JpadaptError(f"{key}: {pattern} is a directory; name files or use a glob like {pattern}/*.jsonl")
            files.append(path)
    duplicates = sorted({str(p) for p in files if files.count(p) > 1})
    if duplicates:
        raise JpadaptError(f"{key}: listed more than once: {', '.join(duplicates)}")
    return files


def display_path(path: Path) -> str:
    """How a file is named in manifests and reports: `bundled:NAME` for shipped files, else as resolved."""
    from data.assets import ASSET_ROOT

    try:
        rel = path.resolve().relative_to(ASSET_ROOT.resolve()).as_posix()
        return BUNDLED_PREFIX + rel.removesuffix(".xz")
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
