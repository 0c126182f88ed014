"""Prompt files for the evaluate stage's generations: parsing, rendering per tokenizer, greedy decoding; batched
`generate_until` (left padding, stop strings) against hand greedy loops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import decoders

from data.assets import stored_path
from eval.generate import (
    COMPLETION,
    INSTRUCTION,
    cut_at_stops,
    generate_until,
    greedy_outputs,
    read_prompts,
    render_prompts,
)
from pipeline.config import PromptTemplateConfig
from pipeline.errors import JpadaptError
from tests.test_perplexity import char_tokenizer, tiny_llama

TEXTS = ["日本の首都は東京です。", "富士山の高さは?", "以下に、あるタスクを説明する指示があります。#指示入力応答:\n"]


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_the_bundled_prompts_parse():
    prompts = read_prompts([stored_path("eval/prompts.jsonl")])
    kinds = [p.kind for p in prompts]
    assert len(prompts) == 10 and kinds.count(COMPLETION) == 5 and kinds.count(INSTRUCTION) == 5
    assert all(p.reference for p in prompts if p.kind == INSTRUCTION)
    assert len({p.id for p in prompts}) == len(prompts)


@pytest.mark.parametrize(("line", "fragment"), [
    ('{"id": "a"}', 'exactly one of "text"'),
    ('{"id": "a", "text": "x", "instruction": "y"}', 'exactly one of "text"'),
    ('{"id": "a", "text": "x", "output": "y"}', "belong to instruction prompts"),
    ('{"id": "a", "text": "  "}', '"text" must be a non-empty string'),
    ('{"text": "x"}', '"id" must be a non-empty string'),
    ('{"id": "a", "instruction": "x", "input": 3}', '"input" must be a non-empty string'),
    ('{"id": "a", "prompt": "x"}', "unknown field(s) prompt"),
    ('["a"]', "expected a JSON object"),
    ('{"id": "a", "text": "x"', "not valid JSON"),
])
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, fragment):
    path = write(tmp_path, '{"id": "ok", "text": "x"}', line)
    with pytest.raises(JpadaptError, match="prompts.jsonl:2") as info:
        read_prompts([path])
    assert fragment in str(info.value)


def test_duplicate_ids_and_non_utf8(tmp_path):
    with pytest.raises(JpadaptError, match="prompts.jsonl:2: prompt id 'a' is already used at .*prompts.jsonl:1"):
        read_prompts([write(tmp_path, '{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}')])
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"id": "a", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(JpadaptError, match="latin1.jsonl:1"):
        read_prompts([path])


def test_instruction_prompts_use_the_japanese_template_or_the_tokenizer_own(tmp_path):
    prompts = read_prompts([write(tmp_path, json.dumps({"id": "c", "text": "日本の首都は"}, ensure_ascii=False),
                                  json.dumps({"id": "i", "instruction": "要約して", "input": "長い文"},
                                             ensure_ascii=False))])
    tokenizer = char_tokenizer(TEXTS)
    template = PromptTemplateConfig()
    completion, instruction = render_prompts(prompts, tokenizer, template)
    assert completion == "日本の首都は"
    assert instruction == (f"<s>{template.system}\n\n{template.instruction}\n要約して\n\n{template.input}\n長い文\n\n"
                           f"{template.response}\n")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert render_prompts(prompts, tokenizer, template)[1] == f"[要約して\n\n{template.input}\n長い文]>"


def test_greedy_outputs_match_generate_with_the_start_token(tmp_path):
    prompts = read_prompts([write(tmp_path, json.dumps({"id": "c", "text": "日本の"}, ensure_ascii=False))])
    tokenizer = char_tokenizer(TEXTS)
    model = tiny_llama(len(tokenizer), seed=3)
    model.generation_config.repetition_penalty = 5.0  # a folder's generation_config must not change greedy decoding
    [answer] = greedy_outputs(model, tokenizer, prompts, ["日本の"], max_new_tokens=5, progress=False)
    ids = [tokenizer.bos_token_id] + tokenizer("日本の", add_special_tokens=False)["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(5):  # greedy by hand: argmax of the last position, no penalty
            nxt = int(model(torch.tensor([ids + expected])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            expected.append(nxt)
    assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()
    model.train()
    greedy_outputs(model, tokenizer, prompts, ["日本の"], max_new_tokens=2, progress=False)
    assert model.training


# ---------------------------------------------------------------------------------------------------------------
# generate_until: batched greedy decoding with stop strings

PROMPTS = ["日本の", "富士山の高さは?", "以下に、あるタスクを説明する指示があります。", "東京", "首都は"]
MAX_NEW = 16


def fused_tokenizer():
    """The character tokenizer, decoding without spaces between tokens (so stop strings are plain substrings)."""
    tokenizer = char_tokenizer(TEXTS + [" "])
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


def prompt_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def hand_greedy(model, ids: list[int], steps: int, eos: int | None) -> tuple[list[int], float]:
    """Greedy by hand, one full forward pass per token: (tokens before EOS, smallest top-2 logit gap seen)."""
    out: list[int] = []
    gap = math.inf
    with torch.no_grad():
        for _ in range(steps):
            top = model(torch.tensor([ids + out])).logits[0, -1].topk(2)
            gap = min(gap, float(top.values[0] - top.values[1]))
            nxt = int(top.indices[0])
            if nxt == eos:
                break
            out.append(nxt)
    return out, gap


@pytest.fixture(scope="module")
def decisive():
    """A tiny LLaMA with clear argmax margins (lm_head scaled by 100: top-2 logit gaps of 0.19 or more along every
    answer below, where float rounding of padded batches moves logits by ~1e-5) that ends the first prompt's answer
    with EOS: the EOS row is 1.1 times the row of the token greedy decoding would give 4th, so EOS out-scores that
    token there (where its logit is positive) or earlier. Answers (seed 11): 3, 16, 16, 16 and 2 tokens."""
    tokenizer = fused_tokenizer()
    model = tiny_llama(len(tokenizer), seed=11).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
        free, _ = hand_greedy(model, prompt_ids(tokenizer, PROMPTS[0]), 4, eos=None)
        model.lm_head.weight[tokenizer.eos_token_id] = 1.1 * model.lm_head.weight[free[3]]
    return model, tokenizer


def test_generate_until_equals_a_hand_greedy_loop_that_stops_at_eos(decisive):
    model, tokenizer = decisive
    ids = prompt_ids(tokenizer, PROMPTS[0])
    expected, gap = hand_greedy(model, ids, MAX_NEW, eos=tokenizer.eos_token_id)
    assert 1 <= len(expected) < MAX_NEW  # stopped by EOS, after some text
    assert gap > 0.05  # far above rounding: the comparison is exact
    [answer] = generate_until(model, tokenizer, [ids], (), MAX_NEW, progress=False)
    assert answer == tokenizer.decode(expected, skip_special_tokens=True) != ""
    # Without EOS in reach, it runs to max_new_tokens.
    ids = prompt_ids(tokenizer, PROMPTS[2])
    expected, gap = hand_greedy(model, ids, 6, eos=tokenizer.eos_token_id)
    assert len(expected) == 6 and gap > 0.05
    assert generate_until(model, tokenizer, [ids], [], 6, progress=False) == [
        tokenizer.decode(expected, skip_special_tokens=True)]


def test_generate_until_batched_with_left_padding_equals_one_at_a_time(decisive):
    model, tokenizer = decisive
    prompts = [prompt_ids(tokenizer, text) for text in PROMPTS]
    assert len({len(p) for p in prompts}) >= 4  # padded batches
    one = generate_until(model, tokenizer, prompts, (), MAX_NEW, batch_size=1, progress=False)
    three = generate_until(model, tokenizer, prompts, (), MAX_NEW, batch_size=3, progress=False)
    assert three == one
    assert len(set(one)) == len(one) and all(one)  # distinct answers: each row got its own prompt
    assert len(one[0]) < MAX_NEW and any(len(text) == MAX_NEW for text in one)  # EOS ended one row early
    for text, ids in zip(one, prompts):  # and each row is its own hand greedy run
        expected, gap = hand_greedy(model, ids, MAX_NEW, eos=tokenizer.eos_token_id)
        assert text == tokenizer.decode(expected, skip_special_tokens=True) and gap > 0.05


def count_forwards(model, calls: list[bool]):
    return model.register_forward_pre_hook(lambda module, args: calls.append(module.training))


def test_stop_strings_cut_the_output_and_end_generation_early(decisive):
    model, tokenizer = decisive
    ids = prompt_ids(tokenizer, PROMPTS[2])
    calls: list[bool] = []
    handle = count_forwards(model, calls)
    try:
        [full] = generate_until(model, tokenizer, [ids], (), MAX_NEW, progress=False)
        full_calls = len(calls)
        # A two-character stop string first seen at `at`, past the start: the tokens at..at+1 complete it.
        at = next(i for i in range(2, len(full) - 1) if full.find(full[i:i + 2]) == i)
        stop = full[at:at + 2]
        calls.clear()
        [cut] = generate_until(model, tokenizer, [ids], ("never", stop), MAX_NEW, progress=False)
    finally:
        handle.remove()
    assert len(full) == MAX_NEW == full_calls
    assert cut == full[:at] == cut_at_stops(full, (stop,))
    assert len(calls) == at + 2  # one forward pass per token, none after the one completing the stop string

    prompts = [prompt_ids(tokenizer, text) for text in PROMPTS]
    fulls = generate_until(model, tokenizer, prompts, (), MAX_NEW, batch_size=3, progress=False)
    until = ("\n", stop, fulls[3][1:3])
    expected = [cut_at_stops(text, until) for text in fulls]
    assert generate_until(model, tokenizer, prompts, until, MAX_NEW, batch_size=3, progress=False) == expected
    assert generate_until(model, tokenizer, prompts, until, MAX_NEW, batch_size=1, progress=False) == expected
    assert sum(e != f for e, f in zip(expected, fulls)) >= 2  # the stops did cut some answers


@pytest.mark.parametrize(("setting", "value"), [("repetition_penalty", 1.3), ("no_repeat_ngram_size", 2)])
def test_a_folders_generation_config_does_not_change_greedy_answers(decisive, setting, value):
    model, tokenizer = decisive
    ids = prompt_ids(tokenizer, PROMPTS[2])  # an answer with repeats: "が首日すりで首日すりで…"
    plain = generate_until(model, tokenizer, [ids], (), MAX_NEW, progress=False)
    saved = getattr(model.generation_config, setting)
    setattr(model.generation_config, setting, value)  # as an instruct model's generation_config.json may set
    try:
        assert generate_until(model, tokenizer, [ids], (), MAX_NEW, progress=False) == plain
    finally:
        setattr(model.generation_config, setting, saved)


def test_generate_until_runs_in_eval_mode_and_restores_training(decisive):
    model, tokenizer = decisive
    calls: list[bool] = []
    model.train()
    handle = count_forwards(model, calls)
    try:
        generate_until(model, tokenizer, [prompt_ids(tokenizer, PROMPTS[1])], (), 3, progress=False)
        assert model.training
        assert calls and not any(calls)
        model.eval()
        generate_until(model, tokenizer, [prompt_ids(tokenizer, PROMPTS[1])], (), 2, progress=False)
        assert not model.training
    finally:
        handle.remove()
        model.eval()


def test_generate_until_rejects_empty_prompts_and_bad_batch_sizes(decisive):
    model, tokenizer = decisive
    with pytest.raises(JpadaptError, match="an empty prompt"):
        generate_until(model, tokenizer, [prompt_ids(tokenizer, "東京"), []], (), 4, progress=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        generate_until(model, tokenizer, [prompt_ids(tokenizer, "東京")], (), 4, batch_size=0, progress=False)
    assert generate_until(model, tokenizer, [], (), 4, progress=False) == []
