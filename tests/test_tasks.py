"""eval/tasks.py: the bundled tasks load with their documented sizes, render lm-evaluation-harness 0.4.13's prompts
exactly, score every multiple-choice task as a hand forward pass does, compute the generative metrics as the harness
does, and draw few-shot examples by the documented rules.

The harness's prompts are its YAML `doc_to_text` / `doc_to_target` templates, copied below as literals (the harness is
not installed here), rendered with a jinja2 environment set up as the harness sets up its own (`lm_eval/utils.py`:
BaseLoader, StrictUndefined, keep_trailing_newline) on the raw bundled records.
"""

from __future__ import annotations

import functools
import json
import lzma
import math
import random
from collections import Counter

import jinja2
import pytest
import torch

from data.assets import stored_path
from eval.multiple_choice import Z95, score_items, wilson_interval
from eval.suite import generative_metrics, language_averages, multiple_choice_metrics
from eval.tasks import (
    DEFAULT_TASKS,
    FEWSHOT_DELIMITER,
    GENERATE,
    INVALID,
    JA_DESCRIPTION,
    MULTIPLE_CHOICE,
    TASKS,
    Doc,
    char_f1,
    extracted_answer,
    get_task,
    last_integer,
    mc_items,
    metric_values,
)
from pipeline.errors import JpadaptError
from tests.test_multiple_choice import tiny_llama
from tokenizer.hf import load_hf_tokenizer

MC_TASKS = [name for name, spec in TASKS.items() if spec.kind == MULTIPLE_CHOICE]


@functools.cache
def docs_of(name: str, split: str | None = None) -> list[Doc]:
    return get_task(name).load(split)


