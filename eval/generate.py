"""Greedy answers of a causal LM to fixed Japanese prompts, rendered the same way for every model.

    prompts = read_prompts([Path("prompts.jsonl")])
    texts = render_prompts(prompts, tokenizer, template)      # what each model is given
    outputs = greedy_outputs(model, tokenizer, texts, max_new_tokens=64)

A prompt file is JSONL, one prompt per line, each with a unique "id" and either
* "text": a completion prompt, given as it is after the start token (BOS, else EOS), or
* "instruction" (+ optional "input", optional "output" = the reference answer): an instruction prompt,
  rendered with the tokenizer's own chat template when it has one (an instruction-tuned model, or the sft
  adapter's tokenizer), else with the Japanese instruction template of `sft.template`, which is what sft
  trains a model without a chat template on. A base model thus sees the prompt format its tuned version
  learned, and the table shows what tuning changed.
Decoding is greedy (no sampling, no repetition penalty) up to `max_new_tokens` or EOS, one prompt at a time
(no padding, so a model's answer does not depend on the other prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import JpadaptError

COMPLETION = "completion"
INSTRUCTION = "instruction"


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str  # COMPLETION or INSTRUCTION
    text: str  # the completion text, or the instruction
    input: str  # an instruction's context ("" for none)
    reference: str  # an instruction's expected answer ("" for none)
    where: str  # file:line


def read_prompts(files: list[Path]) -> list[Prompt]:
    """Every prompt of the files, in order. A bad line raises JpadaptError naming file:line."""
    from data.instruct import jsonl_records

    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for path in files:
        for where, record in jsonl_records(path):
            prompt = _prompt(record, where)
            if prompt.id in seen:
                raise JpadaptError(f"{where}: prompt id {prompt.id!r} is already used at {seen[prompt.id]}")
            seen[prompt.id] = where
            prompts.append(prompt)
    return prompts


def _prompt(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise JpadaptError(f"{where}: expected a JSON object with \"id\" and \"text\" or \"instruction\"")
    unknown = sorted(set(record) - {"id", "text", "instruction", "input", "output"})
    if unknown:
        raise JpadaptError(f"{where}: unknown field(s) {', '.join(unknown)} (known: id, text, instruction, input, "
                           "output)")
    prompt_id = _field(record, "id", where, required=True)
    if ("text" in record) == ("instruction" in record):
        raise JpadaptError(f'{where}: give exactly one of "text" (a completion) or "instruction"')
    if "text" in record:
        if "input" in record or "output" in record:
            raise JpadaptError(f'{where}: "input" and "output" belong to instruction prompts, not "text" ones')
        return Prompt(prompt_id, COMPLETION, _field(record, "text", where, required=True), "", "", where)
    return Prompt(prompt_id, INSTRUCTION, _field(record, "instruction", where, required=True),
                  _field(record, "input", where, required=False), _field(record, "output", where, required=False),
                  where)


def _field(record: dict[str, Any], key: str, where: str, required: bool) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise JpadaptError(f'{where}: "{key}" must be a non-empty string')
    return value


def render_prompts(prompts: list[Prompt], tokenizer: Any, template: Any) -> list[str]:
    """The text each prompt gives the model (module docstring). `template`: a PromptTemplateConfig for
    tokenizers without a chat template. Special tokens (BOS) are part of the text where the template puts
    them; completion prompts get the start token when generated (`greedy_outputs`)."""
    from data.instruct import template_chat_template, user_message

    chat_template = getattr(tokenizer, "chat_template", None) or template_chat_template(template)
    texts = []
    for prompt in prompts:
        if prompt.kind == COMPLETION:
            texts.append(prompt.text)
            continue
        messages = [{"role": "user", "content": user_message(prompt.text, prompt.input, template.input)}]
        texts.append(tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                   add_generation_prompt=True))
    return texts


def greedy_outputs(model: Any, tokenizer: Any, prompts: list[Prompt], texts: list[str], max_new_tokens: int,
                   progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of `texts` (rendered `prompts`), decoded without special tokens and stripped."""
    import torch
    from tqdm import tqdm

    from eval.perplexity import start_token_id

    device = next(model.parameters()).device
    start = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for prompt, text in tqdm(list(zip(prompts, texts)), desc=desc, unit="prompt", disable=not progress):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if prompt.kind == COMPLETION and start is not None:
                ids = [start, *ids]
            input_ids = torch.tensor([ids], device=device)
            with torch.inference_mode():
                generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, use_cache=True)
            new = generated[0, input_ids.shape[1]:].tolist()
            outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs
