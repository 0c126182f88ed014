"""Compare tokenizers on corpora: stream the text in batches, analyse each text once (fugashi morphemes,
scripts), encode each batch with every tokenizer, and accumulate metrics per tokenizer x corpus x group.

Memory holds one batch of texts and per-tokenizer counters (a vocabulary-sized id histogram), never the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data.readers import iter_documents
from pipeline.config import CorpusConfig
from pipeline.errors import JpadaptError
from tokenizer.analysis import analyze, make_tagger
from tokenizer.backend import TokenizerBackend
from tokenizer.metrics import Accumulator, TokenTables, add_costs, measure, token_tables

# Records carrying these fields get per-group figures ("genre:fiction", "source:aozora").
GROUP_FIELDS = ("genre", "source")
# Characters per batch: large enough for the native encoders to use both cores, small enough to stream.
BATCH_CHARS = 400_000
RENYI_ALPHA = 2.5
# Characters per token on the shared Japanese held-out (raw text, whole documents, no BOS/EOS).
REFERENCE_JA_CHARS_PER_TOKEN = {"llama2": 0.81, "mistral": 0.87, "llama3": 1.31, "qwen": 1.37, "llm-jp": 1.73}


@dataclass(frozen=True)
class Corpus:
    stem: str
    files: list[Path]


def corpus_stem(path: Path) -> str:
    """`ja_heldout.jsonl.xz` -> `ja_heldout`."""
    name = path.name
    for suffix in (".xz", ".gz"):
        name = name.removesuffix(suffix)
    return name.rsplit(".", 1)[0] if "." in name else name


def compare(
    corpora: list[Corpus],
    tokenizers: dict[str, TokenizerBackend],
    baseline: str,
    compute_params: int,
    context_length: int,
    max_documents: int | None = None,
    text_field: str = "text",
    progress: bool = True,
    tables: dict[str, TokenTables] | None = None,
) -> dict[str, Any]:
    """Every metric for every tokenizer on every corpus, in the layout of `metrics.json`.

    `tables`: each tokenizer's vocabulary tables when already built (the benchmark times them apart from the
    pass over the text); built here otherwise.
    """
    if baseline not in tokenizers:
        raise JpadaptError(f"baseline {baseline!r} is not one of the tokenizers ({', '.join(tokenizers)})")
    if tables is None:
        tables = {name: token_tables(backend) for name, backend in tokenizers.items()}
    tagger = make_tagger()
    results: dict[str, dict[str, Any]] = {name: {} for name in tokenizers}
    corpus_totals = {}
    for corpus in corpora:
        accumulators = {name: _GroupedAccumulators(tables[name]) for name in tokenizers}
        bars = _progress_bars(corpus, tokenizers, progress)
        for batch in _batches(corpus, text_field, max_documents):
            analyses = [analyze(tagger, text) for text, _ in batch]
            texts = [text for text, _ in batch]
            for name, backend in tokenizers.items():
                encoded = backend.encode_batch(texts)
                decoded = backend.decode_batch([e.ids for e in encoded])
                for (text, groups), analysis, enc, dec in zip(batch, analyses, encoded, decoded):
                    accumulators[name].add(groups, analysis, enc, dec == text)
                bars[name].update(sum(len(t) for t in texts))
        for bar in bars.values():
            bar.close()
        for name in tokenizers:
            results[name][corpus.stem] = accumulators[name].result()
        overall = results[baseline][corpus.stem]
        if overall["documents"] == 0:
            raise JpadaptError(f"corpus {corpus.stem}: no documents with text ({', '.join(map(str, corpus.files))})")
        corpus_totals[corpus.stem] = {key: overall[key] for key in ("documents", "chars", "bytes", "morphemes")}
        _add_costs_everywhere(results, corpus.stem, baseline, compute_params, context_length)
    return {
        "settings": {
            "baseline": baseline,
            "compute_params": compute_params,
            "context_length": context_length,
            "renyi_alpha": RENYI_ALPHA,
            "max_documents": max_documents,
            "library_versions": _library_versions(),
        },
        "corpora": corpus_totals,
        "tokenizer_info": {
            name: {"source": b.source, "kind": b.kind, "vocab_size": b.vocab_size} for name, b in tokenizers.items()
        },
        "tokenizers": results,
        "notes": [],
    }


class _GroupedAccumulators:
    """The overall accumulator plus one per group value seen (genre:..., source:...)."""

    def __init__(self, tables: Any):
        self.tables = tables
        self.overall = Accumulator(tables)
        self.groups: dict[str, Accumulator] = {}

    def add(self, groups: list[str], analysis: Any, encoded: Any, roundtrip_ok: bool) -> None:
        counts = measure(self.tables, analysis, encoded, roundtrip_ok)  # once, whatever the number of groups
        self.overall.add_counts(counts)
        for group in groups:
            if group not in self.groups:
                self.groups[group] = Accumulator(self.tables)
            self.groups[group].add_counts(counts)

    def result(self) -> dict[str, Any]:
        result = self.overall.result()
        if self.groups:
            result["groups"] = {key: self.groups[key].result() for key in sorted(self.groups)}
        return result


def _add_costs_everywhere(results: dict, stem: str, baseline: str, compute_params: int, context_length: int) -> None:
    add_costs({name: per[stem] for name, per in results.items()}, baseline, compute_params, context_length)
    for group in results[baseline][stem].get("groups", {}):
        per_group = {name: per[stem]["groups"][group] for name, per in results.items()}
        add_costs(per_group, baseline, compute_params, context_length)


def _batches(corpus: Corpus, text_field: str, max_documents: int | None) -> Iterator[list[tuple[str, list[str]]]]:
    """Batches of (text, group keys), whole records, about BATCH_CHARS characters each."""
    config = CorpusConfig(train=[str(p) for p in corpus.files], text_field=text_field)
    skipped: dict = {}
    batch: list[tuple[str, list[str]]] = []
    size = documents = 0
    for path in corpus.files:
        for document in iter_documents(path, config, "fail", skipped):
            if max_documents is not None and documents >= max_documents:
                break
            if not document.text:
                continue
            groups = [f"{f}:{document.fields[f]}" for f in GROUP_FIELDS if isinstance(document.fields.get(f), str)]
            batch.append((document.text, groups))
            documents += 1
            size += len(document.text)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _progress_bars(corpus: Corpus, tokenizers: dict, enabled: bool) -> dict[str, tqdm]:
    # One bar per tokenizer, advancing by characters; silent when stderr is not a terminal.
    return {
        name: tqdm(desc=f"{corpus.stem} {name}", unit=" chars", unit_scale=True, position=i, leave=False,
                   disable=None if enabled else True)
        for i, name in enumerate(tokenizers)
    }


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("tokenizers", "sentencepiece", "tiktoken", "fugashi", "unidic-lite"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def reference_notes(metrics: dict[str, Any], stem: str, text_note: str) -> list[str]:
    """Set the figures on `stem` (the bundled Japanese held-out) beside the reference figures measured on the
    same documents as raw text; `text_note` says how this run's text differs from raw."""
    lines = []
    for name, per_corpus in metrics["tokenizers"].items():
        reference = REFERENCE_JA_CHARS_PER_TOKEN.get(name)
        measured = per_corpus.get(stem, {}).get("chars_per_token")
        if reference is not None and measured is not None:
            lines.append(f"{name} {measured:.3f} (reference {reference:.2f})")
    if not lines:
        return []
    return [
        ("Characters per token on the Japanese held-out, here vs. the reference measured on the raw bundled "
        f"held-out (whole documents, no BOS/EOS): {'; '.join(lines)}. {text_note}")
    ]


def write_outputs(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """metrics.json + the rendered report, written to a temporary folder first and moved into place."""
    from stages.tokenizer_report.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written = [staging / "metrics.json", *write_report(metrics, staging)]
        final = []
        for path in written:
            target = out_dir / path.name
            os.replace(path, target)
            final.append(target)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
