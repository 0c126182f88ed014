"""The sft stage on the CPU: QLoRA (bitsandbytes NF4) and plain LoRA on a tiny LLaMA, ZeRO-2 with 2 processes,
new-token rows, the merged model, adapter reload, label masking, and the errors a user gets before training.

The model is a tiny LLaMA folder over a 512-token byte-level BPE trained here; the data are bundled JaQuAD
instruction records with their context cut short, so sequences stay small. Each launch takes ~15 s, mostly imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ModelConfig, SftConfig
from pipeline.launch import free_port
from pipeline.models import load_causal_lm, save_model_folder
from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli
from tests.helpers.jsonl import read_jsonl
from tests.helpers.tiny import byte_bpe_tokenizer, pickle_only_copy

TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True,
              "initializer_range": 0.25}  # logits of a frozen random base need room to move
STEPS = 16
NEW_IDS = (500, 509)  # rows the tests declare "added by extend-vocab"


# ---------------------------------------------------------------------------------------------- fixtures


def _records(name: str, count: int, context_chars: int) -> list[dict]:
    import lzma

    from data.assets import stored_path

    with lzma.open(stored_path(name), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line, _ in zip(f, range(count), strict=False)]
    return [{"instruction": r["instruction"], "input": r["input"][:context_chars], "output": r["output"]}
            for r in records]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    # A random base cannot answer unseen questions, so the tests train on 16 examples repeated: the loss can fall
    # within a few dozen steps. The held-out file holds 12 of them (it checks the evaluation's plumbing).
    distinct = _records("instruct/ja_instruct_train.jsonl", 16, 30)
    train = distinct * 10
    heldout = distinct[:12]
    for name, records in (("train", train), ("heldout", heldout)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    texts = [r["instruction"] + r["input"] + r["output"] for r in train] + ["### 指示: ### 入力: ### 応答:"] * 20
    tokenizer = byte_bpe_tokenizer(texts)
    model = load_causal_lm(ModelConfig(from_config=TINY_LLAMA, dtype="float32"), seed=7)
    for name in ("model", "extended"):
        save_model_folder(model, root / name)
        tokenizer.save_pretrained(str(root / name))
    # "extended": the same model, with new_tokens.json saying its last ids were added by extend-vocab.
    (root / "extended" / "new_tokens.json").write_text(json.dumps({"base_size": NEW_IDS[0],
                                                                   "new_id_range": list(NEW_IDS), "tokens": []}))
    return root


def write_config(workspace: Path, out: Path, model: str = "model", **sft) -> Path:
    settings = {
        "data": str(workspace / "train.jsonl"), "heldout": str(workspace / "heldout.jsonl"),
        "max_seq_len": 192, "template": {"system": ""}, "quantization": "nf4", "precision": "fp32", "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "lr": 1e-2, "warmup_steps": 2, "max_steps": STEPS, "micro_batch_size": 4,
        "grad_accum": 1, "optimizer": "adamw", "gradient_checkpointing": False, "accelerator": "cpu",
        "eval_every": 8, "eval_examples": 12, "generate": 2, "max_new_tokens": 8, "master_port": free_port(), **sft,
    }
    config = {
        "run": {"name": "t", "seed": 7, "output_dir": str(out)},
        "model": {"path": str(workspace / model)},
        "data": {"ja": {"train": str(workspace / "train.jsonl")}},
        "sft": settings,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def stage_dir(out: Path) -> Path:
    return out / "t" / "stages" / "sft"


def run_sft(config: Path) -> None:
    result = jpadapt("sft", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def qlora(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora")
    run_sft(write_config(workspace, out, optimizer="paged_adamw_8bit", gradient_checkpointing=True))
    return out


@pytest.fixture(scope="module")
def lora_extended(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    # packing off: the padded, attention-masked, length-grouped path end to end
    run_sft(write_config(workspace, out, model="extended", quantization="none", merge=True, packing=False))
    return out


# ---------------------------------------------------------------------------------------------- QLoRA end to end


def test_qlora_learns_and_writes_the_outputs(qlora):
    folder = stage_dir(qlora)
    losses = [r["loss"] for r in read_jsonl(folder / "metrics.jsonl")]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    evals = read_jsonl(folder / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert evals[-1]["loss"] < evals[0]["loss"]
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["quantization"] == "nf4" and summary["prompt_format"] == "template"
    assert summary["final_loss"] == losses[-1]
    assert summary["tokens_seen"] == read_jsonl(folder / "metrics.jsonl")[-1]["tokens"]
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5
    assert summary["adapter_check"]["max_abs_logit_diff"] <= summary["adapter_check"]["tolerance"]
    assert summary["data"]["examples"] == 160 and summary["data"]["kept"] + summary["data"]["dropped"] == 160
    adapter = folder / "adapter"
    stamp = json.loads((adapter / "jpadapt.json").read_text(encoding="utf-8"))
    assert stamp["jpadapt_version"] and stamp["base_model"] == summary["base_model"]
    assert "### 応答:" in json.loads((adapter / "tokenizer_config.json").read_text(encoding="utf-8")).get(
        "chat_template", "") or "### 応答:" in (adapter / "chat_template.jinja").read_text(encoding="utf-8")
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    assert len(read_jsonl(folder / "generations.jsonl")) == 2
    assert "## Generations" in (folder / "report.md").read_text(encoding="utf-8")


def test_qlora_adapter_reloads_to_the_same_answers(qlora):
    """base (4-bit) + adapter/ loaded the way a user would, prompt rendered with the saved chat template:
    the greedy answers recorded at the end of training come out again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from pipeline.models import plain_4bit_kernels

    folder = stage_dir(qlora)
    adapter = folder / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization, device_map="cpu",
                                                dtype=torch.float32)
    plain_4bit_kernels(base)  # as training ran (bitsandbytes' CPU-only inference layout is not bit-exact)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    for record in read_jsonl(folder / "generations.jsonl"):
        user = record["instruction"] + (f"\n\n### 入力:\n{record['input']}" if record["input"] else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == record["output"]


# ---------------------------------------------------------------------------------------------- LoRA + new rows


def test_new_token_rows_train_and_nothing_else_outside_lora(lora_extended, workspace):
    """merged/ = base + LoRA + new rows in bf16: every tensor LoRA does not touch equals the base's (in bf16)
    bit for bit, except the new embedding rows, which changed."""
    from safetensors.torch import load_file

    folder = stage_dir(lora_extended)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["new_token_rows"] == NEW_IDS[1] - NEW_IDS[0]
    check = summary["merged_check"]
    assert check["max_abs_logit_diff"] <= check["tolerance"] and check["saved_diff"] == 0.0
    base = load_file(str(workspace / "extended" / "model.safetensors"))
    merged = load_file(str(folder / "merged" / "model.safetensors"))
    targets = summary["lora"]["target_modules"]
    assert set(merged) == set(base)
    for name, tensor in base.items():
        expected = tensor.to(torch.bfloat16)
        if any(f".{t}." in name for t in targets):
            assert not torch.equal(merged[name], expected), name  # LoRA merged into it
        elif name == "model.embed_tokens.weight":
            new = slice(*NEW_IDS)
            assert torch.equal(merged[name][: NEW_IDS[0]], expected[: NEW_IDS[0]])
            assert not torch.equal(merged[name][new], expected[new])
        else:
            assert torch.equal(merged[name], expected), name
    from safetensors import safe_open

    with safe_open(str(folder / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # safe_open is not iterable
        delta = [k for k in keys if "trainable_tokens" in k]
        assert delta and f.get_tensor(delta[0]).shape == (NEW_IDS[1] - NEW_IDS[0], TINY_LLAMA["hidden_size"])


def test_frozen_weights_stay_bit_identical_in_training(workspace):
    """In-process training steps on the QLoRA model: only LoRA matrices and the new rows' delta change; every
    other tensor, the packed 4-bit codes included, is bit-identical afterwards."""
    from data.instruct import Sequence, collate
    from stages.sft import lora_targets
    from stages.sft.worker import batch_tensors, build_model, response_loss

    settings = SftConfig(quantization="nf4", precision="fp32", gradient_checkpointing=True, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0)
    base = load_causal_lm(ModelConfig(path=str(workspace / "extended")))
    targets = lora_targets(base, "all-linear", "nf4")
    model = build_model(str(workspace / "extended"), settings, targets, list(range(*NEW_IDS)), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (2, 24))
    ids[:, 3] = NEW_IDS[0] + 1  # a new token in the input
    labels = ids.clone()
    labels[:, :10] = -100
    seqs = [Sequence(i.numpy(), lab.numpy(), torch.arange(24).numpy(), examples=1) for i, lab in zip(ids, labels)]
    batch = batch_tensors(collate(seqs, 0, False), torch.device("cpu"))
    for _ in range(3):
        nats, count = response_loss(model, batch)
        (nats / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable
    assert any("trainable_tokens_delta" in n for n in changed)


def test_bf16_compute_on_the_4bit_base(workspace):
    """The GPU configuration (bf16 compute under autocast) on the CPU: the loss matches transformers' own loss
    in bf16, trainable parameters stay fp32 masters, and a step moves them."""
    from data.instruct import Sequence, collate
    from stages.sft.worker import batch_tensors, build_model, response_loss

    settings = SftConfig(quantization="nf4", precision="bf16", gradient_checkpointing=True, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0)
    model = build_model(str(workspace / "model"), settings, ["q_proj", "v_proj"], [], torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = torch.randint(0, 512, (1, 20))
    labels = ids.clone()
    labels[:, :8] = -100
    batch = batch_tensors(collate([Sequence(ids[0].numpy(), labels[0].numpy(), torch.arange(20).numpy(), 1)], 0,
                                  False), torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nats, count = response_loss(model, batch)
        reference = model(**batch).loss
    assert float(nats / count) == pytest.approx(float(reference), rel=2e-2)
    before = [p.detach().clone() for p in trainable]
    (nats / count).backward()
    torch.optim.AdamW(trainable, lr=1e-2).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))


def test_loss_ignores_every_prompt_token(workspace):
    """A hand-built example: the loss equals cross-entropy over the answer positions only, and no gradient
    reaches the hidden state of any position whose next token is a prompt token."""
    from stages.sft.worker import response_loss

    model = load_causal_lm(ModelConfig(path=str(workspace / "model")))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 2]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, -100, 45, 46, 47, 2]])  # answer: 45 46 47 </s>
    captured = {}

    def keep(_module, _inputs, output):
        if "hidden" not in captured:  # the first forward: response_loss's
            output.last_hidden_state.retain_grad()
            captured["hidden"] = output.last_hidden_state

    model.model.register_forward_hook(keep)
    nats, count = response_loss(model, {"input_ids": ids, "labels": labels, "position_ids": torch.arange(10)[None]})
    assert count == 4
    logits = model(input_ids=ids).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[5:9], ids[0, 6:10], reduction="sum")
    assert torch.allclose(nats, expected, rtol=1e-5)
    nats.backward()
    grad = captured["hidden"].grad[0].abs().sum(-1)
    assert (grad[:5] == 0).all() and (grad[9] == 0) and (grad[5:9] > 0).all()


