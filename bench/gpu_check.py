"""The GPU check: every CUDA path of jpadapt in one command (under 8 minutes on one H100/H200, offline).

    python bench/gpu_check.py                          # on the GPU: bench/results/gpu-<device>.md
    python bench/gpu_check.py --cpu --tiny --out DIR   # the same parts, shrunk, on the CPU (the default tests run it)

Parts, each guarded (a part that fails is reported with its error and the others still run):
  1. cpt: a Qwen2.5-0.5B-shaped model built from config (bf16, seq 2048), the real `jpadapt cpt` stage with
     DeepSpeed ZeRO-0 and ZeRO-2 on one GPU: tokens/s, MFU = tokens/s x FLOPs per token (6·N + 12·L·d·s, the
     planner's `flops_per_token`) / the device's dense bf16 peak (`pipeline.planner.gpus`), and
     `max_memory_allocated` against the planner's prediction;
  2. sft: the real sft stage (QLoRA, packing) against HF Trainer + PEFT QLoRA on the same data, with
     bench/sft.py's own functions (`run_stage`, `run_baseline`): tokens/s and peak memory ratios; plus the stage
     with plain LoRA (no quantization) for the planner table;
  3. evaluate: the demo model (pipeline/configs/demo.yaml's from_config, random weights) scored on the device and
     on the CPU with the evaluate stage's scorers: JA/EN bits per byte and JGLUE log-likelihoods must agree;
  4. planner: predicted vs measured peak for full (cpt ZeRO-0), LoRA and QLoRA (sft), as a table.
Targets recorded against (GPU): CPT MFU >= 40%; sft >= 1.5x tokens/s and <= 0.7x peak memory of the baseline;
planner within 10% of the measured peak. On the CPU the peak is the process's max RSS and there is no bf16 peak,
so those rows say "n/a" or are informative only.

`--tiny` shrinks model, steps and sequence length (~1-2 min on 2 cores); `--cpu` runs everything on the CPU in
fp32. `--break PART` (or JPADAPT_GPU_CHECK_BREAK=PART) makes that part raise, to test the guards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import importlib.util

import yaml


def _bench_module(name: str) -> Any:
    """bench/<name>.py as a module (bench/ is no package; on sys.path its evaluate.py would shadow HF's)."""
    spec = importlib.util.spec_from_file_location(f"jpadapt_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft_bench = _bench_module("sft")  # bench/sft.py: the jpadapt-vs-Trainer comparison, reused as it is

PARTS = ("cpt", "sft", "evaluate", "planner")
SEED = 1234
# Qwen/Qwen2.5-0.5B's config.json (the planner's "qwen2.5-0.5b" preset): 494,032,768 parameters, tied embeddings.
QWEN_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "tie_word_embeddings": True, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6}
# --tiny: a LLaMA small enough for 2 CPU cores, over the bundled LLaMA-2 tokenizer (32k vocabulary).
TINY = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": True}
TARGETS = {"mfu": 0.40, "sft_speed": 1.5, "sft_memory": 0.7, "planner": 0.10}


def settings(tiny: bool, gpu: bool) -> dict[str, Any]:
    if tiny:
        # 4 x 4 x 64 = 1,024 tokens per cpt step; sft 3 steps of 2 x 512.
        return {"model": TINY, "tokenizer": "llama2", "seq": 64, "micro": 4, "cpt_steps": 4, "docs": 12,
                "sft_steps": 3, "sft_seq": 512, "sft_micro": 2, "examples": 24, "eval_chars": 2000,
                "eval_items": 4, "precision": "bf16" if gpu else "fp32"}
    # 60 x 8 x 2048 = 983,040 tokens per cpt run (3.5 GFLOPs per token: ~9 s at 40% MFU of 989 TFLOPs; the planner
    # puts micro batch 8 without checkpointing at ~31 GiB); MFU is taken after the first step. sft: bench/sft.py's
    # GPU defaults (50 steps x 4 x 512).
    return {"model": QWEN_05B, "tokenizer": "qwen", "seq": 2048, "micro": 8, "cpt_steps": 60, "docs": 2000,
            "sft_steps": 50, "sft_seq": 512, "sft_micro": 4, "examples": 400, "eval_chars": 20000,
            "eval_items": 100, "precision": "bf16" if gpu else "fp32"}


def check_break(part: str) -> None:
    if part in os.environ.get("JPADAPT_GPU_CHECK_BREAK", "").split(","):
        raise RuntimeError(f"{part}: broken on purpose (JPADAPT_GPU_CHECK_BREAK={part})")


def run(argv: list[str], log: Path) -> None:
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(argv, check=False, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv)} failed (exit {result.returncode}); the end of {log}:\n{tail}")


