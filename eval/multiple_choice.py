"""Multiple-choice scoring of a causal LM by choice log-likelihood, as lm-evaluation-harness defines it.

    items = [spec.mc_item(doc) for doc in TASKS["jcommonsenseqa"].load()]     # eval.tasks
    scores = score_items(model, tokenizer, items, prefix=few_shot_prefix)
    accuracy(scores, items, normalized=False).accuracy                       # the harness's `acc`
    accuracy(scores, items, normalized=True).accuracy                        # `acc_norm`

An Item is one question: `context + choices[i]` is the i-th full answer, or, in the harness's "multiple input"
mode (XWinograd), `contexts[i] + choices[i]`: different contexts, the same continuation.
Scoring is lm-evaluation-harness's multiple-choice definition, for each (context, continuation) request:
* Trailing whitespace of the context moves onto the continuation (harness `_encode_pair`).
* The context and the whole string (context + continuation) are tokenized without special tokens; the
  continuation's tokens are the whole string's tokens after the first len(context tokens). The model reads
  the whole string's tokens, so a token that merges across the boundary is scored as continuation.
* loglik = sum of log p(continuation token | everything before it); `acc` picks the argmax of loglik,
  `acc_norm` the argmax of loglik / characters of the choice (harness normalizes by `len(choice)` of the
  choice text without its target delimiter; here: the continuation without its leading whitespace, the same
  for JGLUE).
Differences from the harness:
* A start token (the tokenizer's BOS, else EOS, as in `eval.perplexity`) is always put first, as context.
  The harness (v0.4) adds BOS only with `add_bos_token=True` (set for Gemma), which the JP harness forks
  and most published Japanese scores of LLaMA-family models did with their tokenizer's default BOS; models
  are trained with it, and without it the first tokens are scored from an untrained position.
* No truncation: every sequence must fit the model's context (JGLUE questions with a few shots do).
* A continuation with no token of its own (it merged entirely into the context) is an error here; the
  harness would score it 0, i.e. as the most likely choice.
Requests are batched longest first, right-padded, one forward pass per batch without gradients
(`eval.perplexity.score_tails`), logits kept only for the continuation positions (`logits_to_keep`),
log-softmax in float32, sums in float64.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.errors import JpadaptError

# z for a two-sided 95% interval: the 0.975 quantile of the standard normal.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: `context + choices[i]` (or `contexts[i] + choices[i]`) is the i-th answer."""

    id: str
    context: str  # the prompt before the answer, without few-shot examples
    choices: tuple[str, ...]  # continuations, each with its leading separator
    label: int  # index of the correct choice
    contexts: tuple[str, ...] = ()  # per-choice contexts ("multiple input" mode); `context` is then unused

    def context_of(self, choice: int) -> str:
        return self.contexts[choice] if self.contexts else self.context


@dataclass(frozen=True)
class ChoiceScores:
    """Per choice of one item: summed log-likelihood and the lengths it can be normalized by."""

    loglik: tuple[float, ...]  # sum of log p(choice tokens | context), natural log
    tokens: tuple[int, ...]  # scored tokens of each choice
    chars: tuple[int, ...]  # characters of each choice without its leading separator


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    accuracy: float
    ci_low: float  # 95% Wilson score interval
    ci_high: float


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class _Request:
    """Token ids of one (item, choice) pair; the last `scored` ids are the continuation."""

    item: int
    choice: int
    ids: tuple[int, ...]
    scored: int


def score_items(
    model: Any, tokenizer: Any, items: list[Item], prefix: str = "", batch_size: int = 8, desc: str = "",
    max_length: int | None = None, progress: bool = True,
) -> list[ChoiceScores]:
    """Log-likelihood of every choice of every item after `prefix + item.context` (module docstring).

    The model is run in eval mode (its train/eval mode restored afterwards) on the device of its parameters.
    `max_length`: the model's positions; a longer request is an error (no truncation, as documented above).
    """
    from eval.perplexity import score_tails, vocab_rows

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    requests = _requests(tokenizer, items, prefix)
    vocab = vocab_rows(model)
    for r in requests:
        if max(r.ids) >= vocab:
            raise JpadaptError(
                f"item {items[r.item].id}: the tokenizer gives id {max(r.ids)} but the model has only {vocab} "
                "embedding rows (is this the model's tokenizer?)"
            )
        if max_length is not None and len(r.ids) > max_length:
            raise JpadaptError(
                f"item {items[r.item].id}: {len(r.ids)} tokens with its prompt and few-shot examples, more than the "
                f"model's {max_length} positions (use fewer few-shot examples)"
            )
    nats = score_tails(model, [r.ids for r in requests], [r.scored for r in requests], batch_size, desc or "multiple choice",
                       progress)
    loglik = [-value for value in nats]
    return _collect(items, requests, loglik)


