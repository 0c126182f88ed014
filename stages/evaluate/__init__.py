"""Stage `evaluate`: every model the run produced, side by side, on the same held-out text, tasks and prompts.

Models, in this order, each when it exists: `base` (model.path, or the model.from_config model with the run
seed, as extend-vocab and cpt started from it), `extended` (the extend-vocab output: new rows initialized, not
trained), `cpt` (the continued-pretraining output), `sft` (the sft base with its LoRA adapter applied, loaded
4-bit when it was trained 4-bit), then each `evaluate.extra_models` folder. Each is scored on:
* bits per byte, loss and perplexity on the Japanese and English held-out text written by `prepare`
  (`eval.perplexity`; bits per byte is comparable across vocabularies);
* the bundled benchmark suite (`eval.tasks`): Japanese (JCommonsenseQA, JNLI, JSQuAD, MGSM, XWinograd) and
  English (HellaSwag, XWinograd, GSM8K) tasks under lm-evaluation-harness's prompts, few-shot counts and
  metrics, multiple choice by choice log-likelihood (`eval.multiple_choice`), generative ones by batched greedy
  generation with stop sequences (`eval.generate.generate_until`), every number with a 95% interval;
* optionally any lm-evaluation-harness task through the harness itself (`evaluate.lm_eval_tasks`, `eval.harness`);
* greedy answers to the bundled Japanese prompts (`eval.generate`).
Models are loaded one at a time and scored under `torch.inference_mode`.

Outputs, in `runs/<name>/stages/evaluate/`:
    results.json       settings, models, held-out data, every figure (see stages/evaluate/report.py for its layout)
    predictions.jsonl  per model, task, shots and item: multiple choice: label and each choice's log-likelihood,
                       tokens, chars; generative: the generation, the gold answers and the item's metrics
    generations.jsonl  per prompt: the rendered kind, reference and every model's answer
    lm_eval_samples.jsonl  with evaluate.lm_eval_tasks: the harness's per-item samples, per model
    report.md, report.html, bits_per_byte.png, tasks.png
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from dataclasses import dataclass, field
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
    if settings.lm_eval_tasks:
        from eval.harness import check_harness_tasks

        check_harness_tasks(settings.lm_eval_tasks, _include_path(settings))
    prompts = _prompts(settings)
    check_contexts(entries, tasks, cfg)
    ctx.log.info("evaluating %s on %s", ", ".join(e.name for e in entries),
                 ", ".join([f"{lang} held-out ({len(texts)} documents)" for lang, texts in heldout.items()]
                           + [f"{t.spec.name} {t.shots}-shot ({len(t.docs)} items)" for t in tasks]
                           + [f"lm-eval {name}" for name in settings.lm_eval_tasks]
                           + ([f"{len(prompts)} prompts"] if prompts else [])))
    results = _empty_results(settings, ctx.seed, device, heldout, tasks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predictions: list[dict[str, Any]] = []
    harness_samples: list[dict[str, Any]] = []
    outputs: dict[str, list[str]] = {}
    for entry in entries:
        record, preds, answers = evaluate_model(entry, cfg, ctx, device, heldout, tasks, prompts)
        results["models"].append(record.pop("model"))
        results["lm"][entry.name] = record["lm"]
        results["tasks"]["results"][entry.name] = record["tasks"]
        if "lm_eval" in record:
            # The harness's per-item samples (prompts included) go to their own file: results.json stays small.
            harness_samples += [{"model": entry.name, **s} for s in record["lm_eval"].pop("samples")]
            results["lm_eval"][entry.name] = record["lm_eval"]
        predictions += preds
        outputs[entry.name] = answers
    _write_outputs(ctx.out_dir, results, predictions, prompts, outputs)
    if settings.lm_eval_tasks:
        _write_jsonl(ctx.out_dir / "lm_eval_samples.jsonl", harness_samples)
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
    """Every task prompt (with its generated answer) must fit each model's positions (nothing is truncated):
    checked with the tokenizers and config.json before any weights are loaded, so a long few-shot setting fails
    at once, not after hours."""
    from eval.multiple_choice import longest_request
    from pipeline.models import model_config_values

    for entry in entries:
        model_cfg = cfg.model if entry.kind == "base" else ModelConfig(path=entry.source)
        values = model_config_values(model_cfg)
        values = values.get("text_config") or values
        context = values.get("max_position_embeddings")
        if not isinstance(context, int) or not tasks:
            continue
        tokenizer = load_tokenizer(entry, cfg)
        for t in tasks:
            if t.groups:
                lengths = [longest_request(tokenizer, [t.items[i] for i in indices], prefix)
                           for prefix, indices in t.groups]
                length, item = max(lengths)
            else:
                ids = _generation_prompts(tokenizer, t.prompts)
                length, index = max((len(p) + t.max_new_tokens, i) for i, p in enumerate(ids))
                item = t.docs[index].id
            if length > context:
                raise JpadaptError(
                    f"evaluate: {t.spec.name} item {item} with {t.shots} few-shot examples is {length} tokens for "
                    f"{entry.name} (with the answer it may generate), more than the model's {context} positions "
                    "(lower evaluate.num_fewshot or evaluate.max_gen_tokens)")


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
    """One task at a number of shots. Multiple choice: its items grouped by their few-shot prefix (items sharing
    a prefix score together); generative: each doc's whole prompt."""

    spec: Any  # eval.tasks.TaskSpec
    shots: int
    docs: list[Any]  # eval.tasks.Doc, the first `limit`
    items: list[Any] = field(default_factory=list)  # multiple choice: eval.multiple_choice.Item per doc
    groups: list[tuple[str, list[int]]] = field(default_factory=list)  # (prefix, indices into items)
    prompts: list[str] = field(default_factory=list)  # generative: the text each doc is continued from
    max_new_tokens: int = 0


