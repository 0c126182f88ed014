"""eval/multiple_choice.py: the bundled JGLUE files, harness-style multiple-choice scoring on a tiny random LLaMA with the
bundled LLaMA-2 tokenizer, the metrics and the few-shot draw.

Forced answers: the model's lm_head is replaced by a zero-weight linear layer whose bias is +20 on chosen
tokens and -20 on all others, so every position predicts the same distribution and a choice made only of
favored tokens out-scores any choice with an unfavored token by about 40 nats per such token.
"""

from __future__ import annotations

import lzma
import math
from collections import Counter

import pytest
import torch

from data.assets import stored_path
from eval.multiple_choice import (
    JNLI_LABELS,
    ChoiceScores,
    Item,
    accuracy,
    chance_and_majority,
    fewshot_examples,
    fewshot_prefix,
    load_task,
    score_items,
    wilson_interval,
)
from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError
from pipeline.models import load_causal_lm
from tokenizer.hf import load_hf_tokenizer

JCQA_VALID = "eval/jglue/jcommonsenseqa-v1.3/valid-v1.3.json"
JNLI_VALID = "eval/jglue/jnli-v1.3/valid-v1.3.json"

# Every choice is one LLaMA-2 token ("▁apple", ...); the correct ones share no token with the wrong ones.
HAND_ITEMS = [
    Item("a", "Q: Which is a fruit?\nA:", (" apple", " river", " stone"), 0),
    Item("b", "Q: Which is a color?\nA:", (" cloud", " green", " house"), 1),
    Item("c", "Q: Which is a fruit too?\nA:", (" table", " window", " orange"), 2),
]


