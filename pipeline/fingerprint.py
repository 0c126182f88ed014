"""A stage's fingerprint: the hash of everything that determines its outputs, kept in a diffable form.

The state hashed is {params (the stage's config keys), inputs (content hashes of external files), upstream
(content hashes of prerequisites' outputs), code (source hashes of every first-party module the stage imports,
found by following its imports), libraries (versions of the distributions that code imports),
jpadapt version}. Keeping the state itself in the manifest lets `status` say *why* a stage would run.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pydantic import BaseModel

from pipeline import __version__
from pipeline.config import STAGE_SECTIONS, PipelineConfig
from pipeline.hashing import HashCache, code_closure, digest, distributions_of
from pipeline.stage import StageSpec


def config_value(values: dict[str, Any], dotted: str) -> Any:
    """The value of a dotted key (`cpt.lr`) in the dumped config. A whole stage section is taken without its
    `enabled` switch: turning a stage on or off does not change what it produces."""
    node: Any = values
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if dotted in STAGE_SECTIONS and isinstance(node, dict):
        node = {key: value for key, value in node.items() if key != "enabled"}
    return node


def library_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def outputs_digest(manifest: dict[str, Any]) -> str:
    return digest({path: entry["sha256"] for path, entry in manifest["outputs"].items()})


def stage_code(spec: StageSpec) -> tuple[dict[str, str], dict[str, str]]:
    """({module: source digest}, {distribution: version}) of the code a stage runs: the first-party modules that
    its `run` module and its worker import, transitively; the distributions of the third-party modules they
    import; and the spec's `libraries` (used without an import, e.g. safetensors through transformers)."""
    closure = code_closure([spec.run.__module__, *([spec.worker] if spec.worker else [])])
    dists = {dist for module in closure.third_party for dist in distributions_of(module)} | set(spec.libraries)
    return closure.modules, {dist: library_version(dist) for dist in sorted(dists)}


def stage_state(
    spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, dict[str, Any]], cache: HashCache
) -> dict[str, Any]:
    """The fingerprinted state. `upstream` maps each prerequisite read to its committed manifest."""
    values = cfg.model_dump(mode="json")
    inputs = {}
    if spec.inputs is not None:
        for key, files in spec.inputs(cfg).items():
            inputs[key] = [cache.sha256(path) for path in files]
    code, libraries = stage_code(spec)
    return {
        "stage": spec.name,
        "params": {key: config_value(values, key) for key in spec.params},
        "inputs": inputs,
        "upstream": {name: outputs_digest(manifest) for name, manifest in sorted(upstream.items())},
        "code": code,
        "libraries": libraries,
        "jpadapt": __version__,
    }


def fingerprint(state: dict[str, Any]) -> str:
    return digest(state)


