"""Grow a model's embeddings for an extended vocabulary and give the new rows a useful start.

    summary = extend_embeddings(model, new_ids, pieces, vocab_size=padded, method="mean")

The base tokenizer's ids keep their rows (bit for bit); each new token's row is built from the base rows:

* `mean` — the mean of the base rows of its pieces: `pieces[i]` are the base-tokenizer ids the base tokenizer
  splits new token i into. The input side averages input embeddings, the output side (an untied lm_head)
  averages output embeddings. A new token then starts close to "what the model thinks of its pieces", which is
  what keeps the loss of an extended model near the base model's at step 0 (Hewitt 2021; Gee et al. 2022).
* `random` — normal draws with the per-dimension mean and std of the base rows (seeded): the control.
* `focus` — FOCUS-style (Dobler & de Melo, 2023): a weighted mean of base rows, the weights the sparsemax of
  the cosine similarities between the new token and the base tokens in an auxiliary embedding space learned on
  Japanese text tokenized with the extended tokenizer. FOCUS trains fastText for that space; here it is PPMI
  co-occurrence vectors reduced by a truncated SVD (Levy, Goldberg & Dagan 2015), a few seconds of numpy
  (`aux_vectors`). Candidates are the base tokens that occur in that text; a new token that never occurs in
  it (so has no vector) falls back to `mean` and is counted.

Rows. `vocab_size` is the number of rows wanted (the caller pads it, e.g. to a multiple of 64). The matrix
never shrinks: a model may already have more rows than its tokenizer has tokens (Qwen2.5: 151,936 rows for
151,665 tokens); then the new ids that fall inside those rows are overwritten and the other rows kept.
Padding rows (ids this function adds that are not new tokens, so never produced by the tokenizer) get the
mean of the base rows. The base rows are the ids below `base_size` (default: the smallest new id, which is the
base tokenizer's size when new ids are appended after it); statistics and pieces use only them.

Tied embeddings (one tensor for input and output, e.g. Gemma) stay tied and are written once, from the input
side; an untied lm_head gets its own rows from the base output rows (and its bias, if any, the same mix).
Everything is computed in float32 and written in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import JpadaptError

METHODS = ("mean", "random", "focus")
# Rows per chunk when reading large (possibly bf16) embedding matrices: bounds float32 copies to chunk x hidden.
_ROW_CHUNK = 32_768


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def extend_embeddings(
    model: Any,
    new_ids: Sequence[int],
    pieces: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    method: Literal["mean", "random", "focus"] = "mean",
    seed: int = 0,
    focus_corpus: Sequence[np.ndarray] | None = None,
    base_size: int | None = None,
) -> dict[str, Any]:
    """Resize `model`'s input and output embeddings to `vocab_size` rows and initialise the new tokens' rows.

    Arguments:
        model: a transformers causal LM (anything with get/set_input_embeddings, get_output_embeddings and
            resize_token_embeddings). Changed in place; call this right after loading, before any training.
        new_ids: the extended tokenizer's ids of the added tokens (all >= base_size, distinct, < vocab_size).
        pieces: for each new id, the base-tokenizer ids that the base tokenizer encodes the new token's text
            into (at least one; all < base_size).
        vocab_size: rows wanted; if the model already has more, it keeps them.
        method: "mean", "random" or "focus" (see the module docstring).
        seed: for the "random" draws ("mean" and "focus" are deterministic: the SVD is an exact eigensolve).
        focus_corpus: "focus" only: Japanese text as id arrays of the EXTENDED tokenizer (one per document).
        base_size: the base tokenizer's size; default min(new_ids) (the model's rows if there are no new ids).

    Returns a small JSON-able summary: method, rows_before, rows_after, base_rows, new_rows (initialised),
    new_inside_old_rows (new ids that overwrote existing rows), padding_rows, fallbacks (focus: new tokens
    initialised by `mean` instead), tied, and for focus the auxiliary-space figures.
    """
    if method not in METHODS:
        raise JpadaptError(f"embedding init method {method!r}: expected one of {', '.join(METHODS)}")
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    rows_before = int(inp.weight.shape[0])
    tied = out is not None and _same_tensor(out.weight, inp.weight)
    new = np.asarray(list(new_ids), dtype=np.int64)
    base = _check_ids(new, pieces, rows_before, vocab_size, base_size)
    rows_after = max(rows_before, vocab_size)

    # Every new row is a function of base rows only, so it is computed before the resize and written after it.
    # A bias of the output layer (rare; LLaMA, Qwen and Gemma have none) is treated as one more column.
    out_weight = None if out is None or tied else out.weight
    out_bias = None if out is None or getattr(out, "bias", None) is None else out.bias[:, None]
    fallbacks, focus_info = 0, None
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        in_rows, out_rows, bias_rows = (
            None if w is None else _random_rows(w, base, len(new), gen) for w in (inp.weight, out_weight, out_bias)
        )
    else:
        mix = _mean_mix(pieces)
        if method == "focus":
            if focus_corpus is None:
                raise JpadaptError(
                    "embedding init 'focus' needs focus_corpus (Japanese text as extended-tokenizer ids)"
                )
            mix, focus_info = _focus_mix(new, base, focus_corpus, rows_after, mix)
            fallbacks = focus_info.pop("fallbacks")
        in_rows, out_rows, bias_rows = (
            None if w is None else _mixed_rows(w, mix, len(new)) for w in (inp.weight, out_weight, out_bias)
        )

    if rows_after > rows_before:
        # mean_resizing=False: transformers' own init of the added rows is overwritten below anyway, and its
        # mean resizing samples from the full covariance (a hidden x hidden Cholesky), wasted work here.
        model.resize_token_embeddings(rows_after, mean_resizing=False)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and not _same_tensor(out.weight, inp.weight):
        raise RuntimeError("resizing untied the input and output embeddings")  # a transformers bug, not user input
    padding = np.setdiff1d(np.arange(rows_before, rows_after), new)

    with torch.no_grad():
        _write(inp.weight, new, in_rows, padding, base)
        if out_rows is not None:
            _write(out.weight, new, out_rows, padding, base)
        if bias_rows is not None:
            _write(out.bias[:, None], new, bias_rows, padding, base)

    summary: dict[str, Any] = {
        "method": method,
        "rows_before": rows_before,
        "rows_after": rows_after,
        "base_rows": base,
        "new_rows": len(new),
        "new_inside_old_rows": int(np.count_nonzero(new < rows_before)),
        "padding_rows": len(padding),
        "fallbacks": fallbacks,
        "tied": bool(tied),
    }
    if focus_info is not None:
        summary["focus"] = focus_info
    return summary


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())


def _check_ids(
    new: np.ndarray, pieces: Sequence[Sequence[int]], rows: int, vocab_size: int, base_size: int | None
) -> int:
    """The number of base rows, after checking that the ids make sense together."""
    if len(pieces) != len(new):
        raise JpadaptError(f"{len(new)} new ids but {len(pieces)} piece lists: expected one per new id")
    if len(np.unique(new)) != len(new):
        raise JpadaptError("new token ids must be distinct")
    base = int(base_size) if base_size is not None else int(new.min()) if len(new) else rows
    if base > rows:
        raise JpadaptError(
            f"the model has {rows} embedding rows but the base tokenizer has {base} tokens: "
            "this model does not belong to this tokenizer"
        )
    if len(new) and (int(new.min()) < base or int(new.max()) >= max(rows, vocab_size)):
        raise JpadaptError(
            f"new token ids must lie in [{base}, {max(rows, vocab_size)}) (after the base tokenizer's "
            f"{base} ids, below the {max(rows, vocab_size)} rows); got {int(new.min())}..{int(new.max())}"
        )
    for i, ids in enumerate(pieces):
        if len(ids) == 0:
            raise JpadaptError(f"new token id {int(new[i])} has no base pieces: nothing to initialise it from")
        bad = [int(p) for p in ids if not 0 <= int(p) < base]
        if bad:
            raise JpadaptError(
                f"new token id {int(new[i])}: piece id {bad[0]} is not a base token id (base ids are 0..{base - 1})"
            )
    return base


# ---------------------------------------------------------------------------------------------------------------
# Row builders: a "mix" is sparse weights over base rows, (new-token index, base id, weight) triples


@dataclass(frozen=True)
class Mix:
    token: np.ndarray  # int64, index into new_ids
    base_id: np.ndarray  # int64
    weight: np.ndarray  # float64; the weights of one token sum to 1


def _mean_mix(pieces: Sequence[Sequence[int]]) -> Mix:
    """Equal weights over each token's pieces; a piece that occurs twice counts twice."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    token = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)
    base_id = np.fromiter((int(p) for ids in pieces for p in ids), dtype=np.int64, count=int(lengths.sum()))
    return Mix(token, base_id, 1.0 / lengths[token])


