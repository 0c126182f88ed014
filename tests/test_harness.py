"""eval/harness.py on a tiny random LLaMA over a byte-level BPE: the bundled JCommonsenseQA run through
lm-evaluation-harness (a local task YAML with eval.multiple_choice's prompt) equals eval.multiple_choice item by item, the result is
plain JSON whose accuracy recomputes from its samples, and the errors a user gets before any model work. The
harness's own `arc_easy` and `openbookqa` definitions, pointed at the bundled files, give the bundled tasks' prompts,
choices, log-likelihoods and accuracies item by item.
Skipped as a whole without the `lm-eval` extra (tests/test_harness_missing.py covers that case).

The tokenizer's post-processor adds no BOS, so the harness left to itself would put no start token first;
the comparison therefore also checks that run_harness_tasks makes it score jpadapt's BOS-first sequences.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from data.assets import materialize
from eval.harness import _start_token_tokenizer, run_harness_tasks
from eval.multiple_choice import accuracy, score_items
from eval.tasks import mc_items
from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError
from pipeline.models import load_causal_lm
from tests.helpers.tiny import byte_bpe_tokenizer

lm_eval = pytest.importorskip("lm_eval")  # the optional extra: without it, nothing here runs

JCQA_VALID = "eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json"
LIMIT = 20
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "initializer_range": 0.25}  # large random weights: choices differ by several nats

# eval.multiple_choice's "jcommonsenseqa" prompt: context `質問: {question}\n答え:`, choices ` {choiceN}`.
JCQA_YAML = """\
task: jcqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "質問: {{{{question}}}}\\n答え:"
doc_to_choice: "{{{{[choice0, choice1, choice2, choice3, choice4]}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """include_path: the local JCommonsenseQA task, and one whose data file does not exist."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "jcqa_local.yaml").write_text(JCQA_YAML.format(data=materialize(JCQA_VALID)), encoding="utf-8")
    missing = JCQA_YAML.format(data=folder / "absent.json").replace("task: jcqa_local", "task: jcqa_missing")
    (folder / "jcqa_missing.yaml").write_text(missing, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    texts = [item.context + choice for item in mc_items("jcommonsenseqa")[:300] for choice in item.choices]
    return byte_bpe_tokenizer(texts)


@pytest.fixture(scope="module")
def model(tokenizer):
    return load_causal_lm(ModelConfig(from_config={**TINY_LLAMA, "vocab_size": len(tokenizer)}, dtype="float32"),
                          seed=7)


@pytest.fixture(scope="module")
def harness_run(model, tokenizer, tasks_dir):
    """The local task through the harness, from a model in train mode; with the torch RNG state around it."""
    model.train()
    before = torch.random.get_rng_state()
    result = run_harness_tasks(model, tokenizer, ["jcqa_local"], tasks_dir, limit=LIMIT, batch_size=8,
                               num_fewshot=0, seed=3)
    after = torch.random.get_rng_state()
    training = model.training
    model.eval()
    return {"result": result, "rng_kept": torch.equal(before, after), "training_kept": training}


def test_jcommonsenseqa_through_the_harness_equals_eval_jglue_item_by_item(harness_run, model, tokenizer):
    result = harness_run["result"]
    items = mc_items("jcommonsenseqa")[:LIMIT]
    scores = score_items(model, tokenizer, items, batch_size=8, progress=False)
    samples = [s for s in result["samples"] if s["task"] == "jcqa_local"]
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    assert result["settings"]["start_tokens"] == [tokenizer.bos_token_id]
    diffs = []
    for sample, item, score in zip(samples, items, scores):
        assert sample["prompt"] == item.context  # the same prompt and choices, item by item
        assert sample["choices"] == list(item.choices)
        assert sample["target"] == item.label
        diffs += [abs(a - b) for a, b in zip(sample["loglik"], score.loglik, strict=True)]
    assert max(diffs) < 1e-4, f"max |loglik difference| {max(diffs):.2e}"
    assert len({round(ll, 3) for s in samples for ll in s["loglik"]}) > LIMIT  # not a degenerate model
    metrics = result["tasks"]["jcqa_local"]["metrics"]
    assert metrics["acc"]["value"] == accuracy(scores, items, normalized=False).accuracy
    assert metrics["acc_norm"]["value"] == accuracy(scores, items, normalized=True).accuracy


def test_result_is_plain_json_and_its_accuracy_recomputes_from_its_samples(harness_run, tasks_dir):
    result = harness_run["result"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["version"] == lm_eval.__version__
    assert result["settings"] == {"limit": LIMIT, "num_fewshot": 0, "seed": 3, "batch_size": 8, "bootstrap_iters": 100,
                                  "include_path": str(tasks_dir), "start_tokens": result["settings"]["start_tokens"]}
    task = result["tasks"]["jcqa_local"]
    assert (task["n"], task["num_fewshot"], task["output_type"]) == (LIMIT, 0, "multiple_choice")
    assert task["config"]["dataset_path"] == "json"
    assert task["config"]["doc_to_text"] == "質問: {{question}}\n答え:"
    assert task["config"]["validation_split"] == "validation"
    samples = result["samples"]
    acc = [float(s["loglik"].index(max(s["loglik"])) == s["target"]) for s in samples]
    norm = [[ll / len(c.lstrip()) for ll, c in zip(s["loglik"], s["choices"])] for s in samples]
    acc_norm = [float(v.index(max(v)) == s["target"]) for v, s in zip(norm, samples)]
    assert acc == [s["metrics"]["acc"] for s in samples]
    assert acc_norm == [s["metrics"]["acc_norm"] for s in samples]
    p = sum(acc) / LIMIT
    assert task["metrics"]["acc"]["value"] == pytest.approx(p, abs=1e-12)
    assert task["metrics"]["acc_norm"]["value"] == pytest.approx(sum(acc_norm) / LIMIT, abs=1e-12)
    # The harness's standard error of a mean: sample standard deviation (n - 1) over sqrt(n).
    assert task["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)), rel=1e-9)


def test_the_caller_gets_its_model_mode_rng_and_tokenizer_back(harness_run, tokenizer):
    assert harness_run["training_kept"] and harness_run["rng_kept"]
    # HFLM sets a pad token and run_harness_tasks a start-token post-processor: on a copy only.
    assert tokenizer.pad_token is None
    assert tokenizer.encode("質問", add_special_tokens=True) == tokenizer.encode("質問", add_special_tokens=False)


def test_unknown_task_names_fail_before_any_model_work_with_close_names(tasks_dir):
    no_model = object()  # any use of it would fail with an AttributeError, not a JpadaptError
    with pytest.raises(JpadaptError, match="unknown lm-eval task 'jcqa_locl'; did you mean jcqa_local"):
        run_harness_tasks(no_model, no_model, ["jcqa_locl"], tasks_dir, None, 1, None, 0)
    with pytest.raises(JpadaptError, match="'jcommonsenseqa'; did you mean .*ja_leaderboard_jcommonsenseqa"):
        run_harness_tasks(no_model, no_model, ["jcommonsenseqa"], tasks_dir, None, 1, None, 0)


def test_a_hub_dataset_fails_at_once_offline_whatever_the_environment(tasks_dir, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # As if HF_HUB_OFFLINE / HF_DATASETS_OFFLINE were unset, with an empty datasets cache: run_harness_tasks
    # must switch to offline mode itself, or this would try the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    no_model = object()
    start = time.monotonic()
    with pytest.raises(JpadaptError, match="lm-eval task 'hellaswag': its data cannot be read offline") as err:
        run_harness_tasks(no_model, no_model, ["hellaswag"], tasks_dir, 5, 1, 0, 0)
    assert time.monotonic() - start < 30  # the task index (~5 s) at most, no network timeout
    assert "dataset_path is `json`" in str(err.value) and "data_files" in str(err.value)
    assert "OfflineModeIsEnabled" in str(err.value)  # datasets' own words: offline mode refused the Hub
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


def test_a_missing_local_data_file_names_the_task_and_the_file(tasks_dir):
    no_model = object()
    with pytest.raises(JpadaptError, match=r"lm-eval task 'jcqa_missing': .*absent\.json"):
        run_harness_tasks(no_model, no_model, ["jcqa_missing"], tasks_dir, 5, 1, 0, 0)


@pytest.mark.parametrize("bad, message", [
    ({"tasks": "jcqa_local"}, "non-empty list of task names"),
    ({"tasks": ["jcqa_local", "jcqa_local"]}, "names a task twice"),
    ({"limit": 0}, "limit must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"num_fewshot": -1}, "num_fewshot must be 0 or more"),
])
def test_bad_arguments_are_clear_errors(tasks_dir, bad, message):
    arguments = {"tasks": ["jcqa_local"], "include_path": tasks_dir, "limit": None, "batch_size": 1,
                 "num_fewshot": None, "seed": 0, **bad}
    with pytest.raises(JpadaptError, match=message):
        run_harness_tasks(object(), object(), **arguments)


def test_include_path_must_be_a_folder(tmp_path):
    with pytest.raises(JpadaptError, match="include_path .* is not a folder"):
        run_harness_tasks(object(), object(), ["jcqa_local"], tmp_path / "nowhere", None, 1, None, 0)


def test_the_harness_tokenizer_puts_exactly_the_start_token_first(tokenizer):
    plain = tokenizer.encode("質問 a", add_special_tokens=False)
    copy, start = _start_token_tokenizer(tokenizer)
    assert start == [tokenizer.bos_token_id] and copy.encode("質問 a") == [tokenizer.bos_token_id] + plain
    # A tokenizer that also appends EOS: the harness gets jpadapt's sequence, the start token and the text.
    eos_too = _start_token_tokenizer(tokenizer)[0]
    eos_too.add_eos_token = True
    assert eos_too.encode("質問 a")[-1] == tokenizer.eos_token_id
    assert _start_token_tokenizer(eos_too)[0].encode("質問 a") == [tokenizer.bos_token_id] + plain


# ---------------------------------------------------------------------------------------------- in the stage


def test_the_evaluate_stage_runs_harness_tasks_beside_its_own(model, tokenizer, tasks_dir, tmp_path):
    """`evaluate.lm_eval_tasks` in a real `jpadapt evaluate`: the harness's JCommonsenseQA (same prompt as jpadapt's
    `jcommonsenseqa` variant) gives the same accuracy as the stage's own scorer on the same items, its samples go
    to lm_eval_samples.jsonl (not results.json), the report shows it, and an unknown name fails before any model
    is loaded."""
    import yaml

    from pipeline.models import save_model_folder
    from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli
    from tests.helpers.jsonl import read_jsonl

    save_model_folder(model, tmp_path / "model")
    tokenizer.save_pretrained(str(tmp_path / "model"))
    config = {
        "run": {"name": "t", "seed": 7, "output_dir": str(tmp_path)},
        "model": {"path": str(tmp_path / "model")},
        "data": {lang: {"train": f"bundled:corpus/{lang}_train.jsonl", "heldout": f"bundled:corpus/{lang}_heldout.jsonl"}
                 for lang in ("ja", "en")},
        "prepare": {"dedup": {"near": False}},
        "evaluate": {"max_chars": 500, "window": 64, "stride": 32, "limit": 6, "tasks": ["jcommonsenseqa"],
                     "num_fewshot": [0], "prompts": [], "lm_eval_tasks": ["jcqa_local"],
                     "lm_eval_include_path": str(tasks_dir), "lm_eval_num_fewshot": 0, "accelerator": "cpu"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")

    unknown = run_cli("evaluate", str(path), "evaluate.lm_eval_tasks=[jcqa_locl]", cwd=tmp_path)
    assert_one_line_error(unknown, "unknown lm-eval task 'jcqa_locl'", "jcqa_local")
    assert not (tmp_path / "t" / "stages" / "evaluate").exists()

    result = jpadapt("evaluate", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stage = tmp_path / "t" / "stages" / "evaluate"
    results = json.loads((stage / "results.json").read_text(encoding="utf-8"))
    harness = results["lm_eval"]["base"]
    assert "samples" not in harness and harness["settings"]["num_fewshot"] == 0
    ours = results["tasks"]["results"]["base"]["jcommonsenseqa"]["0"]
    for metric in ("acc", "acc_norm"):
        assert harness["tasks"]["jcqa_local"]["metrics"][metric]["value"] == pytest.approx(ours[metric]["value"])
    samples = read_jsonl(stage / "lm_eval_samples.jsonl")
    assert [(s["model"], s["doc_id"]) for s in samples] == [("base", i) for i in range(6)]
    report = (stage / "report.md").read_text(encoding="utf-8")
    assert "## lm-evaluation-harness tasks" in report and "jcqa_local" in report


# The harness's own task definitions (its installed YAMLs, prompts and targets untouched) pointed at the bundled
# files instead of the Hub: what the bundled task renders and scores must be exactly what the harness does.
HARNESS_OWN = {"arc_easy": ("arc/arc_easy.yaml", "eval/arc/arc_easy_test.jsonl"),
               "openbookqa": ("openbookqa/openbookqa.yaml", "eval/openbookqa/openbookqa_test.jsonl")}


@pytest.mark.parametrize("name", sorted(HARNESS_OWN))
def test_a_bundled_task_equals_the_harness_own_definition_item_by_item(name, tokenizer, tmp_path):
    import yaml

    from eval.tasks import get_task

    definition, data = HARNESS_OWN[name]
    installed = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / definition).read_text(encoding="utf-8"))
    local = {**installed, "task": f"{name}_local", "dataset_path": "json",
             "dataset_kwargs": {"data_files": {"test": str(materialize(data))}}, "training_split": None,
             "validation_split": None, "test_split": "test"}
    local.pop("dataset_name", None)
    local.pop("tag", None)
    (tmp_path / f"{name}_local.yaml").write_text(yaml.safe_dump(local, allow_unicode=True), encoding="utf-8")
    # English in a tokenizer learned on Japanese takes many tokens: room for them, so the harness cuts nothing.
    model = load_causal_lm(ModelConfig(from_config={**TINY_LLAMA, "max_position_embeddings": 1024,
                                                    "vocab_size": len(tokenizer)}, dtype="float32"), seed=7)
    result = run_harness_tasks(model, tokenizer, [f"{name}_local"], tmp_path, limit=LIMIT, batch_size=8,
                               num_fewshot=0, seed=3)
    spec = get_task(name)
    items = [spec.mc_item(doc) for doc in spec.load()][:LIMIT]
    scores = score_items(model, tokenizer, items, batch_size=8, progress=False)
    samples = result["samples"]
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    for sample, item, score in zip(samples, items, scores):
        assert sample["prompt"] == item.context and sample["choices"] == list(item.choices), item.id
        assert sample["target"] == item.label, item.id
        assert max(abs(a - b) for a, b in zip(sample["loglik"], score.loglik, strict=True)) < 1e-4, item.id
    metrics = result["tasks"][f"{name}_local"]["metrics"]
    assert metrics["acc"]["value"] == accuracy(scores, items, normalized=False).accuracy
    assert metrics["acc_norm"]["value"] == accuracy(scores, items, normalized=True).accuracy
