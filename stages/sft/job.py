"""What the sft stage tells its workers: one typed job, written to job.json by the stage process and validated
by every rank when it reads it (`pipeline.training.load_job`), and the tokenized examples it points at
(`data/*.npz`, written by the stage, read by both sides)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import SftConfig
from pipeline.training import JobContext

# Micro steps per length-sorted window of the data order (the usual "group by length" window).
GROUP_MICRO_BATCHES = 50


class Prompt(BaseModel):
    """A held-out conversation answered greedily at the end (`data.instruct.Conversation`'s fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    where: str
    instruction: str
    input: str
    reference: str
    messages: list[dict[str, str]]


class SftData(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    train: Path  # save_examples files
    heldout: Path
    stats: dict[str, int]  # data.instruct.DataStats of the train set, for the summary
    prompts: list[Prompt]


class SftJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    context: JobContext
    sequences_per_epoch: int = Field(ge=1)
    base_model: str  # the HF folder tuned (where the workers load it from)
    base_model_name: str  # how the outputs name it (adapter config, jpadapt.json, summary): run-relative or absolute
    trust_remote_code: bool
    tokenizer_dir: Path  # adapter/, where the stage saved the tokenizer with its chat template
    prompt_format: Literal["chat_template", "template"]
    target_modules: list[str]  # concrete LoRA target names, checked by the stage
    new_token_ids: list[int]  # extend-vocab's new ids whose embedding rows train
    data: SftData
    sft: SftConfig
    jpadapt_version: str


def save_examples(path: Path, examples: list[Any]) -> None:
    """Examples as flat int32 arrays plus offsets (no pickle)."""
    import numpy as np

    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int32) for e in examples]) if examples else \
        np.zeros(0, np.int32)
    labels = np.concatenate([np.asarray(e.labels, dtype=np.int32) for e in examples]) if examples else \
        np.zeros(0, np.int32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, input_ids=ids, labels=labels, offsets=offsets)
    tmp.replace(path)


def load_examples(path: Path) -> list[Any]:
    import numpy as np

    from data.instruct import Example

    with np.load(path, allow_pickle=False) as arrays:
        ids, labels, offsets = arrays["input_ids"], arrays["labels"], arrays["offsets"]
    return [Example(ids[a:b], labels[a:b], f"{path.name}:{i}") for i, (a, b) in enumerate(itertools.pairwise(offsets))]
