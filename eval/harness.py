"""lm-evaluation-harness tasks on an already loaded model: an optional engine beside `eval.multiple_choice`.

    pip install -e ".[lm-eval]"

    from eval.harness import run_harness_tasks
    result = run_harness_tasks(model, tokenizer, ["jcqa_local", "ja_leaderboard_jnli"], include_path=Path("tasks"),
                               limit=None, batch_size=8, num_fewshot=None, seed=0)
    result["tasks"]["jcqa_local"]["metrics"]["acc"]          # {"value": 0.61, "stderr": 0.0146}
    json.dumps(result)                                        # plain JSON: floats, ints, strings, lists, dicts

Any task lm-evaluation-harness knows (its own YAMLs, or YAMLs in `include_path`) runs on the model and tokenizer
as given: they are wrapped in the harness's `HFLM`, never reloaded from disk. Importing this module is cheap
and works without the extra; torch and lm_eval are imported inside the functions.

Offline. Nothing is downloaded: while tasks load and run, the Hub is switched to offline mode (huggingface_hub
and datasets, whatever the environment says). A stock task whose dataset is on the Hub therefore works only when
the dataset is already in the local datasets cache; otherwise it fails at once with a `JpadaptError` that says
to write a task YAML into `include_path` whose data are local files:
    task: jcqa_local
    dataset_path: json
    dataset_kwargs: {data_files: {validation: /data/jcommonsenseqa/valid-v1.3.json}}
    validation_split: validation
    ...the prompt fields (doc_to_text, doc_to_choice, doc_to_target, ...) as in the stock YAML
Multiple-choice and generation tasks and groups of them run this way. Unknown task names fail before any data
or model work, with the closest names the harness knows.
No caching: no response cache, no request cache (`use_cache=None`, `cache_requests=False`); datasets still
keeps its usual Arrow cache of the local files it reads.

Start token (read in lm-eval 0.4.13 and measured with transformers 5.25):
* HFLM encodes every context and context + continuation with `tokenizer.encode(text)`, i.e. with the
  tokenizer's own special tokens. Its `add_bos_token=True` only turns that into `add_special_tokens=True`
  (the default anyway) for a tokenizer object; it reaches the tokenizer's post-processor only when HFLM loads
  the tokenizer itself from a name. So "HFLM prepends BOS by default" holds exactly for tokenizers whose
  post-processor adds BOS: of the bundled ones LLaMA-2, Mistral and llm-jp do; the bundled LLaMA-3
  `tokenizer.json` and Qwen (no BOS at all) put nothing first, and neither does a freshly trained BPE.
* jpadapt always puts one start token first (BOS, else EOS: `eval.perplexity.start_token_id`; for Qwen EOS,
  where the harness alone would put nothing). To score the same sequences, the harness gets a copy of the
  tokenizer whose post-processor puts exactly that token first and nothing after (an EOS the tokenizer
  appends is dropped: eval.multiple_choice scores none), and `add_bos_token=True`; the caller's tokenizer is not
  changed (HFLM also sets a pad token on the one it gets). The ids the harness puts first are recorded in
  `settings.start_tokens`. A tokenizer without a `tokenizers` backend is used as it is, with a warning if its
  first ids differ, and refused if it appends ids: the harness's context/continuation split would then score
  the wrong tokens.

Log-likelihood (HFLM `_encode_pair` and `_loglikelihood_tokens`; the same definition as `eval.multiple_choice`):
trailing whitespace of the context moves onto the continuation; context and context + continuation are
tokenized separately and the continuation's tokens are the whole's tokens after the context's; loglik is
the sum of log p(continuation token | everything before it); `acc` is the argmax of loglik, `acc_norm` of
loglik / len(choice text) in characters. With the start token above, the harness and `eval.multiple_choice` score the
same token ids. Measured on a tiny float32 LLaMA, JCommonsenseQA per choice: max |difference| 7.6e-6 nats
over 20 items (tests/test_harness.py), 1.5e-5 over 100, no prediction differs (float32 vs float64 sums);
without the start token up to 9 nats. A bf16 model's forward pass itself depends on the batch shapes:
`eval.multiple_choice` alone moves by ~0.03 nats between batch sizes 1 and 8, and the two engines differ by ~0.04.
Differences that remain: the harness left-truncates a sequence longer than the model's positions (with a
warning) where `eval.multiple_choice` refuses it, and it fails with an AssertionError on a continuation with no token of
its own where `eval.multiple_choice` raises a JpadaptError.

Batching (HFLM): requests are sorted by length of context + continuation, longest first, and cut into
batches of `batch_size`; each batch is right-padded with id 0 and run in one forward pass without an
attention mask (causal: padding only follows the real tokens); the full logits of the batch are kept and
log-softmaxed in `softmax_dtype`, which is set to float32 here (the harness default is the model's dtype: a
bf16 model would be scored in bf16; `eval.multiple_choice` also uses float32). Multiple-choice requests whose
continuation is one token and that share a context are answered from one forward pass (`logits_cache`).

Side effects, undone on return: the model is put in eval mode (its mode is restored) and the global random,
numpy and torch seeds are set to `seed` (their states are restored). The harness prints its own progress
bars; its logging is kept at WARNING (INFO with `verbose`), less two warnings every wrapped model triggers.

Result (plain JSON):
    {"version": "0.4.13",
     "settings": {"limit", "num_fewshot", "seed", "batch_size", "bootstrap_iters", "include_path", "start_tokens"},
     "tasks": {task: {"metrics": {name: {"value": float, "stderr": float | None}}, "n": items scored,
                      "num_fewshot": int, "output_type": str,
                      "config": {dataset_path, dataset_kwargs, *_split, doc_to_text, ..., version, config_source}}},
     "groups": {group: {"metrics": {...}, "tasks": [task, ...]}},      # only for group names
     "samples": [{"task", "doc_id", "target", "prompt", "metrics": {name: value}, "filter",
                  multiple choice: "choices", "loglik", "is_greedy" (one per choice);
                  other outputs: "resps", "filtered_resps"}]}
A metric of a filter other than "none" is named "metric,filter" (e.g. "exact_match,strict-match").
Standard errors are the harness's: closed-form for mean metrics (acc), bootstrapped with `bootstrap_iters`
draws for the others (bleu, f1, ...), None where it gives none.
"""