def line_count(asset: str) -> int:
    with lzma.open(stored_path(asset), "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


@pytest.fixture(scope="module")
def tokenizer():
    return load_hf_tokenizer("llama2")


def tiny_llama(vocab_size: int, seed: int):
    cfg = ModelConfig(
        from_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
        }
    )
    return load_causal_lm(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return tiny_llama(len(tokenizer), seed=1)


def forced_model(tokenizer, favored: set[int]):
    """A tiny LLaMA whose lm_head predicts the `favored` tokens everywhere (see the module docstring)."""
    model = tiny_llama(len(tokenizer), seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[sorted(favored)] = 20.0
    model.lm_head = head
    return model


def continuation_ids(tokenizer, context: str, choice: str) -> list[int]:
    whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
    return whole[len(tokenizer(context, add_special_tokens=False)["input_ids"]) :]


def choice_tokens(tokenizer, pick) -> set[int]:
    """Token ids of the choice `pick(item)` of every hand-built item."""
    return {t for item in HAND_ITEMS for t in continuation_ids(tokenizer, item.context, item.choices[pick(item)])}


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_jcommonsenseqa_valid_has_five_choices_and_labels_in_range():
    items = load_task("jcommonsenseqa")
    assert len(items) == line_count(JCQA_VALID)
    assert all(len(item.choices) == 5 and 0 <= item.label < 5 for item in items)
    assert all(item.context.startswith("質問: ") and item.context.endswith("\n答え:") for item in items)
    assert all(choice.startswith(" ") for item in items for choice in item.choices)
    assert len({item.id for item in items}) == len(items)


def test_jcommonsenseqa_train_is_bundled_and_disjoint_from_valid():
    train = load_task("jcommonsenseqa", "train")
    assert len(train) == line_count("eval/jglue/jcommonsenseqa-v1.3/train-v1.3.json")
    assert not {item.id for item in train} & {item.id for item in load_task("jcommonsenseqa")}


def test_jnli_valid_maps_the_three_label_strings():
    items = load_task("jnli")
    assert len(items) == line_count(JNLI_VALID)
    assert all(item.choices == (" 含意", " 矛盾", " 中立") for item in items)
    labels = Counter(JNLI_LABELS[item.label] for item in items)
    # The file's label strings, counted independently of the parser.
    with lzma.open(stored_path(JNLI_VALID), "rt", encoding="utf-8") as f:
        expected = Counter(line.split('"label": "')[1].split('"')[0] for line in f if line.strip())
    assert labels == expected
    assert set(labels) == set(JNLI_LABELS)


def test_unknown_task_or_split_is_a_clear_error():
    with pytest.raises(JpadaptError, match="unknown JGLUE task"):
        load_task("jsquad")
    with pytest.raises(JpadaptError, match="no bundled 'train' split"):
        load_task("jnli", "train")


def test_chance_and_majority():
    chance, majority = chance_and_majority(load_task("jnli"))
    assert chance == pytest.approx(1 / 3)
    assert majority == pytest.approx(1350 / 2434)
    assert chance_and_majority(HAND_ITEMS) == (pytest.approx(1 / 3), pytest.approx(1 / 3))


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def test_hand_items_choices_are_distinct_tokens(tokenizer):
    correct = choice_tokens(tokenizer, lambda item: item.label)
    for item in HAND_ITEMS:
        for c, choice in enumerate(item.choices):
            ids = continuation_ids(tokenizer, item.context, choice)
            assert len(ids) == 1
            assert (ids[0] in correct) == (c == item.label)


@pytest.mark.parametrize("normalized", [False, True])
def test_forced_correct_answers_score_one_and_forced_wrong_zero(tokenizer, normalized):
    right = forced_model(tokenizer, choice_tokens(tokenizer, lambda item: item.label))
    scores = score_items(right, tokenizer, HAND_ITEMS)
    result = accuracy(scores, HAND_ITEMS, normalized=normalized)
    assert (result.correct, result.total, result.accuracy) == (3, 3, 1.0)

    wrong = forced_model(tokenizer, choice_tokens(tokenizer, lambda item: (item.label + 1) % 3))
    result = accuracy(score_items(wrong, tokenizer, HAND_ITEMS), HAND_ITEMS, normalized=normalized)
    assert (result.correct, result.accuracy) == (0, 0.0)


def direct_loglik(model, tokenizer, context: str, choice: str) -> float:
    """log p(choice | BOS + context) from one forward pass over the whole sequence, full logits."""
    context_len = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = [tokenizer.bos_token_id] + tokenizer(context + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(logprobs[j - 1, ids[j]]) for j in range(1 + context_len, len(ids)))


def test_loglik_matches_a_direct_computation(random_model, tokenizer):
    pool = load_task("jcommonsenseqa", "train")
    prefix = fewshot_prefix("jcommonsenseqa", fewshot_examples("jcommonsenseqa", 2, seed=0, pool=pool, exclude_id=None))
    items = load_task("jcommonsenseqa")[:2] + load_task("jnli")[:1]
    scores = score_items(random_model, tokenizer, items, prefix=prefix, batch_size=4)
    for item, s in zip(items, scores):
        expected = [direct_loglik(random_model, tokenizer, prefix + item.context, c) for c in item.choices]
        assert s.loglik == pytest.approx(expected, abs=1e-5)
        assert s.tokens == tuple(len(continuation_ids(tokenizer, prefix + item.context, c)) for c in item.choices)
        assert s.chars == tuple(len(c) - 1 for c in item.choices)  # without the leading space
        assert all(ll < 0 for ll in s.loglik)


def test_batch_size_does_not_change_scores(random_model, tokenizer):
    items = load_task("jcommonsenseqa")[:6] + load_task("jnli")[:4]
    one = score_items(random_model, tokenizer, items, batch_size=1)
    eight = score_items(random_model, tokenizer, items, batch_size=8)
    for a, b in zip(one, eight, strict=True):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-5)
        assert (a.tokens, a.chars) == (b.tokens, b.chars)


def test_scoring_restores_training_mode(random_model, tokenizer):
    random_model.train()
    try:
        score_items(random_model, tokenizer, HAND_ITEMS[:1])
        assert random_model.training
    finally:
        random_model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_length_normalization_divides_by_characters_not_tokens():
    items = [Item("x", "ctx", (" ab", " abcdef"), 1)]
    # Sum: -4 > -6 picks choice 0. Per character: -4/2 = -2 < -6/6 = -1 picks choice 1. Per token it would be
    # -4/4 = -1 > -6/1 = -6, choice 0 again.
    scores = [ChoiceScores(loglik=(-4.0, -6.0), tokens=(4, 1), chars=(2, 6))]
    assert accuracy(scores, items, normalized=False).correct == 0
    assert accuracy(scores, items, normalized=True).correct == 1


def test_ties_go_to_the_first_choice():
    items = [Item("x", "ctx", (" a", " b"), 1)]
    assert accuracy([ChoiceScores((-1.0, -1.0), (1, 1), (1, 1))], items, normalized=False).correct == 0


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert (round(low, 3), round(high, 3)) == (0.404, 0.596)
    # By hand: p = 81/263, centre (p + z²/2n) / (1 + z²/n) = 0.31074, half-width 0.05546.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


@pytest.mark.parametrize("successes,total", [(0, 10), (10, 10), (0, 1), (1, 1), (0, 1119), (1119, 1119)])
def test_wilson_interval_edges_stay_in_unit_interval(successes, total):
    low, high = wilson_interval(successes, total)
    assert 0.0 <= low <= successes / total <= high <= 1.0
    assert high - low > 0
    # At 0 successes the upper end is z^2 / (n + z^2); symmetric at n.
    z2 = 1.959963984540054**2
    if successes == 0:
        assert low == 0.0 and high == pytest.approx(z2 / (total + z2))
    if successes == total:
        assert high == 1.0 and low == pytest.approx(total / (total + z2))


def test_accuracy_carries_the_interval():
    items = [Item(str(i), "ctx", (" a", " b"), i % 2) for i in range(100)]
    scores = [ChoiceScores((0.0, -1.0), (1, 1), (1, 1))] * 100  # always choice 0: right on even items
    result = accuracy(scores, items, normalized=False)
    assert (result.correct, result.total, result.accuracy) == (50, 100, 0.5)
    assert (result.ci_low, result.ci_high) == wilson_interval(50, 100)
    assert math.isnan(accuracy([], [], normalized=True).accuracy)


# ---------------------------------------------------------------------------------------------------------------
# Few-shot


def test_fewshot_examples_are_seeded():
    pool = load_task("jcommonsenseqa", "train")
    first = fewshot_examples("jcommonsenseqa", 3, seed=7, pool=pool, exclude_id=None)
    assert len(first) == 3
    assert first == fewshot_examples("jcommonsenseqa", 3, seed=7, pool=pool, exclude_id=None)
    assert first != fewshot_examples("jcommonsenseqa", 3, seed=8, pool=pool, exclude_id=None)


def test_fewshot_examples_never_include_the_excluded_item():
    pool = load_task("jnli")
    for seed in range(20):
        drawn = fewshot_examples("jnli", 4, seed=seed, pool=pool, exclude_id=None)
        # Exclude an item the draw would otherwise contain: it must be replaced, still 4 examples.
        excluded = drawn[seed % 4].id
        again = fewshot_examples("jnli", 4, seed=seed, pool=pool, exclude_id=excluded)
        assert len(again) == 4 and excluded not in {ex.id for ex in again}
    small = pool[:3]
    assert len(fewshot_examples("jnli", 2, seed=0, pool=small, exclude_id=small[0].id)) == 2
    with pytest.raises(JpadaptError, match="pool has only 2"):
        fewshot_examples("jnli", 3, seed=0, pool=small, exclude_id=small[0].id)


def test_fewshot_prefix_renders_solved_examples_separated_by_blank_lines():
    prefix = fewshot_prefix("jnli", HAND_ITEMS[:2])
    assert prefix == "Q: Which is a fruit?\nA: apple\n\nQ: Which is a color?\nA: green\n\n"
    assert fewshot_prefix("jnli", []) == ""
    with pytest.raises(JpadaptError, match="unknown JGLUE task"):
        fewshot_prefix("jsquad", [])
