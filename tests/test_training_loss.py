"""The causal-LM loss cpt and sft share (`pipeline.training.causal_lm_nats`): the decoder once, the output layer in
checkpointed chunks. It must be transformers' own loss, value and gradients, with several chunks, tied or untied
embeddings, gradient checkpointing, masked targets; and through DeepSpeed engines at ZeRO 0-3 in fp32 and bf16
it must train as transformers' loss does (tests/helpers/loss_engines.py, one subprocess, ~60 s on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.launch import free_port
from pipeline.training import causal_lm_nats
from tests.helpers.cli import REPO

VOCAB = 96
TINY = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_llama(tied: bool, checkpointing: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY, tie_word_embeddings=tied),
                                             dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.train()


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("tied", "checkpointing", "masked"),
                         [(True, False, False), (False, True, False), (True, True, True), (False, False, True)])
def test_chunked_loss_equals_full_logits_loss(tied, checkpointing, masked):
    """fp32, 3 x 24 tokens = 69 targets in chunks of 5 positions (14 chunks): the mean equals transformers'
    `.loss` and every parameter's gradient equals its gradient, to float rounding."""
    model = tiny_llama(tied, checkpointing)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if masked:  # sft's case: prompt positions carry no loss
        labels[0, :10] = -100
        labels[2, 5:20] = -100
    calls = []
    hook = model.lm_head.register_forward_hook(lambda _m, inputs, _out: calls.append(inputs[0].shape[0]))
    nats, count = causal_lm_nats(model, ids, labels, chunk_elements=5 * VOCAB)
    hook.remove()
    assert count == int((labels[:, 1:] != -100).sum())
    assert max(calls) == 5 and sum(calls) == count  # the output layer never saw more than one chunk
    (nats / count).backward()
    mine = gradients(model)
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    theirs = gradients(model)
    assert float(nats / count) == pytest.approx(float(reference), rel=1e-6)
    assert mine.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(mine[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_grad_chunks_and_the_default_chunk():
    """Without autograd the chunks run plainly; the default chunk (2**26 logits) is one chunk here."""
    model = tiny_llama(tied=True, checkpointing=False)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        small, count = causal_lm_nats(model, ids, ids, chunk_elements=3 * VOCAB)
        default, _ = causal_lm_nats(model, ids, ids)
        reference = model(input_ids=ids, labels=ids).loss
    assert count == 30
    assert float(small / count) == pytest.approx(float(reference), rel=1e-6)
    assert float(default / count) == pytest.approx(float(reference), rel=1e-6)


def test_deepspeed_engines_train_the_same_with_either_loss():
    """One rank, a torch AdamW, 3 steps x 2 micro batches per case (tests/helpers/loss_engines.py: ZeRO 0-3, fp32
    and bf16, tied and untied embeddings, with and without gradient checkpointing): per-step losses, gradient
    norms and the trained model's held-out loss agree with the run on transformers' loss. fp32: to float
    rounding (measured <= 2e-7). bf16: the chunked output layer sums its weight gradient chunk by chunk in bf16,
    which rounds differently; measured <= 6e-5 on the losses and <= 8e-4 on the gradient norms."""
    result = subprocess.run([sys.executable, "-m", "tests.helpers.loss_engines", str(free_port())], cwd=REPO,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    from tests.helpers.loss_engines import CASES

    assert [tuple(r["case"]) for r in rows] == CASES
    for row in rows:
        _stage, precision, *_ = row["case"]
        old, new = row["old"], row["new"]
        loss_rel, norm_rel = (1e-6, 1e-6) if precision == "fp32" else (5e-4, 5e-3)
        assert new["losses"] == pytest.approx(old["losses"], rel=loss_rel), row
        assert new["grad_norms"] == pytest.approx(old["grad_norms"], rel=norm_rel), row
        assert new["heldout"] == pytest.approx(old["heldout"], rel=loss_rel), row