from __future__ import annotations

import copy
import difflib
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.errors import JpadaptError

MISSING = 'evaluate.lm_eval_tasks needs lm-evaluation-harness: pip install -e ".[lm-eval]"'
# The result layout (results["n-samples"], "N/A" stderrs, TaskManager.load) is that of 0.4.x from 0.4.13.
SUPPORTED = ("0.4.13", "0.5")

# Warnings HFLM logs for every model passed as an object: expected here, so not shown.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

# Task config fields that say which data and prompt ran.
_CONFIG_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split", "training_split",
                "fewshot_split", "description", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter",
                "fewshot_delimiter", "generation_kwargs")


def harness_available() -> bool:
    """Whether lm-evaluation-harness (the `lm-eval` extra) can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> Any:
    """The lm_eval module, or a JpadaptError that says how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise JpadaptError(f"{MISSING} ({exc})") from exc
    from packaging.version import Version

    if not Version(SUPPORTED[0]) <= Version(lm_eval.__version__) < Version(SUPPORTED[1]):
        raise JpadaptError(f"evaluate.lm_eval_tasks needs lm-evaluation-harness >={SUPPORTED[0]},<{SUPPORTED[1]}, "
                           f"found {lm_eval.__version__}: pip install -e \".[lm-eval]\"")
    return lm_eval


