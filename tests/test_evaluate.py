"""The evaluate stage end to end on the CPU: a tiny LLaMA through prepare, cpt and QLoRA sft, then every model
side by side. Each figure in results.json is recomputed from the run directory or by hand: bits per byte against
a direct forward pass, the cpt row against cpt's own last forgetting point, JGLUE accuracies and intervals from
predictions.jsonl, the sft adapter's choice log-likelihoods from base + adapter loaded the way a user would.
Also the errors a user gets before any model is scored.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from eval.multiple_choice import Item, chance_and_majority, wilson_interval
from eval.tasks import get_task, mc_items, metric_values
from pipeline.config import ModelConfig
from pipeline.launch import free_port
from pipeline.models import load_causal_lm, save_model_folder
from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli
from tests.helpers.jsonl import read_jsonl
from tests.helpers.tiny import byte_bpe_tokenizer, pickle_only_copy

TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 2048, "tie_word_embeddings": True, "initializer_range": 0.25}
SEQ_LEN = 64
EVAL_CHARS = 2000
LIMIT = 6
# jpadapt's own prompt, a harness prompt, a generative task and the harness's "multiple input" mode.
TASKS = {"jcommonsenseqa": "acc", "ja_leaderboard_jnli": "acc", "ja_leaderboard_mgsm": "acc", "xwinograd_en": "acc"}
MC_TASKS = ("jcommonsenseqa", "ja_leaderboard_jnli", "xwinograd_en")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny LLaMA folder over a byte-level BPE trained on the bundled text, instruction data, and prompts."""
    import lzma

    from data.assets import stored_path

    root = tmp_path_factory.mktemp("evaluate")
    with lzma.open(stored_path("instruct/ja_instruct_train.jsonl"), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line, _ in zip(f, range(16), strict=False)]
    records = [{"instruction": r["instruction"], "input": r["input"][:30], "output": r["output"]} for r in records]
    (root / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records * 4),
                                    encoding="utf-8")
    prompts = [{"id": "plain", "text": "日本の首都は"},
               {"id": "ask", "instruction": "富士山の高さは?", "input": "富士山は日本一高い山です。", "output": "3776メートル"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts),
                                        encoding="utf-8")
    texts = [r["instruction"] + r["input"] + r["output"] for r in records] + ["### 指示: ### 入力: ### 応答:"] * 20
    tokenizer = byte_bpe_tokenizer(texts)
    model = load_causal_lm(ModelConfig(from_config=TINY_LLAMA, dtype="float32"), seed=7)
    save_model_folder(model, root / "model")
    tokenizer.save_pretrained(str(root / "model"))
    return root


