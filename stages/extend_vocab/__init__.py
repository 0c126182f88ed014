"""Stage `extend-vocab`: add Japanese tokens to the base tokenizer through its own merges, and grow the model.

SentencePiece bases (LLaMA-2, Mistral, llm-jp, Gemma) get pieces appended to their model proto
(`tokenizer/extend_sp.py`); byte-level BPE bases (LLaMA-3, Qwen) get BPE training continued from their merges
(`tokenizer/extend_bpe.py`). Base and special tokens keep their ids; new ids follow the base's last id. When the
YAML names a model (`model.path` or `model.from_config`), its embeddings are resized to a multiple of
`pad_to_multiple_of` and the new rows initialized (`tokenizer/embeddings.py`).

Outputs, in `runs/<name>/stages/extend-vocab/`:
    tokenizer/          Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json; + tokenizer.model)
    new_tokens.json     every new id: token text, base pieces it replaces, count in the training text
    model/              HF model folder (safetensors) with the tokenizer and new_tokens.json, when a model is set
    comparison/         the tokenizer report of base vs extended on the held-out text (metrics.json, report.*)
    summary.json        every figure report.md prints
    report.md           what was added, before/after efficiency, invariants, tokens saved on the same text
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import BUNDLED_TOKENIZERS, PipelineConfig, TokenizerReportConfig
from pipeline.errors import JpadaptError
from pipeline.paths import resolve_path
from pipeline.stage import StageContext, StageSpec, lazy

SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL_BPE = "byte-level-bpe"
# A model may have more embedding rows than its tokenizer has ids (Qwen2.5-7B: 152,064 rows for 151,665 ids);
# beyond this many extra rows it was most likely made for another tokenizer.
MAX_SPARE_ROWS = 1024
EXAMPLES = 40


@dataclass(frozen=True)
class BaseTokenizer:
    kind: str  # SENTENCEPIECE | BYTE_LEVEL_BPE
    file: Path  # tokenizer.model or tokenizer.json
    config: Path | None  # tokenizer_config.json beside it (chat template, special tokens)
    spec: str


def _tokenizer_spec(cfg: PipelineConfig) -> str:
    spec = cfg.model.tokenizer or cfg.model.path
    if spec is None:
        raise JpadaptError("extend-vocab needs a base tokenizer: set model.tokenizer (or model.path)")
    return spec


def _base_folder(spec: str) -> Path:
    from data.assets import materialize_dir

    if spec in BUNDLED_TOKENIZERS:
        return materialize_dir(f"tokenizers/{spec}")
    return resolve_path(spec, "model.tokenizer")


def find_base(spec: str) -> BaseTokenizer:
    """The file to extend: a SentencePiece `tokenizer.model` if there is one, else a byte-level BPE
    `tokenizer.json` (LLaMA-3's `tokenizer.model` is a tiktoken rank file and is passed over)."""
    from tokenizer.load import sniff_format

    where = _base_folder(spec)
    files = [where] if where.is_file() else [where / "tokenizer.model", where / "tokenizer.json"]
    config = (where if where.is_dir() else where.parent) / "tokenizer_config.json"
    config = config if config.is_file() else None
    for file in files:
        if not file.is_file():
            continue
        fmt = sniff_format(file)
        if fmt == "sentencepiece":
            return BaseTokenizer(SENTENCEPIECE, file, config, spec)
        if fmt == "tokenizer.json" and _is_byte_level_bpe(file):
            return BaseTokenizer(BYTE_LEVEL_BPE, file, config, spec)
    raise JpadaptError(
        f"model.tokenizer {spec!r}: unknown base tokenizer kind; extend-vocab extends a SentencePiece "
        "tokenizer.model (LLaMA-2, Mistral, llm-jp, Gemma) or a byte-level BPE tokenizer.json (LLaMA-3, Qwen)"
    )


def _is_byte_level_bpe(file: Path) -> bool:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JpadaptError(f"{file}: not a valid tokenizer.json ({exc})") from exc
    model = config.get("model") or {}
    return model.get("type") == "BPE" and "ByteLevel" in json.dumps(config.get("decoder"))


def has_model(cfg: PipelineConfig) -> bool:
    return cfg.model.path is not None or cfg.model.from_config is not None


def preflight(cfg: PipelineConfig, base: BaseTokenizer):
    """Every check that needs no learning, so bad input fails before minutes of work. Returns the base
    tokenizer, loaded."""
    from tokenizer.extend_sp import model_type, read_model
    from tokenizer.load import load_tokenizer

    settings = cfg.extend_vocab
    if base.kind == SENTENCEPIECE and model_type(read_model(base.file)) == "unigram" and settings.algorithm != "unigram":
        raise JpadaptError(
            f"extend_vocab.algorithm: {base.file} is a unigram SentencePiece model, whose pieces need "
            "log-probabilities that BPE candidates lack; set extend_vocab.algorithm: unigram (got bpe)"
        )
    # Recorded as the config names it ("bundled:llama2", or the path given), not as the cache file it resolves to.
    source = f"bundled:{base.spec}" if base.spec in BUNDLED_TOKENIZERS else base.spec
    backend = load_tokenizer(str(base.file), name="base", source=source)
    size = backend.vocab_size
    if has_model(cfg):
        from pipeline.models import check_model_folder, model_vocab_size

        if cfg.model.path is not None:  # before minutes of tokenizer training, not when the model is loaded
            check_model_folder(cfg.model.path, "model.path")
        rows = model_vocab_size(cfg.model)
        if not size <= rows <= size + MAX_SPARE_ROWS:
            raise JpadaptError(
                f"model: its vocabulary ({rows:,} embedding rows) does not match the base tokenizer "
                f"{base.spec!r} ({size:,} ids); set model.tokenizer to the model's own tokenizer"
            )
    return backend


# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(cfg: PipelineConfig, base: BaseTokenizer, texts: list[str], out: Path, log) -> dict[str, Any]:
    """Learn and write the extended tokenizer folder; returns what was added."""
    settings = cfg.extend_vocab
    if base.kind == SENTENCEPIECE:
        from tokenizer.extend_sp import extend_sentencepiece, write_sentencepiece_folder

        model, ext = extend_sentencepiece(
            base.file, texts, settings.new_tokens, algorithm=settings.algorithm,
            morpheme_pretokenize=settings.morpheme_pretokenize,
        )
        write_sentencepiece_folder(model, out, base.config)
        return {"base_size": ext.base_size, "new_ids": ext.new_ids, "seconds": ext.seconds,
                "candidates": ext.candidates}
    from tokenizer.extend_bpe import extend_byte_level_bpe

    out.mkdir(parents=True, exist_ok=True)
    ext = extend_byte_level_bpe(
        base.file, texts, settings.new_tokens, out, morpheme_boundaries=settings.morpheme_pretokenize, progress=True
    )
    if base.config is not None:
        shutil.copy(base.config, out / "tokenizer_config.json")
    log.info("learned %d merges in %.1f s", len(ext.new_ids), ext.seconds)
    return {"base_size": ext.base_size, "new_ids": ext.new_ids, "seconds": ext.seconds, "candidates": None}


def base_hf_tokenizer(base: BaseTokenizer, scratch: Path):
    """The base as a `tokenizers.Tokenizer` whose model splits token strings the way the extension's vocabulary
    spells them (SentencePiece bases are converted exactly as the extended folder was)."""
    from tokenizers import Tokenizer

    if base.kind == BYTE_LEVEL_BPE:
        return Tokenizer.from_file(str(base.file))
    from tokenizer.extend_sp import read_model, write_sentencepiece_folder

    write_sentencepiece_folder(read_model(base.file), scratch, base.config)
    return Tokenizer.from_file(str(scratch / "tokenizer.json"))


def new_token_records(extended, base_tk, new_ids: list[int], counts: list[int], token_text) -> list[dict]:
    """Per new id: its vocabulary string, the text it stands for, the base ids it replaces, its count.
    `extended` and `base_tk` are `tokenizers.Tokenizer`s."""
    records = []
    for new_id, count in zip(new_ids, counts):
        token = extended.id_to_token(new_id)
        pieces = [t.id for t in base_tk.model.tokenize(token)]
        records.append({"id": new_id, "token": token, "text": token_text(new_id), "base_pieces": pieces,
                        "count": count})
    return records


def count_new_tokens(extended, texts: list[str], new_ids: list[int]) -> tuple[list[int], list]:
    """How often each new id occurs in the training text, and the encoded text (FOCUS learns from it)."""
    import numpy as np

    encoded = [e.ids for e in extended.encode_batch(texts)]
    histogram = np.bincount(np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int64),
                            minlength=extended.vocab_size)
    return [int(histogram[i]) for i in new_ids], encoded


