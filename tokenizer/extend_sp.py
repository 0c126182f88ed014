"""Add Japanese pieces to a SentencePiece model (LLaMA-2, Mistral, llm-jp, Gemma), the Chinese-LLaMA way.

1. `learn_candidates`: train a SentencePiece model (BPE or unigram) on the Japanese training text, optionally
   segmented by fugashi first (`pretokenization_delimiter` between morphemes, so no piece crosses a morpheme
   boundary).
2. `merge_pieces`: append its best pieces that the base lacks to the base model proto. Nothing else in the
   proto changes (normalizer, byte fallback, special pieces), so every base piece keeps its id.

How appended pieces are found by the encoder depends on the base model's type:
- BPE bases (LLaMA-2, Mistral, Gemma): encoding merges adjacent symbols whose concatenation is a piece, highest
  score first. A new piece must therefore be the concatenation of two pieces that exist (base or new), and its
  score decides when it merges. New pieces get scores above every base piece, in the candidate model's order, so
  on Japanese text they win over the few Japanese merges the base has. Only pieces holding a Japanese character
  are added, so English text never meets them: English ids stay identical.
- Unigram bases (llm-jp): the encoder picks the segmentation with the highest total score, so any piece is
  reachable; new pieces keep the log-probabilities of a unigram candidate model.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from pipeline.errors import JpadaptError

# Hiragana, katakana, CJK ideographs (ext. A, unified, compatibility), CJK punctuation, half/fullwidth forms.
JAPANESE_CHAR = re.compile(r"[\u3000-\u303f\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
MORPHEME_DELIMITER = "\u241f"  # '␟', absent from real text; SentencePiece drops it and never learns across it
SPACE_MARK = "\u2581"
NORMAL = sp_pb.ModelProto.SentencePiece.NORMAL
MODEL_TYPES = {sp_pb.TrainerSpec.UNIGRAM: "unigram", sp_pb.TrainerSpec.BPE: "bpe"}
# SentencePiece skips training sentences longer than max_sentence_length bytes; lines are cut below it.
MAX_LINE_CHARS = 4000


@dataclass(frozen=True)
class SpExtension:
    """What `merge_pieces` appended: `new_ids` are contiguous from `base_size`."""

    base_size: int
    new_ids: list[int]
    new_pieces: list[str]
    candidates: int  # Japanese candidates the base lacked, before the `new_tokens` cut
    seconds: float  # learning the candidate model


def has_japanese(text: str) -> bool:
    return JAPANESE_CHAR.search(text) is not None


def read_model(path: Path) -> sp_pb.ModelProto:
    try:
        return sp_pb.ModelProto.FromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, OSError
        raise JpadaptError(f"{path}: not a SentencePiece model ({exc})") from exc


def model_type(model: sp_pb.ModelProto) -> str:
    """"bpe" or "unigram"; word/char models have no merges or scores to extend."""
    kind = MODEL_TYPES.get(model.trainer_spec.model_type)
    if kind is None:
        raise JpadaptError(
            f"SentencePiece model type {sp_pb.TrainerSpec.ModelType.Name(model.trainer_spec.model_type)} "
            "cannot be extended (supported: BPE, unigram)"
        )
    return kind


def training_lines(texts: Iterable[str]) -> list[str]:
    """Non-empty lines, long ones cut."""
    lines: list[str] = []
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_LINE_CHARS):
                piece = line[start : start + MAX_LINE_CHARS]
                if piece.strip():
                    lines.append(piece)
    return lines


def morpheme_segmented(lines: Sequence[str]) -> list[str]:
    """Each line with MORPHEME_DELIMITER between fugashi morphemes; a morpheme keeps the spaces before it."""
    import fugashi

    tagger = fugashi.Tagger()
    return [MORPHEME_DELIMITER.join(node.white_space + node.surface for node in tagger(line)) for line in lines]


def learn_candidates(
    lines: Sequence[str], *, algorithm: str, vocab_size: int, morpheme_pretokenize: bool, threads: int = 2
) -> sp_pb.ModelProto:
    """A SentencePiece model of `vocab_size` pieces (fewer if the text cannot support that many)."""
    if not lines:
        raise JpadaptError("no Japanese training text to learn new tokens from")
    sentences = morpheme_segmented(lines) if morpheme_pretokenize else list(lines)
    options: dict[str, object] = {
        "model_type": algorithm,
        "vocab_size": vocab_size,
        "character_coverage": 0.9995,
        "split_digits": True,  # as LLaMA-2's model: no number pieces
        "byte_fallback": False,
        "hard_vocab_limit": False,  # a smaller model instead of an error; the caller counts what is usable
        "max_sentence_length": MAX_LINE_CHARS * 4 + 16,  # bytes: 4 per character at most, plus delimiters
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "num_threads": threads,
        "minloglevel": 2,
    }
    if morpheme_pretokenize:
        options["pretokenization_delimiter"] = MORPHEME_DELIMITER
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **options)
    except RuntimeError as exc:
        raise JpadaptError(f"learning Japanese candidate tokens failed: {exc}") from exc
    return sp_pb.ModelProto.FromString(writer.getvalue())


def candidate_pieces(candidates: sp_pb.ModelProto, base_pieces: set[str]) -> list[sp_pb.ModelProto.SentencePiece]:
    """Normal pieces with a Japanese character that the base lacks, best first.

    Unigram: by score. BPE: characters first, then merged pieces in merge order. A BPE model lists its
    characters last, but a character the base lacks costs 2-3 byte-fallback tokens at every occurrence, so it
    pays more than any merge.
    """
    pieces = [
        p for p in candidates.pieces if p.type == NORMAL and p.piece not in base_pieces and has_japanese(p.piece)
    ]
    if model_type(candidates) == "unigram":
        pieces.sort(key=lambda p: -p.score)
    else:
        pieces.sort(key=lambda p: len(p.piece) > 1)  # stable: each group keeps its order
    return pieces


def _reachable(piece: str, vocab: set[str]) -> bool:
    """A BPE encoder can build `piece` by merging two symbols: existing pieces, or single characters (encoding
    starts from characters, known or not)."""

    def symbol(part: str) -> bool:
        return len(part) == 1 or part in vocab

    return len(piece) == 1 or any(symbol(piece[:i]) and symbol(piece[i:]) for i in range(1, len(piece)))


def _path_to(piece: str, vocab: set[str]) -> list[str]:
    """Pieces to add, shortest first, so that a BPE encoder can build `piece`: the piece itself when it splits
    into two existing pieces, else its longest existing prefix joined to a suffix made reachable the same way."""
    if piece in vocab:
        return []
    if _reachable(piece, vocab):
        return [piece]
    cut = max(i for i in range(1, len(piece)) if piece[:i] in vocab or i == 1)
    return [*_path_to(piece[cut:], vocab), piece]


def select_for_bpe(pieces: list[str], vocab: set[str], wanted: int, *, add_intermediates: bool) -> list[str]:
    """Up to `wanted` pieces, best first, each buildable from the base and earlier picks.

    A BPE candidate model lists parents before children: a piece that is not buildable had a parent that was
    filtered out (no Japanese character, e.g. '12' under '12年') and is skipped, which keeps the budget for
    pieces the candidate model ranked. Unigram pieces have no parents: with `add_intermediates` the pieces
    they need (suffixes) are added first and count towards `wanted`, unless one lacks a Japanese character.
    """
    vocab = set(vocab)
    chosen: list[str] = []
    for piece in pieces:
        path = _path_to(piece, vocab) if add_intermediates else [piece] if _reachable(piece, vocab) else []
        if not all(map(has_japanese, path)):
            continue  # an intermediate like '......' (of '......。') would change English text
        if len(chosen) + len(path) > wanted:
            break
        chosen += path
        vocab.update(path)
    return chosen


def merge_pieces(
    base: sp_pb.ModelProto, candidates: sp_pb.ModelProto, new_tokens: int, seconds: float = 0.0
) -> tuple[sp_pb.ModelProto, SpExtension]:
    """The base proto with up to `new_tokens` candidate pieces appended (see the module docstring)."""
    base_kind = model_type(base)
    base_pieces = {p.piece for p in base.pieces}
    ranked = candidate_pieces(candidates, base_pieces)
    if base_kind == "bpe":
        chosen = select_for_bpe(
            [p.piece for p in ranked], base_pieces, new_tokens, add_intermediates=model_type(candidates) == "unigram"
        )
        top = max(p.score for p in base.pieces)
        # Strictly above every base score and decreasing in candidate order: first candidate merges first.
        scores = [top + float(len(chosen) - rank) for rank in range(len(chosen))]
    else:
        if model_type(candidates) != "unigram":
            raise JpadaptError(
                "the base tokenizer is a unigram SentencePiece model: its pieces need log-probabilities, which "
                "BPE candidates lack; set extend_vocab.algorithm: unigram"
            )
        chosen_pieces = ranked[:new_tokens]
        chosen = [p.piece for p in chosen_pieces]
        scores = [p.score for p in chosen_pieces]
    if len(chosen) < new_tokens:
        raise JpadaptError(
            f"the Japanese training text supports only {len(chosen)} new tokens that the base tokenizer lacks "
            f"(asked for {new_tokens}); lower extend_vocab.new_tokens or give more Japanese text"
        )
    extended = sp_pb.ModelProto()
    extended.CopyFrom(base)
    for piece, score in zip(chosen, scores):
        entry = extended.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, NORMAL
    base_size = len(base.pieces)
    extension = SpExtension(
        base_size=base_size,
        new_ids=list(range(base_size, base_size + len(chosen))),
        new_pieces=chosen,
        candidates=len(ranked),
        seconds=seconds,
    )
    return extended, extension


def extend_sentencepiece(
    base_file: Path,
    texts: Iterable[str],
    new_tokens: int,
    *,
    algorithm: str,
    morpheme_pretokenize: bool,
    threads: int = 2,
) -> tuple[sp_pb.ModelProto, SpExtension]:
    """Learn candidates on `texts` and append the best `new_tokens` to the model in `base_file`.

    The candidate model is trained larger than `new_tokens` because some of its pieces are already in the base
    (or are not reachable); if that is still too few, it is trained once more, twice as large.
    """
    base = read_model(base_file)
    if model_type(base) == "unigram" and algorithm != "unigram":
        raise JpadaptError(
            f"{base_file} is a unigram SentencePiece model: set extend_vocab.algorithm: unigram "
            "(its pieces need log-probabilities, which BPE candidates lack)"
        )
    lines = training_lines(texts)
    # SentencePiece needs a piece per covered character on top of the multi-character pieces.
    size = int(new_tokens * 1.25) + len(set().union(*map(set, lines))) + 100
    started = time.monotonic()
    for attempt in range(2):
        candidates = learn_candidates(
            lines, algorithm=algorithm, vocab_size=size, morpheme_pretokenize=morpheme_pretokenize, threads=threads
        )
        try:
            return merge_pieces(base, candidates, new_tokens, seconds=time.monotonic() - started)
        except JpadaptError:
            if attempt == 1 or len(candidates.pieces) < size:  # the text gave all it has
                raise
            size *= 2
    raise AssertionError("unreachable")


def write_sentencepiece_folder(model: sp_pb.ModelProto, out_dir: Path, base_config: Path | None) -> None:
    """`tokenizer.model` plus a Hugging Face folder (tokenizer.json, tokenizer_config.json) converted from it.

    The base folder's tokenizer_config.json is kept when there is one (chat template, special tokens); bundled
    SentencePiece models have none, and LLaMA-2's settings (BOS added, no EOS) are used.
    """
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.SerializeToString())
    if base_config is not None:
        config = json.loads(base_config.read_text(encoding="utf-8"))
    else:
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
        for piece in model.pieces:
            if piece.type == sp_pb.ModelProto.SentencePiece.UNKNOWN:
                config["unk_token"] = piece.piece
        for key, piece_id in (("bos_token", model.trainer_spec.bos_id), ("eos_token", model.trainer_spec.eos_id)):
            if 0 <= piece_id < len(model.pieces):
                config[key] = model.pieces[piece_id].piece
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    if len(tokenizer) != len(model.pieces):
        raise JpadaptError(
            f"transformers converted the extended SentencePiece model to {len(tokenizer)} tokens, "
            f"not {len(model.pieces)}: tokenizer_class {config.get('tokenizer_class')!r} does not fit this model"
        )
    tokenizer.save_pretrained(str(out_dir))
    if model_type(model) == "bpe":
        order_merges_by_score(out_dir / "tokenizer.json", model)


def order_merges_by_score(tokenizer_json: Path, model: sp_pb.ModelProto) -> None:
    """Rank the converted merges as SentencePiece applies them: by the score of the merged piece.

    transformers' converter does not (LLaMA-2's own file then splits runs of spaces differently from its
    `tokenizer.model`, and appended pieces would lose to base merges). Sorted, the `tokenizers` BPE gives
    SentencePiece's ids on the whole bundled held-out, Japanese and English (tested).
    """
    config = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    score = {p.piece: p.score for p in model.pieces}
    merges = config["model"]["merges"]

    def merged(merge: str | list[str]) -> str:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        return left + right

    config["model"]["merges"] = sorted(merges, key=lambda merge: -score[merged(merge)])  # stable: ties keep order
    tokenizer_json.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
