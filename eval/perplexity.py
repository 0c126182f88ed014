"""Loss, perplexity and bits per byte of a causal LM on raw texts, comparable across tokenizers.

    result = bits_per_byte(model, tokenizer, texts, window=1024, stride=512)
    result.bits_per_byte, result.loss, result.ppl, result.tokens, result.bytes

Loss per token and perplexity depend on the tokenizer (a tokenizer with longer tokens has fewer, harder
tokens); bits per byte does not: it is the total negative log-likelihood of the text in bits divided by its
UTF-8 bytes, so a base model and its vocabulary-extended version can be compared on the same text.

The convention, exactly:
* Each text is one document, tokenized alone without special tokens (`add_special_tokens=False`).
* With `add_bos` (default), one start token is put before it: the tokenizer's BOS, or its EOS when it has no
  BOS (Qwen; EOS is then the document separator the model saw in pretraining, as lm-evaluation-harness does).
  The start token is context only, never scored, so every token of the text is scored, the first included.
  Without `add_bos`, or with a tokenizer that has neither, the first token of each text has no context and is
  not scored (its bytes still count, so the figure is a little optimistic).
* `tokens` counts the scored tokens; `bytes` the UTF-8 bytes of all texts (the text as given, not any
  dummy-prefix space a SentencePiece tokenizer adds); `nats` the summed negative log-likelihood.
* Long documents: sliding windows (the Hugging Face "perplexity of fixed-length models" recipe). A window
  holds at most `window` tokens; the first scores all its tokens, each next one moves `stride` tokens further
  and scores only the tokens it adds, with the rest as context. Every token is scored exactly once, with up to
  `window - 1` tokens of context (at least `window - stride` once past the first window). With
  `stride == window` a window would add a token that has no context inside it, so windows then advance by
  `window - 1` (the HF recipe instead silently drops that token).
* Windows of all documents are batched, longest first, right-padded; logits are computed only for the scored
  tail of each batch (`logits_to_keep`), and log-softmax in float32. Totals are summed in float64 in document
  order, so the result does not depend on `batch_size` beyond float rounding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pipeline.errors import JpadaptError


@dataclass(frozen=True)
class LossResult:
    """Summed negative log-likelihood of some texts, with what it was summed over."""

    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the texts
    nats: float  # total negative log-likelihood, natural log

    @property
    def loss(self) -> float:
        """Mean cross-entropy per scored token, in nats (what training logs as the loss)."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan

    @property
    def ppl(self) -> float:
        """Per-token perplexity: only comparable between models that share a tokenizer."""
        return math.exp(self.loss) if self.tokens else math.nan

    def to_dict(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nats": self.nats,
            "loss": self.loss,
            "ppl": self.ppl,
            "bits_per_byte": self.bits_per_byte,
        }


@dataclass(frozen=True)
class Window:
    """Token ids [begin, end) of one document, of which the last `scored` are scored (end - begin <= window)."""

    doc: int
    begin: int
    end: int
    scored: int


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for a sequence of `n_tokens` ids whose first id is context only.

    Targets are positions 1..n_tokens-1; each is in exactly one window's scored tail, predicted from the
    positions before it inside that window.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if n_tokens < 2:
        return []
    step = min(stride, window - 1)
    end = min(window, n_tokens)
    spans = [(0, end, end - 1)]
    while end < n_tokens:
        new_end = min(end + step, n_tokens)
        spans.append((new_end - window, new_end, new_end - end))
        end = new_end
    return spans


def start_token_id(tokenizer: Any) -> int | None:
    """The id put before each document: BOS, else EOS, else None."""
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    return None


