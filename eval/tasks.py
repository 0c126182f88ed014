"""The bundled benchmark suite: each task's data, prompt, few-shot count and metric, after one named harness.

    spec = TASKS["ja_leaderboard_jcommonsenseqa"]
    docs = spec.load()                                         # the bundled evaluation split, file order
    shots = spec.fewshot(docs[0], k=spec.num_fewshot, seed=1234)
    prompt = spec.prompt(docs[0], shots)                       # description + solved examples + the question

A task's name says whose prompt it is. `ja_leaderboard_*`, `hellaswag`, `xwinograd_en`, `arc_easy`,
`arc_challenge`, `openbookqa` and `gsm8k` are lm-evaluation-harness 0.4.13's tasks of those names (the
`japanese_leaderboard` group and the English stock tasks): the same description, `doc_to_text`, target delimiter,
few-shot delimiter ("\\n\\n"), default few-shot count, stop sequences and metric. `jcommonsenseqa` and `jnli` are
jpadapt's own shorter prompts (the only ones before the suite), kept as a variant: `質問: …\\n答え:` and `前提: …\\n仮説: …\\n関係:`.

Every prompt is built as the harness builds it:
    description + Σ(doc_to_text(shot) + target_delimiter + target(shot) + "\\n\\n") + doc_to_text(doc)
and a multiple-choice continuation is `target_delimiter + choice`; a generative answer is the greedy
continuation of the prompt cut at the first stop sequence.

Where this differs from the harness, on purpose or for lack of data (printed in the report):
* Few-shot examples are drawn per question with the run seed (the harness draws from one stateful generator
  seeded 1234), from the split the harness names where it is bundled. JNLI's and JSQuAD's train splits are not
  bundled (not in the shared data / too large), so their examples come from the evaluation split itself, never
  the question being asked nor, for JSQuAD, another question on the same article.
* A start token (BOS, else EOS) always comes first (eval.multiple_choice), as the harness does for models whose tokenizer
  adds BOS. Nothing is truncated: a prompt that does not fit the model is an error (the harness cuts from the
  left).
* `hellaswag` is a fixed seeded 1,000-item subset of the validation split, whose text went through
  klosax/hellaswag_text_data's preprocessing (no ctx_a / ctx_b split, so ctx_b is not capitalized);
  `gsm8k`'s few-shot pool is the first 250 train problems. `arc_easy`, `arc_challenge` and `openbookqa` have their
  test splits only (the harness's few-shot split is train), so examples come from the test split, never the
  asked question; their copies give every question 4 choices, where ARC has a few with 3 or 5 (under 1%).
  See data/bundled/SOURCES.md.
* `ja_leaderboard_jsquad` also reports character F1 (the best over the gold answers), as llm-jp-eval does.
* Generation stops at `max_new_tokens` per task (the harness's 256, lower for short answers).

The tasks' data comes from public repositories, with licenses in data/bundled/SOURCES.md. The bundled Japanese
corpus holds Wikipedia paragraphs from JSQuAD: do not read JSQuAD scores of a model trained on that corpus as
held-out results.
"""

from __future__ import annotations

import json
import lzma
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data.assets import stored_path
from pipeline.errors import JpadaptError

MULTIPLE_CHOICE = "multiple_choice"
GENERATE = "generate_until"
HARNESS = "lm-evaluation-harness 0.4.13"
JA_DESCRIPTION = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
FEWSHOT_DELIMITER = "\n\n"
INVALID = "[invalid]"


@dataclass(frozen=True)
class Doc:
    """One evaluation item in harness terms. Multiple choice: `choices` and `label` (and per-choice
    `contexts` in the harness's "multiple input" mode, where every choice shares the continuation `target`).
    Generative: `answers`, the gold strings the metric compares with."""

    id: str
    text: str  # doc_to_text
    target: str  # doc_to_target as text: what a solved few-shot example shows after the delimiter
    choices: tuple[str, ...] = ()
    label: int = -1
    contexts: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    group: str = ""  # few-shot examples never share the asked item's group (its id, or its article)


