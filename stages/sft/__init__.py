"""Stage `sft`: QLoRA instruction tuning. The base stays frozen (4-bit NF4, or as is for plain LoRA); LoRA
adapters on every linear layer learn, plus, after a vocabulary extension, the new tokens' embedding rows.

The stage process (`run`) checks everything it can before a GPU is touched: the base model (quantizable, LoRA
targets present, vocabulary), the prompt format, every instruction record (`data/instruct.py`), the plan and the
port. It tokenizes the data once into `data/` and starts the job like cpt does: one process, or DeepSpeed's
launcher for data parallelism over several GPUs (ZeRO 0-2). Every rank runs the worker
(`python -m stages.sft.worker job.json`, `worker.py`), told what to do by the typed job in `job.py`.

Loss: mean negative log-likelihood per *response* token over the whole optimizer step (all micro batches, all
ranks). Prompt tokens are masked, and the output layer only runs on the positions that carry loss: with
extractive QA data 98% of the tokens are prompt, and for a large vocabulary (Gemma: 262k rows) the logits of
those positions would be most of the step's time and memory. Logits of the kept positions are computed in
checkpointed chunks, so no full (tokens x vocabulary) tensor ever exists.

Outputs, in `runs/<name>/stages/sft/`:
    adapter/            PEFT adapter (safetensors) + tokenizer (with the chat template used) + jpadapt.json
    merged/             with `merge: true`: base dequantized + LoRA merged, bf16 safetensors, plain transformers
    base_model/         only when the base was built from `model.from_config` (the adapter needs a base to load on)
    metrics.jsonl       per step: loss, lr, grad norm, tokens, response tokens, tokens/s, epoch
    eval.jsonl          held-out loss per response token at step 0, every eval_every steps and at the end
    generations.jsonl   greedy answers to held-out prompts, without and with the adapter
    summary.json, report.md, report.html, loss.png, tensorboard/
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import ModelConfig, PipelineConfig, SftConfig
from pipeline.errors import JpadaptError
from pipeline.launch import check_launch
from pipeline.stage import JOB, StageContext, StageSpec, lazy
from pipeline.training import check_plan, job_context, pick_accelerator, run_workers
from stages.sft.job import GROUP_MICRO_BATCHES, Prompt, SftData, SftJob, load_examples, save_examples

TRAIN_DATA, HELDOUT_DATA = "data/train.npz", "data/heldout.npz"


def run(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Any]:
    settings = cfg.sft
    accelerator = pick_accelerator("sft", settings.accelerator, settings.num_gpus, settings.precision)
    check_plan(cfg, "sft", ctx)
    check_launch(settings, "sft", ctx.node)
    base, base_name = _base_model(cfg, ctx)
    tokenizer, prompt_format = _tokenizer(cfg, base, ctx.out_dir / "adapter")
    target_modules = _check_model(cfg, base, tokenizer)
    new_ids = _new_token_ids(base) if settings.train_new_tokens else []
    data = _tokenize(cfg, tokenizer, ctx)
    steps, per_epoch = _total_steps(cfg, ctx)
    ctx.log.info("%d steps (%.2f epochs of %d sequences)", steps, _epochs(cfg, steps, per_epoch), per_epoch)
    job = SftJob(
        context=job_context(ctx, accelerator, steps),
        sequences_per_epoch=per_epoch,
        base_model=base,
        base_model_name=base_name,
        trust_remote_code=cfg.model.trust_remote_code,
        tokenizer_dir=ctx.out_dir / "adapter",
        prompt_format=prompt_format,
        target_modules=target_modules,
        new_token_ids=new_ids,
        data=data,
        sft=settings,
        jpadapt_version=__version__,
    )
    run_workers(WORKER, job, ctx.out_dir / JOB, settings, accelerator, ctx.log, ctx.node)

    from stages.sft.report import write_report

    write_report(ctx.out_dir)
    summary = json.loads((ctx.out_dir / "summary.json").read_text(encoding="utf-8"))
    final = summary.get("final_eval") or {}
    return {"steps": summary["steps"], "trainable_params": summary["trainable_params"],
            "final_loss": round(summary["final_loss"], 4),
            **({"heldout_loss": round(final["loss"], 4)} if final else {})}


# ---------------------------------------------------------------------------------------------- preflight


def _base_model(cfg: PipelineConfig, ctx: StageContext) -> tuple[str, str]:
    """The folder to tune: sft.base_model, else the cpt output, else the extend-vocab output, else model.path. A
    model built from `model.from_config` is saved into the stage directory first (an adapter needs a base folder).
    Every folder is checked as loading will check it (`check_model_folder`), before anything is tokenized or
    launched. Returns (the folder to load, its name in the outputs): a folder of this run is named relative to the
    run directory (`stages/cpt/model`, `stages/sft/base_model`: true after the commit, the same in every run
    directory; evaluate resolves it with `ctx.resolve`), any other folder by its absolute path."""
    from pipeline.models import check_model_folder, load_causal_lm, save_model_folder

    if cfg.sft.base_model is not None:
        folder = str(check_model_folder(cfg.sft.base_model, "sft.base_model"))
        return folder, folder
    for stage in ("cpt", "extend-vocab"):
        output = ctx.prerequisites.get(stage)
        if output is not None and (output / "model" / "config.json").is_file():
            folder = check_model_folder(output / "model", f"the {stage} output")
            return str(folder), ctx.run_relative(folder)
    if cfg.model.path is not None:
        folder = str(check_model_folder(cfg.model.path, "model.path"))
        return folder, folder
    folder = ctx.out_dir / "base_model"
    save_model_folder(load_causal_lm(cfg.model, seed=ctx.seed), folder)
    ctx.log.info("base: a %s model built from model.from_config, saved to %s", cfg.model.from_config["model_type"],
                 folder)
    return str(folder), ctx.run_relative(folder)


def _tokenizer(cfg: PipelineConfig, base: str, adapter_dir: Path) -> tuple[Any, str]:
    """The base's tokenizer with the chat template training renders prompts with, saved into adapter/ so that
    inference renders them the same way. Returns (tokenizer, "chat_template" | "template")."""
    from data.instruct import template_chat_template
    from tokenizer.hf import load_hf_tokenizer

    folder = Path(base)
    has_own = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    spec = folder if has_own else (cfg.model.tokenizer or cfg.model.path)
    if spec is None:
        raise JpadaptError(f"sft: {base} has no tokenizer files; set model.tokenizer")
    tokenizer = load_hf_tokenizer(spec, trust_remote_code=cfg.model.trust_remote_code,
                                  key="sft base model" if has_own else "model.tokenizer")
    settings = cfg.sft
    own_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.prompt_format == "chat_template" and not own_template:
        raise JpadaptError("sft.prompt_format is chat_template but the tokenizer has none; use auto or template")
    prompt_format = "chat_template" if own_template and settings.prompt_format != "template" else "template"
    if prompt_format == "template":
        tokenizer.chat_template = template_chat_template(settings.template)
    if tokenizer.eos_token_id is None:
        raise JpadaptError("sft: the tokenizer has no EOS token; the model could not learn where an answer ends")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tokenizer.save_pretrained(str(adapter_dir))
    return tokenizer, prompt_format


def _check_model(cfg: PipelineConfig, base: str, tokenizer: Any) -> list[str]:
    """What would otherwise fail minutes later inside a worker: a base bitsandbytes cannot quantize, LoRA targets
    that match nothing, a tokenizer larger than the embedding. Checked on a weightless (meta-device) copy.
    Returns the concrete LoRA target module names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import model_config_values, model_vocab_size

    settings = cfg.sft
    values = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    if settings.quantization == "nf4" and values.get("quantization_config"):
        method = values["quantization_config"].get("quant_method", "another method")
        raise JpadaptError(f"sft.quantization nf4: {base} is already quantized ({method}); bitsandbytes quantizes "
                           "float weights only: point sft at the unquantized model, or set sft.quantization: none")
    model_cfg = ModelConfig(path=base, trust_remote_code=cfg.model.trust_remote_code)
    positions = model_config_values(model_cfg).get("max_position_embeddings")
    if isinstance(positions, int) and settings.max_seq_len > positions:
        raise JpadaptError(f"sft.max_seq_len is {settings.max_seq_len} but the model allows at most {positions} "
                           "positions (max_position_embeddings)")
    rows = model_vocab_size(model_cfg)
    if len(tokenizer) > rows:
        raise JpadaptError(f"sft: the tokenizer has {len(tokenizer):,} ids but {base} has {rows:,} embedding rows")
    config = AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return lora_targets(model, settings.target_modules, settings.quantization)