def invariants(base, extended, prepared: Path, sp_file: Path | None, comparison: dict[str, Any]) -> dict[str, Any]:
    """The checks the issue names, on every held-out record: round trip and token counts (from the comparison,
    which already encoded and decoded every record), records whose ids changed, ids vs SentencePiece."""
    import numpy as np

    from data.prepare import prepared_shards, prepared_texts

    result: dict[str, Any] = {}
    for lang in ("ja", "en"):
        texts = list(prepared_texts(prepared_shards(prepared, lang, "heldout")))
        if not texts:
            continue
        measured = {name: comparison["tokenizers"][name][f"{lang}_heldout"] for name in ("base", "extended")}
        row = {
            "documents": len(texts),
            "roundtrip_failures": measured["extended"]["roundtrip_failures"],
            "base_tokens": measured["base"]["tokens"],
            "extended_tokens": measured["extended"]["tokens"],
        }
        ext = [e.ids for e in extended.encode_batch(texts)]
        old = [e.ids for e in base.encode_batch(texts)]
        changed = [not np.array_equal(a, b) for a, b in zip(old, ext)]
        row["documents_with_changed_ids"] = int(sum(changed))
        row["tokens_in_changed_documents"] = int(sum(len(a) for a, c in zip(old, changed) if c))
        if sp_file is not None:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(sp_file))
            row["documents_matching_sentencepiece"] = int(
                sum(list(ids) == sp_ids for ids, sp_ids in zip(ext, sp.encode(texts)))
            )
        result[lang] = row
    return result


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    # data.prepare imports numpy and the readers: time that `jpadapt --help` and `status` must not pay.
    from data.prepare import capped_texts, prepared_shards, prepared_texts
    from tokenizer.compare import Corpus, compare, write_outputs
    from tokenizer.load import load_tokenizer

    settings = cfg.extend_vocab
    base = find_base(_tokenizer_spec(cfg))
    base_backend = preflight(cfg, base)
    base_size = base_backend.vocab_size
    prepared = ctx.artifact("prepare")
    texts = capped_texts(prepared_texts(prepared_shards(prepared, "ja", "train")), settings.max_training_chars)
    if not any(t.strip() for t in texts):
        raise JpadaptError(f"{prepared / 'ja'}: no Japanese training text to learn new tokens from")

    ctx.log.info("learning %d Japanese tokens for %s (%s, %s)", settings.new_tokens, base.spec, base.kind,
                 settings.algorithm if base.kind == SENTENCEPIECE else "continued BPE")
    tok_dir = ctx.out_dir / "tokenizer"
    added = build_tokenizer(cfg, base, texts, tok_dir, ctx.log)
    if added["base_size"] != base_size:
        raise RuntimeError(f"extension starts at id {added['base_size']}, the base has {base_size} ids")
    new_ids = added["new_ids"]

    extended = load_tokenizer(str(tok_dir), name="extended", source=ctx.run_relative(tok_dir))
    counts, encoded = count_new_tokens(extended, texts, new_ids)

    def token_text(i: int) -> str:
        return extended.token_bytes[i].decode("utf-8", errors="replace")

    records = new_token_records(extended.tokenizer, base_hf_tokenizer(base, ctx.out_dir / ".base"),
                                new_ids, counts, token_text)
    shutil.rmtree(ctx.out_dir / ".base", ignore_errors=True)
    _write_json(ctx.out_dir / "new_tokens.json", {"base_size": base_size, "new_id_range": [new_ids[0], new_ids[-1] + 1],
                                                  "tokens": records})

    corpora = [Corpus(f"{lang}_heldout", prepared_shards(prepared, lang, "heldout")) for lang in ("ja", "en")
               if prepared_shards(prepared, lang, "heldout")]
    report_settings = cfg.tokenizer_report or TokenizerReportConfig()
    comparison = compare(corpora, {"base": base_backend, "extended": extended}, baseline="base",
                         compute_params=report_settings.compute_params,
                         context_length=report_settings.context_length)
    sp_file = tok_dir / "tokenizer.model" if base.kind == SENTENCEPIECE else None
    checks = invariants(base_backend, extended, prepared, sp_file, comparison)
    failures = sum(row["roundtrip_failures"] for row in checks.values())
    if failures:
        raise RuntimeError(f"the extended tokenizer does not decode {failures} held-out records back to their text")
    write_outputs(comparison, ctx.out_dir / "comparison")

    model_info = None
    if has_model(cfg):
        model_info = extend_model(cfg, ctx, records, encoded, len(extended.token_bytes))

    summary = {
        "base": base.spec,
        "kind": base.kind,
        "algorithm": settings.algorithm if base.kind == SENTENCEPIECE else "continued byte-level BPE",
        "morpheme_pretokenize": settings.morpheme_pretokenize,
        "base_size": base_size,
        "new_tokens": len(new_ids),
        "tokenizer_size": base_size + len(new_ids),
        "candidates": added["candidates"],
        "training_chars": sum(map(len, texts)),
        "efficiency": _efficiency(comparison),
        "invariants": checks,
        "model": model_info,
    }
    _write_json(ctx.out_dir / "summary.json", summary)
    from stages.extend_vocab.report import render_report

    (ctx.out_dir / "report.md").write_text(render_report(summary, records, EXAMPLES), encoding="utf-8")
    ja = summary["efficiency"].get("ja_heldout", {})
    # Times go to the manifest, not the outputs: a rerun must give byte-identical files.
    return {
        "new tokens": len(new_ids),
        "ja chars/token": f"{ja.get('base_chars_per_token', 0):.2f} -> {ja.get('extended_chars_per_token', 0):.2f}",
        "learned in": f"{added['seconds']:.1f} s",
    }