@dataclass(frozen=True)
class Scoring:
    """How a generative task scores one generation (already cut at the stop sequences), as its harness does."""

    metrics: Callable[[Doc, str], dict[str, float]]  # every metric of one item: 1.0 / 0.0, char F1 in [0, 1]
    extract: Callable[[str], str]  # what the headline metric compared with the gold answer (for the report)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    lang: str  # "ja" | "en"
    title: str  # for people: "JCommonsenseQA"
    harness: str  # whose prompt: HARNESS + group, or "jpadapt"
    kind: str  # MULTIPLE_CHOICE | GENERATE
    num_fewshot: int  # the harness's default
    metrics: tuple[str, ...]  # the first is the task's headline metric
    files: dict[str, str]  # split -> bundled asset name
    parse: Callable[[dict[str, Any], int], Doc] = field(repr=False)
    eval_split: str = "valid"
    fewshot_split: str | None = None  # None: the evaluation split itself, excluding the asked item's group
    description: str = ""
    target_delimiter: str = " "
    until: tuple[str, ...] = ()
    max_new_tokens: int = 0
    zero_shot_only: bool = False  # the harness defines no few-shot examples (Winograd schemas)
    scoring: Scoring | None = field(default=None, repr=False)  # generative tasks

    # ---------------------------------------------------------------------------------------------- data

    def load(self, split: str | None = None) -> list[Doc]:
        """The bundled split (default: the evaluation split) as Docs, in file order."""
        split = split or self.eval_split
        asset = self.asset(split)
        path = stored_path(asset)
        docs = []
        with lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(self.parse(json.loads(line), number))
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    raise JpadaptError(f"{path}:{number}: not a {self.name} record ({exc!r})") from exc
        return docs

    def asset(self, split: str) -> str:
        if split not in self.files:
            raise JpadaptError(f"task {self.name!r} has no bundled {split!r} split; bundled: {', '.join(self.files)}")
        return self.files[split]

    def shot_counts(self, asked: list[int]) -> list[int]:
        """The few-shot counts this task runs at when `asked` is requested: 0-shot-only tasks run once, 0-shot."""
        return [0] if self.zero_shot_only else asked

    def splits_read(self, shots: int) -> list[str]:
        """The bundled splits an evaluation at `shots` reads (for the stage's input list)."""
        return sorted({self.eval_split, self.fewshot_split or self.eval_split} if shots else {self.eval_split})

    # ---------------------------------------------------------------------------------------------- prompts

    def fewshot(self, doc: Doc, k: int, seed: int, pool: list[Doc]) -> list[Doc]:
        """`k` solved examples for `doc` drawn from `pool` with `seed`, none in `doc`'s group.

        The draw is one seeded sample of k + 1 items with the excluded ones dropped, so every question of a
        run gets the same examples except where its own group was drawn; when that leaves fewer than k (several
        questions on one article), a larger seeded sample is drawn instead."""
        if k == 0:
            return []
        if self.zero_shot_only:
            raise JpadaptError(f"{self.name}: few-shot examples are not defined for this task (the harness runs it "
                               "0-shot); set its num_fewshot to 0")
        same_split = self.fewshot_split is None
        for size in (k + 1, k + 33, len(pool)):
            drawn = random.Random(seed).sample(pool, min(size, len(pool)))
            kept = [d for d in drawn if not (same_split and d.group == doc.group)][:k]
            if len(kept) == k:
                return kept
        raise JpadaptError(f"{self.name}: {k} few-shot examples asked for, but the pool has only {len(kept)}")

    def prefix(self, shots: list[Doc]) -> str:
        """The description and the solved examples: everything before the asked item's text."""
        return self.description + "".join(
            f"{shot.text}{self.target_delimiter}{shot.target}{FEWSHOT_DELIMITER}" for shot in shots)

    def prompt(self, doc: Doc, shots: list[Doc]) -> str:
        return self.prefix(shots) + doc.text

    def mc_item(self, doc: Doc) -> Any:
        """The eval.multiple_choice Item this task scores for `doc` (its context without the few-shot prefix)."""
        from eval.multiple_choice import Item

        if doc.contexts:
            return Item(doc.id, "", (self.target_delimiter + doc.target,) * len(doc.contexts), doc.label,
                        contexts=doc.contexts)
        return Item(doc.id, doc.text, tuple(self.target_delimiter + c for c in doc.choices), doc.label)

    def describe(self) -> dict[str, Any]:
        """The task's definition as results.json records it."""
        return {"title": self.title, "lang": self.lang, "harness": self.harness, "kind": self.kind,
                "num_fewshot": self.num_fewshot, "metrics": list(self.metrics), "eval_split": self.eval_split,
                "fewshot_split": self.fewshot_split or f"{self.eval_split} (excluding the item's "
                                                       f"{'article' if self.name.endswith('jsquad') else 'self'})",
                "description": self.description, "target_delimiter": self.target_delimiter,
                "until": list(self.until), "max_new_tokens": self.max_new_tokens}


# ================================================================================================== parsers


def _jcqa_jpadapt(r: dict[str, Any], _: int) -> Doc:
    choices = tuple(r[f"choice{i}"] for i in range(5))
    label = int(r["label"])
    return Doc(str(r["q_id"]), f"質問: {r['question']}\n答え:", choices[label], choices, label, group=str(r["q_id"]))


