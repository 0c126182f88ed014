"""eval/multiple_choice.py: harness-style multiple-choice scoring on a tiny random LLaMA with the bundled LLaMA-2
tokenizer (items from eval.tasks), multiple-input items, and the metrics. Loading, prompts and few-shot draws of the
tasks are tested in tests/test_tasks.py.

Forced answers: the model's lm_head is replaced by a zero-weight linear layer whose bias is +20 on chosen
tokens and -20 on all others, so every position predicts the same distribution and a choice made only of
favored tokens out-scores any choice with an unfavored token by about 40 nats per such token.
"""

from __future__ import annotations

import math

import pytest
import torch

from eval.multiple_choice import (
    ChoiceScores,
    Item,
    accuracy,
    chance_and_majority,
    longest_request,
    score_items,
    wilson_interval,
)
from eval.tasks import get_task, mc_items
from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError
from pipeline.models import load_causal_lm
from tokenizer.hf import load_hf_tokenizer

# Every choice is one LLaMA-2 token ("▁apple", ...); the correct ones share no token with the wrong ones.
HAND_ITEMS = [
    Item("a", "Q: Which is a fruit?\nA:", (" apple", " river", " stone"), 0),
    Item("b", "Q: Which is a color?\nA:", (" cloud", " green", " house"), 1),
    Item("c", "Q: Which is a fruit too?\nA:", (" table", " window", " orange"), 2),
]


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
# Baselines


def test_chance_and_majority():
    chance, majority = chance_and_majority(mc_items("jnli"))
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
    spec = get_task("jcommonsenseqa")
    prefix = spec.prefix(spec.fewshot(spec.load()[0], 2, seed=0, pool=spec.load("train")))
    assert prefix.count("\n\n") == 2 and prefix.startswith("質問: ")
    items = mc_items("jcommonsenseqa")[:2] + mc_items("jnli")[:1]
    scores = score_items(random_model, tokenizer, items, prefix=prefix, batch_size=4)
    for item, s in zip(items, scores):
        expected = [direct_loglik(random_model, tokenizer, prefix + item.context, c) for c in item.choices]
        assert s.loglik == pytest.approx(expected, abs=1e-5)
        assert s.tokens == tuple(len(continuation_ids(tokenizer, prefix + item.context, c)) for c in item.choices)
        assert s.chars == tuple(len(c) - 1 for c in item.choices)  # without the leading space
        assert all(ll < 0 for ll in s.loglik)


def test_multiple_input_item_scores_each_context_with_the_shared_continuation(random_model, tokenizer):
    """The harness's "multiple input" mode (XWinograd): choice i is `contexts[i] + choices[i]`; `context` is unused."""
    contexts = ("The city councilmen refused the demonstrators a permit because the city councilmen",
                "The city councilmen refused the demonstrators a permit because the demonstrators")
    item = Item("w", "never read", (" feared violence.",) * 2, 0, contexts=contexts)
    swapped = Item("w2", "", item.choices, 1, contexts=contexts[::-1])
    prefix = "Q: Which is a fruit?\nA: apple\n\n"
    scores = score_items(random_model, tokenizer, [item, swapped], prefix=prefix, batch_size=3)
    expected = [direct_loglik(random_model, tokenizer, prefix + context, " feared violence.") for context in contexts]
    assert scores[0].loglik == pytest.approx(expected, abs=1e-5)
    assert scores[1].loglik == pytest.approx(expected[::-1], abs=1e-5)
    assert expected[0] != pytest.approx(expected[1], abs=1e-3)  # the contexts do change the score
    assert scores[0].chars == (len("feared violence."),) * 2
    n = len(continuation_ids(tokenizer, prefix + contexts[0], " feared violence."))
    assert scores[0].tokens[0] == n >= 3
    assert item.context_of(1) == contexts[1] and HAND_ITEMS[0].context_of(2) == HAND_ITEMS[0].context


def test_trailing_whitespace_of_the_context_moves_onto_the_choice(random_model, tokenizer):
    """A context ending in a space is scored as the context without it and the choice with it (harness
    `_encode_pair`): "A: " + "apple" scores like "A:" + " apple", one token "▁apple"."""
    moved = Item("s", "Q: Which is a fruit?\nA: ", ("apple", "river"), 0)
    [scores] = score_items(random_model, tokenizer, [moved])
    expected = [direct_loglik(random_model, tokenizer, "Q: Which is a fruit?\nA:", c) for c in (" apple", " river")]
    assert scores.loglik == pytest.approx(expected, abs=1e-5)
    assert scores.tokens == (1, 1)


def test_a_choice_without_a_token_of_its_own_is_an_error(random_model, tokenizer):
    with pytest.raises(JpadaptError, match="gives no token of its own"):
        score_items(random_model, tokenizer, [Item("e", "Q: x\nA:", (" apple", ""), 0)])


def test_longest_request_counts_the_start_token_and_the_prefix(random_model, tokenizer):
    prefix = "Q: Which is a fruit?\nA: apple\n\n"
    lengths = {item.id: 1 + max(len(tokenizer(prefix + item.context + c, add_special_tokens=False)["input_ids"])
                                for c in item.choices) for item in HAND_ITEMS}
    longest = max(lengths.values())
    assert longest_request(tokenizer, HAND_ITEMS, prefix) == (longest, next(i for i, n in lengths.items()
                                                                             if n == longest))
    with pytest.raises(JpadaptError, match="more than the model's 8 positions"):
        score_items(random_model, tokenizer, HAND_ITEMS[:1], max_length=8)


def test_no_items_give_no_requests(random_model, tokenizer):
    assert longest_request(tokenizer, []) == (0, "")  # its max(..., default=(0, "")) means to allow this
    assert score_items(random_model, tokenizer, [], progress=False) == []


def test_batch_size_does_not_change_scores(random_model, tokenizer):
    items = mc_items("jcommonsenseqa")[:6] + mc_items("jnli")[:4]
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
