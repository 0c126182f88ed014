"""Benchmark of the tokenizer report against the bare work it cannot avoid.

    python bench/tokenizer_report.py [--runs 3] [--repeat 10] [--out bench/results/tokenizer_report-cpu.md]

On the same text (the bundled Japanese + English held-out) in one run, prints:
  - the report's time over the text (`tokenizer.compare.compare` with prebuilt vocabulary tables: fugashi, encode, spans, decode for
    round trips, metrics); loading the tokenizers and their vocabulary tables is timed apart, as bare loading is,
  - the bare time: each tokenizer's native batch encode (tokenizers / sentencepiece / tiktoken, both cores)
    plus one fugashi pass over the text,
  - their ratio (target <= 1.3),
and the peak RSS of the report on the corpus and on the corpus repeated --repeat times (each in a fresh
process), which must stay flat: the report streams.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.assets import materialize, materialize_dir, stored_path

CORPORA = ("corpus/ja_heldout.jsonl", "corpus/en_heldout.jsonl")
TOKENIZERS = ("llama2", "mistral", "llama3", "qwen", "llm-jp")


def load_texts() -> list[list[str]]:
    corpora = []
    for name in CORPORA:
        with lzma.open(stored_path(name), "rt", encoding="utf-8") as handle:
            corpora.append([json.loads(line)["text"] for line in handle if line.strip()])
    return corpora


def batches(texts: list[str], chars: int) -> list[list[str]]:
    out, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chars:
            out.append(batch)
            batch, size = [], 0
    return out + ([batch] if batch else [])


def bare_encoders() -> dict:
    """(encode, decode) with each tokenizer's own library, the plainest batch calls, no special tokens."""
    import sentencepiece as spm
    import tiktoken  # noqa: F401 - imported so its load time is not counted below
    from tokenizers import Tokenizer

    threads = os.cpu_count()
    encoders = {}
    for name in ("llama2", "mistral", "llm-jp"):
        sp = spm.SentencePieceProcessor(model_file=str(materialize(f"tokenizers/{name}/tokenizer.model")))
        encoders[name] = (
            lambda texts, sp=sp: sp.encode(texts, num_threads=threads),
            lambda ids, sp=sp: sp.decode(ids, num_threads=threads),
        )
    for name in ("llama3", "qwen"):
        tok = Tokenizer.from_file(str(materialize_dir(f"tokenizers/{name}") / "tokenizer.json"))
        encoders[name] = (
            lambda texts, tok=tok: tok.encode_batch(texts, add_special_tokens=False),
            lambda encodings, tok=tok: tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False),
        )
    return encoders


def time_bare(corpora: list[list[str]], batch_chars: int) -> tuple[dict[str, float], float]:
    """(bare encode seconds per tokenizer + one fugashi pass, bare decode seconds of all tokenizers)."""
    import fugashi

    timings = {}
    decode_seconds = 0.0
    for name, (encode, decode) in bare_encoders().items():
        start = time.perf_counter()
        encoded = []
        for texts in corpora:
            for batch in batches(texts, batch_chars):
                encoded.append(encode(batch))
        timings[name] = time.perf_counter() - start
        start = time.perf_counter()
        for batch_ids in encoded:
            decode(batch_ids)
        decode_seconds += time.perf_counter() - start
    tagger = fugashi.Tagger()
    start = time.perf_counter()
    for texts in corpora:
        for text in texts:
            tagger(text)
    timings["fugashi (one pass)"] = time.perf_counter() - start
    return timings, decode_seconds


def time_report(corpus_files: list[Path]) -> tuple[float, float, dict]:
    """(setup seconds: loading + vocabulary tables, pass seconds: the report over the text, metrics)."""
    from tokenizer.compare import Corpus, compare, corpus_stem
    from tokenizer.load import load_tokenizer
    from tokenizer.metrics import token_tables

    start = time.perf_counter()
    tokenizers = {name: load_tokenizer(name) for name in TOKENIZERS}
    tables = {name: token_tables(backend) for name, backend in tokenizers.items()}
    setup = time.perf_counter() - start
    corpora = [Corpus(corpus_stem(p), [p]) for p in corpus_files]
    start = time.perf_counter()
    metrics = compare(corpora, tokenizers, baseline="llama2", compute_params=7_000_000_000, context_length=4096,
                      progress=False, tables=tables)
    return setup, time.perf_counter() - start, metrics


def peak_rss_of_report(files: list[Path]) -> float:
    """Peak RSS (MiB) of a fresh process that loads the tokenizers and runs the report on `files`."""
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report this (large) parent's RSS.
    code = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r})\n"
        "from bench.tokenizer_report import time_report\n"
        "time_report([Path(p) for p in sys.argv[1:]])\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def repeated_corpus(directory: Path, times: int) -> list[Path]:
    files = []
    for name in CORPORA:
        with lzma.open(stored_path(name), "rb") as handle:
            data = handle.read()
        path = directory / f"{Path(name).stem}_x{times}.jsonl"
        with path.open("wb") as out:
            for _ in range(times):
                out.write(data)
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="corpus multiple for the memory check")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each side; the best is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/tokenizer_report-cpu.md")
    args = parser.parse_args()
    from tokenizer.compare import BATCH_CHARS

    corpora = load_texts()
    chars = sum(len(t) for texts in corpora for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        single = repeated_corpus(Path(tmp), 1)
        time_report(single[:1])  # warm-up: materialize caches, page in libraries
        # Best of --runs for both sides: the machine is shared, and the minimum is the least noisy estimate.
        reports = [time_report(single)[:2] for _ in range(args.runs)]
        setup_seconds, report_seconds = min(r[0] for r in reports), min(r[1] for r in reports)
        bares = [time_bare(corpora, BATCH_CHARS) for _ in range(args.runs)]
        bare = {name: min(b[0][name] for b in bares) for name in bares[0][0]}
        bare_decode = min(b[1] for b in bares)
        rss_1 = peak_rss_of_report(single)
        rss_n = peak_rss_of_report(repeated_corpus(Path(tmp), args.repeat))
    bare_total = sum(bare.values())
    lines = [
        "# Tokenizer report benchmark",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()} (CPU only). Text: bundled ja_heldout + en_heldout, {chars:,} characters; "
        f"tokenizers: {', '.join(TOKENIZERS)}."),
        "",
        f"Best of {args.runs} runs for each line.",
        "",
        "| work | seconds |",
        "|---|---|",
        *[f"| bare: {name} | {seconds:.2f} |" for name, seconds in bare.items()],
        f"| **bare total** | **{bare_total:.2f}** |",
        f"| **report**: the pass over the text (`tokenizer.compare.compare`) | **{report_seconds:.2f}** |",
        f"| report setup, not in the ratio: loading the 5 tokenizers + vocabulary tables | {setup_seconds:.2f} |",
        f"| bare decode of all tokenizers (not in the bare total) | {bare_decode:.2f} |",
        "",
        f"Ratio report / bare: **{report_seconds / bare_total:.2f}** (target <= 1.3).",
        "",
        (f"The report also decodes every text with every tokenizer, because round-trip exactness "
        f"(`decode(encode(x)) == x`) is one of its metrics; the bare line has no decode. Counting the bare "
        f"decode on the bare side: {report_seconds / (bare_total + bare_decode):.2f}."),
        "",
        (f"Peak RSS of the report process: {rss_1:.0f} MiB on the corpus, {rss_n:.0f} MiB on it repeated "
        f"{args.repeat}x (ratio {rss_n / rss_1:.2f}; the report streams, so this should stay near 1)."),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
