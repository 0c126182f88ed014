"""Peak memory of cpt's loss on a 152k vocabulary, full logits (transformers' loss, what cpt used) against the
chunked output layer (`pipeline.training.causal_lm_nats`, what cpt uses now), on CPU.

    python bench/cpt_loss_memory.py [--out bench/results/cpt_loss_memory-cpu.md]

The model: a tiny LLaMA from config with Qwen's vocabulary (151,936 rows), hidden 64, 2 layers, untied; a micro
batch of 2 x 512 tokens; fp32 and bf16. Measured:
  - the output layer + loss alone (the planner's "logits and loss" term): peak of live CPU allocations from
    torch.profiler's memory events over one forward + backward from given hidden states (after a warm-up step,
    so parameter gradients already exist), as bench/planner_validation.py's logits rows do;
  - one whole training step (decoder + output layer + loss, forward + backward), the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.planner_validation import profiled_peak
from pipeline.planner.memory import Setup, plan_memory
from pipeline.planner.shapes import shape_from_hf_config
from pipeline.training import LOGIT_CHUNK_ELEMENTS, causal_lm_nats, output_nats

VOCAB = 151_936  # Qwen2/2.5/3's padded vocabulary (config.json vocab_size)
SPEC = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
BATCH, SEQ = 2, 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(precision: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**SPEC), dtype=DTYPES[precision]).train()


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def step_fn(model, ids, chunked: bool):
    def step() -> None:
        if chunked:
            nats, count = causal_lm_nats(model, ids, ids)
            (nats / count).backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()  # the output (logits) is dropped before backward

    return step


def head_fn(model, hidden, ids, chunked: bool):
    def head() -> None:
        if chunked:
            nats, count = output_nats(model, hidden, ids)
            (nats / count).backward()
        else:
            logits = model.lm_head(hidden)
            loss = model.loss_function(logits=logits, labels=ids, vocab_size=VOCAB)
            del logits
            loss.backward()

    return head


def measure(precision: str) -> dict:
    model = build(precision)
    ids = batch()
    hidden = torch.randn(BATCH, SEQ, SPEC["hidden_size"], dtype=DTYPES[precision], requires_grad=True)
    out = {}
    for chunked in (False, True):
        name = "chunked" if chunked else "full"
        started = time.perf_counter()
        out[f"head_{name}"] = profiled_peak(head_fn(model, hidden, ids, chunked))
        out[f"step_{name}"] = profiled_peak(step_fn(model, ids, chunked))
        out[f"seconds_{name}"] = time.perf_counter() - started
    with torch.no_grad():
        full = float(model(input_ids=ids, labels=ids).loss)
        nats, count = causal_lm_nats(model, ids, ids)
    out["loss_full"], out["loss_chunked"] = full, float(nats / count)
    return out


def planned(precision: str) -> tuple[int, str]:
    shape = shape_from_hf_config(SPEC, "tiny-llama-qwen-vocab")
    term = plan_memory(shape, Setup(method="full", micro_batch=BATCH, seq_len=SEQ, precision=precision,
                                    activation_checkpointing=False)).term("logits and loss")
    return term.bytes, term.formula


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpt_loss_memory-cpu.md")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    mib = 2**20
    targets = BATCH * (SEQ - 1)
    chunk = LOGIT_CHUNK_ELEMENTS // VOCAB
    lines = [
        "# cpt loss memory on CPU: full logits vs the chunked output layer",
        "",
        (f"Machine: CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python "
         f"{platform.python_version()}, torch {torch.__version__}. Produced by `python bench/cpt_loss_memory.py`."),
        "",
        (f"Tiny LLaMA from config, vocabulary {VOCAB:,} (Qwen), hidden 64, 2 layers, untied; micro batch {BATCH} x "
         f"{SEQ} tokens = {targets:,} targets; chunks of {LOGIT_CHUNK_ELEMENTS:,} logits = {chunk} positions "
         f"({-(-targets // chunk)} chunks). Peaks: live bytes of the CPU allocator (torch.profiler memory events) "
         "over one forward + backward after a warm-up; RSS: the process's max RSS after building the model and "
         "one step, in a fresh process."),
        "",
        "| precision | measured | full logits | chunked | ratio | planner (chunked) | planner / measured |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for precision in ("fp32", "bf16"):
        m = measure(precision)
        plan_bytes, formula = planned(precision)
        rows = [("output layer + loss (peak)", m["head_full"], m["head_chunked"], plan_bytes),
                ("whole step (peak)", m["step_full"], m["step_chunked"], None)]
        for label, full, chunked, plan in rows:
            lines.append(f"| {precision} | {label} | {full / mib:,.1f} MiB | {chunked / mib:,.1f} MiB | "
                         f"{full / chunked:.2f}x | " + (f"{plan / mib:,.1f} MiB | {plan / chunked:.3f} |"
                                                        if plan else "| |"))
        notes.append(f"- {precision}: loss full {m['loss_full']:.7f}, chunked {m['loss_chunked']:.7f} "
                     f"(|diff| {abs(m['loss_full'] - m['loss_chunked']):.1e}); head + step measurements took "
                     f"{m['seconds_full']:.1f} s (full) and {m['seconds_chunked']:.1f} s (chunked); planner "
                     f"formula: `{formula}`")
        print(json.dumps({"precision": precision, **m, "planner": plan_bytes}), flush=True)
    lines += ["", *notes, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
