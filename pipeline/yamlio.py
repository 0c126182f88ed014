"""Reading pipeline YAML safely: `yaml.safe_load` semantics, plus the checks a config file deserves.

- YAML 1.1 reads `1e-5` as a string; configs are full of learning rates, so floats follow YAML 1.2 here.
- A duplicated key is an error (plain PyYAML silently keeps the last one).
- Errors name the file and line.
- Size is bounded before anything is built: aliases let a few lines stand for billions of values ("billion
  laughs"), and every later step (validation, hashing, the saved config.yaml) would expand them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import JpadaptError

_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
_StrictSafeLoader.add_constructor("tag:yaml.org,2002:map", _StrictSafeLoader.construct_mapping)


# A pipeline YAML holds a few hundred values; these bounds are far above any real one and far below what would
# exhaust memory. Values are counted as expanded: an alias counts as everything it stands for.
MAX_CONFIG_BYTES = 256 << 10
MAX_VALUES = 50_000
MAX_DEPTH = 32
MAX_SCALAR_CHARS = 65_536


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error or a document over the bounds becomes a JpadaptError naming `source:line`."""
    loader = None
    try:
        loader = _StrictSafeLoader(text)  # its reader already refuses control characters
        root = loader.get_single_node()
        if root is None:
            return None
        _check_size(root, source)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JpadaptError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise JpadaptError(f"{source}: invalid YAML: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise JpadaptError(f"{source}: invalid YAML value: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_size(root: yaml.Node, source: str) -> None:
    """Refuse a document whose expanded form is too large or too deep, or that refers to itself, before any
    value is built. Each node's expanded size is computed once (aliases share nodes), so this is linear in the
    text even for an alias bomb."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def refuse(node: yaml.Node, problem: str) -> JpadaptError:
        return JpadaptError(f"{source}:{node.start_mark.line + 1}: refused: {problem}")

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise refuse(node, "an alias refers to the value that contains it (a recursive structure)")
        if depth > MAX_DEPTH:
            raise refuse(node, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode):
            if len(node.value) > MAX_SCALAR_CHARS:
                raise refuse(node, f"a value of {len(node.value):,} characters (at most {MAX_SCALAR_CHARS:,})")
            total = 1
        else:
            open_nodes.add(key)
            children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) \
                else node.value
            total = 1
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_VALUES:
                    raise refuse(node, f"the config expands to more than {MAX_VALUES:,} values (aliases count as "
                                 "what they stand for); a pipeline YAML holds a few hundred")
            open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def read_yaml_file(path: Path) -> tuple[Any, str]:
    """Return (parsed data, text) of a YAML file, with clear errors for missing or undecodable files."""
    if not path.exists():
        raise JpadaptError(f"{path}: config file not found")
    if not path.is_file():
        raise JpadaptError(f"{path}: not a file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise JpadaptError(f"{path}: {path.stat().st_size:,} bytes, more than a pipeline YAML can be "
                           f"({MAX_CONFIG_BYTES:,}); is this the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise JpadaptError(f"{path}: not UTF-8 (byte {exc.start})") from None
    return parse_yaml(text, str(path)), text


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line, so schema errors can point at a line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*prefix, str(index))] = item.start_mark.line + 1
                walk(item, (*prefix, str(index)))

    if root is not None:
        walk(root, ())
    return lines


def dump_yaml(data: Any) -> str:
    """Deterministic YAML: key order kept, unicode as is."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