def run_harness_tasks(
    model: Any, tokenizer: Any, tasks: list[str], include_path: Path | None, limit: int | None, batch_size: int,
    num_fewshot: int | None, seed: int, *, bootstrap_iters: int = 100, verbose: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness `tasks` on a loaded causal LM and its tokenizer (module docstring).

    Arguments:
        tasks: names the harness knows: its own tasks, groups and tags, and those of the YAMLs in `include_path`.
        include_path: a folder of task YAMLs (searched recursively), or None.
        limit: at most this many items per task (the first ones), or None for all.
        batch_size: requests per forward pass.
        num_fewshot: few-shot examples per item, or None for each task's own default (0 if it has none); a task
            whose YAML sets `num_fewshot: 0` stays zero-shot.
        seed: the harness's random, numpy, torch and few-shot sampling seed.
        bootstrap_iters: draws for the standard error of metrics without a closed form (the harness defaults to
            100,000); 0 gives no standard errors at all, not even for acc.
        verbose: the harness's INFO logging too.
    """
    lm_eval = _require()
    _check_arguments(tasks, include_path, limit, batch_size, num_fewshot, bootstrap_iters)
    with _harness_logging(verbose), _hub_offline():
        manager = _task_manager(include_path)
        _check_names(tasks, manager)
        loaded = _load_tasks(tasks, manager)  # reads the data: before any model work
        harness_tokenizer, start_tokens = _start_token_tokenizer(tokenizer)
        results = _evaluate(lm_eval, model, harness_tokenizer, loaded, manager, limit, batch_size, num_fewshot,
                            seed, bootstrap_iters)
    settings = {"limit": limit, "num_fewshot": num_fewshot, "seed": seed, "batch_size": batch_size,
                "bootstrap_iters": bootstrap_iters, "include_path": None if include_path is None else str(include_path),
                "start_tokens": start_tokens}
    return {"version": lm_eval.__version__, "settings": settings, **_collect(results)}


def check_harness_tasks(tasks: list[str], include_path: Path | None) -> None:
    """Fail now, before any model loads, when the extra is missing or a task name is unknown."""
    _require()
    _check_arguments(tasks, include_path, None, 1, None, 0)
    _check_names(tasks, _task_manager(include_path))


def _check_arguments(tasks: list[str], include_path: Path | None, limit: int | None, batch_size: int,
                     num_fewshot: int | None, bootstrap_iters: int) -> None:
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise JpadaptError(f"evaluate.lm_eval_tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise JpadaptError(f"evaluate.lm_eval_tasks names a task twice: {tasks}")
    if include_path is not None and not Path(include_path).is_dir():
        raise JpadaptError(f"lm-eval include_path {include_path} is not a folder (it should hold task YAMLs)")
    if limit is not None and limit < 1:
        raise JpadaptError(f"lm-eval limit must be at least 1 item per task (or None for all), got {limit}")
    if batch_size < 1:
        raise JpadaptError(f"lm-eval batch_size must be at least 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise JpadaptError(f"lm-eval num_fewshot must be 0 or more (None: each task's default), got {num_fewshot}")
    if bootstrap_iters < 0:
        raise JpadaptError(f"lm-eval bootstrap_iters must be 0 or more, got {bootstrap_iters}")


# ---------------------------------------------------------------------------------------------------------------
# Tasks


def _task_manager(include_path: Path | None) -> Any:
    """The harness's index of task names (it reads every stock YAML: ~5 s), built once per folder content."""
    if include_path is None:
        return _cached_task_manager(None, ())
    root = Path(include_path).resolve()
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()))
    return _cached_task_manager(str(root), stamp)


@lru_cache(maxsize=4)
def _cached_task_manager(include_path: str | None, stamp: tuple) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _check_names(tasks: list[str], manager: Any) -> None:
    known = manager.all_tasks
    for name in tasks:
        if name in manager.task_index:
            continue
        # Substrings first: "jcommonsenseqa" should find "ja_leaderboard_jcommonsenseqa".
        close = [k for k in known if name.lower() in k.lower()][:5]
        close += [k for k in difflib.get_close_matches(name, known, n=5, cutoff=0.6) if k not in close]
        hint = f"did you mean {', '.join(close[:5])}?" if close else "`lm-eval ls tasks` lists them"
        raise JpadaptError(f"unknown lm-eval task {name!r}; {hint} ({len(known):,} tasks, groups and tags known, "
                           "with the YAMLs under include_path)")