def longest_request(tokenizer: Any, items: list[Item], prefix: str = "") -> tuple[int, str]:
    """(tokens, item id) of the longest sequence `score_items` would run: to check a model's context first."""
    return max(((len(r.ids), items[r.item].id) for r in _requests(tokenizer, items, prefix)), default=(0, ""))


def _requests(tokenizer: Any, items: list[Item], prefix: str) -> list[_Request]:
    # eval.perplexity imports torch: the task files and splits here are read by `validate` and `status` too.
    from eval.perplexity import start_token_id

    start = start_token_id(tokenizer)
    head = [] if start is None else [start]
    pairs = [_split_whitespace(prefix + item.context_of(c), choice) for item in items
             for c, choice in enumerate(item.choices)]
    contexts = _encode(tokenizer, [context for context, _ in pairs])
    wholes = _encode(tokenizer, [context + continuation for context, continuation in pairs])
    requests = []
    index = [(i, c) for i, item in enumerate(items) for c in range(len(item.choices))]
    for (i, c), context_ids, whole_ids in zip(index, contexts, wholes):
        scored = len(whole_ids) - len(context_ids)
        if scored < 1:
            raise JpadaptError(
                f"item {items[i].id}: choice {items[i].choices[c]!r} gives no token of its own after the context"
            )
        if not head and not context_ids:
            raise JpadaptError(f"item {items[i].id}: empty context, and the tokenizer has no BOS or EOS to stand for it")
        requests.append(_Request(item=i, choice=c, ids=tuple(head + whole_ids), scored=scored))
    return requests


def _split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation, as the harness does: tokenizers that
    attach a space to the next word would otherwise score an odd, space-less continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: a few-shot prompt may pass the tokenizer's model_max_length, which is the caller's choice.
    if not texts:  # a fast tokenizer raises IndexError on an empty batch
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _collect(items: list[Item], requests: list[_Request], loglik: list[float]) -> list[ChoiceScores]:
    per_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for r, value in zip(requests, loglik):  # requests are in item, then choice order
        per_item[r.item].append((value, r.scored))
    return [
        ChoiceScores(
            loglik=tuple(value for value, _ in scored),
            tokens=tuple(n for _, n in scored),
            chars=tuple(len(choice.lstrip()) for choice in item.choices),
        )
        for item, scored in zip(items, per_item)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def accuracy(scores: list[ChoiceScores], items: list[Item], normalized: bool) -> Accuracy:
    """Share of items whose best-scored choice is the label: by loglik (`acc`), or with `normalized` by loglik
    per character (`acc_norm`). Ties go to the first choice, as numpy's argmax in the harness."""
    if len(scores) != len(items):
        raise ValueError(f"{len(scores)} scores for {len(items)} items")
    correct = sum(_predicted(s, normalized) == item.label for s, item in zip(scores, items))
    low, high = wilson_interval(correct, len(items))
    total = len(items)
    return Accuracy(correct, total, correct / total if total else math.nan, low, high)


def _predicted(scores: ChoiceScores, normalized: bool) -> int:
    values = [ll / n for ll, n in zip(scores.loglik, scores.chars)] if normalized else list(scores.loglik)
    return values.index(max(values))


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: unlike p ± z·se it stays in [0, 1] and is not empty at
    0 or n successes. (nan, nan) for no trials."""
    if total == 0:
        return math.nan, math.nan
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # At 0 or n successes one end is exactly p, which float rounding can push just past it (0.9999999999999999
    # for n/n): clamp so the interval always holds the observed proportion and stays in [0, 1].
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def chance_and_majority(items: list[Item]) -> tuple[float, float]:
    """Baselines: the expected accuracy of a uniform random guess, and of always answering the commonest label."""
    if not items:
        return math.nan, math.nan
    chance = math.fsum(1 / len(item.choices) for item in items) / len(items)
    majority = Counter(item.label for item in items).most_common(1)[0][1] / len(items)
    return chance, majority
