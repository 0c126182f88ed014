"""What the cpt stage tells its workers: one typed job, written to job.json by the stage process and validated
by every rank when it reads it (`pipeline.training.load_job`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import CptConfig, ModelConfig
from pipeline.training import JobContext

LANGS = ("ja", "en")
Lang = Literal["ja", "en"]


class TokenFiles(BaseModel):
    """A language's tokenized train set in the cache (`data.mixture.load_token_cache(folder)`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: Path
    n_tokens: int = Field(ge=0)
    n_docs: int = Field(ge=0)


class CptJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    context: JobContext
    model: ModelConfig  # what the workers load: the extend-vocab output replaces the configured model
    extended_from: Path | None  # the extend-vocab output directory, when the vocabulary was extended
    extended_from_name: str | None  # how summary.json names it: relative to the run directory (`stages/...`)
    tokenizer_dir: Path
    tokens: dict[Lang, TokenFiles]  # "en" only with replay
    heldout: dict[Lang, list[Path]]  # the languages that have held-out shards
    cpt: CptConfig
