"""Stage `evaluate`: every model the run produced, side by side, on the same held-out text, tasks and prompts.

Models, in this order, each when it exists: `base` (model.path, or the model.from_config model with the run
seed, as extend-vocab and cpt started from it), `extended` (the extend-vocab output: new rows initialized, not
trained), `cpt` (the continued-pretraining output), `sft` (the sft base with its LoRA adapter applied, loaded
4-bit when it was trained 4-bit), then each `evaluate.extra_models` folder. Each is scored on:
* bits per byte, loss and perplexity on the Japanese and English held-out text written by `prepare`
  (`eval.perplexity`; bits per byte is comparable across vocabularies);
* JGLUE JCommonsenseQA and JNLI by choice log-likelihood, zero- and k-shot (`eval.jglue`);
* greedy answers to the bundled Japanese prompts (`eval.generate`).
Models are loaded one at a time and scored under `torch.inference_mode`.

Outputs, in `runs/<name>/stages/evaluate/`:
    results.json       settings, models, held-out data, every figure (see stages/evaluate/report.py for its layout)
    predictions.jsonl  per model, task, shots and item: label and each choice's log-likelihood, tokens, chars
    generations.jsonl  per prompt: the rendered kind, reference and every model's answer
    report.md, report.html, bits_per_byte.png, jglue.png
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import EvaluateConfig, ModelConfig, PipelineConfig
from pipeline.errors import JpadaptError
from pipeline.models import check_model_folder
from pipeline.paths import display_path
from pipeline.stage import StageContext, StageSpec, lazy

LANGS = ("ja", "en")
PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the table: where it comes from and how to load it (nothing is loaded here)."""

    name: str
    kind: str  # base | extended | cpt | sft | extra
    source: str  # a folder, or "model.from_config (llama)"
    tokenizer: str  # a folder or a model.tokenizer spec
    adapter: str | None = None  # sft: the adapter folder, applied on `source`
    quantization: str | None = None  # sft: "nf4" when the base was trained 4-bit
    dtype: str = "auto"  # float32 | bfloat16 | auto (the folder's)

    def describe(self, ctx: StageContext) -> dict[str, Any]:
        """Its row in results.json: folders of this run named relative to the run directory (`stages/cpt/model`,
        the same in every run directory), other folders as display_path shows them."""
        def shown(path: str | None) -> str | None:
            if path is None or not Path(path).exists():
                return path
            try:
                return ctx.run_relative(Path(path))
            except ValueError:  # outside the run
                return display_path(Path(path))

        return {"name": self.name, "kind": self.kind, "source": shown(self.source), "tokenizer": shown(self.tokenizer),
                "adapter": shown(self.adapter), "quantization": self.quantization}