def _load_tasks(tasks: list[str], manager: Any) -> list[Any]:
    """Each name's Task or Group objects, its data read (offline); a failure names the task."""
    from datasets.exceptions import DatasetNotFoundError

    loaded: list[Any] = []
    for name in tasks:
        try:
            built = manager.load([name])
        except (ConnectionError, DatasetNotFoundError) as exc:  # a Hub dataset that is not in the local cache
            raise JpadaptError(
                f"lm-eval task {name!r}: its data cannot be read offline ({_first_line(exc)}). jpadapt downloads "
                "nothing: write a task YAML into include_path whose dataset_path is `json` (or csv, parquet) and "
                "whose dataset_kwargs.data_files point at local files, with the stock task's prompt fields"
            ) from exc
        except FileNotFoundError as exc:
            raise JpadaptError(f"lm-eval task {name!r}: its data cannot be read ({_first_line(exc)}); check "
                               "dataset_kwargs.data_files in its YAML") from exc
        except Exception as exc:  # a broken YAML, template or processing function of the task
            raise JpadaptError(f"lm-eval task {name!r} cannot be loaded: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from exc
        groups = built.get("groups", {})
        loaded.extend([groups[name]] if name in groups else built["tasks"].values())
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Running


def _start_token_tokenizer(tokenizer: Any) -> tuple[Any, list[int]]:
    """A copy of `tokenizer` whose special tokens are exactly jpadapt's start token, first (set through its
    `tokenizers` post-processor where it needs it); and the ids the harness will put first (module docstring)."""
    from eval.perplexity import start_token_id

    harness_tokenizer = copy.deepcopy(tokenizer)
    start = start_token_id(tokenizer)
    if start is not None and _added(harness_tokenizer) != ([start], []):
        backend = getattr(harness_tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import processors

            token = harness_tokenizer.convert_ids_to_tokens(start)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{token}:0 $A:0", pair=f"{token}:0 $A:0 $B:1", special_tokens=[(token, start)]
            )
    prefix, suffix = _added(harness_tokenizer)
    if suffix:
        raise JpadaptError(f"the tokenizer appends token ids {suffix} to every text (add_eos_token?): lm-eval would "
                           "score the wrong continuation tokens; give it a tokenizer that does not")
    if prefix != ([] if start is None else [start]):
        logging.getLogger(__name__).warning(
            "lm-eval puts token ids %s first, not the start token %s that eval.multiple_choice puts first (%s is not a "
            "tokenizers-backed tokenizer): its figures are not directly comparable", prefix, start,
            type(tokenizer).__name__)
    return harness_tokenizer, prefix


def _added(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids `tokenizer.encode` adds before and after a text's own ids."""
    text = "a 日本"
    plain = list(tokenizer.encode(text, add_special_tokens=False))
    full = list(tokenizer.encode(text, add_special_tokens=True))
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise JpadaptError(f"the tokenizer encodes {text!r} differently with and without special tokens: "
                       f"{full} vs {plain}")


def _evaluate(lm_eval: Any, model: Any, tokenizer: Any, loaded: list[Any], manager: Any, limit: int | None,
              batch_size: int, num_fewshot: int | None, seed: int, bootstrap_iters: int) -> dict[str, Any]:
    import torch
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    with _rng_restored():
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                      add_bos_token=True, softmax_dtype=torch.float32)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=loaded, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                bootstrap_iters=bootstrap_iters, log_samples=True, use_cache=None, cache_requests=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)
    if results is None:  # only on a non-zero rank of a distributed run, which HFLM on a model object is not
        raise JpadaptError("lm-eval returned no results (is this a non-zero rank of a distributed run?)")
    return results


