"""Read back what the Markdown reports print, so tests compare numbers with the files they come from."""

from __future__ import annotations


def table_rows(lines: list[str], start: int) -> list[dict[str, str]]:
    """Rows of the first pipe table at or after lines[start], as dicts keyed by column title."""
    i = start
    while not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip("|").split(" | ")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True)))
    return rows