def task_requests(settings: EvaluateConfig, seed: int) -> list[TaskRequests]:
    from eval.tasks import MULTIPLE_CHOICE, get_task

    out = []
    for name in settings.tasks:
        spec = get_task(name)
        split = spec.load()
        docs = split[: settings.limit]
        shot_counts = settings.shots(spec)
        # Each bundled file is read once per task: the few-shot pool is the evaluation split itself unless the
        # task names another (read only when some evaluation has shots).
        pool = spec.load(spec.fewshot_split) if spec.fewshot_split and any(shot_counts) else split
        for shots in shot_counts:
            examples = [spec.fewshot(doc, shots, seed, pool) for doc in docs]
            if spec.kind == MULTIPLE_CHOICE:
                groups: dict[str, list[int]] = {}
                for i, shots_of_doc in enumerate(examples):
                    groups.setdefault(spec.prefix(shots_of_doc), []).append(i)
                out.append(TaskRequests(spec, shots, docs, items=[spec.mc_item(d) for d in docs],
                                        groups=list(groups.items())))
            else:
                limit = min(spec.max_new_tokens, settings.max_gen_tokens or spec.max_new_tokens)
                out.append(TaskRequests(spec, shots, docs, prompts=[spec.prompt(d, e) for d, e in zip(docs, examples)],
                                        max_new_tokens=limit))
    return out


def _generation_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids a generative task's prompts are continued from: the start token, then the prompt."""
    from eval.perplexity import start_token_id

    start = start_token_id(tokenizer)
    head = [] if start is None else [start]
    return [head + list(ids) for ids in tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]]


def _include_path(settings: EvaluateConfig) -> Path | None:
    from pipeline.paths import resolve_path

    if settings.lm_eval_include_path is None:
        return None
    return resolve_path(settings.lm_eval_include_path, "evaluate.lm_eval_include_path")


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
            scores = _score_tasks(model, tokenizer, tasks, entry.name, settings.batch_size, context)
            seconds["tasks"] = time.perf_counter() - clock
        clock = time.perf_counter()
        answers = _generate(model, tokenizer, prompts, cfg, entry.name)
        seconds["generate"] = time.perf_counter() - clock
        harness = None
        if settings.lm_eval_tasks:
            from eval.harness import run_harness_tasks

            clock = time.perf_counter()
            harness = run_harness_tasks(model, tokenizer, settings.lm_eval_tasks, _include_path(settings),
                                        settings.limit, settings.batch_size, settings.lm_eval_num_fewshot, ctx.seed)
            seconds["lm_eval"] = time.perf_counter() - clock
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    task_results, predictions = _task_results(entry.name, tasks, scores)
    for lang, result in lm.items():
        ctx.log.info("%s: %s bits/byte %.4f (loss %.4f over %d tokens)", entry.name, lang,
                     result["bits_per_byte"], result["loss"], result["tokens"])
    for task, per_shots in task_results.items():
        for shots, metrics in per_shots.items():
            ctx.log.info("%s: %s %s-shot %s", entry.name, task, shots,
                         ", ".join(f"{name} {m['value']:.3f}" for name, m in metrics.items()))
    record = {"model": {**entry.describe(ctx), "dtype": dtype, "vocab_size": len(tokenizer),
                        "positions": context, "window": window, "stride": stride,
                        "seconds": {k: round(v, 3) for k, v in seconds.items()}},
              "lm": lm, "tasks": task_results}
    if harness is not None:
        record["lm_eval"] = harness
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