# ---------------------------------------------------------------------------------------------- data parallel


def test_zero2_two_processes_match_one_process(workspace, tmp_path):
    """QLoRA + ZeRO-2 over 2 processes (micro batch 2 each) vs 1 process with micro batch 4: the same sequences
    per step and the loss normalized over the whole step, so the losses agree."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"max_steps": 6, "eval_every": 6, "generate": 0, "grad_accum": 2}
    run_sft(write_config(workspace, one, micro_batch_size=4, **common))
    run_sft(write_config(workspace, two, micro_batch_size=2, num_gpus=2, zero_stage=2, **common))
    a = [r["loss"] for r in read_jsonl(stage_dir(one) / "metrics.jsonl")]
    b = [r["loss"] for r in read_jsonl(stage_dir(two) / "metrics.jsonl")]
    assert a == pytest.approx(b, rel=2e-4), (a, b)
    summary = json.loads((stage_dir(two) / "summary.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2


# ---------------------------------------------------------------------------------------------- bad input


def _fails(workspace: Path, tmp_path: Path, *fragments: str, model: str = "model", **sft) -> None:
    """In-process (`cli.main`): each fails before any worker starts, so a process of its own only costs imports;
    test_zero2_two_processes_match_one_process runs the real command."""
    config = write_config(workspace, tmp_path / "out", model=model, **sft)
    result = run_cli("sft", str(config), cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (stage_dir(tmp_path / "out") / "summary.json").exists()


def test_record_without_output_fails_before_training(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "質問"}\n', encoding="utf-8")
    _fails(workspace, tmp_path, "bad.jsonl:2", "output", data=str(bad))


def test_empty_data_fails(workspace, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    _fails(workspace, tmp_path, "sft.data", "no examples", data=str(empty))


def test_template_without_response_marker_fails(workspace, tmp_path):
    _fails(workspace, tmp_path, "sft.template", "response marker", template={"response": ""})


def test_zero_rank_fails(workspace, tmp_path):
    _fails(workspace, tmp_path, "sft.lora_r", lora_r=0)


def test_qlora_with_zero3_is_refused_with_the_reason(workspace, tmp_path):
    _fails(workspace, tmp_path, "ZeRO-3", "4-bit", zero_stage=3)


def test_already_quantized_model_fails(workspace, tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    for file in (workspace / "model").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    _fails(workspace, tmp_path, "already quantized", "gptq", base_model=str(folder))


def test_pickle_only_base_model_is_refused_before_anything_runs(workspace, tmp_path):
    """sft.base_model with config.json + pytorch_model.bin only: one line naming it, from the runner's input check
    (no stage folder, no job.json); it used to be refused by the launched worker."""
    folder = pickle_only_copy(workspace / "model", tmp_path / "pickled")
    _fails(workspace, tmp_path, "sft.base_model", str(folder.resolve()), "only pytorch_model.bin", "safetensors",
           base_model=str(folder))
    assert not (tmp_path / "out" / "t" / "stages").exists()


def test_a_base_built_from_config_is_named_where_it_is_after_the_commit(tmp_path):
    """With model.from_config and no cpt output, sft saves the base into its own folder. The adapter used to name
    it by the attempt folder (`stages/sft.partial/base_model`), gone once the stage commits, so evaluate could not
    load the adapter's base. It is named relative to the run directory, and evaluate finds it there."""
    import logging

    from pipeline.config import load_config
    from pipeline.stage import StageContext
    from stages.evaluate import _sft_entry
    from stages.sft import _base_model

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "cpt.enabled=false",
                             "extend_vocab.enabled=false", "model.from_config.vocab_size=512"])
    run_dir = tmp_path / "r"
    sft = StageContext("sft", run_dir / "stages" / "sft.partial", run_dir, 7, logging.getLogger("test"))
    folder, name = _base_model(cfg, sft)
    assert Path(folder) == run_dir / "stages" / "sft.partial" / "base_model" and name == "stages/sft/base_model"
    adapter = sft.out_dir / "adapter"
    adapter.mkdir()
    (adapter / "jpadapt.json").write_text(json.dumps({"base_model": name, "quantization": "nf4"}))
    (run_dir / "stages" / "sft.partial").rename(run_dir / "stages" / "sft")  # the runner's commit
    evaluate = StageContext("evaluate", run_dir / "stages" / "evaluate.partial", run_dir, 7,
                            logging.getLogger("test"), prerequisites={"sft": run_dir / "stages" / "sft"})
    entry = _sft_entry(cfg, evaluate, run_dir / "stages" / "sft" / "adapter")
    assert Path(entry.source) == (run_dir / "stages" / "sft" / "base_model").resolve()
    assert entry.describe(evaluate)["source"] == "stages/sft/base_model"


