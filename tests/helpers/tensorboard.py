"""TensorBoard event files as tests read them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def board_counts(folder: Path) -> Counter:
    """How many times each (tag, step) is in the event files of `folder`, over all of them."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    counts: Counter = Counter()
    for path in folder.glob("events.out.tfevents.*"):
        for event in LegacyEventFileLoader(str(path)).Load():
            counts.update((value.tag, event.step) for value in event.summary.value)
    return counts