def lora_targets(model: Any, wanted: list[str] | str, quantization: str) -> list[str]:
    """Leaf names of the linear layers that get adapters: every nn.Linear but the output layer for "all-linear",
    else the names listed (each must match at least one linear layer)."""
    import torch

    output = model.get_output_embeddings()
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not output}
    if not linear:
        what = "bitsandbytes can quantize (4-bit NF4 replaces nn.Linear layers)" if quantization == "nf4" else \
            "LoRA can adapt"
        raise JpadaptError(f"sft: the model has no linear layers {what}")
    if wanted == "all-linear":
        return sorted(linear)
    unknown = [name for name in wanted if name not in linear]
    if unknown:
        raise JpadaptError(f"sft.target_modules: {', '.join(unknown)} match no linear layer of the model "
                           f"(its linear layers: {', '.join(sorted(linear))})")
    return list(wanted)


def _new_token_ids(base: str) -> list[int]:
    """The ids extend-vocab added (its new_tokens.json travels with the model folder)."""
    path = Path(base) / "new_tokens.json"
    if not path.is_file():
        return []
    start, end = json.loads(path.read_text(encoding="utf-8"))["new_id_range"]
    return list(range(start, end))


def _tokenize(cfg: PipelineConfig, tokenizer: Any, ctx: StageContext) -> SftData:
    """Read and tokenize the train and held-out records (every bad record is an error here, before training);
    saved as arrays in data/ for the workers."""
    from data.instruct import read_conversations, tokenize_all

    settings = cfg.sft
    marker = settings.template.input
    train = read_conversations(settings.data, "sft.data", marker)
    examples, stats = tokenize_all(train, tokenizer, settings.max_seq_len, desc="tokenize sft.data")
    if not examples:
        raise JpadaptError(f"sft.data: no example keeps an answer within max_seq_len {settings.max_seq_len} "
                           f"({stats.dropped} dropped); raise sft.max_seq_len")
    if stats.truncated or stats.dropped:
        ctx.log.warning("sft.data: %d of %d examples are longer than max_seq_len %d: %d truncated, %d dropped "
                        "(nothing of their answer fits)", stats.truncated + stats.dropped, stats.examples,
                        settings.max_seq_len, stats.truncated, stats.dropped)
    heldout = read_conversations(settings.heldout, "sft.heldout", marker) if settings.heldout else []
    scored = heldout[: settings.eval_examples] if settings.eval_examples else heldout
    held_examples, _ = tokenize_all(scored, tokenizer, settings.max_seq_len, desc="tokenize sft.heldout")
    (ctx.out_dir / "data").mkdir(exist_ok=True)
    save_examples(ctx.out_dir / TRAIN_DATA, examples)
    save_examples(ctx.out_dir / HELDOUT_DATA, held_examples)
    prompts = [Prompt(where=c.where, instruction=c.instruction, input=c.input, reference=c.reference,
                      messages=list(c.messages)) for c in heldout[: settings.generate]]
    return SftData(train=ctx.out_dir / TRAIN_DATA, heldout=ctx.out_dir / HELDOUT_DATA, stats=stats.to_dict(),
                   prompts=prompts)


