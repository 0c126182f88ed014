"""One place that seeds every random number generator a process uses."""

from __future__ import annotations

import random
import sys

import numpy as np


def set_seed(seed: int, rank: int = 0) -> int:
    """Seed `random`, `numpy.random` and, if it is already imported, torch with `seed + rank`; return it.

    Adding the rank gives each distributed process its own stream (data order, dropout) from one run seed.
    torch is seeded only when something has imported it, so CPU-only stages never pay for importing torch:
    the runner calls this before each stage, and training code calls it again after importing torch.
    """
    used = seed + rank
    random.seed(used)
    np.random.seed(used % 2**32)  # numpy accepts only 32-bit seeds
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(used)  # seeds the CPU and every CUDA device
    return used
