"""Benchmark of vocabulary extension: the issue's targets, side by side with the base tokenizers.

    python bench/extend_vocab.py [--new-tokens 16000] [--out bench/results/extend_vocab-cpu.md]

For LLaMA-2 (SentencePiece), LLaMA-3 and Qwen (byte-level BPE), each with and without morpheme boundaries:
learn `--new-tokens` Japanese tokens from the bundled Japanese training text (raw, as shipped) and print
  - the learning time on this machine (target: minutes on 2 cores),
  - Japanese and English characters per token on the bundled held-out, base vs extended, and their ratio
    (targets: LLaMA-2 >= 1.6x on Japanese; LLaMA-3 / Qwen >= 15% fewer Japanese tokens with English
    characters per token within 1%),
  - records whose ids changed on English, and decode(encode(x)) == x failures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from data.assets import materialize, materialize_dir
from tokenizer.load import load_tokenizer

CASES = (("llama2", "sentencepiece"), ("llama3", "byte-level-bpe"), ("qwen", "byte-level-bpe"))


def texts(name: str) -> list[str]:
    with open(materialize(f"corpus/{name}.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def extend(base: str, kind: str, train: list[str], new_tokens: int, morphemes: bool, out: Path) -> float:
    """Writes the extended tokenizer folder to `out`; returns the learning time in seconds."""
    started = time.perf_counter()
    if kind == "sentencepiece":
        from tokenizer.extend_sp import extend_sentencepiece, write_sentencepiece_folder

        model, _ = extend_sentencepiece(materialize(f"tokenizers/{base}/tokenizer.model"), train, new_tokens,
                                        algorithm="bpe", morpheme_pretokenize=morphemes)
        seconds = time.perf_counter() - started
        write_sentencepiece_folder(model, out, None)
        return seconds
    from tokenizer.extend_bpe import extend_byte_level_bpe

    out.mkdir(parents=True)
    extend_byte_level_bpe(materialize_dir(f"tokenizers/{base}") / "tokenizer.json", train, new_tokens, out,
                          morpheme_boundaries=morphemes)
    return time.perf_counter() - started


def measure(backend, docs: list[str]) -> tuple[int, list, int]:
    encoded = [e.ids for e in backend.encode_batch(docs)]
    failures = sum(d != t for d, t in zip(backend.decode_batch(encoded), docs))
    return sum(map(len, encoded)), encoded, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/extend_vocab-cpu.md")
    args = parser.parse_args()
    train = texts("ja_train")
    held = {"ja": texts("ja_heldout"), "en": texts("en_heldout")}
    chars = {lang: sum(map(len, docs)) for lang, docs in held.items()}
    rows = []
    for base, kind in CASES:
        base_backend = load_tokenizer(base)
        before = {lang: measure(base_backend, docs) for lang, docs in held.items()}
        for morphemes in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                seconds = extend(base, kind, train, args.new_tokens, morphemes, Path(tmp) / "tok")
                extended = load_tokenizer(str(Path(tmp) / "tok"), name="extended")
                after = {lang: measure(extended, docs) for lang, docs in held.items()}
            changed_en = sum(not np.array_equal(a, b) for a, b in zip(before["en"][1], after["en"][1]))
            row = {
                "base": base, "kind": kind, "morphemes": morphemes, "seconds": seconds,
                "ja_cpt": (chars["ja"] / before["ja"][0], chars["ja"] / after["ja"][0]),
                "en_cpt": (chars["en"] / before["en"][0], chars["en"] / after["en"][0]),
                "ja_token_change": after["ja"][0] / before["ja"][0] - 1,
                "en_changed_records": changed_en, "en_records": len(held["en"]),
                "roundtrip_failures": after["ja"][2] + after["en"][2],
            }
            rows.append(row)
            print(json.dumps(row))
    write(rows, args, len(train), sum(map(len, train)))


def write(rows: list[dict], args: argparse.Namespace, documents: int, train_chars: int) -> None:
    lines = [
        f"# Vocabulary extension: +{args.new_tokens:,} Japanese tokens",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, no GPU; "
        f"`python bench/extend_vocab.py --new-tokens {args.new_tokens}`. Learned from the bundled Japanese training "
        f"text ({documents} documents, {train_chars:,} characters, raw); measured on the bundled held-out (whole "
        "documents, no BOS/EOS)."),
        "",
        ("| base | morpheme boundaries | learning time | JA chars/token base -> extended | ratio | JA tokens | "
        "EN chars/token base -> extended | EN records with changed ids | round-trip failures |"),
        "|---|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['base']} ({r['kind']}) | {'yes' if r['morphemes'] else 'no'} | {r['seconds']:.1f} s | "
            f"{r['ja_cpt'][0]:.3f} -> {r['ja_cpt'][1]:.3f} | {r['ja_cpt'][1] / r['ja_cpt'][0]:.2f}x | "
            f"{100 * r['ja_token_change']:+.1f}% | {r['en_cpt'][0]:.3f} -> {r['en_cpt'][1]:.3f} | "
            f"{r['en_changed_records']} of {r['en_records']} | {r['roundtrip_failures']} |"
        )
    lines += [
        "",
        ("Targets: LLaMA-2 + 16,000 >= 1.6x Japanese chars/token; LLaMA-3 / Qwen + 16,000 >= 15% fewer Japanese "
        "tokens with English chars/token within 1%; learning in minutes on 2 cores. The SentencePiece time is the "
        "candidate model plus the merge (fugashi segmentation included); the byte-level time includes encoding "
        "the corpus with the base tokenizer, fugashi and the BPE continuation."),
        "",
    ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
