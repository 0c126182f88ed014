"""eval/perplexity.py: bits per byte against direct computations with the model, on a tiny random LLaMA.

The tokenizer is character-level (`tokenizers` WordLevel, one token per character), so token counts are known
without running it; the model is a 2-layer LLaMA from config, float32, on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eval.perplexity import LossResult, bits_per_byte, start_token_id, windows
from pipeline.config import ModelConfig
from pipeline.errors import JpadaptError
from pipeline.models import load_causal_lm

TEXTS = [
    (
        "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で"
        "ニャーニャー泣いていた事だけは記憶している。"
    ),
    "Hello, world. 2024年12月3日\n東京都",
    (
        "親譲りの無鉄砲で小供の時から損ばかりしている。小学校に居る時分学校の二階から飛び降りて一週間ほど腰を抜かした"
        "事がある。なぜそんな無闇をしたと聞く人があるかも知れぬ。別段深い理由でもない。"
    ),
    "短い",
]


def char_tokenizer(texts: list[str], *, bos: bool = True) -> PreTrainedTokenizerFast:
    chars = sorted(set("".join(texts)))
    specials = ["<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", **kwargs)


def tiny_llama(vocab_size: int, seed: int = 0):
    cfg = ModelConfig(
        from_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        }
    )
    return load_causal_lm(cfg, seed=seed)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer)).eval()


def full_context_nats(model, ids: list[int]) -> float:
    """NLL of ids[1:] given everything before, one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


def test_short_text_matches_direct_computation(model, tokenizer):
    text = TEXTS[0]
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) + 1  # one token per character
    result = bits_per_byte(model, tokenizer, [text], window=256, stride=128)
    expected = full_context_nats(model, ids)
    assert result.tokens == len(text)  # BOS is context only; the first character is scored
    assert result.bytes == len(text.encode("utf-8"))
    assert result.nats == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert result.loss == pytest.approx(expected / len(text), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected / len(text)), rel=1e-5)


def test_several_texts_sum(model, tokenizer):
    together = bits_per_byte(model, tokenizer, TEXTS, window=256, stride=128)
    alone = [bits_per_byte(model, tokenizer, [t], window=256, stride=128) for t in TEXTS]
    assert together.tokens == sum(r.tokens for r in alone) == sum(map(len, TEXTS))
    assert together.bytes == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert together.nats == pytest.approx(sum(r.nats for r in alone), rel=1e-5)


@pytest.mark.parametrize("window, stride", [(16, 4), (16, 15), (16, 16), (8, 1), (5, 100), (300, 7)])
def test_sliding_window_scores_every_token_once(model, tokenizer, window, stride):
    text = TEXTS[0] + TEXTS[2]
    spans = windows(len(text) + 1, window, stride)
    covered = [t for begin, end, scored in spans for t in range(end - scored, end)]
    assert covered == list(range(1, len(text) + 1))  # every target once, in order, BOS never
    assert all(end - begin <= window and begin >= 0 and scored <= end - begin - 1 for begin, end, scored in spans)
    result = bits_per_byte(model, tokenizer, [text], window=window, stride=min(stride, window))
    assert result.tokens == len(text)


def test_stride_one_gives_each_token_window_minus_one_context(model, tokenizer):
    """Independent oracle: with stride 1, token t is predicted from exactly the window - 1 tokens before it."""
    text = TEXTS[2][:60]
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    window = 12
    expected = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = ids[max(0, t - (window - 1)) : t + 1]
            logits = model(torch.tensor([context])).logits[0, -2].double()
            expected -= float(torch.log_softmax(logits, -1)[ids[t]])
    result = bits_per_byte(model, tokenizer, [text], window=window, stride=1, batch_size=16)
    assert result.tokens == len(text)
    assert result.nats == pytest.approx(expected, rel=1e-5)


def test_windows_give_the_same_result_at_any_batch_size(model, tokenizer):
    results = [
        bits_per_byte(model, tokenizer, TEXTS, window=24, stride=10, batch_size=b) for b in (1, 3, 8, 64)
    ]
    assert len({r.tokens for r in results}) == 1
    for r in results[1:]:
        assert r.nats == pytest.approx(results[0].nats, rel=1e-5)


def test_uniform_logits_give_log2_vocab_bits_per_token(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: the uniform distribution over all rows
    rows = model.get_output_embeddings().weight.shape[0]
    result = bits_per_byte(model, tokenizer, TEXTS, window=16, stride=5, batch_size=4)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert result.tokens == sum(map(len, TEXTS))
    assert result.bits_per_byte == pytest.approx(math.log2(rows) * result.tokens / n_bytes, rel=1e-6)


def test_start_token_falls_back_to_eos_and_can_be_left_out(model):
    no_bos = char_tokenizer(TEXTS, bos=False)
    assert no_bos.bos_token_id is None
    assert start_token_id(no_bos) == no_bos.eos_token_id
    text = TEXTS[1]
    ids = no_bos(text, add_special_tokens=False)["input_ids"]
    with_eos = bits_per_byte(model, no_bos, [text], window=64, stride=32)
    assert with_eos.nats == pytest.approx(full_context_nats(model, [no_bos.eos_token_id] + ids), rel=1e-5)
    bare = bits_per_byte(model, no_bos, [text], window=64, stride=32, add_bos=False)
    assert bare.tokens == len(text) - 1  # the first token has no context
    assert bare.bytes == with_eos.bytes
    assert bare.nats == pytest.approx(full_context_nats(model, ids), rel=1e-5)


def test_empty_texts_and_training_mode(model, tokenizer):
    model.train()
    result = bits_per_byte(model, tokenizer, ["", TEXTS[3], ""], window=8, stride=4)
    assert model.training  # restored
    model.eval()
    assert result.tokens == len(TEXTS[3])
    assert bits_per_byte(model, tokenizer, [], window=8, stride=4) == LossResult(0, 0, 0.0)
    assert math.isnan(LossResult(0, 0, 0.0).bits_per_byte)


def test_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="window"):
        bits_per_byte(model, tokenizer, TEXTS, window=1, stride=1)
    with pytest.raises(ValueError, match="stride"):
        bits_per_byte(model, tokenizer, TEXTS, window=8, stride=0)
    small = tiny_llama(8)  # fewer rows than the tokenizer has ids
    with pytest.raises(JpadaptError, match="embedding rows"):
        bits_per_byte(small, tokenizer, TEXTS, window=8, stride=4)


def test_deterministic(model, tokenizer):
    a = bits_per_byte(model, tokenizer, TEXTS, window=20, stride=7, batch_size=3)
    b = bits_per_byte(model, tokenizer, TEXTS, window=20, stride=7, batch_size=3)
    assert a == b