def _score_tasks(model: Any, tokenizer: Any, tasks: list[TaskRequests], name: str, batch_size: int,
                 context: int | None) -> list[list[Any]]:
    """Per TaskRequests, in doc order: multiple choice: the ChoiceScores; generative: the generation."""
    from eval.generate import generate_until
    from eval.multiple_choice import score_items

    out = []
    for t in tasks:
        desc = f"{name} {t.spec.name} {t.shots}-shot"
        if not t.groups:
            out.append(generate_until(model, tokenizer, _generation_prompts(tokenizer, t.prompts), t.spec.until,
                                      t.max_new_tokens, batch_size, desc=desc))
            continue
        scores: list[Any] = [None] * len(t.items)
        for prefix, indices in t.groups:
            group = score_items(model, tokenizer, [t.items[i] for i in indices], prefix=prefix,
                                batch_size=batch_size, desc=desc, max_length=context, progress=len(t.groups) == 1)
            for i, value in zip(indices, group):
                scores[i] = value
        out.append(scores)
    return out


def _task_results(name: str, tasks: list[TaskRequests], scores: list[list[Any]],
                  ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per task and shots, every metric with its 95% interval; and the per-item records they recompute from."""
    from eval.suite import generative_metrics, multiple_choice_metrics
    from eval.tasks import extracted_answer, metric_values

    results: dict[str, dict[str, Any]] = {}
    predictions = []
    for t, task_scores in zip(tasks, scores):
        if t.groups:
            metrics = multiple_choice_metrics(task_scores, t.items)
            for item, s in zip(t.items, task_scores):
                predictions.append({"model": name, "task": t.spec.name, "shots": t.shots, "id": item.id,
                                    "label": item.label, "loglik": list(s.loglik), "tokens": list(s.tokens),
                                    "chars": list(s.chars)})
        else:
            per_item = [metric_values(t.spec, doc, text) for doc, text in zip(t.docs, task_scores)]
            metrics = generative_metrics(t.spec.metrics, per_item)
            for doc, text, values in zip(t.docs, task_scores, per_item):
                predictions.append({"model": name, "task": t.spec.name, "shots": t.shots, "id": doc.id,
                                    "generation": text, "extracted": extracted_answer(t.spec, text),
                                    "answers": list(doc.answers), "metrics": values})
        results.setdefault(t.spec.name, {})[str(t.shots)] = metrics
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
    from eval.multiple_choice import chance_and_majority

    definitions = {}
    for t in tasks:
        chance, majority = chance_and_majority(t.items) if t.groups else (None, None)
        definitions[t.spec.name] = {**t.spec.describe(), "items": len(t.docs), "chance": chance,
                                    "majority": majority, "max_new_tokens": t.max_new_tokens or None}
    return {
        "settings": {**settings.model_dump(mode="json"), "seed": seed, "device": str(device)},
        "heldout": {lang: {"documents": len(texts), "chars": sum(map(len, texts)),
                           "bytes": sum(len(t.encode("utf-8")) for t in texts)} for lang, texts in heldout.items()},
        "models": [],
        "lm": {},
        "tasks": {"definitions": definitions, "results": {}},
        "lm_eval": {},
    }


def _write_outputs(out: Path, results: dict[str, Any], predictions: list[dict[str, Any]], prompts: list[Any],
                   outputs: dict[str, list[str]]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_jsonl(out / "predictions.jsonl", predictions)
    with (out / "generations.jsonl").open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"id": prompt.id, "kind": prompt.kind, "prompt": prompt.text, "input": prompt.input,
                                "reference": prompt.reference,
                                "outputs": {name: answers[i] for name, answers in outputs.items()}},
                               ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


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
    from eval.tasks import get_task
    from pipeline.models import model_folder_files, model_inputs
    from pipeline.paths import resolve_files

    settings = cfg.evaluate
    files: dict[str, list[Path]] = {}
    for task in settings.tasks:
        spec = get_task(task)
        splits = sorted({split for shots in settings.shots(spec) for split in spec.splits_read(shots)})
        files[f"evaluate.tasks.{task}"] = [stored_path(spec.asset(split)) for split in splits]
    if settings.lm_eval_include_path is not None:
        folder = _include_path(settings)
        files["evaluate.lm_eval_include_path"] = sorted(p for p in folder.rglob("*") if p.is_file()) \
            if folder.is_dir() else [folder]
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
    description="base, extend-vocab, cpt and sft models side by side: JA/EN bits per byte, the JA/EN benchmark "
                "suite, generations",
    requires=("prepare",),
    uses=("extend-vocab", "cpt", "sft"),
    params=("run.seed", "model", "evaluate", "sft.precision", "sft.template"),
    unhashed=("plan", "extend_vocab.new_tokens", "extend_vocab.pad_to_multiple_of"),
    inputs=_inputs,
    outputs=("results.json", "predictions.jsonl", "generations.jsonl", "report.md", "report.html"),
    libraries=("safetensors",),
    report_section=lazy("stages.evaluate.report:report_section"),
    overview_line=lazy("stages.evaluate.report:overview_line"),
)
