"""Fuzzing the config loader: whatever the YAML, `load_config` gives a config or one JpadaptError, in bounded time
and memory, and what it accepts can be saved and hashed (as `run` and `status` do) within the same bounds.

The cases are generated from a fixed seed (the same cases on every run, so a failure reproduces): random nesting,
anchors and aliases (bombs included), every YAML type, non-finite and huge numbers, long strings, keys of the real
schema and unknown ones, and byte-level mutations of the demo config.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG, PipelineConfig, load_config, resolved_yaml
from pipeline.errors import JpadaptError
from pipeline.hashing import canonical_json

CASES = 100
SECONDS_PER_CASE = 10.0  # generous: tracemalloc slows allocation, and CI shares two cores
PEAK_BYTES_PER_CASE = 64 << 20

SECTIONS = ["run", "model", "data", "prepare", "tokenizer_report", "extend_vocab", "plan", "cpt", "sft", "evaluate"]
KEYS = ["name", "seed", "lr", "epochs", "from_config", "train", "ja", "en", "dedup", "threshold", "tasks",
        "num_fewshot", "adam_betas", "enabled", "mystery", "hidden_size", "rope_scaling", "max_steps", "gpu"]
SCALARS = ["1", "0", "-3", "1e-5", "1e999", ".inf", "-.inf", ".nan", "true", "no", "null", "~", "''", "abc", "日本語",
           "0x1F", "0o17", "1_000", "2026-12-04", "'1e-5'", "!!binary aGk=", "[]", "{}"]


def random_scalar(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.05:
        return "9" * rng.choice([10, 400, 5000])  # past Python's 4300-digit int conversion limit too
    if roll < 0.08:
        return "'" + "x" * rng.choice([100, 70_000]) + "'"
    return rng.choice(SCALARS)


def random_yaml(rng: random.Random) -> str:
    """A flow-style YAML document: mappings, lists, scalars, with anchors defined and aliases used."""
    anchors: list[str] = []

    def value(depth: int) -> str:
        roll = rng.random()
        if anchors and roll < 0.15:
            return f"*{rng.choice(anchors)}"
        if depth > rng.choice([3, 6, 40]) or roll < 0.35:
            return random_scalar(rng)
        if roll < 0.65:
            body = ", ".join(f"{rng.choice(KEYS)}: {value(depth + 1)}" for _ in range(rng.randint(0, 4)))
            text = "{" + body + "}"
        else:
            width = rng.choice([0, 1, 3, 9])
            text = "[" + ", ".join(value(depth + 1) for _ in range(width)) + "]"
        if rng.random() < 0.3:
            name = f"a{len(anchors)}"
            anchors.append(name)
            return f"&{name} {text}"
        return text

    lines = []
    for section in rng.sample(SECTIONS, rng.randint(1, len(SECTIONS))):
        lines.append(f"{section}: {value(0)}")
    if rng.random() < 0.3:  # an alias bomb of random width and depth under a random key
        width, levels = rng.randint(2, 12), rng.randint(2, 10)
        lines.append(f"b0: &b0 [{', '.join(['x'] * width)}]")
        lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, levels)]
        lines.append(f"{rng.choice(SECTIONS)}: {{from_config: {{k: *b{levels - 1}}}}}")
    return "\n".join(lines) + "\n"


# Written as the byte 0xff (surrogateescape): a file that is not UTF-8.
BAD_BYTE = "\udcff"


def mutated_demo(rng: random.Random) -> str:
    """The demo config with a few characters deleted, duplicated or replaced by YAML syntax."""
    text = list(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    for _ in range(rng.randint(1, 8)):
        where = rng.randrange(len(text))
        action = rng.random()
        if action < 0.3:
            del text[where]
        elif action < 0.6:
            text.insert(where, rng.choice(["&a ", "*a", "[", "]", "{", "}", ":", "-", "\t", "!!", "%", "'", '"',
                                           "\n  ", "\x00", BAD_BYTE]))
        else:
            text[where] = rng.choice(["0", "x", " ", "\n", "#", ","])
    return "".join(text)


def check_one(path: Path, text: str) -> str:
    """Load `text` as a config file and, if it loads, save and hash it as a run would. 'ok' or 'refused'."""
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    try:
        cfg = load_config(path)
    except JpadaptError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return "refused"
    assert isinstance(cfg, PipelineConfig)
    resolved_yaml(cfg)
    canonical_json(cfg.model_dump(mode="json"))
    return "ok"


@pytest.mark.parametrize("kind", ["generated", "mutated"])
def test_the_config_loader_gives_a_config_or_one_error_in_bounded_time_and_memory(tmp_path: Path, kind: str) -> None:
    rng = random.Random(f"jpadapt-config-fuzz-{kind}")
    outcomes = {"ok": 0, "refused": 0}
    for case in range(CASES):
        text = random_yaml(rng) if kind == "generated" else mutated_demo(rng)
        tracemalloc.start()
        began = time.monotonic()
        try:
            outcome = check_one(tmp_path / "fuzz.yaml", text)
        except Exception as exc:  # anything but JpadaptError is the bug this test looks for
            raise AssertionError(f"case {case} raised {type(exc).__name__}: {exc}\n--- YAML ---\n{text[:2000]}") from exc
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        elapsed = time.monotonic() - began
        assert elapsed < SECONDS_PER_CASE, f"case {case} took {elapsed:.1f} s:\n{text[:2000]}"
        assert peak < PEAK_BYTES_PER_CASE, f"case {case} peaked at {peak / 2**20:.0f} MiB:\n{text[:2000]}"
        outcomes[outcome] += 1
    # The generator must reach both sides, or it tests nothing: mutated demos often still load.
    assert outcomes["refused"] > 0
    if kind == "mutated":
        assert outcomes["ok"] > 0, outcomes