def test_sequence_longer_than_the_model_allows_fails(workspace, tmp_path):
    _fails(workspace, tmp_path, "sft.max_seq_len", "256", max_seq_len=512)


def test_unknown_lora_target_fails(workspace, tmp_path):
    _fails(workspace, tmp_path, "sft.target_modules", "c_attn", "q_proj", target_modules=["c_attn"])


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_gemma_qlora_learns_the_answer_format(tmp_path):
    """Gemma 3 270M (pretrained, 262k vocabulary; the GGUF ships no chat template, so the Japanese template is
    used): QLoRA steps run, the response-only loss agrees with transformers' (the stage checks it before the
    first step), and the held-out loss falls."""
    from tests.helpers.gemma import gemma_folder

    folder = gemma_folder()
    records = _records("instruct/ja_instruct_train.jsonl", 64, 300)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                          encoding="utf-8")
    heldout = _records("instruct/ja_instruct_heldout.jsonl", 16, 300)
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout),
                                            encoding="utf-8")
    config = write_config(tmp_path, tmp_path / "out", max_steps=12, eval_every=12, micro_batch_size=2,
                          max_seq_len=384, lr=2e-4, generate=2, max_new_tokens=16, template={})
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["model"] = {"path": str(folder)}
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    run_sft(config)
    stage = stage_dir(tmp_path / "out")
    summary = json.loads((stage / "summary.json").read_text(encoding="utf-8"))
    assert summary["prompt_format"] == "template"
    evals = read_jsonl(stage / "eval.jsonl")
    assert evals[-1]["loss"] < evals[0]["loss"], evals