@functools.cache
def raw_records(asset: str) -> list[dict]:
    """The bundled file's JSON lines as they are, without eval.tasks' parsers."""
    with lzma.open(stored_path(asset), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fewshot_pool(name: str) -> list[Doc]:
    spec = get_task(name)
    return docs_of(name, spec.fewshot_split) if spec.fewshot_split else docs_of(name)


# ================================================================================================================
# Loading

COUNTS = [
    ("ja_leaderboard_jcommonsenseqa", "valid", 1119),
    ("ja_leaderboard_jcommonsenseqa", "train", 8939),
    ("ja_leaderboard_jnli", "valid", 2434),
    ("ja_leaderboard_jsquad", "valid", 4442),
    ("ja_leaderboard_mgsm", "test", 250),
    ("ja_leaderboard_mgsm", "train", 8),
    ("ja_leaderboard_xwinograd", "test", 959),
    ("jcommonsenseqa", "valid", 1119),
    ("jcommonsenseqa", "train", 8939),
    ("jnli", "valid", 2434),
    ("hellaswag", "valid", 1000),
    ("xwinograd_en", "test", 2325),
    ("arc_easy", "test", 2376),
    ("arc_challenge", "test", 1172),
    ("openbookqa", "test", 500),
    ("gsm8k", "test", 1319),
    ("gsm8k", "train", 250),
]


def test_the_count_table_covers_every_bundled_split():
    assert {(name, split) for name, split, _ in COUNTS} == {(n, s) for n, spec in TASKS.items() for s in spec.files}
    assert set(DEFAULT_TASKS) <= set(TASKS)


@pytest.mark.parametrize(("name", "split", "count"), COUNTS)
def test_every_bundled_split_loads_with_its_documented_count(name, split, count):
    spec = get_task(name)
    docs = docs_of(name, split)
    assert len(docs) == count == len(raw_records(spec.files[split]))
    assert len({d.id for d in docs}) == count
    if spec.kind == MULTIPLE_CHOICE:
        width = len(docs[0].contexts or docs[0].choices)
        assert all(len(d.contexts or d.choices) == width and 0 <= d.label < width for d in docs)
    else:
        assert all(d.answers and all(a.strip() for a in d.answers) for d in docs)
    if split == spec.eval_split:
        assert spec.load() == docs


def test_jcommonsenseqa_items_keep_jpadapts_short_prompt():
    items = mc_items("jcommonsenseqa")
    assert len(items) == 1119
    assert all(len(item.choices) == 5 and 0 <= item.label < 5 for item in items)
    assert all(item.context.startswith("質問: ") and item.context.endswith("\n答え:") for item in items)
    assert all(choice.startswith(" ") and not choice.startswith("  ") for item in items for choice in item.choices)
    first = raw_records("eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json")[0]
    assert items[0].context == f"質問: {first['question']}\n答え:"
    assert items[0].choices == tuple(" " + first[f"choice{i}"] for i in range(5))
    assert items[0].label == first["label"]


def test_jcommonsenseqa_train_is_disjoint_from_valid():
    assert not {d.id for d in docs_of("jcommonsenseqa", "train")} & {d.id for d in docs_of("jcommonsenseqa")}


@pytest.mark.parametrize("name", ["jnli", "ja_leaderboard_jnli"])
def test_jnli_maps_the_three_label_strings(name):
    # JGLUE's JNLI labels in the order of the Hugging Face dataset's ClassLabel, which the harness's
    # `doc_to_choice: ["含意", "矛盾", "中立"]` indexes.
    names = ("entailment", "contradiction", "neutral")
    docs = docs_of(name)
    expected = Counter(r["label"] for r in raw_records("eval/jglue/jnli-v1.3/valid-v1.3.json"))
    assert Counter(names[d.label] for d in docs) == expected and set(expected) == set(names)
    assert all(d.choices == ("含意", "矛盾", "中立") for d in docs)
    if name == "jnli":
        assert all(item.choices == (" 含意", " 矛盾", " 中立") for item in mc_items(name)[:50])


def test_unknown_task_split_or_kind_is_a_clear_error():
    with pytest.raises(JpadaptError, match="unknown evaluation task 'hellaswg'; did you mean hellaswag"):
        get_task("hellaswg")
    with pytest.raises(JpadaptError, match="did you mean jcommonsenseqa"):
        get_task("jcommonsensqa")
    with pytest.raises(JpadaptError, match="unknown evaluation task 'jsquad'; did you mean ja_leaderboard_jsquad"):
        get_task("jsquad")  # a name inside a task's name is suggested
    with pytest.raises(JpadaptError, match="unknown evaluation task 'mmlu'; known: ja_leaderboard_jcommonsenseqa"):
        get_task("mmlu")  # too far from every name for a suggestion: the list instead
    with pytest.raises(JpadaptError, match="no bundled 'train' split; bundled: valid"):
        get_task("jnli").load("train")
    with pytest.raises(JpadaptError, match="generative task, not multiple choice"):
        mc_items("gsm8k")
    with pytest.raises(JpadaptError, match="not a generative task"):
        metric_values(get_task("hellaswag"), docs_of("hellaswag")[0], "x")


# ================================================================================================================
# Prompts: the harness's templates


@functools.cache
def harness_template(template: str) -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template)


def harness_render(template: str, record: dict) -> str:
    return harness_template(template).render(**record)


# From lm_eval/tasks/japanese_leaderboard/*.yaml, hellaswag/hellaswag.yaml, arc/arc_easy.yaml (arc_challenge includes
# it), openbookqa/openbookqa.yaml and gsm8k/gsm8k.yaml (0.4.13).
YAML_JA_DESCRIPTION = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
YAML_TEXT = {
    "ja_leaderboard_jcommonsenseqa": "### 指示：\n出力は以下から選択してください：\n{% for choice in choices %}- {{ choice }}\n"
                                     "{% endfor %}\n### 入力：\n{{ question }}\n\n### 応答：",
    "ja_leaderboard_jnli": "### 指示：\n与えられた前提と仮説の関係を回答してください。\n\n出力は以下から選択してください：\n含意\n矛盾\n"
                           "中立\n\n### 入力：\n前提：{{ sentence1 }}\n仮説：{{ sentence2 }}\n\n### 応答：",
    "ja_leaderboard_jsquad": "### 指示：\n与えられた文脈から、質問に対する答えを抜き出してください。\n\n### 入力：\n文脈：{% set "
                             "_context = context.split('[SEP]')[-1] %}{{ _context | trim }}\n質問：{{ question }}\n\n### "
                             "応答：",
    "ja_leaderboard_mgsm": "### 指示：\n与えられた問題に対して、ステップごとに答えを導き出してください。\n\n### 入力：\n{{ question | "
                           "replace('問題：', '') }}\n\n### 応答：",
    "hellaswag": "{{query}}",
    "arc_easy": "Question: {{question}}\nAnswer:",
    "arc_challenge": "Question: {{question}}\nAnswer:",
    "openbookqa": "{{question_stem}}",  # the YAML's `doc_to_text: question_stem`: a column name
    "gsm8k": "Question: {{question}}\nAnswer:",
}
# Generative tasks' doc_to_target (multiple-choice targets are `choices[label]`).
YAML_TARGET = {
    "ja_leaderboard_jsquad": "{{ answers['text'][0] }}",
    "ja_leaderboard_mgsm": "{{ answer | replace('ステップごとの答え：', '') }}",
    "gsm8k": "{{answer}}",
}
# (description, target_delimiter, num_fewshot, until, output_type); the harness's defaults where the YAML sets none:
# description "", target_delimiter " ", num_fewshot 0 (null in the YAML too).
YAML_SETTINGS = {
    "ja_leaderboard_jcommonsenseqa": (YAML_JA_DESCRIPTION, "\n", 3, (), MULTIPLE_CHOICE),
    "ja_leaderboard_jnli": (YAML_JA_DESCRIPTION, "\n", 3, (), MULTIPLE_CHOICE),
    "ja_leaderboard_jsquad": (YAML_JA_DESCRIPTION, "\n", 2, ("\n\n",), GENERATE),
    "ja_leaderboard_mgsm": (YAML_JA_DESCRIPTION, "\n", 5, ("\n\n",), GENERATE),
    "ja_leaderboard_xwinograd": ("", "", 0, (), MULTIPLE_CHOICE),
    "hellaswag": ("", " ", 0, (), MULTIPLE_CHOICE),
    "xwinograd_en": ("", " ", 0, (), MULTIPLE_CHOICE),
    "arc_easy": ("", " ", 0, (), MULTIPLE_CHOICE),
    "arc_challenge": ("", " ", 0, (), MULTIPLE_CHOICE),
    "openbookqa": ("", " ", 0, (), MULTIPLE_CHOICE),
    "gsm8k": ("", " ", 5, ("Question:", "</s>", "<|im_end|>"), GENERATE),
}
JNLI_CLASSES = ("entailment", "contradiction", "neutral")  # the HF dataset's ClassLabel order


def harness_doc(name: str, record: dict) -> dict:
    """The record as the harness's `process_docs` leaves it, with `choices` / `gold` for multiple choice."""
    if name == "ja_leaderboard_jcommonsenseqa":
        choices = [record[f"choice{i}"] for i in range(5)]
        return {**record, "choices": choices, "gold": record["label"]}
    if name == "ja_leaderboard_jnli":
        return {**record, "choices": ["含意", "矛盾", "中立"], "gold": JNLI_CLASSES.index(record["label"])}
    if name == "hellaswag":
        return {**record, "gold": int(record["label"])}
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        # doc_to_choice "{{choices.text}}"; doc_to_target "{{choices.label.index(answerKey)}}" (openbookqa's with
        # answerKey.lstrip()), rendered on the record.
        target = "{{choices.label.index(answerKey" + (".lstrip()" if name == "openbookqa" else "") + ")}}"
        return {**record, "choices": record["choices"]["text"], "gold": int(harness_render(target, record))}
    return record


def test_harness_settings_and_constants():
    assert JA_DESCRIPTION == YAML_JA_DESCRIPTION and FEWSHOT_DELIMITER == "\n\n"
    assert set(YAML_SETTINGS) == {name for name, spec in TASKS.items() if spec.harness != "jpadapt"}
    for name, (description, delimiter, shots, until, kind) in YAML_SETTINGS.items():
        spec = get_task(name)
        assert (spec.description, spec.target_delimiter, spec.num_fewshot, spec.until, spec.kind) == (
            description, delimiter, shots, until, kind), name
        assert spec.harness.startswith("lm-evaluation-harness 0.4.13")
        assert (spec.kind == GENERATE) == (spec.max_new_tokens > 0) == (spec.scoring is not None), name
    # The harness's few-shot split is `train` for all; JNLI's and JSQuAD's are not bundled (documented).
    assert {n: TASKS[n].fewshot_split for n in ("ja_leaderboard_jcommonsenseqa", "ja_leaderboard_mgsm", "gsm8k")} == {
        "ja_leaderboard_jcommonsenseqa": "train", "ja_leaderboard_mgsm": "train", "gsm8k": "train"}
    assert TASKS["ja_leaderboard_jnli"].fewshot_split is None and TASKS["ja_leaderboard_jsquad"].fewshot_split is None
    assert all(TASKS[n].zero_shot_only for n in ("ja_leaderboard_xwinograd", "xwinograd_en"))