JNLI_LABELS = ("entailment", "contradiction", "neutral")
JNLI_CHOICES = ("含意", "矛盾", "中立")  # in the order of JNLI_LABELS, as the harness's doc_to_choice


def _jnli_jpadapt(r: dict[str, Any], _: int) -> Doc:
    label = JNLI_LABELS.index(r["label"])
    return Doc(str(r["sentence_pair_id"]), f"前提: {r['sentence1']}\n仮説: {r['sentence2']}\n関係:",
               JNLI_CHOICES[label], JNLI_CHOICES, label, group=str(r["sentence_pair_id"]))


def _jcqa_leaderboard(r: dict[str, Any], _: int) -> Doc:
    choices = tuple(r[f"choice{i}"] for i in range(5))
    label = int(r["label"])
    listed = "".join(f"- {c}\n" for c in choices)
    text = f"### 指示：\n出力は以下から選択してください：\n{listed}\n### 入力：\n{r['question']}\n\n### 応答："
    return Doc(str(r["q_id"]), text, choices[label], choices, label, group=str(r["q_id"]))


def _jnli_leaderboard(r: dict[str, Any], _: int) -> Doc:
    label = JNLI_LABELS.index(r["label"])
    text = ("### 指示：\n与えられた前提と仮説の関係を回答してください。\n\n出力は以下から選択してください：\n含意\n矛盾\n中立\n\n"
            f"### 入力：\n前提：{r['sentence1']}\n仮説：{r['sentence2']}\n\n### 応答：")
    return Doc(str(r["sentence_pair_id"]), text, JNLI_CHOICES[label], JNLI_CHOICES, label,
               group=str(r["sentence_pair_id"]))


def _jsquad_leaderboard(r: dict[str, Any], _: int) -> Doc:
    context = r["context"].split("[SEP]")[-1].strip()
    answers = tuple(r["answers"]["text"])
    if not answers:
        raise ValueError("no gold answer")
    text = f"### 指示：\n与えられた文脈から、質問に対する答えを抜き出してください。\n\n### 入力：\n文脈：{context}\n質問：{r['question']}\n\n### 応答："
    return Doc(str(r["id"]), text, answers[0], answers=answers, group=str(r["title"]))


def _mgsm_leaderboard(r: dict[str, Any], number: int) -> Doc:
    question = r["question"].replace("問題：", "")
    text = f"### 指示：\n与えられた問題に対して、ステップごとに答えを導き出してください。\n\n### 入力：\n{question}\n\n### 応答："
    target = (r.get("answer") or "").replace("ステップごとの答え：", "")
    return Doc(f"mgsm-ja-{number}", text, target, answers=(str(int(r["answer_number"])),), group=str(number))


def _xwinograd_ja(r: dict[str, Any], number: int) -> Doc:
    choices = (r["sentence1"].strip(), r["sentence2"].strip())
    label = int(r["answer"]) - 1
    return Doc(f"xwinograd-ja-{number}", "", choices[label], choices, label, group=str(number))


def _xwinograd_en(r: dict[str, Any], number: int) -> Doc:
    sentence = r["sentence"]
    blank = sentence.index("_")
    contexts = (sentence[:blank] + r["option1"], sentence[:blank] + r["option2"])
    return Doc(f"xwinograd-en-{number}", "", sentence[blank + 1:].strip(), label=int(r["answer"]) - 1,
               contexts=contexts, group=str(number))


def _hellaswag(r: dict[str, Any], _: int) -> Doc:
    choices = tuple(r["choices"])
    label = int(r["label"])
    return Doc(f"hellaswag-{r['ind']}", r["query"], choices[label], choices, label, group=str(r["ind"]))


def _ai2_choices(r: dict[str, Any]) -> tuple[tuple[str, ...], int]:
    """ARC's and OpenBookQA's choices and the gold's position (the harness's choices.label.index(answerKey))."""
    return tuple(r["choices"]["text"]), r["choices"]["label"].index(r["answerKey"].lstrip())


def _arc(r: dict[str, Any], _: int) -> Doc:
    choices, label = _ai2_choices(r)
    return Doc(r["id"], f"Question: {r['question']}\nAnswer:", choices[label], choices, label, group=r["id"])


def _openbookqa(r: dict[str, Any], _: int) -> Doc:
    choices, label = _ai2_choices(r)
    return Doc(r["id"], r["question_stem"], choices[label], choices, label, group=r["id"])