# ============================================================================================ shared inputs


def sliced_corpora(work: Path, docs: int) -> dict[str, dict[str, str]]:
    """The first `docs` records of each bundled corpus (English books cut to 20,000 characters)."""
    from data.assets import materialize

    paths: dict[str, dict[str, str]] = {}
    for lang in ("ja", "en"):
        paths[lang] = {}
        for split in ("train", "heldout"):
            out = work / f"{lang}_{split}.jsonl"
            with open(materialize(f"corpus/{lang}_{split}.jsonl"), encoding="utf-8") as src, \
                    open(out, "w", encoding="utf-8") as dst:
                for line, _ in zip(src, range(docs if split == "train" else max(4, docs // 5)), strict=False):
                    record = json.loads(line)
                    record["text"] = record["text"][:20_000]
                    dst.write(json.dumps(record, ensure_ascii=False) + "\n")
            paths[lang][split] = str(out)
    return paths


def model_folder(work: Path, spec: dict[str, Any], tokenizer: str, dtype: str) -> Path:
    """The from-config model with random weights as a Hugging Face folder (weights + tokenizer)."""
    from pipeline.config import ModelConfig
    from pipeline.models import load_causal_lm, save_model_folder
    from tokenizer.hf import load_hf_tokenizer

    folder = work / "model"
    if not (folder / "config.json").is_file():
        save_model_folder(load_causal_lm(ModelConfig(from_config=spec, dtype=dtype), seed=SEED), folder)
        load_hf_tokenizer(tokenizer).save_pretrained(str(folder))
    return folder


def planned_bytes(config: Path, stage: str, overrides: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.planner.memory import plan_memory
    from pipeline.planner.plan import model_shape, stage_setup

    cfg = load_config(config, overrides or [])
    setup, _, _ = stage_setup(cfg, stage)
    plan = plan_memory(model_shape(cfg), setup)
    # The fixed "framework overhead" allowance (CUDA context, cuBLAS workspace, fragmentation) is memory that
    # torch.cuda.max_memory_allocated does not count: the comparison is with the tensor terms.
    return plan.gpu_bytes - plan.term(OVERHEAD).bytes


OVERHEAD = "framework overhead"


# ============================================================================================ 1. cpt


def part_cpt(work: Path, s: dict[str, Any], gpu: bool, device: Any) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.launch import free_port
    from pipeline.planner.compute import flops_per_token
    from pipeline.planner.plan import model_shape, stage_setup

    check_break("cpt")
    config = {
        "run": {"name": "cpt", "seed": SEED, "output_dir": str(work)},
        "model": {"tokenizer": s["tokenizer"], "from_config": s["model"],
                  "dtype": "bfloat16" if s["precision"] == "bf16" else "float32"},
        "data": sliced_corpora(work, s["docs"]),
        "prepare": {"min_chars": 20},
        "cpt": {"replay_ratio": 0.1, "seq_len": s["seq"], "micro_batch_size": s["micro"], "grad_accum": 1,
                "max_steps": s["cpt_steps"], "lr": 3e-4, "warmup_steps": 2, "precision": s["precision"],
                "gradient_checkpointing": False, "zero_stage": 0, "num_gpus": 1,
                "accelerator": "cuda" if gpu else "cpu",
                # evaluations and checkpoints outside the timed steps; one of each at the end
                "eval_every": s["cpt_steps"], "eval_chars": s["eval_chars"], "save_every": s["cpt_steps"],
                "keep_checkpoints": 1, "master_port": free_port()},
    }
    if gpu and device is not None:
        config["plan"] = {"gpu": device.key}
    path = work / "cpt.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    rows = {}
    for stage in (0, 2):
        overrides = [f"cpt.zero_stage={stage}", f"cpt.master_port={free_port()}"]
        run([sys.executable, "-m", "pipeline.cli", "cpt", str(path), *overrides], work / f"cpt-zero{stage}.log")
        summary = json.loads((work / "cpt" / "stages" / "cpt" / "summary.json").read_text(encoding="utf-8"))
        cfg = load_config(path, overrides)
        setup, _, _ = stage_setup(cfg, "cpt")
        per_token, formula = flops_per_token(model_shape(cfg), setup)
        # Steady state: the first step carries one-time costs (allocations, kernels' autotuning, the optimizer's
        # state), a large share of a run of a few seconds; bench/sft.py's split of the stage's metrics.jsonl.
        steady = sft_bench.throughput(*sft_bench.stage_steps(work / "cpt" / "stages" / "cpt" / "metrics.jsonl"))
        mfu = (steady["tokens_per_s_after_first"] * per_token / (device.bf16_tflops * 1e12)
               if gpu and device is not None else None)
        rows[f"ZeRO-{stage}"] = {"steps": summary["steps"], "tokens": summary["tokens_seen"],
                                 "tokens_per_s": summary["tokens_per_s"],
                                 "tokens_per_s_after_first": steady["tokens_per_s_after_first"],
                                 "flops_per_token": per_token,
                                 "formula": formula, "mfu": mfu, "peak_bytes": summary["peak_memory"]["bytes"],
                                 "peak_kind": summary["peak_memory"]["kind"],
                                 "planned_bytes": planned_bytes(path, "cpt", overrides),
                                 "final_loss": json.loads((work / "cpt" / "stages" / "cpt" / "metrics.jsonl")
                                                          .read_text().splitlines()[-1])["loss"]}
    return rows


def cpt_lines(rows: dict[str, Any]) -> list[str]:
    lines = [("| run | steps | tokens | tokens/s | tokens/s after step 1 | MFU (after step 1) | target | peak GiB "
             "| planned GiB | planned / measured |"),
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in rows.items():
        mfu = "n/a (no bf16 peak for a CPU)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        verdict = "n/a" if r["mfu"] is None else ("pass" if r["mfu"] >= TARGETS["mfu"] else "FAIL")
        lines.append(f"| cpt {name} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_s']:,.1f} "
                     f"| {r['tokens_per_s_after_first']:,.1f} | {mfu} "
                     f"| >= {TARGETS['mfu']:.0%}: {verdict} | {r['peak_bytes'] / 2**30:.3f} "
                     f"| {r['planned_bytes'] / 2**30:.3f} | {r['planned_bytes'] / r['peak_bytes']:.3f} |")
    first = next(iter(rows.values()))
    lines += ["", (f"FLOPs per token: {first['formula']} = {first['flops_per_token']:,.0f}; peak memory: "
              f"{first['peak_kind']}.")]
    return lines


# ============================================================================================ 2. sft


def part_sft(work: Path, s: dict[str, Any], gpu: bool) -> dict[str, Any]:
    check_break("sft")
    folder = model_folder(work, s["model"], s["tokenizer"], "bfloat16" if gpu else "float32")
    tokenizer = sft_bench.prepared_tokenizer(folder)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    records, arrays, _ = sft_bench.write_data(work, s["examples"], tokenizer, s["sft_seq"])
    args = argparse.Namespace(steps=s["sft_steps"], max_seq_len=s["sft_seq"], micro_batch=s["sft_micro"],
                              quantization="nf4")
    rows = {"baseline": sft_bench.run_baseline(work, folder, arrays, args, gpu),
            "qlora": sft_bench.run_stage(work, "jpadapt", folder, records, arrays, args, gpu, packing=True)}
    rows["qlora"]["planned_bytes"] = planned_bytes(work / "jpadapt.yaml", "sft")
    args.quantization = "none"
    rows["lora"] = sft_bench.run_stage(work, "jpadapt-lora", folder, records, arrays, args, gpu, packing=True)
    rows["lora"]["planned_bytes"] = planned_bytes(work / "jpadapt-lora.yaml", "sft")
    return rows


def sft_lines(rows: dict[str, Any], gpu: bool) -> list[str]:
    base, mine = rows["baseline"], rows["qlora"]
    speed = mine["tokens_per_s"] / base["tokens_per_s"]
    memory = mine["peak_bytes"] / base["peak_bytes"]
    lines = ["| side | steps | real tokens | tokens/s | peak GiB |", "|---|---:|---:|---:|---:|"]
    for key, label in (("baseline", "HF Trainer + PEFT QLoRA"), ("qlora", "jpadapt sft QLoRA (packing)"),
                       ("lora", "jpadapt sft LoRA (packing)")):
        r = rows[key]
        lines.append(f"| {label} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_s']:,.1f} "
                     f"| {r['peak_bytes'] / 2**30:.3f} |")

    def verdict(ok: bool) -> str:
        return ("pass" if ok else "FAIL") if gpu else "n/a on the CPU"

    lines += ["", "| jpadapt QLoRA / baseline | measured | target | verdict |", "|---|---:|---|---|",
              f"| tokens/s | {speed:.2f}x | >= {TARGETS['sft_speed']}x | {verdict(speed >= TARGETS['sft_speed'])} |",
              (f"| peak memory | {memory:.2f}x | <= {TARGETS['sft_memory']}x "
              f"| {verdict(memory <= TARGETS['sft_memory'])} |"),
              "", f"Peak memory: {base['peak_kind']}."]
    return lines


# ============================================================================================ 3. evaluate


def part_evaluate(work: Path, s: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """The demo model's scores on the device against the CPU's, with the evaluate stage's scorers."""
    import torch

    from eval.perplexity import bits_per_byte
    from eval.tasks import mc_items
    from pipeline.config import load_config

    check_break("evaluate")
    bench_evaluate = _bench_module("evaluate")
    jpadapt_logliks, load = bench_evaluate.jpadapt_logliks, bench_evaluate.load
    demo = load_config(None)
    folder = work / "demo-model"
    if not (folder / "config.json").is_file():
        from pipeline.models import load_causal_lm, save_model_folder
        from tokenizer.hf import load_hf_tokenizer

        save_model_folder(load_causal_lm(demo.model, seed=SEED), folder)
        load_hf_tokenizer(demo.model.tokenizer).save_pretrained(str(folder))
    corpora = sliced_corpora(work, 5)
    texts = {lang: [json.loads(line)["text"] for line in Path(paths["heldout"]).read_text().splitlines()]
             for lang, paths in corpora.items()}
    texts = {lang: ["\n".join(t)[: s["eval_chars"]]] for lang, t in texts.items()}
    items = mc_items("jcommonsenseqa")[: s["eval_items"]] + mc_items("jnli")[: s["eval_items"]]
    window, stride = demo.evaluate.window, demo.evaluate.stride
    sides = {}
    for device in ("cpu", "cuda" if gpu else "cpu"):
        model, tokenizer = load(folder, device)
        with torch.inference_mode():
            bpb = {lang: bits_per_byte(model, tokenizer, t, window=window, stride=stride).bits_per_byte
                   for lang, t in texts.items()}
            logliks = jpadapt_logliks(model, tokenizer, items, 8)
        sides["cpu" if not sides else "device"] = {"bpb": bpb, "logliks": logliks}
        del model
    cpu, dev = sides["cpu"], sides["device"]
    diff = max(abs(a - b) for x, y in zip(cpu["logliks"], dev["logliks"], strict=True)
               for a, b in zip(x, y, strict=True))
    return {"bpb": {lang: (cpu["bpb"][lang], dev["bpb"][lang]) for lang in cpu["bpb"]}, "loglik_max_diff": diff,
            "items": len(items), "device": "cuda" if gpu else "cpu (no GPU: the CPU against itself)"}


# fp32 on both sides; a GPU's kernels sum in another order (TF32 off by default for matmuls in torch).
BPB_TOLERANCE, LOGLIK_TOLERANCE = 1e-3, 1e-2


def evaluate_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"Demo model (fp32) on {r['device']} against the CPU.", "",
             "| quantity | CPU | device | abs diff | tolerance | verdict |", "|---|---:|---:|---:|---:|---|"]
    for lang, (a, b) in r["bpb"].items():
        lines.append(f"| {lang} bits per byte | {a:.6f} | {b:.6f} | {abs(a - b):.2e} | {BPB_TOLERANCE:g} "
                     f"| {'pass' if abs(a - b) <= BPB_TOLERANCE else 'FAIL'} |")
    d = r["loglik_max_diff"]
    lines.append(f"| JGLUE log-likelihoods ({r['items']} items), max | | | {d:.2e} | {LOGLIK_TOLERANCE:g} "
                 f"| {'pass' if d <= LOGLIK_TOLERANCE else 'FAIL'} |")
    return lines


# ============================================================================================ 4. planner


def part_planner(results: dict[str, Any]) -> list[tuple[str, int, int]]:
    check_break("planner")
    rows = []
    if isinstance(results.get("cpt"), dict):
        r = results["cpt"]["ZeRO-0"]
        rows.append(("full (cpt ZeRO-0)", r["planned_bytes"], r["peak_bytes"]))
        r = results["cpt"]["ZeRO-2"]
        rows.append(("full (cpt ZeRO-2, 1 GPU)", r["planned_bytes"], r["peak_bytes"]))
    if isinstance(results.get("sft"), dict):
        for key, label in (("lora", "LoRA (sft)"), ("qlora", "QLoRA (sft)")):
            rows.append((label, results["sft"][key]["planned_bytes"], results["sft"][key]["peak_bytes"]))
    if not rows:
        raise RuntimeError("no measured peak: the cpt and sft parts both failed")
    return rows


def planner_lines(rows: list[tuple[str, int, int]], gpu: bool) -> list[str]:
    lines = [(f"Planned: the planner's per-GPU terms without its fixed {OVERHEAD!r} allowance, which "
             "max_memory_allocated does not see; measured: the stage's summary.json peak."), "","| method | planned GiB | measured GiB | error | target | verdict |", "|---|---:|---:|---:|---|---|"]
    for label, planned, measured in rows:
        error = planned / measured - 1
        ok = abs(error) <= TARGETS["planner"]
        verdict = ("pass" if ok else "FAIL") if gpu else "n/a (CPU: max RSS, not the planner's GPU memory)"
        lines.append(f"| {label} | {planned / 2**30:.3f} | {measured / 2**30:.3f} | {error:+.1%} "
                     f"| within {TARGETS['planner']:.0%} | {verdict} |")
    return lines


# ============================================================================================ main


def device_info(gpu: bool) -> tuple[str, str, Any]:
    """(slug for the file name, description, catalog GPU or None)."""
    import torch

    from pipeline.planner.gpus import CATALOG

    if not gpu:
        return "cpu", f"CPU {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores", None
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    # The catalog entry whose model name is in the device's name, the closest in memory (A100 40 vs 80 GB, L4 vs
    # L40S); its dense bf16 peak is the MFU's denominator and its memory the planner's fit check.
    squeezed = name.lower().replace(" ", "")
    matches = [g for g in CATALOG.values() if g.key.split("-")[0].lower() in squeezed]
    found = min(matches, key=lambda g: abs(g.memory_bytes / 2**30 - memory), default=None)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return slug, f"{name}, {memory:.0f} GiB (catalog: {found.key if found else 'unknown: no MFU'})", found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (fp32), even where a GPU is present")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, few steps, short sequences")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (default: bench/results)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder, emptied first (default: runs/gpu-check, or OUT/gpu-check-work)")
    parser.add_argument("--break", dest="broken", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.broken:
        os.environ["JPADAPT_GPU_CHECK_BREAK"] = args.broken
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    import torch

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch: run with --cpu (and --tiny) to check on the CPU")
    started = time.monotonic()
    slug, described, device = device_info(gpu)
    s = settings(args.tiny, gpu)
    work = args.work or (ROOT / "runs" / "gpu-check" if args.out is None else args.out / "gpu-check-work")
    args.out = args.out or ROOT / "bench" / "results"
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for part in PARTS:
        print(f"{part} ...", flush=True)
        clock = time.monotonic()
        try:
            if part == "cpt":
                (work / "cpt").mkdir(parents=True, exist_ok=True)
                results[part] = part_cpt(work / "cpt", s, gpu, device)
            elif part == "sft":
                (work / "sft").mkdir(parents=True, exist_ok=True)
                results[part] = part_sft(work / "sft", s, gpu)
            elif part == "evaluate":
                (work / "evaluate").mkdir(parents=True, exist_ok=True)
                results[part] = part_evaluate(work / "evaluate", s, gpu)
            else:
                results[part] = part_planner(results)
        except BaseException as exc:  # a part's failure is reported, the others still run
            if isinstance(exc, KeyboardInterrupt):
                raise
            results[part] = exc
            traceback.print_exc()
        seconds[part] = time.monotonic() - clock
        print(f"  {part}: {'FAILED' if isinstance(results[part], BaseException) else 'ok'} "
              f"({seconds[part]:.0f} s)", flush=True)
    from importlib.metadata import version

    cuda = torch.version.cuda or "none"
    lines = [f"# GPU check: {described}", "",
             (f"Command: `python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({(time.monotonic() - started) / 60:.1f} min). {datetime.date.today().isoformat()}."),
             f"torch {torch.__version__}, CUDA {cuda}, "
             + ", ".join(f"{n} {version(n)}" for n in ("transformers", "peft", "bitsandbytes", "deepspeed")) + ".",
             (f"Model: {'tiny LLaMA' if args.tiny else 'Qwen2.5-0.5B shape'} from config, random weights; "
             f"{s['precision']}."), ""]
    render = {"cpt": lambda r: cpt_lines(r), "sft": lambda r: sft_lines(r, gpu),
              "evaluate": evaluate_lines, "planner": lambda r: planner_lines(r, gpu)}
    titles = {"cpt": "## 1. cpt (ZeRO-0 and ZeRO-2, one device)", "sft": "## 2. sft: QLoRA against HF Trainer + PEFT",
              "evaluate": "## 3. evaluate: device against CPU", "planner": "## 4. planner: predicted vs measured peak"}
    failed = []
    for part in PARTS:
        lines += [titles[part], "", f"({seconds[part]:.0f} s)", ""]
        result = results[part]
        if isinstance(result, BaseException):
            failed.append(part)
            lines += [f"**FAILED**: `{type(result).__name__}`", "", "```",
                      str(result).strip()[-3000:] or repr(result), "```", ""]
        else:
            lines += [*render[part](result), ""]
    lines.append(f"Parts failed: {', '.join(failed) if failed else 'none'}.")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"gpu-{slug}.md"
    report.write_text(text, encoding="utf-8")
    print(text)
    print(f"report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