def bits_per_byte(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int,
    stride: int,
    batch_size: int = 8,
    add_bos: bool = True,
    progress: bool = False,
) -> LossResult:
    """Negative log-likelihood of `texts` under `model` (see the module docstring for the exact convention).

    Arguments:
        model: a transformers causal LM; evaluated in eval mode under no_grad, its train/eval mode restored.
        tokenizer: the transformers tokenizer that matches the model (only ids and BOS/EOS ids are used).
        texts: documents; empty ones count nothing.
        window: most tokens per forward pass (at least 2); stride: tokens scored per window after the first.
        batch_size: windows per forward pass.
        add_bos: put the start token (BOS, else EOS) before each document.
        progress: a tqdm bar over batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    windows(2, window, stride)  # checks window and stride even when there is no text
    texts = list(texts)
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    docs = _encode(tokenizer, texts, add_bos)
    vocab = vocab_rows(model)
    for i, ids in enumerate(docs):
        if ids and max(ids) >= vocab:
            raise JpadaptError(
                f"text {i}: the tokenizer gives id {max(ids)} but the model has only {vocab} embedding rows "
                "(is this the model's tokenizer?)"
            )
    spans = [Window(d, b, e, s) for d, ids in enumerate(docs) for b, e, s in windows(len(ids), window, stride)]
    rows = [docs[w.doc][w.begin : w.end] for w in spans]
    nats = score_tails(model, rows, [w.scored for w in spans], batch_size, "bits/byte", progress)
    return LossResult(tokens=sum(w.scored for w in spans), bytes=total_bytes, nats=math.fsum(nats))


def _encode(tokenizer: Any, texts: list[str], add_bos: bool) -> list[list[int]]:
    start = start_token_id(tokenizer) if add_bos else None
    prefix = [] if start is None else [start]
    docs = []
    for text in texts:
        # verbose=False: documents longer than the tokenizer's model_max_length are expected here (windows).
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
        docs.append(prefix + list(ids) if ids else [])
    return docs


def accepts_logits_to_keep(model: Any) -> bool:
    """transformers' causal LMs (v4.50+) compute logits only for the last N positions when asked; a PEFT
    wrapper passes the argument through to the model it wraps. Other models get full logits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def vocab_rows(model: Any) -> int:
    weight = model.get_input_embeddings().weight
    # Under DeepSpeed ZeRO-3 each rank holds a flat shard; `ds_shape` is the full shape.
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def score_tails(model: Any, rows: list[list[int]], scored: list[int], batch_size: int, desc: str,
                progress: bool = True) -> list[float]:
    """`tail_nats` of every row, in batches of `batch_size` rows taken longest first, most-scored first among
    equal lengths (little padding and few kept logits in each batch; the first batch shows at once if memory is
    short), in eval mode without gradients; the model's
    train/eval mode is restored afterwards. Results are in the order of `rows`."""
    # Longest first, and among equal lengths most-scored first: a first window (all positions scored) and a
    # later one (only its stride scored) in one batch would make the whole batch keep every position's logits.
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), -scored[i], i))
    nats = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep_logits = accepts_logits_to_keep(model)
    try:
        with torch.no_grad():  # not inference_mode: cpt scores its live (ZeRO-3) engine between steps
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
                chunk = order[start : start + batch_size]
                values = tail_nats(model, [rows[i] for i in chunk], [scored[i] for i in chunk], device, keep_logits)
                for i, value in zip(chunk, values):
                    nats[i] = value
    finally:
        model.train(was_training)
    return nats


def tail_nats(model: Any, rows: list[list[int]], scored: list[int], device: torch.device,
              keep_logits: bool) -> list[float]:
    """For each token row, the summed negative log-likelihood (nats) of its last `scored` tokens given all the
    tokens before them. One right-padded forward pass; log-softmax in float32, sums in float64. Also the
    multiple-choice scorer's (`eval.multiple_choice`): a continuation is the scored tail of context + continuation."""
    lengths = [len(row) for row in rows]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : lengths[index]] = torch.tensor(row)
        mask[index, : lengths[index]] = 1
    # Logits at position p predict token p + 1: a row's scored tokens [len - scored, len) are predicted by
    # positions [len - scored - 1, len - 1). Keep the last `keep` positions, enough for every row's tail.
    keep = max(width - n + k + 1 for n, k in zip(lengths, scored))
    kwargs: dict[str, Any] = {"use_cache": False}
    if bool((mask == 0).any()):
        kwargs["attention_mask"] = mask.to(device)
    if keep_logits:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids.to(device), **kwargs).logits
    first_kept = width - logits.shape[1]  # the position of logits[:, 0]
    results = []
    for index, (n, k) in enumerate(zip(lengths, scored)):
        lo = n - k - 1 - first_kept
        row_logits = logits[index, lo : lo + k].float()
        targets = input_ids[index, n - k : n].to(row_logits.device)
        nll = torch.nn.functional.cross_entropy(row_logits, targets, reduction="sum")
        results.append(float(nll.double()))
    return results