def _gsm8k(r: dict[str, Any], number: int) -> Doc:
    return Doc(f"gsm8k-{number}", f"Question: {r['question']}\nAnswer:", r["answer"], answers=(r["answer"],),
               group=str(number))


# ============================================================================= scoring generations (harness filters)

_TRIM = (r"^\s+", r"\s+$")


def _jsquad_metrics(doc: Doc, generation: str) -> dict[str, float]:
    answer = generation.strip()  # the harness's remove_whitespace filter
    return {"exact_match": float(_ignore(answer, _TRIM) == _ignore(doc.answers[0], _TRIM)),
            "char_f1": max(char_f1(answer, gold) for gold in doc.answers)}


def _mgsm_metrics(doc: Doc, generation: str) -> dict[str, float]:
    return {"acc": float(last_integer(generation) == int(doc.answers[0]))}


def _mgsm_extract(generation: str) -> str:
    value = last_integer(generation)
    return INVALID if value is None else str(value)


_GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def _gsm8k_strict(generation: str) -> str:
    return _regex_pick(generation, r"#### (\-?[0-9\.\,]+)", 0)


def _gsm8k_metrics(doc: Doc, generation: str) -> dict[str, float]:
    gold = _ignore(doc.answers[0], _GSM8K_IGNORE).lower()
    flexible = _regex_pick(generation, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)
    return {"exact_match": float(_ignore(_gsm8k_strict(generation), _GSM8K_IGNORE).lower() == gold),
            "exact_match_flexible": float(_ignore(flexible, _GSM8K_IGNORE).lower() == gold)}


# ================================================================================================== the tasks

_JGLUE = "eval/jglue/"
_LEADERBOARD = f"{HARNESS} japanese_leaderboard"

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("ja_leaderboard_jcommonsenseqa", "ja", "JCommonsenseQA", _LEADERBOARD, MULTIPLE_CHOICE, 3, ("acc",),
             {"train": _JGLUE + "jcommonsenseqa-v1.3/train-v1.3.json",
              "valid": _JGLUE + "jcommonsenseqa-v1.3/valid-v1.3.json"},
             _jcqa_leaderboard, fewshot_split="train", description=JA_DESCRIPTION, target_delimiter="\n"),
    TaskSpec("ja_leaderboard_jnli", "ja", "JNLI", _LEADERBOARD, MULTIPLE_CHOICE, 3, ("acc",),
             {"valid": _JGLUE + "jnli-v1.3/valid-v1.3.json"}, _jnli_leaderboard, description=JA_DESCRIPTION,
             target_delimiter="\n"),
    TaskSpec("ja_leaderboard_jsquad", "ja", "JSQuAD", _LEADERBOARD, GENERATE, 2, ("exact_match", "char_f1"),
             {"valid": _JGLUE + "jsquad-v1.3/valid-v1.3.jsonl"}, _jsquad_leaderboard, description=JA_DESCRIPTION,
             target_delimiter="\n", until=("\n\n",), max_new_tokens=64, scoring=Scoring(_jsquad_metrics, str.strip)),
    TaskSpec("ja_leaderboard_mgsm", "ja", "MGSM (ja)", _LEADERBOARD, GENERATE, 5, ("acc",),
             {"train": "eval/mgsm/mgsm_ja_train.jsonl", "test": "eval/mgsm/mgsm_ja.jsonl"}, _mgsm_leaderboard,
             eval_split="test", fewshot_split="train", description=JA_DESCRIPTION, target_delimiter="\n",
             until=("\n\n",), max_new_tokens=256, scoring=Scoring(_mgsm_metrics, _mgsm_extract)),
    TaskSpec("ja_leaderboard_xwinograd", "ja", "XWinograd (ja)", _LEADERBOARD, MULTIPLE_CHOICE, 0, ("acc",),
             {"test": "eval/xwinograd/xwinograd_ja.jsonl"}, _xwinograd_ja, eval_split="test", target_delimiter="",
             zero_shot_only=True),
    TaskSpec("jcommonsenseqa", "ja", "JCommonsenseQA", "jpadapt", MULTIPLE_CHOICE, 0, ("acc", "acc_norm"),
             {"train": _JGLUE + "jcommonsenseqa-v1.3/train-v1.3.json",
              "valid": _JGLUE + "jcommonsenseqa-v1.3/valid-v1.3.json"},
             _jcqa_jpadapt, fewshot_split="train"),
    TaskSpec("jnli", "ja", "JNLI", "jpadapt", MULTIPLE_CHOICE, 0, ("acc", "acc_norm"),
             {"valid": _JGLUE + "jnli-v1.3/valid-v1.3.json"}, _jnli_jpadapt),
    TaskSpec("hellaswag", "en", "HellaSwag", HARNESS, MULTIPLE_CHOICE, 0, ("acc_norm", "acc"),
             {"valid": "eval/hellaswag/hellaswag_val.jsonl"}, _hellaswag),
    TaskSpec("xwinograd_en", "en", "XWinograd (en)", HARNESS, MULTIPLE_CHOICE, 0, ("acc",),
             {"test": "eval/xwinograd/xwinograd_en.jsonl"}, _xwinograd_en, eval_split="test", zero_shot_only=True),
    TaskSpec("arc_easy", "en", "ARC-Easy", HARNESS, MULTIPLE_CHOICE, 0, ("acc", "acc_norm"),
             {"test": "eval/arc/arc_easy_test.jsonl"}, _arc, eval_split="test"),
    TaskSpec("arc_challenge", "en", "ARC-Challenge", HARNESS, MULTIPLE_CHOICE, 0, ("acc_norm", "acc"),
             {"test": "eval/arc/arc_challenge_test.jsonl"}, _arc, eval_split="test"),
    TaskSpec("openbookqa", "en", "OpenBookQA", HARNESS, MULTIPLE_CHOICE, 0, ("acc_norm", "acc"),
             {"test": "eval/openbookqa/openbookqa_test.jsonl"}, _openbookqa, eval_split="test"),
    TaskSpec("gsm8k", "en", "GSM8K", HARNESS, GENERATE, 5, ("exact_match", "exact_match_flexible"),
             {"train": "eval/gsm8k/train_fewshot.jsonl", "test": "eval/gsm8k/test.jsonl"}, _gsm8k,
             eval_split="test", fewshot_split="train", until=("Question:", "</s>", "<|im_end|>"),
             max_new_tokens=256, scoring=Scoring(_gsm8k_metrics, _gsm8k_strict)),
)}

