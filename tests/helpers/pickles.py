"""A malicious pickle, for tests that checkpoints are loaded as data."""

from __future__ import annotations

from pathlib import Path


class Planted:
    """A pickle that runs code when it is loaded in full: it creates the file `ran`."""

    def __init__(self, ran: Path):
        self.ran = ran

    def __reduce__(self):
        return exec, (f"open({str(self.ran)!r}, 'w').close()",)