def write_config(workspace: Path, out: Path, *, stages: tuple[str, ...] = ("cpt", "sft"), **evaluate) -> Path:
    config = {
        "run": {"name": "t", "seed": 7, "output_dir": str(out)},
        "model": {"path": str(workspace / "model")},
        "data": {"ja": {"train": "bundled:corpus/ja_train.jsonl", "heldout": "bundled:corpus/ja_heldout.jsonl"},
                 "en": {"train": "bundled:corpus/en_train.jsonl", "heldout": "bundled:corpus/en_heldout.jsonl"}},
        "prepare": {"dedup": {"near": False}},
        "evaluate": {"max_chars": EVAL_CHARS, "window": SEQ_LEN, "stride": SEQ_LEN // 2, "batch_size": 4,
                     "limit": LIMIT, "num_fewshot": [0, 2], "prompts": [str(workspace / "prompts.jsonl")],
                     "tasks": list(TASKS), "max_gen_tokens": 6,
                     "max_new_tokens": 6, "extra_models": [str(workspace / "model")], "accelerator": "cpu",
                     **evaluate},
    }
    if "cpt" in stages:
        config["cpt"] = {"replay_ratio": 0.2, "seq_len": SEQ_LEN, "micro_batch_size": 4, "grad_accum": 1,
                         "max_steps": 4, "lr": 5e-3, "warmup_steps": 1, "precision": "fp32",
                         "gradient_checkpointing": False, "zero_stage": 0, "num_gpus": 1, "accelerator": "cpu",
                         "eval_every": 4, "eval_chars": EVAL_CHARS, "save_every": 100, "master_port": free_port()}
    if "sft" in stages:
        config["sft"] = {"data": [str(workspace / "sft.jsonl")], "heldout": [str(workspace / "sft.jsonl")], "max_seq_len": 128,
                         "template": {"system": ""}, "quantization": "nf4", "precision": "fp32", "lora_r": 4,
                         "lora_alpha": 8, "lr": 1e-2, "warmup_steps": 1, "max_steps": 4, "micro_batch_size": 4,
                         "optimizer": "adamw", "gradient_checkpointing": False, "accelerator": "cpu", "eval_every": 4,
                         "eval_examples": 4, "generate": 0, "master_port": free_port()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = write_config(workspace, out)
    result = jpadapt("evaluate", str(config), cwd=out)  # a real process: cpt and sft launch DeepSpeed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def stage(out: Path, name: str = "evaluate") -> Path:
    return out / "t" / "stages" / name


def results_of(out: Path) -> dict:
    return json.loads((stage(out) / "results.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- end to end


def test_every_model_of_the_run_side_by_side(run):
    results = results_of(run)
    assert [m["name"] for m in results["models"]] == ["base", "cpt", "sft", "model"]
    assert [m["kind"] for m in results["models"]] == ["base", "cpt", "sft", "extra"]
    sft = results["models"][2]
    assert sft["quantization"] == "nf4" and sft["adapter"] == "stages/sft/adapter"
    # The run's folders are named relative to the run directory; the others as given.
    assert [m["source"] for m in results["models"][1:3]] == ["stages/cpt/model", "stages/cpt/model"]
    assert set(results["lm"]) == set(results["tasks"]["results"]) == {"base", "cpt", "sft", "model"}
    # The extra folder is the base folder: every figure must agree exactly.
    assert results["lm"]["model"] == results["lm"]["base"]
    assert results["tasks"]["results"]["model"] == results["tasks"]["results"]["base"]
    for name in ("report.md", "report.html", "bits_per_byte.png", "tasks.png"):
        assert (stage(run) / name).stat().st_size > 0


def test_bits_per_byte_is_nats_over_bytes_and_ln2(run):
    results = results_of(run)
    for per_lang in results["lm"].values():
        for lang, r in per_lang.items():
            assert r["bytes"] == results["heldout"][lang]["bytes"]
            assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (r["bytes"] * math.log(2)), rel=1e-12)
            assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)


def test_cpt_row_repeats_cpt_own_last_forgetting_point(run):
    # Same texts (max_chars = cpt.eval_chars), same window and stride: the same figure from two code paths.
    last = read_jsonl(stage(run, "cpt") / "forgetting.jsonl")[-1]
    cpt = results_of(run)["lm"]["cpt"]
    for lang in ("ja", "en"):
        assert cpt[lang]["tokens"] == last[lang]["tokens"]
        assert cpt[lang]["bits_per_byte"] == pytest.approx(last[lang]["bits_per_byte"], rel=1e-5)


def test_base_bits_per_byte_matches_a_hand_computation_on_the_bundled_text(run, workspace):
    """Score the prepared Japanese held-out text window by window with plain forward passes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.prepare import capped_texts, prepared_shards, prepared_texts

    texts = capped_texts(prepared_texts(prepared_shards(stage(run, "prepare"), "ja", "heldout")), EVAL_CHARS)
    tokenizer = AutoTokenizer.from_pretrained(str(workspace / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(workspace / "model"), dtype=torch.float32).eval()
    nats, tokens = 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        end = 0
        while end < len(ids):  # windows of SEQ_LEN; each new window scores the STRIDE tokens it adds
            new_end = min(len(ids), SEQ_LEN if end == 0 else end + SEQ_LEN // 2)
            begin = max(0, new_end - SEQ_LEN)
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:new_end]])).logits[0].double()
            first = max(end, 1)  # the BOS is context only
            targets = torch.tensor(ids[first:new_end])
            nats += float(torch.nn.functional.cross_entropy(logits[first - begin - 1: new_end - begin - 1], targets,
                                                            reduction="sum"))
            tokens += new_end - first
            end = new_end
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    base = results_of(run)["lm"]["base"]["ja"]
    assert base["tokens"] == tokens
    assert base["bits_per_byte"] == pytest.approx(nats / (n_bytes * math.log(2)), rel=1e-5)


def test_task_metrics_and_intervals_recompute_from_predictions(run):
    results = results_of(run)
    predictions = read_jsonl(stage(run) / "predictions.jsonl")
    assert len(predictions) == 4 * (3 * 2 + 1) * LIMIT  # models x (tasks x shots; xwinograd 0-shot only) x items
    definitions = results["tasks"]["definitions"]
    for task in MC_TASKS:
        items = mc_items(task)[:LIMIT]
        chance, majority = chance_and_majority(items)
        assert (definitions[task]["items"], definitions[task]["chance"], definitions[task]["majority"]) == (
            LIMIT, chance, majority)
        for name, per_task in results["tasks"]["results"].items():
            for shots in ("0", "2") if task != "xwinograd_en" else ():
                rows = [p for p in predictions if p["model"] == name and p["task"] == task and str(p["shots"]) == shots]
                assert [p["id"] for p in rows] == [item.id for item in items]
                for key, normalized in (("acc", False), ("acc_norm", True)):
                    correct = sum(_argmax(p, normalized) == p["label"] for p in rows)
                    metrics = per_task[task][shots][key]
                    assert (metrics["correct"], metrics["total"]) == (correct, LIMIT)
                    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_interval(correct, LIMIT))
    spec = get_task("ja_leaderboard_mgsm")
    docs = {d.id: d for d in spec.load()[:LIMIT]}
    for name, per_task in results["tasks"]["results"].items():
        rows = [p for p in predictions if p["model"] == name and p["task"] == spec.name and p["shots"] == 2]
        assert [p["id"] for p in rows] == list(docs)
        values = [metric_values(spec, docs[p["id"]], p["generation"])["acc"] for p in rows]
        assert [p["metrics"]["acc"] for p in rows] == values
        assert per_task[spec.name]["2"]["acc"]["correct"] == sum(values)


def _argmax(prediction: dict, normalized: bool) -> int:
    values = [ll / c for ll, c in zip(prediction["loglik"], prediction["chars"])] if normalized else prediction["loglik"]
    return values.index(max(values))


def test_fewshot_prompts_change_the_scores_and_never_show_the_question(run):
    predictions = read_jsonl(stage(run) / "predictions.jsonl")
    zero = [p["loglik"] for p in predictions if p["model"] == "base" and p["shots"] == 0 and "loglik" in p]
    two = [p["loglik"] for p in predictions if p["model"] == "base" and p["shots"] == 2 and "loglik" in p]
    assert zero != two
    spec = get_task("ja_leaderboard_jnli")
    pool = spec.load()
    for doc in pool[:LIMIT]:
        assert doc.id not in {ex.id for ex in spec.fewshot(doc, 2, 7, pool)}


def test_sft_choice_loglik_matches_base_plus_adapter_loaded_by_hand(run):
    """The first JCommonsenseQA item, 0-shot: each choice's log-likelihood from a full forward pass of the 4-bit
    base with the adapter, tokenized the harness way (context, then context + choice)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipeline.models import load_frozen_base

    adapter = stage(run, "sft") / "adapter"
    base_name = json.loads((adapter / "jpadapt.json").read_text(encoding="utf-8"))["base_model"]
    assert base_name == "stages/cpt/model"  # relative to the run directory: the same in every run directory
    base_folder = str(run / "t" / base_name)
    model = PeftModel.from_pretrained(load_frozen_base(base_folder, "nf4", "float32", "cpu", False), str(adapter))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    item: Item = mc_items("jcommonsenseqa")[0]
    expected = []
    for choice in item.choices:
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        whole = [tokenizer.bos_token_id] + tokenizer(item.context + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
        first = 1 + len(context)
        expected.append(sum(float(logp[i - 1, whole[i]]) for i in range(first, len(whole))))
    row = next(p for p in read_jsonl(stage(run) / "predictions.jsonl")
               if p["model"] == "sft" and p["task"] == "jcommonsenseqa" and p["shots"] == 0)
    assert row["id"] == item.id
    assert row["loglik"] == pytest.approx(expected, abs=1e-3)


def test_generations_for_every_prompt_and_model(run):
    generations = read_jsonl(stage(run) / "generations.jsonl")
    assert [g["id"] for g in generations] == ["plain", "ask"]
    assert generations[1]["reference"] == "3776メートル" and generations[1]["kind"] == "instruction"
    for g in generations:
        assert set(g["outputs"]) == {"base", "cpt", "sft", "model"}
        assert g["outputs"]["model"] == g["outputs"]["base"]


def test_report_has_every_section_and_model(run):
    report = (stage(run) / "report.md").read_text(encoding="utf-8")
    for fragment in ("# Evaluation", "## What each stage did", "## Held-out text: bits per byte", "## Benchmark suite",
                     "### Every metric", "## Generations", "](bits_per_byte.png)", "](tasks.png)", "Japanese average",
                     "English average", "Δ cpt", "base -> cpt", "cpt -> sft", "lm-evaluation-harness 0.4.13"):
        assert fragment in report, fragment
    results = results_of(run)
    assert f"{results['lm']['cpt']['ja']['bits_per_byte']:.4f}" in report
    acc = results["tasks"]["results"]["sft"]["ja_leaderboard_jnli"]["2"]["acc"]
    assert f"{acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" in report


def test_up_to_date_then_only_evaluate_reruns_when_its_settings_change(run):
    config = run / "pipeline.yaml"
    again = run_cli("evaluate", str(config), cwd=run)
    assert again.returncode == 0 and "evaluate: up to date" in again.stdout, again.stdout + again.stderr
    changed = run_cli("evaluate", str(config), "evaluate.tasks=[jnli]", "evaluate.num_fewshot=[0]", cwd=run)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "cpt: up to date" in changed.stdout and "sft: up to date" in changed.stdout
    assert "evaluate: running (stale" in changed.stdout and "evaluate.tasks" in changed.stdout
    assert set(results_of(run)["tasks"]["definitions"]) == {"jnli"}


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def quick(workspace, tmp_path) -> Path:
    """prepare + evaluate only (no training), for the errors."""
    return write_config(workspace, tmp_path, stages=(), extra_models=[], tasks=["jnli"], num_fewshot=[0], limit=2)


def test_missing_extra_model_folder_is_named(quick):
    result = run_cli("evaluate", str(quick), "evaluate.extra_models=[nowhere/model]", cwd=quick.parent)
    assert_one_line_error(result, "evaluate.extra_models[0]", "nowhere/model")
    assert not (quick.parent / "t" / "stages" / "evaluate").exists()


def test_pickle_only_extra_model_is_refused_before_the_base_is_scored(quick, workspace, tmp_path):
    """An extra folder with config.json + pytorch_model.bin only: one line naming it, before any stage runs. It
    used to pass the config.json check and be refused at loading, after prepare ran and the base was scored."""
    folder = pickle_only_copy(workspace / "model", tmp_path / "pickled")
    started = time.monotonic()
    result = run_cli("evaluate", str(quick), f"evaluate.extra_models=[{folder}]", cwd=quick.parent)
    seconds = time.monotonic() - started
    assert_one_line_error(result, "evaluate.extra_models[0]", str(folder.resolve()), "only pytorch_model.bin",
                          "safetensors")
    assert not (quick.parent / "t" / "stages").exists()  # not even prepare: nothing was scored
    assert seconds < 10, seconds  # in-process: ~0.1 s


def test_bad_prompt_line_is_named(quick, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y", "output": "z"}\n', encoding="utf-8")
    result = run_cli("evaluate", str(quick), f"evaluate.prompts=[{bad}]", cwd=quick.parent)
    assert_one_line_error(result, "bad.jsonl:2", "instruction prompts")
    assert not (quick.parent / "t" / "stages" / "evaluate" / "results.json").exists()


@pytest.mark.parametrize(("override", "fragments"), [
    ("evaluate.num_fewshot=[0,0]", ["evaluate", "num_fewshot must list distinct values"]),
    ("evaluate.num_fewshot=[-1]", ["num_fewshot entries must be 0 or more"]),
    ("evaluate.stride=4096", ["stride (4096) is larger than window"]),
    ("evaluate.tasks=[jsquad]", ["evaluate.tasks", "did you mean ja_leaderboard_jsquad"]),
])
def test_bad_settings_are_config_errors(quick, override, fragments):
    assert_one_line_error(run_cli("validate", str(quick), override, cwd=quick.parent), *fragments)


def test_fewshot_prompt_longer_than_the_model_is_an_error(quick):
    result = run_cli("evaluate", str(quick), "evaluate.num_fewshot=[60]", cwd=quick.parent)
    assert_one_line_error(result, "evaluate:", "jnli item", "with 60 few-shot examples", "for base",
                          "more than the model's 2048 positions", "evaluate.num_fewshot")
    assert not (quick.parent / "t" / "stages" / "evaluate").exists()