def harness_cases(names):
    return list(names)


@pytest.mark.parametrize("name", harness_cases(YAML_TEXT))
def test_every_doc_text_is_the_harness_template_rendered_on_the_raw_record(name):
    spec = get_task(name)
    for split, asset in spec.files.items():
        docs, records = docs_of(name, split), raw_records(asset)
        assert len(docs) == len(records)
        for doc, record in zip(docs, records):
            record = harness_doc(name, record)
            assert doc.text == harness_render(YAML_TEXT[name], record), (split, doc.id)
            if spec.kind == MULTIPLE_CHOICE:
                assert (list(doc.choices), doc.label) == (record["choices"], record["gold"]), doc.id
                assert doc.target == doc.choices[doc.label]
            elif record.get("answer", "") is not None:  # MGSM's test records have no worked answer
                assert doc.target == harness_render(YAML_TARGET[name], record), (split, doc.id)
    if name == "ja_leaderboard_jsquad":
        doc, record = docs_of(name)[0], raw_records(spec.files["valid"])[0]
        assert doc.answers == tuple(record["answers"]["text"]) and doc.group == record["title"]
        assert "[SEP]" in record["context"] and "[SEP]" not in doc.text
    if name == "ja_leaderboard_mgsm":
        assert [d.answers for d in docs_of(name)[:2]] == [(str(r["answer_number"]),) for r in
                                                          raw_records(spec.files["test"])[:2]]
        assert docs_of(name, "train")[0].target.startswith("ロジャーは最初5個")


@pytest.mark.parametrize("name", harness_cases([n for n in YAML_TEXT if TASKS[n].num_fewshot]))
def test_a_few_shot_prompt_is_assembled_as_the_harness_assembles_it(name):
    """The harness's plain-text prompt: the description (system message), then per example the question, the target
    delimiter, the answer and the few-shot delimiter, then the question asked."""
    spec = get_task(name)
    pool = fewshot_pool(name)
    pool_records = raw_records(spec.files[spec.fewshot_split or spec.eval_split])
    position = {d.id: i for i, d in enumerate(pool)}
    doc = docs_of(name)[1]
    shots = spec.fewshot(doc, spec.num_fewshot, seed=1234, pool=pool)
    assert len(shots) == spec.num_fewshot
    expected = YAML_SETTINGS[name][0]
    for shot in shots:
        record = harness_doc(name, pool_records[position[shot.id]])
        answer = (record["choices"][record["gold"]] if spec.kind == MULTIPLE_CHOICE
                  else harness_render(YAML_TARGET[name], record))
        expected += harness_render(YAML_TEXT[name], record) + YAML_SETTINGS[name][1] + answer + "\n\n"
    expected += harness_render(YAML_TEXT[name], harness_doc(name, raw_records(spec.files[spec.eval_split])[1]))
    assert spec.prompt(doc, shots) == expected


def test_xwinograd_docs_follow_the_harness():
    ja, en = get_task("ja_leaderboard_xwinograd"), get_task("xwinograd_en")
    for doc, record in zip(docs_of(ja.name), raw_records(ja.files["test"])):
        # ja_leaderboard_xwinograd.process_docs: the two whole sentences, stripped, are the choices; doc_to_text "".
        assert doc.text == "" and not doc.contexts
        assert doc.choices == (record["sentence1"].strip(), record["sentence2"].strip())
        assert doc.label == int(record["answer"]) - 1
    item = ja.mc_item(docs_of(ja.name)[0])
    assert item.context == "" and item.choices == docs_of(ja.name)[0].choices  # target delimiter ""
    for doc, record in zip(docs_of(en.name), raw_records(en.files["test"])):
        # xwinograd/utils.py, "multiple input": the sentence up to "_" with each option are the contexts, what
        # follows "_" (stripped) the one continuation.
        before, after = record["sentence"].split("_", 1)
        assert doc.contexts == (before + record["option1"], before + record["option2"])
        assert doc.target == after.strip() and doc.label == int(record["answer"]) - 1 and doc.text == ""
    doc = docs_of(en.name)[0]
    item = en.mc_item(doc)
    assert item.contexts == doc.contexts and item.choices == (" " + doc.target,) * 2 and item.label == doc.label