def _efficiency(comparison: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    per = comparison["tokenizers"]
    for stem in per["base"]:
        row = {}
        for key in ("chars_per_token", "tokens_per_morpheme", "tokens"):
            row[f"base_{key}"] = per["base"][stem][key]
            row[f"extended_{key}"] = per["extended"][stem][key]
        row["token_change"] = row["extended_tokens"] / row["base_tokens"] - 1
        row["chars_per_token_ratio"] = row["extended_chars_per_token"] / row["base_chars_per_token"]
        out[stem] = row
    return out


def extend_model(cfg: PipelineConfig, ctx: StageContext, records: list[dict], encoded: list, size: int) -> dict:
    """Load the model, grow its embeddings to a padded vocabulary, initialize the new rows, save a folder."""
    from pipeline.models import load_causal_lm, save_model_folder
    from tokenizer.embeddings import extend_embeddings

    settings = cfg.extend_vocab
    rows = math.ceil(size / settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    started = time.monotonic()
    model = load_causal_lm(cfg.model, seed=ctx.seed)
    info = extend_embeddings(
        model,
        [r["id"] for r in records],
        [r["base_pieces"] for r in records],
        vocab_size=rows,
        method=settings.init,
        seed=ctx.seed,
        focus_corpus=encoded if settings.init == "focus" else None,
    )
    out = ctx.out_dir / "model"
    save_model_folder(model, out)
    for file in (ctx.out_dir / "tokenizer").iterdir():
        shutil.copy(file, out / file.name)
    shutil.copy(ctx.out_dir / "new_tokens.json", out / "new_tokens.json")
    ctx.log.info("model: %d -> %d embedding rows (%s init) in %.1f s", info["rows_before"], info["rows_after"],
                 settings.init, time.monotonic() - started)
    return {**info, "vocab_size": info["rows_after"]}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    from pipeline.models import model_inputs, tokenizer_files

    files = model_inputs(cfg.model)
    files["model.tokenizer"] = tokenizer_files(_tokenizer_spec(cfg), "model.tokenizer")
    return files


SPEC = StageSpec(
    name="extend-vocab",
    run=run,
    description="add Japanese tokens to the base tokenizer through real merges; resize and initialize embeddings",
    requires=("prepare",),
    # Not cpt's settings: the compute this saves is reported by cpt, so changing them never reruns this stage.
    params=("extend_vocab", "model", "tokenizer_report.compute_params", "tokenizer_report.context_length"),
    inputs=_inputs,
    outputs=("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "new_tokens.json", "summary.json",
             "report.md", "comparison/metrics.json"),
    libraries=("safetensors",),
    report_section=lazy("stages.extend_vocab.report:report_section"),
)
