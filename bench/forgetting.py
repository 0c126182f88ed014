"""Benchmark: does English replay limit forgetting? A controlled experiment on a model that really knows English.

    python bench/forgetting.py [--out bench/.forgetting] [--seeds 1 2 3] [--ratios 0 0.05 0.1 0.25 0.5]
                               [--ja-steps 100] [--pretrain-steps 500] [--results bench/results/forgetting-cpu]

1. **Base model.** A small LLaMA (4 layers, hidden 256, 5.3M parameters) and its own byte-level BPE tokenizer
   (8,192 tokens, learned on the bundled English and Japanese train text) are pretrained from scratch on English
   only: the bundled `en_train` + `en_pretrain` (the whole shared English train file, 1.24M tokens), with AdamW and
   a cosine schedule, English held-out bits per byte measured along the way. Saved as a Hugging Face folder. The
   Japanese rows of its embedding have never been trained: like LLaMA-2 before Swallow, it has a vocabulary that
   can spell Japanese and has read none.
2. **CPT sweep.** The real `cpt` stage (`jpadapt cpt`, DeepSpeed ZeRO-0, fp32, one process) continues from that
   folder on the bundled Japanese with `replay_ratio` r in --ratios, several seeds each (the seed changes the order
   of the training blocks), under two budgets:
   * `equal_ja`: every run sees the same Japanese tokens, so it takes ja_steps / (1 - r) steps (replay costs compute);
   * `equal_steps`: every run takes ja_steps steps, so replay takes Japanese tokens away.
   r = 0 is the same run under both budgets.
3. **Results** (`<results>.md`, `.json`, `.png`, `-tradeoff.png`): per run, the step-0 point of `forgetting.jsonl`
   is the base model; English forgetting = final EN bits/byte - base, Japanese gain = base - final JA bits/byte.
   Mean and sample standard deviation over seeds, and whether each ratio's difference from r = 0 is larger than the
   seed spread.

Every number comes from the runs' own `forgetting.jsonl` and `summary.json` (`runs/<name>/stages/cpt/`), which
stay in --out; rerunning the script reuses the base model and every finished run (the stage is up to date).
`tests/test_forgetting.py` (`-m slow`) runs a reduced version and checks the ordering.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml

BUDGETS = ("equal_ja", "equal_steps")
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class BaseSpec:
    """The English base model: its shape, tokenizer size and pretraining schedule (all of it decides the model)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    layers: int = 4
    heads: int = 4
    max_positions: int = 512
    steps: int = 500
    batch: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_chars: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class CptSpec:
    ja_steps: int = 100
    seq_len: int = 256
    micro_batch: int = 8
    lr: float = 1e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    eval_points: int = 5
    eval_chars: int = 20_000


# ---------------------------------------------------------------------------------------------- base model


def bundled_texts(name: str) -> list[str]:
    from data import assets

    with open(assets.materialize(name), encoding="utf-8") as handle:
        # NFKC as the pipeline's prepare step normalizes (pipeline/configs/demo.yaml).
        return [unicodedata.normalize("NFKC", json.loads(line)["text"]) for line in handle]


def english_train_texts() -> list[str]:
    return bundled_texts("corpus/en_train.jsonl") + bundled_texts("corpus/en_pretrain.jsonl")