@contextmanager
def _rng_restored() -> Iterator[None]:
    """simple_evaluate seeds the global generators; give the caller back the states it had."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode for huggingface_hub and datasets, which read these flags on every call (the environment
    variables are read once, at import)."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_WARNINGS)


@contextmanager
def _harness_logging(verbose: bool) -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level, drop = logger.level, _DropExpected()
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    hflm = logging.getLogger("lm_eval.models.huggingface")
    hflm.addFilter(drop)
    try:
        yield
    finally:
        logger.setLevel(level)
        hflm.removeFilter(drop)


# ---------------------------------------------------------------------------------------------------------------
# Results


def _collect(results: dict[str, Any]) -> dict[str, Any]:
    """The parts of simple_evaluate's results that say what ran and what came out, as plain JSON."""
    configs, subtasks = results.get("configs", {}), results.get("group_subtasks", {})
    tasks, groups = {}, {}
    for name, values in results["results"].items():
        metrics = _metrics(values)
        if name in configs:
            config = configs[name]
            tasks[name] = {
                "metrics": metrics,
                "n": int(results["n-samples"][name]["effective"]),
                "num_fewshot": int(results["n-shot"].get(name, config.get("num_fewshot") or 0)),
                "output_type": str(config.get("output_type")),
                "config": _config(config, results.get("versions", {}).get(name)),
            }
        else:
            groups[name] = {"metrics": metrics, "tasks": list(subtasks.get(name, []))}
    samples = [_sample(task, s, configs.get(task, {}).get("output_type"))
               for task, task_samples in results.get("samples", {}).items() for s in task_samples]
    return {"tasks": tasks, **({"groups": groups} if groups else {}), "samples": samples}


def _metrics(values: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": {"value": 0.5, "stderr": 0.1}}."""
    metrics = {}
    for key, value in values.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else key
        stderr = values.get(f"{metric}_stderr,{filter_name}")
        metrics[name] = {"value": _number(value), "stderr": _number(stderr)}
    return metrics


def _number(value: Any) -> float | None:
    """A float, or None for the harness's "N/A" and other non-numbers."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _config(config: dict[str, Any], version: Any) -> dict[str, Any]:
    chosen = {key: _plain(config[key]) for key in _CONFIG_KEYS if config.get(key) not in (None, "")}
    fewshot = config.get("fewshot_config") or {}
    if fewshot.get("split"):
        chosen["fewshot_split"] = str(fewshot["split"])
    chosen["version"] = _plain(version)
    source = (config.get("metadata") or {}).get("config_source")
    if source:
        chosen["config_source"] = str(source)
    return chosen


def _sample(task: str, sample: dict[str, Any], output_type: str | None) -> dict[str, Any]:
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else ()
    record = {
        "task": task,
        "doc_id": _plain(sample["doc_id"]),
        "target": _plain(sample.get("target")),
        "prompt": _plain(first[0]) if first else None,
        "metrics": {name: _plain(sample.get(name)) for name in sample.get("metrics", [])},
        "filter": sample.get("filter", "none"),
    }
    if output_type == "multiple_choice":
        responses = sample["filtered_resps"]  # one (loglik, is_greedy) per choice
        record["choices"] = [_plain(args[1]) for args in arguments]
        record["loglik"] = [float(loglik) for loglik, _ in responses]
        record["is_greedy"] = [bool(greedy) for _, greedy in responses]
    else:
        record["resps"] = _plain(sample.get("resps"))
        record["filtered_resps"] = _plain(sample.get("filtered_resps"))
    return record


def _plain(value: Any) -> Any:
    """JSON types for harness values: tuples become lists, numpy scalars Python numbers, the rest strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):  # numpy's float64 is one too
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalar
        return _plain(value.item())
    return str(value)
