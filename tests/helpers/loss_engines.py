"""Old and new cpt loss through DeepSpeed engines, side by side in one process (one rank):
`python -m tests.helpers.loss_engines PORT` prints one JSON line per case.

Each case builds the same tiny LLaMA twice (same seed) and trains both engines 3 steps x 2 micro batches with
torch AdamW: one on transformers' loss (`engine(input_ids, labels).loss`, what cpt used), one on
`engine_nats` (the chunked loss, several chunks). Reported: both runs' per-step mean losses and gradient norms,
and the held-out loss of both models after training (no_grad, transformers' forward)."""

from __future__ import annotations

import json
import os
import sys

CASES = [  # (ZeRO stage, precision, tied embeddings, gradient checkpointing)
    (0, "fp32", True, False),
    (0, "bf16", False, True),
    (1, "bf16", False, True),
    (2, "fp32", False, True),
    (2, "bf16", True, False),
    (3, "fp32", True, True),
    (3, "bf16", False, False),
    (3, "bf16", True, True),
]
VOCAB = 128
CHUNK = VOCAB * 7  # 7 positions a chunk: a micro batch of 2 x 15 targets is 5 chunks
CONFIG = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def run_case(stage: int, precision: str, tied: bool, checkpointing: bool, new: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.training import decay_groups, deepspeed_config, engine_nats, grad_norm, initialize

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG, tie_word_embeddings=tied), dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    config = deepspeed_config(micro_batch_size=2, grad_accum=2, grad_clip=1.0, precision=precision, zero_stage=stage)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=3e-3)
    engine, _ = initialize(model, optimizer, lambda step: 3e-3, 3e-3, config)
    data = torch.randint(0, VOCAB, (3, 2, 2, 16), generator=torch.Generator().manual_seed(1))
    losses, norms = [], []
    for step in range(3):
        step_losses, norm = [], None
        for micro in range(2):
            batch = data[step, micro]
            if new:
                nats, count = engine_nats(engine, input_ids=batch, labels=batch, chunk_elements=CHUNK)
                loss = nats / count
            else:
                loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            if micro == 1 and stage == 0:
                norm = grad_norm(engine.module)
            engine.step()
            step_losses.append(float(loss))
        losses.append(sum(step_losses) / 2)
        norms.append(float(norm if norm is not None else engine.get_global_grad_norm()))
    heldout = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    engine.module.eval()
    with torch.no_grad():
        final = float(engine.module(input_ids=heldout, labels=heldout).loss)
    return {"losses": losses, "grad_norms": norms, "heldout": final}


def main() -> None:
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": sys.argv[1], "DS_ACCELERATOR": "cpu"})
    import deepspeed

    from pipeline.training import quiet_libraries

    deepspeed.init_distributed(dist_backend="gloo")
    quiet_libraries()
    for case in CASES:
        old, new = (run_case(*case, new=flag) for flag in (False, True))
        print(json.dumps({"case": case, "old": old, "new": new}), flush=True)


if __name__ == "__main__":
    main()