def explain_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable reasons why two states differ, most specific first."""
    reasons = []
    for key in sorted(set(old.get("params", {})) | set(new.get("params", {}))):
        reasons += _param_diff(key, old.get("params", {}).get(key), new.get("params", {}).get(key))
    for key in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if old.get("inputs", {}).get(key) != new.get("inputs", {}).get(key):
            reasons.append(f"input files of {key} changed")
    for name in sorted(set(old.get("upstream", {})) | set(new.get("upstream", {}))):
        if old.get("upstream", {}).get(name) != new.get("upstream", {}).get(name):
            reasons.append(f"outputs of {name} changed")
    for module in sorted(set(old.get("code", {})) | set(new.get("code", {}))):
        if old.get("code", {}).get(module) != new.get("code", {}).get(module):
            reasons.append(f"code of {module} changed")
    for dist in sorted(set(old.get("libraries", {})) | set(new.get("libraries", {}))):
        before, after = old.get("libraries", {}).get(dist), new.get("libraries", {}).get(dist)
        if before != after:
            reasons.append(f"{dist} {before} -> {after}")
    if old.get("jpadapt") != new.get("jpadapt"):
        reasons.append(f"jpadapt {old.get('jpadapt')} -> {new.get('jpadapt')}")
    return reasons or ["fingerprint changed"]


def _param_diff(key: str, old: Any, new: Any) -> list[str]:
    """Descend into sections so the reason names the leaf key (`prepare.min_chars: 50 -> 100`)."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        reasons = []
        for sub in sorted(set(old) | set(new)):
            reasons += _param_diff(f"{key}.{sub}", old.get(sub), new.get(sub))
        return reasons
    return [f"{key}: {_short(old)} -> {_short(new)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ what a stage may read


class UndeclaredConfigRead(AttributeError):
    """A stage read a config key that its fingerprint does not cover: a bug in the stage's SPEC, which would
    let a changed value go unnoticed. It is raised at the read, so the omission cannot survive one test run."""


def covered_keys(spec: StageSpec) -> frozenset[str]:
    """The dotted keys a stage may read: its params (fingerprinted) and its `unhashed` keys (read, but they do
    not shape the outputs: ports, checkpoint retention, the GPU the plan check assumes)."""
    return frozenset((*spec.params, *spec.unhashed))


class ConfigView:
    """What `run(cfg, ctx)` is handed: the pipeline config, reduced to the keys the stage declares.

    A read of any other key raises UndeclaredConfigRead naming the key. Sections whose every field is declared
    come back as the real pydantic objects (so `model_dump`, `model_copy` work on them); partly declared ones come
    back as views. `enabled(stage)` is allowed for the stage itself and the stages it reads (their outputs are
    fingerprinted as upstream), or when that `<section>.enabled` is declared.
    """

    def __init__(self, target: Any, prefix: str, spec: StageSpec, graph: frozenset[str]):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_graph", graph)
        object.__setattr__(self, "_keys", covered_keys(spec))

    @classmethod
    def of(cls, cfg: PipelineConfig, spec: StageSpec) -> ConfigView:
        graph = frozenset(name.replace("-", "_") for name in (spec.name, *spec.requires, *spec.uses))
        return cls(cfg, "", spec, graph)

    def __getattr__(self, name: str) -> Any:
        target = object.__getattribute__(self, "_target")
        if not self._prefix and name == "enabled":
            return self._enabled
        if not self._prefix and name == "section":
            return lambda stage: getattr(self, stage.replace("-", "_"))
        path = f"{self._prefix}.{name}" if self._prefix else name
        value = getattr(target, name)
        if self._covers(path, value):
            return value
        declared_below = any(key.startswith(path + ".") for key in self._keys)
        if isinstance(value, BaseModel) and declared_below:
            return ConfigView(value, path, self._spec, self._graph)
        if value is None and declared_below:
            # A section the stage reads keys of, absent from the YAML (evaluate's `cfg.sft is not None`): there is
            # nothing to read, and the absence is fingerprinted (config_value gives None for its keys).
            return None
        raise UndeclaredConfigRead(
            f"stage {self._spec.name} reads config key {path!r}, which its SPEC does not declare: add it to "
            "params (it shapes the outputs) or unhashed (it does not)"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")

    def _enabled(self, stage: str) -> bool:
        section = stage.replace("-", "_")
        if section in self._graph or f"{section}.enabled" in self._keys or section in self._keys:
            return object.__getattribute__(self, "_target").enabled(stage)
        raise UndeclaredConfigRead(
            f"stage {self._spec.name} asks whether {stage} is enabled, which it neither reads nor declares"
        )

    def _covers(self, path: str, value: Any) -> bool:
        """True when `path` or an ancestor is declared, or when every field under it is."""
        if any(path == key or path.startswith(key + ".") for key in self._keys):
            return True
        if not isinstance(value, BaseModel):
            return False
        # A section's `enabled` switch never shapes its outputs (config_value leaves it out too).
        return all(self._covers(f"{path}.{field}", getattr(value, field))
                   for field in type(value).model_fields if field != "enabled")
