"""GPU catalog: memory and dense bf16 peak, for fit checks and time estimates.

memory: what `nvidia-smi` reports as total memory (MiB) for the card; peak: the vendor's dense bf16 tensor
throughput with fp32 accumulation (no sparsity). Prices differ by provider: pass your own $/GPU-hour.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pipeline.errors import JpadaptError

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_mib: int
    bf16_tflops: float

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


CATALOG: dict[str, GPU] = {
    gpu.key: gpu
    for gpu in (
        GPU("RTX3090-24GB", "GeForce RTX 3090 24 GB", 24_576, 71.0),
        GPU("RTX4090-24GB", "GeForce RTX 4090 24 GB", 24_564, 165.2),
        GPU("L4-24GB", "L4 24 GB", 23_034, 121.0),
        GPU("A10-24GB", "A10 24 GB", 23_028, 125.0),
        GPU("A6000-48GB", "RTX A6000 48 GB", 49_140, 154.8),
        GPU("L40S-48GB", "L40S 48 GB", 46_068, 362.0),
        GPU("A100-40GB", "A100 40 GB", 40_960, 312.0),
        GPU("A100-80GB", "A100 80 GB", 81_920, 312.0),
        GPU("H100-80GB", "H100 SXM 80 GB", 81_559, 989.0),
        GPU("H200-141GB", "H200 141 GB", 143_771, 989.0),
        GPU("B200-192GB", "B200 192 GB", 183_359, 2250.0),
    )
}


def gpu(key: str) -> GPU:
    if key in CATALOG:
        return CATALOG[key]
    close = difflib.get_close_matches(key, list(CATALOG), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(CATALOG)}"
    raise JpadaptError(f"unknown GPU {key!r}; {hint}")
