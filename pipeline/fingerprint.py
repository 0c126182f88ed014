"""A stage's fingerprint: the hash of everything that determines its outputs, kept in a diffable form.

The state hashed is {params (the stage's config keys), inputs (content hashes of external files), upstream
(content hashes of prerequisites' outputs), code (source hashes of the stage's modules), libraries (versions),
jpadapt version}. Keeping the state itself in the manifest lets `status` say *why* a stage would run.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pipeline import __version__
from pipeline.config import STAGE_SECTIONS, PipelineConfig
from pipeline.hashing import HashCache, digest, source_digest
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


def stage_state(
    spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, dict[str, Any]], cache: HashCache
) -> dict[str, Any]:
    """The fingerprinted state. `upstream` maps each prerequisite read to its committed manifest."""
    values = cfg.model_dump(mode="json")
    inputs = {}
    if spec.inputs is not None:
        for key, files in spec.inputs(cfg).items():
            inputs[key] = [cache.sha256(path) for path in files]
    return {
        "stage": spec.name,
        "params": {key: config_value(values, key) for key in spec.params},
        "inputs": inputs,
        "upstream": {name: outputs_digest(manifest) for name, manifest in sorted(upstream.items())},
        "code": {module: source_digest(module) for module in spec.code},
        "libraries": {dist: library_version(dist) for dist in spec.libraries},
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