# ================================================================================================================
# Scoring every multiple-choice task against a hand forward pass


@pytest.fixture(scope="module")
def llama2_tokenizer():
    # Byte fallback: every character of every task has tokens, so every choice gives tokens of its own.
    return load_hf_tokenizer("llama2")


@pytest.fixture(scope="module")
def random_llama(llama2_tokenizer):
    return tiny_llama(len(llama2_tokenizer), seed=5)


def hand_loglik(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """Harness definition by hand: the context's trailing whitespace moves onto the continuation; the model reads
    BOS + tokens(context + continuation); the continuation's tokens are those after the context's own tokens."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    n_context = len(tokenizer(stripped, add_special_tokens=False)["input_ids"])
    ids = [tokenizer.bos_token_id] + tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, n_context:-1].double()  # position j predicts ids[j + 1]
    targets = torch.tensor(ids[1 + n_context:])
    return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()), len(targets)


@pytest.mark.parametrize("name", MC_TASKS)
def test_every_multiple_choice_task_scores_as_a_hand_forward_pass(name, random_llama, llama2_tokenizer):
    spec = get_task(name)
    pool = fewshot_pool(name)
    for doc in docs_of(name)[:2]:
        shots = spec.fewshot(doc, spec.num_fewshot, seed=1234, pool=pool)
        assert len(shots) == spec.num_fewshot
        prompt = spec.prompt(doc, shots)
        item = spec.mc_item(doc)
        if doc.contexts:
            requests = [(spec.prefix(shots) + context, spec.target_delimiter + doc.target) for context in doc.contexts]
        else:
            assert spec.prefix(shots) + item.context == prompt
            requests = [(prompt, spec.target_delimiter + choice) for choice in doc.choices]
        [scores] = score_items(random_llama, llama2_tokenizer, [item], prefix=spec.prefix(shots), batch_size=4,
                               progress=False)
        expected = [hand_loglik(random_llama, llama2_tokenizer, context, cont) for context, cont in requests]
        assert scores.loglik == pytest.approx([ll for ll, _ in expected], abs=1e-4), doc.id
        assert scores.tokens == tuple(n for _, n in expected) and min(scores.tokens) >= 1
        assert scores.chars == tuple(len(cont.lstrip()) for _, cont in requests)


# ================================================================================================================
# Generative metrics


def test_jsquad_exact_match_uses_the_first_answer_and_char_f1_the_best():
    spec = get_task("ja_leaderboard_jsquad")
    doc = Doc("q", "", "小笠原諸島", answers=("小笠原諸島", "小笠原諸島を除く日本", "小笠原諸島"))
    assert metric_values(spec, doc, " 小笠原諸島\n") == {"exact_match": 1.0, "char_f1": 1.0}
    # Gold answers after the first count for F1 only, as the harness's exact match takes doc_to_target (the first).
    assert metric_values(spec, doc, "小笠原諸島を除く日本") == {"exact_match": 0.0, "char_f1": 1.0}
    # 3 of 5 characters: precision 1, recall 3/5, F1 2·(3/5)/(8/5) = 0.75 (against the longer gold: 6/13).
    assert metric_values(spec, doc, "小笠原")["char_f1"] == pytest.approx(0.75)
    assert metric_values(spec, doc, "") == {"exact_match": 0.0, "char_f1": 0.0}
    assert metric_values(spec, doc, "小笠原 諸島") == {"exact_match": 0.0, "char_f1": pytest.approx(10 / 11)}
    assert extracted_answer(spec, "\n 小笠原諸島 ") == "小笠原諸島"


def test_char_f1_counts_characters_as_multisets():
    assert char_f1("ああい", "あい") == pytest.approx(0.8)  # common {あ, い}: precision 2/3, recall 1
    assert char_f1("", "") == 1.0 and char_f1("", "あ") == 0.0 and char_f1("abc", "xyz") == 0.0
    assert char_f1("ab", "ba") == 1.0


@pytest.mark.parametrize(("text", "value"), [
    ("答えは1,234です。", 1234),
    ("3.5", None),
    ("18.", 18),
    ("答えは分かりません。", None),
    ("", None),
    ("5+6=11。答えは11です。", 11),
    ("-7度", -7),
    ("2.0", 2),
    ("1.2.3", None),
    ("答えは18です.", None),  # the last number-like run is the lone ".", as the harness's regex finds it
])
def test_mgsm_last_integer(text, value):
    assert last_integer(text) == value


def test_mgsm_accuracy_and_extracted_answer():
    spec = get_task("ja_leaderboard_mgsm")
    doc = docs_of(spec.name)[0]
    assert doc.answers == ("18",)
    assert metric_values(spec, doc, "16-3-4=9。9×2=18。答えは18です。") == {"acc": 1.0}
    assert metric_values(spec, doc, "答えは18.5です。") == {"acc": 0.0}
    assert metric_values(spec, doc, "答えは9です。") == {"acc": 0.0}
    assert extracted_answer(spec, "答えは1,234です。") == "1234"
    assert extracted_answer(spec, "分かりません") == INVALID


@pytest.mark.parametrize(("generation", "strict", "flexible"), [
    ("9 * 2 = $18 every day.\n#### 18", 1.0, 1.0),
    ("#### 18.", 1.0, 1.0),  # "\.$" is ignored
    ("The answer is 18.", 0.0, 1.0),  # no "####": only the last number counts
    ("She makes $18.", 0.0, 1.0),
    ("She makes $18.00", 0.0, 0.0),  # "18.00" != "18": the harness compares strings
    ("#### $18", 0.0, 1.0),  # strict wants a digit right after "#### "
    ("#### 18\nThen 20 more.", 1.0, 0.0),  # strict takes the first "####", flexible the last number
    ("It is 16 - 3 - 4 = 9 eggs", 0.0, 0.0),
    ("no number at all", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible_extraction(generation, strict, flexible):
    spec = get_task("gsm8k")
    doc = docs_of("gsm8k")[0]
    assert doc.answers[0].endswith("#### 18")
    assert metric_values(spec, doc, generation) == {"exact_match": strict, "exact_match_flexible": flexible}


def test_gsm8k_commas_and_case_are_ignored_on_both_sides():
    spec = get_task("gsm8k")
    doc = Doc("g", "", "1,200 + 34 = 1,234\n#### 1,234", answers=("1,200 + 34 = 1,234\n#### 1,234",))
    assert metric_values(spec, doc, "#### 1234") == {"exact_match": 1.0, "exact_match_flexible": 1.0}
    assert metric_values(spec, doc, "so $1,234.") == {"exact_match": 0.0, "exact_match_flexible": 1.0}
    assert extracted_answer(spec, "#### 1,234") == "1,234" and extracted_answer(spec, "1234") == INVALID


def test_generative_metrics_intervals():
    per_item = [{"exact_match": 1.0, "char_f1": 1.0}, {"exact_match": 0.0, "char_f1": 0.5},
                {"exact_match": 0.0, "char_f1": 0.25}]
    metrics = generative_metrics(("exact_match", "char_f1"), per_item)
    em = metrics["exact_match"]
    assert (em["value"], em["correct"], em["total"]) == (pytest.approx(1 / 3), 1, 3)
    assert (em["ci_low"], em["ci_high"]) == wilson_interval(1, 3)
    assert (round(em["ci_low"], 4), round(em["ci_high"], 4)) == (0.0615, 0.7923)
    # char F1: mean 7/12, sample standard deviation sqrt(0.291667 / 2) = 0.381881, half-width 1.96 · 0.381881 / √3
    # = 0.432131: [0.151202, 1.015465] clipped to [0.151202, 1].
    f1 = metrics["char_f1"]
    assert "correct" not in f1 and f1["total"] == 3 and f1["value"] == pytest.approx(7 / 12)
    assert f1["ci_low"] == pytest.approx(0.151202, abs=1e-6) and f1["ci_high"] == 1.0
    low = generative_metrics(("char_f1",), [{"char_f1": 0.1}, {"char_f1": 0.0}, {"char_f1": 0.2}])["char_f1"]
    assert low["ci_low"] == 0.0 and low["ci_high"] == pytest.approx(0.1 + Z95 * 0.1 / math.sqrt(3))


def test_multiple_choice_metrics_and_language_averages():
    from eval.multiple_choice import ChoiceScores, Item

    items = [Item(str(i), "c", (" a", " bb"), i % 2) for i in range(4)]
    # Sums always pick choice 0 (right on even items); per character -1/1 < -1.5/2 picks choice 1 (right on odd).
    scores = [ChoiceScores((-1.0, -1.5), (1, 1), (1, 2))] * 4
    metrics = multiple_choice_metrics(scores, items)
    assert {k: (m["correct"], m["total"], m["value"]) for k, m in metrics.items()} == {
        "acc": (2, 4, 0.5), "acc_norm": (2, 4, 0.5)}
    items = [Item(str(i), "c", (" a", " bb"), 1) for i in range(4)]
    metrics = multiple_choice_metrics(scores, items)
    assert (metrics["acc"]["value"], metrics["acc_norm"]["value"]) == (0.0, 1.0)
    assert (metrics["acc_norm"]["ci_low"], metrics["acc_norm"]["ci_high"]) == wilson_interval(4, 4)

    tasks = {
        "definitions": {"a": {"lang": "ja", "metrics": ["acc"]}, "b": {"lang": "ja", "metrics": ["exact_match", "f1"]},
                        "c": {"lang": "en", "metrics": ["acc_norm", "acc"]}, "d": {"lang": "en", "metrics": ["acc"]}},
        "results": {"m": {"a": {"3": {"acc": {"value": 0.5}}, "0": {"acc": {"value": 0.9}}},
                          "b": {"2": {"exact_match": {"value": 0.2}, "f1": {"value": 0.8}}},
                          "c": {"0": {"acc_norm": {"value": 0.4}, "acc": {"value": 0.3}}}}},
    }
    # Each task's headline (first) metric at its first evaluated shot count; "d" has no results for "m".
    assert language_averages(tasks, "m") == {"ja": (pytest.approx(0.35), 2), "en": (0.4, 1)}
    assert language_averages(tasks, "other") == {}


# ================================================================================================================
# Few-shot


def test_jcommonsenseqa_draw_is_unchanged():
    """The examples drawn for a seed are those eval/jglue.py drew before the suite (ids recorded from it): one
    seeded sample of k + 1 from the train split, the first k kept; the same for every question."""
    spec = get_task("jcommonsenseqa")
    pool = fewshot_pool(spec.name)
    recorded = {(1234, 3): ["7220", "1914", "122"], (0, 2): ["6311", "6890"],
                (7, 5): ["5305", "2471", "6468", "791", "1186"]}
    for (seed, k), ids in recorded.items():
        for doc in docs_of(spec.name)[:3]:
            shots = spec.fewshot(doc, k, seed=seed, pool=pool)
            assert [s.id for s in shots] == ids
            assert shots == random.Random(seed).sample(pool, k + 1)[:k]
    shots = spec.fewshot(docs_of(spec.name)[0], 2, seed=0, pool=pool)
    assert spec.prefix(shots) == ("質問: 紐を使った遊び道具はどれ?\n答え: ヨーヨー\n\n"
                                  "質問: 物を載せるために、板などを水平にわたし、取り付けたものとは？\n答え: 棚\n\n")
    # The harness-prompt variant draws the same questions from the same split.
    leaderboard = get_task("ja_leaderboard_jcommonsenseqa")
    drawn = leaderboard.fewshot(docs_of(leaderboard.name)[0], 3, seed=1234, pool=fewshot_pool(leaderboard.name))
    assert [s.id for s in drawn] == recorded[(1234, 3)]


@pytest.mark.parametrize("name", ["jnli", "ja_leaderboard_jsquad", "gsm8k"])
def test_fewshot_is_seeded_and_counted(name):
    spec = get_task(name)
    pool, doc = fewshot_pool(name), docs_of(name)[0]
    first = spec.fewshot(doc, 4, seed=7, pool=pool)
    assert len(first) == 4 and len(set(first)) == 4
    assert first == spec.fewshot(doc, 4, seed=7, pool=pool)
    assert first != spec.fewshot(doc, 4, seed=8, pool=pool)
    assert spec.fewshot(doc, 0, seed=7, pool=pool) == []


def test_jnli_examples_come_from_valid_and_never_are_the_asked_item():
    spec = get_task("jnli")
    pool = docs_of("jnli")
    # Recorded from eval/jglue.py before the suite: the same draw.
    assert [s.id for s in spec.fewshot(pool[0], 3, seed=1234, pool=pool)] == ["1805", "478", "30"]
    for seed in range(30):
        draw = random.Random(seed).sample(pool, 5)
        asked = draw[seed % 5]  # a question the plain draw contains: it must be left out, still 4 examples
        shots = spec.fewshot(asked, 4, seed=seed, pool=pool)
        assert asked not in shots and shots == [d for d in draw if d != asked][:4]
    for name in ("jnli", "ja_leaderboard_jnli"):
        for doc in docs_of(name)[:40]:
            assert doc not in get_task(name).fewshot(doc, 3, seed=1234, pool=docs_of(name))


def test_jsquad_examples_never_share_the_asked_articles():
    spec = get_task("ja_leaderboard_jsquad")
    docs = docs_of(spec.name)
    asked = docs[0]
    same = [d for d in docs if d.group == asked.group]
    others = [d for d in docs if d.group != asked.group][:3]
    assert len(same) >= 5  # JSQuAD asks several questions per article
    pool = same + others
    for seed in range(20):
        shots = spec.fewshot(asked, 2, seed=seed, pool=pool)
        assert len(shots) == 2 and all(s.group != asked.group for s in shots)
    # Only three questions on other articles: a larger seeded sample finds them all, a fourth cannot be had.
    assert set(spec.fewshot(asked, 3, seed=0, pool=pool)) == set(others)
    with pytest.raises(JpadaptError, match="3 few-shot examples asked for, but the pool has only 2"):
        spec.fewshot(asked, 3, seed=0, pool=same + others[:2])
    for doc in docs[:40]:
        assert all(s.group != doc.group for s in spec.fewshot(doc, 2, seed=1234, pool=docs))


def test_fewshot_from_a_separate_split_does_not_exclude_by_group():
    """Train examples are never the asked question, so nothing is dropped: MGSM's 8 train problems with k = 8."""
    spec = get_task("ja_leaderboard_mgsm")
    pool = fewshot_pool(spec.name)
    doc = docs_of(spec.name)[0]
    assert {s.id for s in spec.fewshot(doc, 8, seed=3, pool=pool)} == {d.id for d in pool}
    assert spec.fewshot(doc, 5, seed=3, pool=pool) == random.Random(3).sample(pool, 6)[:5]


@pytest.mark.parametrize("name", ["ja_leaderboard_xwinograd", "xwinograd_en"])
def test_zero_shot_only_tasks_refuse_examples(name):
    spec = get_task(name)
    doc = docs_of(name)[0]
    with pytest.raises(JpadaptError, match="few-shot examples are not defined for this task"):
        spec.fewshot(doc, 1, seed=0, pool=docs_of(name))
    assert spec.fewshot(doc, 0, seed=0, pool=docs_of(name)) == []
    assert spec.shot_counts([0, 3]) == [0] and spec.shot_counts([5]) == [0]
    assert get_task("gsm8k").shot_counts([0, 5]) == [0, 5]


def test_prefix_renders_description_and_solved_examples():
    shots = [Doc("a", "Q: Which is a fruit?\nA:", "apple"), Doc("b", "Q: Which is a color?\nA:", "green")]
    assert get_task("jnli").prefix(shots) == "Q: Which is a fruit?\nA: apple\n\nQ: Which is a color?\nA: green\n\n"
    assert get_task("jnli").prefix([]) == ""
    assert get_task("ja_leaderboard_jnli").prefix(shots[:1]) == JA_DESCRIPTION + "Q: Which is a fruit?\nA:\napple\n\n"
    assert get_task("ja_leaderboard_jnli").prefix([]) == JA_DESCRIPTION
    assert get_task("hellaswag").prompt(shots[1], shots[:1]) == "Q: Which is a fruit?\nA: apple\n\nQ: Which is a color?\nA:"
