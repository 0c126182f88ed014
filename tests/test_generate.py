"""Prompt files for the evaluate stage's generations: parsing, rendering per tokenizer, greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.assets import stored_path
from eval.generate import COMPLETION, INSTRUCTION, greedy_outputs, read_prompts, render_prompts
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
