"""Read back cpt's forgetting verdict ("English forgot +0.123 bits/byte (1.234 -> 1.357); Japanese gained ...") and
check its numbers against forgetting.jsonl."""

from __future__ import annotations

import re

# One language's part: "<Language> <word><delta> bits/byte (<base> -> <final>)", or "<Language> unchanged (...)".
PART = re.compile(r"(?P<language>English|Japanese) (?:(?P<word>forgot \+|improved by |gained |lost )"
                  r"(?P<delta>\d+\.\d{3}) bits/byte|unchanged) \((?P<base>\d+\.\d{3}) -> (?P<final>\d+\.\d{3})\)")
ROSE = {"English": "forgot +", "Japanese": "lost "}
FELL = {"English": "improved by ", "Japanese": "gained "}


def assert_verdict_matches(line: str, evals: list[dict]) -> None:
    """Every number of the verdict `line` is the first or last evaluation's bits per byte (or their difference),
    and each word says which way it moved."""
    parts = [PART.fullmatch(part) for part in line.split("; ")]
    assert len(parts) == 2 and all(parts), line
    assert [part["language"] for part in parts] == ["English", "Japanese"], line
    for part, lang in zip(parts, ("en", "ja")):
        base, final = evals[0][lang]["bits_per_byte"], evals[-1][lang]["bits_per_byte"]
        assert (part["base"], part["final"]) == (f"{base:.3f}", f"{final:.3f}"), line
        if part["word"] is None:
            assert f"{abs(final - base):.3f}" == "0.000", line
            continue
        assert part["delta"] == f"{abs(final - base):.3f}", line
        assert part["word"] == (ROSE if final > base else FELL)[part["language"]], line