def _mixed_rows(weight: torch.Tensor, mix: Mix, n_new: int) -> torch.Tensor:
    """float32 rows: row i = sum of weight * base row over token i's triples."""
    rows = torch.zeros(n_new, weight.shape[1], dtype=torch.float32)
    step = max(1, (1 << 24) // max(1, weight.shape[1]))  # ~64 MB of gathered float32 rows at a time
    for start in range(0, len(mix.token), step):
        part = slice(start, start + step)
        gathered = weight.detach()[torch.from_numpy(mix.base_id[part])].float()
        gathered *= torch.from_numpy(mix.weight[part]).float()[:, None]
        rows.index_add_(0, torch.from_numpy(mix.token[part]), gathered)
    return rows


def base_stats(weight: torch.Tensor, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (population) std of rows [0, base), in float32, read in chunks."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    squares = torch.zeros(weight.shape[1], dtype=torch.float64)
    for start in range(0, base, _ROW_CHUNK):
        chunk = weight.detach()[start : min(base, start + _ROW_CHUNK)].double()
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    mean = total / base
    var = (squares / base - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float()


def _random_rows(weight: torch.Tensor, base: int, n_new: int, gen: torch.Generator) -> torch.Tensor:
    mean, std = base_stats(weight, base)
    return mean + std * torch.randn(n_new, weight.shape[1], generator=gen, dtype=torch.float32)


def _write(weight: torch.Tensor, new: np.ndarray, rows: torch.Tensor, padding: np.ndarray, base: int) -> None:
    if len(new):
        weight[torch.from_numpy(new)] = rows.to(weight.dtype)
    if len(padding):
        mean, _ = base_stats(weight, base)
        weight[torch.from_numpy(padding)] = mean.to(weight.dtype).expand(len(padding), -1)


# ---------------------------------------------------------------------------------------------------------------
# FOCUS-style weights


@dataclass(frozen=True)
class AuxVectors:
    """Auxiliary token vectors: `ids` (sorted) have unit-length rows in `vectors`."""

    ids: np.ndarray  # int64
    vectors: np.ndarray  # float32, len(ids) x dims
    corpus_tokens: int
    contexts: int


def aux_vectors(
    corpus: Sequence[np.ndarray],
    vocab_size: int,
    *,
    window: int = 5,
    contexts: int = 1024,
    dims: int = 100,
    alpha: float = 0.75,
) -> AuxVectors:
    """PPMI-SVD token vectors learned on `corpus` (id arrays, one per document).

    Co-occurrences are counted within `window` tokens on either side, never across documents. The context
    features are the `contexts` most frequent ids (a token x context matrix instead of token x token: the rare
    contexts add little and would make the matrix vocabulary-squared). PPMI uses context-distribution smoothing
    (counts ** alpha, Levy et al. 2015). The truncated SVD comes from the eigenvectors of the contexts x contexts
    Gram matrix, accumulated over row blocks so no dense tokens x contexts matrix is ever held; vectors are
    U * sqrt(S) (symmetric weighting), L2-normalised because only cosines are used. Tokens without any positive
    PPMI entry get no vector. Cost for 1M tokens: one sort of ~10M pair codes plus tokens x contexts^2 flops.
    """
    seq, freq = _concat_with_gaps(corpus, vocab_size, window)
    occurring = np.flatnonzero(freq)
    row_of = np.full(vocab_size, -1, dtype=np.int64)
    row_of[occurring] = np.arange(len(occurring))
    order = np.argsort(-freq, kind="stable")[: min(contexts, len(occurring))]
    n_ctx = len(order)
    ctx_of = np.full(vocab_size, -1, dtype=np.int64)
    ctx_of[order] = np.arange(n_ctx)

    codes = []
    for k in range(1, window + 1):
        left, right = seq[:-k], seq[k:]
        ok = (left >= 0) & (right >= 0)
        left, right = left[ok], right[ok]
        for word, ctx in ((left, right), (right, left)):
            c = ctx_of[ctx]
            keep = c >= 0
            codes.append(row_of[word[keep]] * n_ctx + c[keep])
    if not codes or not sum(map(len, codes)):
        return AuxVectors(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), int(freq.sum()), n_ctx)
    pair, count = np.unique(np.concatenate(codes), return_counts=True)
    row, col = pair // n_ctx, pair % n_ctx
    count = count.astype(np.float64)
    row_sum = np.bincount(row, count, minlength=len(occurring))
    ctx_p = np.bincount(col, count, minlength=n_ctx) ** alpha
    ctx_p /= ctx_p.sum()
    pmi = np.log(count) - np.log(row_sum[row]) - np.log(ctx_p[col])
    positive = pmi > 0
    row, col, value = row[positive], col[positive], pmi[positive].astype(np.float32)

    # Row blocks of the sparse PPMI matrix as dense float32 (row is sorted: pair codes sorted row-major).
    block_rows = max(1, (1 << 24) // max(1, n_ctx))  # ~64 MB per dense block
    bounds = np.searchsorted(row, np.arange(0, len(occurring) + block_rows, block_rows))

    def blocks():
        for b in range(len(bounds) - 1):
            start_row = b * block_rows
            n = min(block_rows, len(occurring) - start_row)
            if n <= 0:
                return
            dense = np.zeros((n, n_ctx), dtype=np.float32)
            lo, hi = bounds[b], bounds[b + 1]
            dense[row[lo:hi] - start_row, col[lo:hi]] = value[lo:hi]
            yield start_row, dense

    gram = np.zeros((n_ctx, n_ctx), dtype=np.float64)
    for _, dense in blocks():
        gram += dense.T @ dense
    eigval, eigvec = np.linalg.eigh(gram)  # ascending
    keep = min(dims, n_ctx)
    eigval, eigvec = eigval[::-1][:keep], eigvec[:, ::-1][:, :keep]
    useful = eigval > eigval[0] * 1e-9 if keep else np.zeros(0, bool)
    eigval, eigvec = eigval[useful], eigvec[:, useful]
    # M V = U S, so U sqrt(S) = M V S^-1/2 (S = sqrt(eigval)).
    project = (eigvec * eigval ** -0.25).astype(np.float32)
    vectors = np.zeros((len(occurring), project.shape[1]), dtype=np.float32)
    for start_row, dense in blocks():
        vectors[start_row : start_row + len(dense)] = dense @ project
    norms = np.linalg.norm(vectors, axis=1)
    has = norms > 0
    return AuxVectors(
        ids=occurring[has],
        vectors=vectors[has] / norms[has, None],
        corpus_tokens=int(freq.sum()),
        contexts=n_ctx,
    )


def _concat_with_gaps(corpus: Sequence[np.ndarray], vocab_size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents in one array, `window` -1s between them so that no pair within the window crosses one."""
    parts: list[np.ndarray] = []
    gap = np.full(window, -1, dtype=np.int64)
    for i, doc in enumerate(corpus):
        ids = np.asarray(doc, dtype=np.int64).ravel()
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise JpadaptError(
                f"focus corpus document {i}: token ids must lie in [0, {vocab_size}), found "
                f"{int(ids.min())}..{int(ids.max())} (was it tokenized with the extended tokenizer?)"
            )
        parts += [ids, gap]
    seq = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    freq = np.bincount(seq[seq >= 0], minlength=vocab_size)
    return seq, freq


def sparsemax(z: np.ndarray) -> np.ndarray:
    """Sparsemax of each row (Martins & Astudillo 2016): the Euclidean projection onto the simplex."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    tau = _sparsemax_threshold(-np.sort(-z, axis=1))
    return np.maximum(z - tau[:, None], 0.0)


def _sparsemax_threshold(z_sorted: np.ndarray) -> np.ndarray:
    """tau per row of rows sorted in descending order (the support is a prefix of the sorted row)."""
    k = np.arange(1, z_sorted.shape[1] + 1)
    cumsum = np.cumsum(z_sorted, axis=1) - 1.0
    support = (z_sorted - cumsum / k) > 0
    size = support.sum(axis=1)
    return cumsum[np.arange(len(z_sorted)), size - 1] / size


def _sparse_top(sims: np.ndarray, top: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sparsemax of each row as (column indices, weights), looking at its `top` largest entries first.

    The support of sparsemax is a prefix of the sorted row, so if fewer than `top` of the top entries are in it,
    the rest of the row cannot be: exact, without sorting whole rows of tens of thousands of candidates.
    """
    n = sims.shape[1]
    if top < n:
        idx = np.argpartition(-sims, top - 1, axis=1)[:, :top]
    else:
        idx = np.broadcast_to(np.arange(n), sims.shape)
    vals = np.take_along_axis(sims, idx, axis=1).astype(np.float64)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
    tau = _sparsemax_threshold(vals)
    result = []
    for r in range(len(sims)):
        weights = vals[r] - tau[r]
        size = int(np.count_nonzero(weights > 0))
        if size == top and top < n:  # the support may go on past the top entries: do this row in full
            full = sparsemax(sims[r][None])[0]
            cols = np.flatnonzero(full > 0)
            result.append((cols, full[cols]))
        else:
            result.append((idx[r, :size], weights[:size]))
    return result


def focus_weights(
    new_ids: Sequence[int],
    base_size: int,
    corpus: Sequence[np.ndarray],
    vocab_size: int,
    *,
    aux: AuxVectors | None = None,
    top: int = 256,
    chunk: int = 512,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """FOCUS weights: for each new id that has an auxiliary vector, (base ids, weights) with weights >= 0
    summing to 1, the sparsemax of its cosine similarities to the base tokens that have vectors.

    New ids missing from the result have no vector (they never occur in `corpus`, or only with rare contexts):
    callers fall back to another init. Also returns figures for the summary.
    """
    aux = aux if aux is not None else aux_vectors(corpus, vocab_size)
    new = np.asarray(list(new_ids), dtype=np.int64)
    pos = np.full(vocab_size, -1, dtype=np.int64)
    pos[aux.ids] = np.arange(len(aux.ids))
    candidates = aux.ids[aux.ids < base_size]
    cand_vecs = aux.vectors[pos[candidates]]
    with_vec = new[pos[new] >= 0]
    weights: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    supports = []
    if len(candidates):
        for start in range(0, len(with_vec), chunk):
            ids = with_vec[start : start + chunk]
            sims = aux.vectors[pos[ids]] @ cand_vecs.T
            for token, (cols, w) in zip(ids, _sparse_top(sims, min(top, len(candidates)))):
                weights[int(token)] = (candidates[cols], w / w.sum())  # renormalise away float rounding
                supports.append(len(cols))
    info = {
        "aux": "PPMI-SVD (FOCUS-style, instead of fastText)",
        "corpus_tokens": aux.corpus_tokens,
        "context_features": aux.contexts,
        "dims": int(aux.vectors.shape[1]) if aux.vectors.ndim == 2 else 0,
        "tokens_with_vectors": len(aux.ids),
        "base_candidates": len(candidates),
        "mean_support": round(float(np.mean(supports)), 2) if supports else 0.0,
    }
    return weights, info


def _focus_mix(
    new: np.ndarray, base: int, corpus: Sequence[np.ndarray], vocab_size: int, mean_mix: Mix
) -> tuple[Mix, dict[str, Any]]:
    """FOCUS weights where a token has a vector, `mean` weights (from `mean_mix`) where it has none."""
    weights, info = focus_weights(new, base, corpus, vocab_size)
    token, base_id, weight = [], [], []
    fallback = np.ones(len(new), dtype=bool)
    for i, new_id in enumerate(new.tolist()):
        if new_id in weights:
            ids, w = weights[new_id]
            token.append(np.full(len(ids), i, dtype=np.int64))
            base_id.append(ids)
            weight.append(w)
            fallback[i] = False
    from_mean = fallback[mean_mix.token]
    token.append(mean_mix.token[from_mean])
    base_id.append(mean_mix.base_id[from_mean])
    weight.append(mean_mix.weight[from_mean])
    info["fallbacks"] = int(fallback.sum())
    mix = Mix(np.concatenate(token), np.concatenate(base_id).astype(np.int64), np.concatenate(weight))
    return mix, info