# The suite a run evaluates by default: every bundled task under the harness's prompts.
DEFAULT_TASKS = ("ja_leaderboard_jcommonsenseqa", "ja_leaderboard_jnli", "ja_leaderboard_jsquad", "ja_leaderboard_mgsm",
                 "ja_leaderboard_xwinograd", "hellaswag", "xwinograd_en", "arc_easy", "arc_challenge", "openbookqa",
                 "gsm8k")


def get_task(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        import difflib

        close = [t for t in TASKS if name in t] + difflib.get_close_matches(name, TASKS, n=3)
        close = list(dict.fromkeys(close))[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(TASKS)}"
        raise JpadaptError(f"unknown evaluation task {name!r}{hint}")
    return spec


# ================================================================================================== metrics


def metric_values(spec: TaskSpec, doc: Doc, generation: str) -> dict[str, float]:
    """Every metric of a generative task for one generation, as the harness computes it per item."""
    if spec.scoring is None:
        raise JpadaptError(f"{spec.name} is not a generative task")
    return spec.scoring.metrics(doc, generation)


def extracted_answer(spec: TaskSpec, generation: str) -> str:
    """What the headline metric compared with the gold answer: shown next to the gold in the report."""
    if spec.scoring is None:
        raise JpadaptError(f"{spec.name} is not a generative task")
    return spec.scoring.extract(generation)


def _ignore(text: str, patterns: tuple[str, ...]) -> str:
    for pattern in patterns:
        text = re.sub(pattern, "", text)
    return text


def _regex_pick(text: str, pattern: str, group_select: int) -> str:
    """The harness's `regex` filter: the `group_select`-th match (of a multi-group pattern, its first non-empty
    group), stripped; "[invalid]" when nothing matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")


def last_integer(text: str) -> int | None:
    """ja_leaderboard_mgsm's answer extraction: the last number-like run, dots stripped from its ends and commas
    removed; an integer value counts, anything else (no number, a fraction, '1.2.3') is no answer."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        value = float(matches[-1].strip(".").replace(",", ""))
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def char_f1(prediction: str, gold: str) -> float:
    """F1 of the characters two strings share (as multisets), the JSQuAD metric of llm-jp-eval / JGLUE's
    character-level evaluation; 1.0 when both are empty."""
    from collections import Counter

    if not prediction and not gold:
        return 1.0
    common = sum((Counter(prediction) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def mc_items(name: str, split: str | None = None) -> list[Any]:
    """A multiple-choice task's split as eval.multiple_choice Items (contexts without few-shot examples)."""
    spec = get_task(name)
    if spec.kind != MULTIPLE_CHOICE:
        raise JpadaptError(f"{name} is a generative task, not multiple choice")
    return [spec.mc_item(doc) for doc in spec.load(split)]