def _batch_rows(s: SftConfig) -> int:
    """Rows one micro step reads over all ranks: the unit the data order is built from, so that 2 GPUs x micro
    batch 2 read the same rows per step as 1 GPU x micro batch 4."""
    return s.micro_batch_size * s.num_gpus * s.num_nodes


def _global_sequences(cfg: PipelineConfig) -> int:
    s = cfg.sft
    return s.micro_batch_size * s.grad_accum * s.num_gpus * s.num_nodes


def _total_steps(cfg: PipelineConfig, ctx: StageContext) -> tuple[int, int]:
    """(optimizer steps, sequences in the first epoch)."""
    from data.instruct import epoch_sequences

    s = cfg.sft
    examples = load_examples(ctx.out_dir / TRAIN_DATA)
    per_epoch = len(epoch_sequences(examples, packing=s.packing, max_seq_len=s.max_seq_len, seed=ctx.seed, epoch=0,
                                    group_size=_batch_rows(s) * GROUP_MICRO_BATCHES, batch_rows=_batch_rows(s)))
    if s.max_steps is not None:
        return s.max_steps, per_epoch
    return max(1, math.ceil(s.epochs * per_epoch / _global_sequences(cfg))), per_epoch


def _epochs(cfg: PipelineConfig, steps: int, per_epoch: int) -> float:
    return steps * _global_sequences(cfg) / per_epoch


# The module every rank runs; also a root of sft's code fingerprint (it is launched, not imported).
WORKER = "stages.sft.worker"


def _inputs(cfg: PipelineConfig) -> dict[str, list[Path]]:
    from pipeline.models import check_model_folder, model_folder_files, model_inputs
    from pipeline.paths import resolve_files

    files = {"sft.data": resolve_files(cfg.sft.data, "sft.data")}
    if cfg.sft.heldout:
        files["sft.heldout"] = resolve_files(cfg.sft.heldout, "sft.heldout")
    files.update(model_inputs(cfg.model))
    if cfg.sft.base_model is not None:
        files["sft.base_model"] = model_folder_files(check_model_folder(cfg.sft.base_model, "sft.base_model"),
                                                     "sft.base_model")
    return files


SPEC = StageSpec(
    name="sft",
    run=run,
    description="QLoRA instruction tuning: 4-bit NF4 base, LoRA adapters, loss on answers only",
    uses=("cpt", "extend-vocab"),
    # Every sft key but the port shapes the outputs.
    params=("run.seed", "model", *(f"sft.{key}" for key in SftConfig.model_fields if key != "master_port")),
    unhashed=("sft.master_port", "plan", "extend_vocab.new_tokens", "extend_vocab.pad_to_multiple_of"),
    inputs=_inputs,
    outputs=("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/jpadapt.json",
             "metrics.jsonl", "summary.json", "report.md"),
    libraries=("safetensors",),
    worker=WORKER,
    report_section=lazy("stages.sft.report:report_section"),
)