# ============================================================================================ stage


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    import torch

    from pipeline.training import check_plan, pick_accelerator

    settings = cfg.evaluate
    device = torch.device(pick_accelerator("evaluate", settings.accelerator, 1, "fp32"))
    check_plan(cfg, "evaluate", ctx)
    entries = model_entries(cfg, ctx)
    heldout = heldout_texts(ctx.artifact("prepare"), settings)
    tasks = task_requests(settings, ctx.seed)
    prompts = _prompts(settings)
    check_contexts(entries, tasks, cfg)
    ctx.log.info("evaluating %s on %s", ", ".join(e.name for e in entries),
                 ", ".join([f"{lang} held-out ({len(texts)} documents)" for lang, texts in heldout.items()]
                           + [f"{t.task} {t.shots}-shot ({len(t.items)} items)" for t in tasks]
                           + ([f"{len(prompts)} prompts"] if prompts else [])))
    results = _empty_results(settings, ctx.seed, device, heldout, tasks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predictions: list[dict[str, Any]] = []
    outputs: dict[str, list[str]] = {}
    for entry in entries:
        record, preds, answers = evaluate_model(entry, cfg, ctx, device, heldout, tasks, prompts)
        results["models"].append(record.pop("model"))
        results["lm"][entry.name] = record["lm"]
        results["jglue"]["results"][entry.name] = record["jglue"]
        predictions += preds
        outputs[entry.name] = answers
    _write_outputs(ctx.out_dir, results, predictions, prompts, outputs)
    if device.type == "cuda":
        # What the plan's evaluate estimate is compared with in the run report. On a CPU the process's max RSS
        # would include every stage that ran before in the same process, so nothing is recorded there.
        peak = {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "torch.cuda.max_memory_allocated"}
        (ctx.out_dir / "summary.json").write_text(json.dumps({"peak_memory": peak, "accelerator": "cuda",
                                                              "world_size": 1}, indent=1) + "\n", encoding="utf-8")

    from stages.evaluate.report import write_report

    write_report(ctx.out_dir)
    return _summary(results)


# ---------------------------------------------------------------------------------------------- the models


def model_entries(cfg: PipelineConfig, ctx: StageContext) -> list[ModelEntry]:
    """The models of the run that exist (module docstring), every folder checked to be loadable
    (`check_model_folder`: config.json, safetensors weights) before the first model is scored; no weights read."""
    settings = cfg.evaluate
    entries = []
    base = _base_entry(cfg, settings)
    if base is not None:
        entries.append(base)
    for stage, kind in (("extend-vocab", "extended"), ("cpt", "cpt")):
        output = ctx.prerequisites.get(stage)
        if output is not None and (output / "model" / "config.json").is_file():
            folder = str(check_model_folder(output / "model", f"the {stage} output"))
            entries.append(ModelEntry(kind, kind, folder, folder, dtype=settings.dtype))
    sft = ctx.prerequisites.get("sft")
    if sft is not None:
        entries.append(_sft_entry(cfg, ctx, sft / "adapter"))
    names = {e.name for e in entries}
    for i, folder in enumerate(settings.extra_models):
        path = check_model_folder(folder, f"evaluate.extra_models[{i}]")
        name = path.name
        while name in names:
            name = f"{name}_{i}"
        names.add(name)
        entries.append(ModelEntry(name, "extra", str(path), str(path), dtype=settings.dtype))
    if not entries:
        raise JpadaptError("evaluate: no model to evaluate: set model.path, model.from_config or "
                           "evaluate.extra_models")
    return entries


def _base_entry(cfg: PipelineConfig, settings: EvaluateConfig) -> ModelEntry | None:
    model = cfg.model
    tokenizer = model.tokenizer or model.path
    if model.path is not None:
        folder = check_model_folder(model.path, "model.path")
        return ModelEntry("base", "base", str(folder), str(tokenizer), dtype=_dtype(settings, model.dtype))
    if model.from_config is not None:
        if tokenizer is None:
            raise JpadaptError("evaluate: the model.from_config model needs model.tokenizer")
        return ModelEntry("base", "base", f"model.from_config ({model.from_config.get('model_type')})",
                          str(tokenizer), dtype=_dtype(settings, model.dtype))
    return None


def _sft_entry(cfg: PipelineConfig, ctx: StageContext, adapter: Path) -> ModelEntry:
    info_file = adapter / "jpadapt.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        base = info["base_model"]
    except (OSError, ValueError, KeyError) as exc:
        raise JpadaptError(f"{info_file}: cannot read the adapter's base model ({exc})") from None
    # sft names a folder of this run relative to the run directory (`stages/cpt/model`), others absolute.
    folder = check_model_folder(ctx.resolve(base), f"{info_file} base_model")
    # The adapter is scored on the base as it was trained: 4-bit NF4 (QLoRA) in sft's compute dtype.
    quantization = info.get("quantization")
    dtype = PRECISION_DTYPES[cfg.sft.precision] if cfg.sft is not None else "float32"
    return ModelEntry("sft", "sft", str(folder), str(adapter), adapter=str(adapter),
                      quantization=quantization if quantization == "nf4" else None, dtype=dtype)


def _dtype(settings: EvaluateConfig, model_dtype: str) -> str:
    return settings.dtype if settings.dtype != "auto" else model_dtype


def load_model(entry: ModelEntry, cfg: PipelineConfig, seed: int, device: Any) -> Any:
    """The entry's model on `device`, in eval mode."""
    from pipeline.models import load_causal_lm, load_frozen_base

    trust = cfg.model.trust_remote_code
    if entry.adapter is not None:
        from peft import PeftModel

        base = load_frozen_base(entry.source, entry.quantization or "none", entry.dtype, device, trust)
        with warnings.catch_warnings():  # PEFT still calls transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            return PeftModel.from_pretrained(base, entry.adapter).eval()
    if entry.kind == "base" and cfg.model.path is None:
        model = load_causal_lm(cfg.model.model_copy(update={"dtype": entry.dtype}), seed=seed)
    else:
        model_cfg = cfg.model.model_copy(update={"path": entry.source, "from_config": None, "dtype": entry.dtype,
                                                 "trust_remote_code": trust and entry.kind in ("base", "extra")})
        model = load_causal_lm(model_cfg)
    return model.to(device).eval()


def load_tokenizer(entry: ModelEntry, cfg: PipelineConfig) -> Any:
    from tokenizer.hf import load_hf_tokenizer

    spec: str | Path = Path(entry.tokenizer) if Path(entry.tokenizer).is_dir() else entry.tokenizer
    return load_hf_tokenizer(spec, trust_remote_code=cfg.model.trust_remote_code,
                             key=f"evaluate: tokenizer of {entry.name}")


def check_contexts(entries: list[ModelEntry], tasks: list[TaskRequests], cfg: PipelineConfig) -> None:
    """Every JGLUE prompt must fit each model's positions (nothing is truncated): checked with the tokenizers and
    config.json before any weights are loaded, so a long few-shot setting fails at once, not after hours."""
    from eval.jglue import longest_request
    from pipeline.models import model_config_values

    for entry in entries:
        model_cfg = cfg.model if entry.kind == "base" else ModelConfig(path=entry.source)
        values = model_config_values(model_cfg)
        context = values.get("max_position_embeddings")
        if not isinstance(context, int) or not tasks:
            continue
        tokenizer = load_tokenizer(entry, cfg)
        for t in tasks:
            for prefix, indices in t.groups:
                length, item = longest_request(tokenizer, [t.items[i] for i in indices], prefix)
                if length > context:
                    raise JpadaptError(
                        f"evaluate: {t.task} item {item} with {t.shots} few-shot examples is {length} tokens for "
                        f"{entry.name}, more than the model's {context} positions (lower evaluate.num_fewshot)")


def positions(model: Any) -> int | None:
    """The model's context length, when its config states one."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


# ---------------------------------------------------------------------------------------------- the data


def heldout_texts(prepared: Path, settings: EvaluateConfig) -> dict[str, list[str]]:
    """prepare's held-out documents per language, in order, capped at max_documents and max_chars."""
    from data.prepare import capped_texts, prepared_shards, prepared_texts

    texts = {}
    for lang in LANGS:
        shards = prepared_shards(prepared, lang, "heldout")
        if not shards:
            continue
        docs = list(prepared_texts(shards))[: settings.max_documents]
        texts[lang] = [t for t in capped_texts(docs, settings.max_chars) if t]
    if not any(texts.values()):
        raise JpadaptError(f"{prepared}: the prepare stage wrote no held-out text to evaluate on")
    return {lang: docs for lang, docs in texts.items() if docs}


@dataclass(frozen=True)
class TaskRequests:
    """One JGLUE evaluation: a task at a number of shots, its items grouped by their few-shot prefix."""

    task: str
    shots: int
    items: list[Any]  # eval.jglue.Item, the first `limit`
    groups: list[tuple[str, list[int]]]  # (prefix, indices into items): items sharing a prefix score together


def task_requests(settings: EvaluateConfig, seed: int) -> list[TaskRequests]:
    from eval.jglue import FEWSHOT_SPLIT, fewshot_examples, fewshot_prefix, load_task

    out = []
    for task in settings.tasks:
        items = load_task(task)[: settings.limit]
        for shots in settings.num_fewshot:
            groups: dict[str, list[int]] = {}
            if shots:
                split = FEWSHOT_SPLIT[task]
                pool = load_task(task, split)
                for i, item in enumerate(items):
                    # Drawn from the split being scored (JNLI), the question itself is never its own example.
                    exclude = item.id if split == "valid" else None
                    prefix = fewshot_prefix(task, fewshot_examples(task, shots, seed, pool, exclude))
                    groups.setdefault(prefix, []).append(i)
            else:
                groups[""] = list(range(len(items)))
            out.append(TaskRequests(task, shots, items, list(groups.items())))
    return out


def _prompts(settings: EvaluateConfig) -> list[Any]:
    from eval.generate import read_prompts
    from pipeline.paths import resolve_files

    return read_prompts(resolve_files(settings.prompts, "evaluate.prompts")) if settings.prompts else []


# ---------------------------------------------------------------------------------------------- scoring


def evaluate_model(entry: ModelEntry, cfg: PipelineConfig, ctx: StageContext, device: Any,
                   heldout: dict[str, list[str]], tasks: list[TaskRequests], prompts: list[Any],
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    import torch

    settings = cfg.evaluate
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    tokenizer = load_tokenizer(entry, cfg)
    model = load_model(entry, cfg, ctx.seed, device)
    seconds["load"] = time.perf_counter() - clock
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    context = positions(model)
    window = min(settings.window, context) if context else settings.window
    stride = min(settings.stride, window)
    if window < settings.window:
        ctx.log.info("%s: window %d -> %d (the model's positions)", entry.name, settings.window, window)
    try:
        with torch.inference_mode():
            clock = time.perf_counter()
            lm = _bits_per_byte(model, tokenizer, heldout, window, stride, settings.batch_size)
            seconds["lm"] = time.perf_counter() - clock
            clock = time.perf_counter()
            scores = _jglue(model, tokenizer, tasks, entry.name, settings.batch_size, context)
            seconds["jglue"] = time.perf_counter() - clock
        clock = time.perf_counter()
        answers = _generate(model, tokenizer, prompts, cfg, entry.name)
        seconds["generate"] = time.perf_counter() - clock
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    jglue, predictions = _jglue_results(entry.name, tasks, scores)
    for lang, result in lm.items():
        ctx.log.info("%s: %s bits/byte %.4f (loss %.4f over %d tokens)", entry.name, lang,
                     result["bits_per_byte"], result["loss"], result["tokens"])
    for task, per_shots in jglue.items():
        for shots, metrics in per_shots.items():
            ctx.log.info("%s: %s %s-shot acc %.3f, acc_norm %.3f", entry.name, task, shots,
                         metrics["acc"]["accuracy"], metrics["acc_norm"]["accuracy"])
    record = {"model": {**entry.describe(ctx), "dtype": dtype, "vocab_size": len(tokenizer),
                        "positions": context, "window": window, "stride": stride,
                        "seconds": {k: round(v, 3) for k, v in seconds.items()}},
              "lm": lm, "jglue": jglue}
    return record, predictions, answers


def _bits_per_byte(model: Any, tokenizer: Any, heldout: dict[str, list[str]], window: int, stride: int,
                   batch_size: int) -> dict[str, Any]:
    from eval.perplexity import bits_per_byte

    results = {}
    for lang, texts in heldout.items():
        result = bits_per_byte(model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size,
                               progress=True)
        results[lang] = result.to_dict()
    return results


def _jglue(model: Any, tokenizer: Any, tasks: list[TaskRequests], name: str, batch_size: int,
           context: int | None) -> list[list[Any]]:
    """Per TaskRequests, the ChoiceScores of its items in item order."""
    from eval.jglue import score_items

    out = []
    for t in tasks:
        scores: list[Any] = [None] * len(t.items)
        for prefix, indices in t.groups:
            group = score_items(model, tokenizer, [t.items[i] for i in indices], prefix=prefix,
                                batch_size=batch_size, desc=f"{name} {t.task} {t.shots}-shot", max_length=context,
                                progress=len(t.groups) == 1)
            for i, value in zip(indices, group):
                scores[i] = value
        out.append(scores)
    return out


def _jglue_results(name: str, tasks: list[TaskRequests], scores: list[list[Any]],
                   ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    from dataclasses import asdict

    from eval.jglue import accuracy

    results: dict[str, dict[str, Any]] = {}
    predictions = []
    for t, task_scores in zip(tasks, scores):
        results.setdefault(t.task, {})[str(t.shots)] = {
            "acc": asdict(accuracy(task_scores, t.items, normalized=False)),
            "acc_norm": asdict(accuracy(task_scores, t.items, normalized=True)),
        }
        for item, s in zip(t.items, task_scores):
            predictions.append({"model": name, "task": t.task, "shots": t.shots, "id": item.id, "label": item.label,
                                "loglik": list(s.loglik), "tokens": list(s.tokens), "chars": list(s.chars)})
    return results, predictions


def _generate(model: Any, tokenizer: Any, prompts: list[Any], cfg: PipelineConfig, name: str) -> list[str]:
    if not prompts:
        return []
    from eval.generate import greedy_outputs, render_prompts
    from pipeline.config import PromptTemplateConfig

    template = cfg.sft.template if cfg.sft is not None else PromptTemplateConfig()
    texts = render_prompts(prompts, tokenizer, template)
    return greedy_outputs(model, tokenizer, prompts, texts, cfg.evaluate.max_new_tokens, desc=f"{name} generate")


# ---------------------------------------------------------------------------------------------- outputs


def _empty_results(settings: EvaluateConfig, seed: int, device: Any, heldout: dict[str, list[str]],
                   tasks: list[TaskRequests]) -> dict[str, Any]:
    from eval.jglue import chance_and_majority

    baselines = {}
    for t in tasks:
        chance, majority = chance_and_majority(t.items)
        baselines[t.task] = {"items": len(t.items), "chance": chance, "majority": majority}
    return {
        "settings": {**settings.model_dump(mode="json"), "seed": seed, "device": str(device)},
        "heldout": {lang: {"documents": len(texts), "chars": sum(map(len, texts)),
                           "bytes": sum(len(t.encode("utf-8")) for t in texts)} for lang, texts in heldout.items()},
        "models": [],
        "lm": {},
        "jglue": {"baselines": baselines, "results": {}},
    }


def _write_outputs(out: Path, results: dict[str, Any], predictions: list[dict[str, Any]], prompts: list[Any],
                   outputs: dict[str, list[str]]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for record in predictions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with (out / "generations.jsonl").open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"id": prompt.id, "kind": prompt.kind, "prompt": prompt.text, "input": prompt.input,
                                "reference": prompt.reference,
                                "outputs": {name: answers[i] for name, answers in outputs.items()}},
                               ensure_ascii=False) + "\n")


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"models": ", ".join(m["name"] for m in results["models"])}
    for lang in LANGS:
        values = [f"{name} {per_lang[lang]['bits_per_byte']:.4f}" for name, per_lang in results["lm"].items()
                  if lang in per_lang]
        if values:
            summary[f"{lang} bits/byte"] = ", ".join(values)
    return summary


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    from data.assets import stored_path
    from eval.jglue import FEWSHOT_SPLIT, task_asset
    from pipeline.models import model_folder_files, model_inputs
    from pipeline.paths import resolve_files

    settings = cfg.evaluate
    files: dict[str, list[Path]] = {}
    for task in settings.tasks:
        splits = sorted({"valid", FEWSHOT_SPLIT[task]} if any(settings.num_fewshot) else {"valid"})
        files[f"evaluate.tasks.{task}"] = [stored_path(task_asset(task, split)) for split in splits]
    if settings.prompts:
        files["evaluate.prompts"] = resolve_files(settings.prompts, "evaluate.prompts")
    files.update(model_inputs(cfg.model))
    for i, folder in enumerate(settings.extra_models):
        key = f"evaluate.extra_models[{i}]"
        files[key] = model_folder_files(check_model_folder(folder, key), key)
    return files


SPEC = StageSpec(
    name="evaluate",
    run=run,
    description="base, extend-vocab, cpt and sft models side by side: JA/EN bits per byte, JGLUE, generations",
    requires=("prepare",),
    uses=("extend-vocab", "cpt", "sft"),
    params=("run.seed", "model", "evaluate", "sft.precision", "sft.template"),
    unhashed=("plan", "extend_vocab.new_tokens", "extend_vocab.pad_to_multiple_of"),
    inputs=_inputs,
    outputs=("results.json", "predictions.jsonl", "generations.jsonl", "report.md", "report.html"),
    libraries=("safetensors",),
    report_section=lazy("stages.evaluate.report:report_section"),
)
