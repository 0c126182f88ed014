"""Small real tokenizers for stage tests: trained here in well under a second, saved like any HF folder."""

from __future__ import annotations

from collections.abc import Iterable


def byte_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 509):
    """A byte-level BPE trained on `texts` with <s>, </s>, <unk>: every text round-trips, and Japanese costs
    several tokens per character, which keeps sequences long enough to exercise windows and packing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def pickle_only_copy(folder, target):
    """`folder` (an HF model folder) as an older checkpoint ships it: the same files, but the weights in a
    `pytorch_model.bin` (torch.save's pickle) instead of safetensors. Returns the new folder."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    folder, target = Path(folder), Path(target)
    target.mkdir(parents=True)
    state = {}
    for file in sorted(folder.iterdir()):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        elif file.is_file() and file.name != "model.safetensors.index.json":
            (target / file.name).write_bytes(file.read_bytes())
    torch.save(state, target / "pytorch_model.bin")
    return target