def train_tokenizer(folder: Path, vocab_size: int) -> Any:
    """A byte-level BPE learned on the bundled English and Japanese train text (deterministic), saved as an HF
    tokenizer folder whose only special token, <|endoftext|>, separates documents (as Qwen's does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(english_train_texts() + bundled_texts("corpus/ja_train.jsonl"), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, model_max_length=1_000_000)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def token_stream(tokenizer: Any, texts: list[str]) -> Any:
    """Documents as one stream, each after an end-of-text separator: what the model learns a document start from."""
    import numpy as np

    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.fromiter((t for doc in ids for t in (eos, *doc)), dtype=np.int64)


def heldout_texts(prepared: Path, lang: str, max_chars: int) -> list[str]:
    """The held-out texts cpt evaluates on (the prepare stage's output, first `max_chars` characters)."""
    from data.prepare import capped_texts, prepared_shards, prepared_texts

    return capped_texts(prepared_texts(prepared_shards(prepared, lang, "heldout")), max_chars)


def pretrain(folder: Path, spec: BaseSpec, prepared: Path) -> dict[str, Any]:
    """Pretrain the English base model into `folder` (an HF folder with the tokenizer), unless it is there with the
    same spec. Returns pretrain.json: the spec, the English/Japanese held-out curve and the time it took."""
    record_path = folder / "pretrain.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record["spec"] == asdict(spec):
            return record
    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from eval.perplexity import bits_per_byte
    from pipeline.training import decay_groups, lr_schedule

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(folder, spec.vocab_size)
    stream = token_stream(tokenizer, english_train_texts())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                         max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    # The same optimizer groups and schedule as cpt's (pipeline/training.py).
    optimizer = torch.optim.AdamW(decay_groups(model, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.95))
    schedule = lr_schedule(spec.lr, spec.warmup, spec.steps, spec.min_lr_ratio)
    heldout = {lang: heldout_texts(prepared, lang, spec.eval_chars) for lang in ("en", "ja")}
    blocks = len(stream) // spec.seq_len
    rng = np.random.default_rng(spec.seed)
    order = np.concatenate([rng.permutation(blocks) for _ in range(math.ceil(spec.steps * spec.batch / blocks) + 1)])

    def evaluate(step: int) -> dict[str, Any]:
        model.eval()
        point: dict[str, Any] = {"step": step, "tokens": step * spec.batch * spec.seq_len}
        for lang, texts in heldout.items():
            result = bits_per_byte(model, tokenizer, texts, window=spec.seq_len, stride=spec.seq_len // 2,
                                   batch_size=spec.batch, progress=False)
            point[lang] = {"bits_per_byte": result.bits_per_byte, "loss": result.loss}
        model.train()
        return point

    curve, started = [evaluate(0)], time.monotonic()
    model.train()
    bar = tqdm(range(spec.steps), desc="pretrain (English)", unit="step")
    for step in bar:
        picks = order[step * spec.batch:(step + 1) * spec.batch]
        batch = torch.from_numpy(np.stack([stream[b * spec.seq_len:(b + 1) * spec.seq_len] for b in picks]))
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            curve.append(evaluate(step + 1))
            bar.write(f"  step {step + 1}: EN held-out {curve[-1]['en']['bits_per_byte']:.4f} bits/byte")
    seconds = time.monotonic() - started
    model.save_pretrained(str(folder), safe_serialization=True)
    record = {"spec": asdict(spec), "params": sum(p.numel() for p in model.parameters()),
              "train_tokens_available": len(stream), "seconds": round(seconds, 1), "curve": curve}
    record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


# ---------------------------------------------------------------------------------------------- cpt runs


def pipeline_yaml(out: Path, name: str, model: Path | None, seed: int, ratio: float, steps: int,
                  spec: CptSpec, base: BaseSpec) -> Path:
    """The pipeline YAML of one run. Without `model` (the prepare-only run) the model is the base shape from
    config: prepare does not read it."""
    from pipeline.launch import free_port

    model_section: dict[str, Any] = {"dtype": "float32"}
    if model is None:
        model_section |= {"tokenizer": "llama2", "from_config": {
            "model_type": "llama", "vocab_size": base.vocab_size, "hidden_size": base.hidden_size,
            "intermediate_size": base.intermediate_size, "num_hidden_layers": base.layers,
            "num_attention_heads": base.heads, "num_key_value_heads": base.heads,
            "max_position_embeddings": base.max_positions}}
    else:
        model_section |= {"path": str(model), "tokenizer": str(model)}
    config = {
        "run": {"name": name, "seed": seed, "output_dir": str(out / "runs")},
        "model": model_section,
        "data": {lang: {"train": f"bundled:corpus/{lang}_train.jsonl", "heldout": f"bundled:corpus/{lang}_heldout.jsonl"}
                 for lang in ("ja", "en")},
        "prepare": {"normalization": "NFKC", "min_chars": 50},
        "cpt": {
            "replay_ratio": ratio, "seq_len": spec.seq_len, "micro_batch_size": spec.micro_batch, "grad_accum": 1,
            "max_steps": steps, "lr": spec.lr, "warmup_steps": spec.warmup, "min_lr_ratio": spec.min_lr_ratio,
            "precision": "fp32", "gradient_checkpointing": False, "zero_stage": 0, "num_gpus": 1,
            "accelerator": "cpu", "eval_every": max(1, steps // spec.eval_points), "eval_chars": spec.eval_chars,
            "save_every": steps, "keep_checkpoints": 1, "master_port": free_port(),
        },
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def jpadapt(command: str, config: Path, log: Path) -> None:
    with log.open("a", encoding="utf-8") as handle:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", command, str(config)], cwd=ROOT, check=False,
                              stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"jpadapt {command} {config} failed (exit {done.returncode}); see {log}")


def run_name(budget: str, ratio: float, seed: int) -> str:
    return f"{budget}-r{ratio:g}-s{seed}"


def steps_for(budget: str, ratio: float, ja_steps: int) -> int:
    return math.ceil(ja_steps / (1 - ratio)) if budget == "equal_ja" else ja_steps


def planned_runs(ratios: list[float], seeds: list[int], ja_steps: int) -> list[tuple[str, float, int, int]]:
    """(budget, ratio, seed, steps); r = 0 runs once and counts for both budgets."""
    runs = []
    for budget in BUDGETS:
        for ratio in ratios:
            if budget == "equal_steps" and ratio == 0:
                continue
            runs += [(budget, ratio, seed, steps_for(budget, ratio, ja_steps)) for seed in seeds]
    return runs


def run_result(out: Path, name: str) -> dict[str, Any]:
    stage = out / "runs" / name / "stages" / "cpt"
    evals = [json.loads(line) for line in (stage / "forgetting.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = json.loads((stage / "summary.json").read_text(encoding="utf-8"))
    first, last = evals[0], evals[-1]
    return {
        "name": name,
        "steps": summary["steps"],
        "tokens": summary["tokens_seen"],
        "ja_tokens": summary["tokens_by_language"]["ja"],
        "en_tokens": summary["tokens_by_language"]["en"],
        "en_share": summary["realized_en_share"],
        "en_base": first["en"]["bits_per_byte"], "en_final": last["en"]["bits_per_byte"],
        "ja_base": first["ja"]["bits_per_byte"], "ja_final": last["ja"]["bits_per_byte"],
        "en_forgetting": last["en"]["bits_per_byte"] - first["en"]["bits_per_byte"],
        "ja_gain": first["ja"]["bits_per_byte"] - last["ja"]["bits_per_byte"],
        "wall_seconds": summary["wall_seconds"],
        "train_seconds": summary["train_seconds"],
        "curve": [{"tokens": e["tokens"], "ja_tokens": e["tokens"] * (1 - summary["realized_en_share"]),
                   "en": e["en"]["bits_per_byte"], "ja": e["ja"]["bits_per_byte"]} for e in evals],
    }


# ---------------------------------------------------------------------------------------------- analysis


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: dict[str, dict[str, Any]], ratios: list[float], seeds: list[int], ja_steps: int
              ) -> dict[str, list[dict[str, Any]]]:
    """Per budget, per ratio: mean and seed spread of forgetting, gain and time, and the seeds' runs."""
    table: dict[str, list[dict[str, Any]]] = {}
    for budget in BUDGETS:
        rows = []
        for ratio in ratios:
            owner = "equal_ja" if ratio == 0 else budget
            runs = [results[run_name(owner, ratio, seed)] for seed in seeds]
            row: dict[str, Any] = {"ratio": ratio, "steps": steps_for(budget, ratio, ja_steps), "runs": [r["name"] for r in runs]}
            for key in ("en_forgetting", "ja_gain", "wall_seconds", "en_share", "ja_tokens", "en_tokens", "en_final", "ja_final"):
                row[key], row[f"{key}_sd"] = mean_sd([r[key] for r in runs])
            row["en_base"], row["ja_base"] = runs[0]["en_base"], runs[0]["ja_base"]
            rows.append(row)
        baseline = rows[0]
        for previous, row in itertools.pairwise(rows):
            row["en_vs_no_replay"] = row["en_forgetting"] - baseline["en_forgetting"]
            row["separated"] = separated(row, baseline)
            row["en_vs_previous"] = row["en_forgetting"] - previous["en_forgetting"]
            row["separated_from_previous"] = separated(row, previous)
        table[budget] = rows
    return table


def separated(row: dict[str, Any], other: dict[str, Any]) -> bool:
    """English forgetting of two ratios differs by more than twice the larger seed SD: a crude but honest bar."""
    spread = max(row["en_forgetting_sd"], other["en_forgetting_sd"])
    return abs(row["en_forgetting"] - other["en_forgetting"]) > 2 * spread


def shape_of(rows: list[dict[str, Any]]) -> str:
    """Whether English forgetting falls as replay grows, telling real rises from seed noise."""
    rises = [row for row in rows[1:] if row["en_vs_previous"] > 0]
    if not rises:
        return "falls monotonically as replay grows"
    described = ", ".join(f"r={row['ratio']:g} is {row['en_vs_previous']:+.3f} above the ratio before it"
                          f"{' (within the seed spread)' if not row['separated_from_previous'] else ' (beyond the seed spread)'}"
                          for row in rises)
    real = any(row["separated_from_previous"] for row in rises)
    return (f"does NOT fall monotonically: {described}" if real
            else f"falls monotonically within noise: {described}")


def verdict_lines(table: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = []
    for budget, rows in table.items():
        forgetting = [row["en_forgetting"] for row in rows]
        gains = [row["ja_gain"] for row in rows]
        lines.append(
            f"{budget}: English forgetting {', '.join(f'{f:+.3f}' for f in forgetting)} bits/byte for r = "
            f"{', '.join(format(row['ratio'], 'g') for row in rows)}: {shape_of(rows)}; Japanese gain "
            f"{gains[0]:.3f} -> {gains[-1]:.3f} bits/byte; separated from r = 0 beyond 2 seed SDs: "
            + ", ".join(f"r={row['ratio']:g} {'yes' if row['separated'] else 'no'}" for row in rows[1:]))
    return lines


def markdown(table: dict[str, list[dict[str, Any]]], base: dict[str, Any], cpt: CptSpec, seeds: list[int],
             results_stem: str, command: str) -> str:
    curve = base["curve"]
    en_curve = ", ".join(f"{p['step']}: {p['en']['bits_per_byte']:.3f}" for p in curve)
    last_drop = curve[-2]["en"]["bits_per_byte"] - curve[-1]["en"]["bits_per_byte"]
    total_drop = curve[0]["en"]["bits_per_byte"] - curve[-1]["en"]["bits_per_byte"]
    # "Flattened": the last evaluation interval gave under 2% of everything pretraining gained.
    shape = ("the curve has flattened at the end of the schedule" if last_drop < 0.02 * total_drop
             else "the curve is still falling: a longer pretraining would give a stronger base")
    spec = base["spec"]
    lines = [
        "# English replay vs forgetting: a controlled experiment (CPU)", "",
        f"Machine: {platform.machine()} CPU, 2 cores, no GPU. Command: `{command}`.", "",
        "## Base model: a small LLaMA pretrained on English only", "",
        (f"{base['params']:,} parameters ({spec['layers']} layers, hidden {spec['hidden_size']}, vocabulary "
         f"{spec['vocab_size']:,}: a byte-level BPE learned on the bundled English and Japanese train text), pretrained "
         f"from scratch for {spec['steps']} steps x {spec['batch']} x {spec['seq_len']} tokens "
         f"({spec['steps'] * spec['batch'] * spec['seq_len']:,} tokens, "
         f"{spec['steps'] * spec['batch'] * spec['seq_len'] / base['train_tokens_available']:.2f} epochs of the "
         f"{base['train_tokens_available']:,}-token English train text: bundled en_train + en_pretrain), AdamW lr "
         f"{spec['lr']:g}, cosine to {spec['min_lr_ratio']:g}x, in {base['seconds'] / 60:.1f} min."),
        "",
        (f"English held-out bits per byte by step: {en_curve}. The last {spec['eval_every']} steps gained "
        f"{last_drop:.3f} bits/byte of the {total_drop:.3f} pretraining gained: {shape}. The Japanese held-out "
        f"level of the base is {curve[-1]['ja']['bits_per_byte']:.3f} bits/byte (it has read no Japanese)."),
        "",
        "## CPT on Japanese from that model, with English replay", "",
        (f"The real `cpt` stage, {cpt.seq_len}-token sequences x {cpt.micro_batch} per step, lr {cpt.lr:g} (warmup "
         f"{cpt.warmup}, cosine to {cpt.min_lr_ratio:g}x), DeepSpeed ZeRO-0, fp32, 1 process; bits per byte on the "
         f"first {cpt.eval_chars:,} characters of the prepared Japanese and English held-out sets. Seeds "
         f"{', '.join(map(str, seeds))} (the seed changes the order of the training blocks). "
         "Forgetting = final English bits/byte - the base's; gain = the base's Japanese bits/byte - final. "
         "Mean ± sample SD over seeds. Worker wall: the training job's own time (summary.json `wall_seconds`: "
         "training, evaluations, checkpoint, consolidation), without the ~20 s of stage start-up each run also had."),
        "",
    ]
    titles = {"equal_ja": f"Equal Japanese tokens ({cpt.ja_steps} x {cpt.micro_batch * cpt.seq_len:,} Japanese tokens in every run; "
                          "replay adds steps)",
              "equal_steps": f"Equal steps ({cpt.ja_steps} steps in every run; replay takes Japanese tokens' place)"}
    for budget, rows in table.items():
        lines += [f"### {titles[budget]}", "",
                  ("| replay_ratio | steps | JA tokens | EN tokens | EN bits/byte (base -> final) | EN forgetting | "
                  "vs r=0 | JA bits/byte (base -> final) | JA gain | worker wall |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            versus = ("—" if "en_vs_no_replay" not in row else
                      f"{row['en_vs_no_replay']:+.4f}{'' if row['separated'] else ' (within noise)'}")
            lines.append(
                f"| {row['ratio']:g} | {row['steps']} | {row['ja_tokens']:,.0f} | {row['en_tokens']:,.0f} | "
                f"{row['en_base']:.4f} -> {row['en_final']:.4f} | {row['en_forgetting']:+.4f} ± {row['en_forgetting_sd']:.4f} | "
                f"{versus} | {row['ja_base']:.4f} -> {row['ja_final']:.4f} | {row['ja_gain']:.4f} ± {row['ja_gain_sd']:.4f} | "
                f"{row['wall_seconds']:.0f} ± {row['wall_seconds_sd']:.0f} s |")
        lines.append("")
    lines += ["## Verdict", "", *[f"- {line}" for line in verdict_lines(table)], "",
              f"![forgetting curves]({results_stem}.png)", "", f"![trade-off]({results_stem}-tradeoff.png)", ""]
    return "\n".join(lines)


COLORS = ["#1b1b1b", "#6a3d9a", "#1f78b4", "#33a02c", "#e31a1c", "#ff7f00"]


def plot_curves(results: dict[str, dict[str, Any]], table: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """EN and JA bits/byte vs Japanese tokens seen, per budget, mean over seeds, base level dashed."""
    from pipeline import reportkit as kit

    with kit.plot_style():
        fig, axes = kit.figure(12, 8, ncols=2, nrows=2)
        draw_curves(axes, results, table)
        path.write_bytes(kit.png(fig))


def draw_curves(axes: Any, results: dict[str, dict[str, Any]], table: dict[str, list[dict[str, Any]]]) -> None:
    for row_axes, (budget, rows) in zip(axes, table.items()):
        for column, lang in enumerate(("en", "ja")):
            ax = row_axes[column]
            for color, row in zip(COLORS, rows):
                curves = [results[name]["curve"] for name in row["runs"]]
                x = [statistics.fmean(c[i]["ja_tokens"] for c in curves) for i in range(len(curves[0]))]
                y = [statistics.fmean(c[i][lang] for c in curves) for i in range(len(curves[0]))]
                ax.plot(x, y, marker="o", ms=3, color=color, label=f"replay {row['ratio']:g}")
            ax.axhline(rows[0][f"{lang}_base"], ls="--", color="#888888", lw=1, label="base model")
            name = "English" if lang == "en" else "Japanese"
            ax.set(title=f"{name} held-out bits/byte ({budget.replace('_', ' ')})", xlabel="Japanese tokens trained",
                   ylabel="bits per byte")
            ax.grid(alpha=0.3)
        row_axes[0].legend(frameon=False, fontsize=8)


def plot_tradeoff(table: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """The choice a user makes: English forgetting and final Japanese bits/byte against replay_ratio, per budget,
    mean over seeds with SD error bars. Forgetting on a symmetric-log axis: r = 0 forgets several times more."""
    from pipeline import reportkit as kit

    with kit.plot_style():
        fig, (left, right) = kit.figure(11, 4.2, ncols=2)
        draw_tradeoff(left, right, table)
        path.write_bytes(kit.png(fig))


def draw_tradeoff(left: Any, right: Any, table: dict[str, list[dict[str, Any]]]) -> None:
    for marker, (budget, rows) in zip(("o", "s"), table.items()):
        ratios = [r["ratio"] for r in rows]
        label = budget.replace("_", " ")
        left.errorbar(ratios, [r["en_forgetting"] for r in rows], yerr=[r["en_forgetting_sd"] for r in rows],
                      marker=marker, capsize=3, label=label)
        right.errorbar(ratios, [r["ja_final"] for r in rows], yerr=[r["ja_final_sd"] for r in rows],
                       marker=marker, capsize=3, label=label)
    left.set_yscale("symlog", linthresh=0.1)
    left.set(xlabel="replay_ratio", ylabel="bits/byte (lower is better)",
             title="English forgetting: final - base model")
    right.set(xlabel="replay_ratio", ylabel="bits/byte (lower is better)", title="Japanese held-out bits/byte, final")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)


# ---------------------------------------------------------------------------------------------- main


def experiment(out: Path, ratios: list[float], seeds: list[int], base_spec: BaseSpec, cpt: CptSpec,
               say=print, report_only: bool = False
               ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Run (or reuse) everything; return (pretrain record, {run: result}, aggregated table). `report_only`: read
    the finished runs as they are, without asking jpadapt whether they are up to date (a code change since would
    make it rerun them)."""
    if report_only:
        base = json.loads((out / "base-model" / "pretrain.json").read_text(encoding="utf-8"))
        results = {run_name(b, r, s): run_result(out, run_name(b, r, s)) for b, r, s, _ in planned_runs(ratios, seeds, cpt.ja_steps)}
        return base, results, aggregate(results, ratios, seeds, cpt.ja_steps)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "jpadapt.log"
    prep = pipeline_yaml(out, "prepare-only", None, 0, 0.0, 1, cpt, base_spec)
    jpadapt("prepare", prep, log)
    base_folder = out / "base-model"
    base = pretrain(base_folder, base_spec, out / "runs" / "prepare-only" / "stages" / "prepare")
    say(f"base model: EN held-out {base['curve'][-1]['en']['bits_per_byte']:.4f} bits/byte after "
        f"{base_spec.steps} steps ({base['seconds']:.0f} s)")
    results = {}
    plan = planned_runs(ratios, seeds, cpt.ja_steps)
    for index, (budget, ratio, seed, steps) in enumerate(plan, 1):
        name = run_name(budget, ratio, seed)
        config = pipeline_yaml(out, name, base_folder, seed, ratio, steps, cpt, base_spec)
        started = time.monotonic()
        jpadapt("cpt", config, log)
        results[name] = run_result(out, name)
        r = results[name]
        say(f"[{index}/{len(plan)}] {name}: {steps} steps, EN {r['en_base']:.4f} -> {r['en_final']:.4f} "
            f"({r['en_forgetting']:+.4f}), JA {r['ja_base']:.4f} -> {r['ja_final']:.4f} ({time.monotonic() - started:.0f} s)")
    return base, results, aggregate(results, ratios, seeds, cpt.ja_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".forgetting", help="runs and the base model")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "forgetting-cpu",
                        help="stem of the .md/.json/.png results")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0, 0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ja-steps", type=int, default=CptSpec.ja_steps)
    parser.add_argument("--cpt-lr", type=float, default=CptSpec.lr)
    parser.add_argument("--pretrain-steps", type=int, default=BaseSpec.steps)
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the finished runs in --out")
    args = parser.parse_args(argv)
    if sorted(args.ratios) != args.ratios or args.ratios[0] != 0:
        parser.error("--ratios must start at 0 and increase")
    base_spec = BaseSpec(steps=args.pretrain_steps)
    cpt = CptSpec(ja_steps=args.ja_steps, lr=args.cpt_lr)
    base, results, table = experiment(args.out, args.ratios, args.seeds, base_spec, cpt, report_only=args.report_only)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python bench/forgetting.py " + " ".join(given)
    stem = args.results
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, table, stem.with_suffix(".png"))
    plot_tradeoff(table, stem.parent / f"{stem.name}-tradeoff.png")
    stem.with_suffix(".md").write_text(markdown(table, base, cpt, args.seeds, stem.name, command.strip()), encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps({"base": base, "cpt": asdict(cpt), "table": table,
                                                     "runs": results}, indent=1), encoding="utf-8")
    for line in verdict_lines(table):
        print(line)
    print(f"results: {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
