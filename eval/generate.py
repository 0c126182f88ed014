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
Decoding is greedy (no sampling, no repetition penalty) up to `max_new_tokens` or EOS, batched with left
padding (`generate_until`, which the generative benchmark tasks use too).
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
                   progress: bool = True, desc: str = "generate", batch_size: int = 8) -> list[str]:
    """Greedy continuations of `texts` (rendered `prompts`), decoded without special tokens and stripped."""
    from eval.perplexity import start_token_id

    start = start_token_id(tokenizer)
    ids = []
    for prompt, text in zip(prompts, texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append([start, *tokens] if prompt.kind == COMPLETION and start is not None else list(tokens))
    outputs = generate_until(model, tokenizer, ids, (), max_new_tokens, batch_size, progress, desc)
    return [output.strip() for output in outputs]


# ---------------------------------------------------------------------------------------------------------------
# Batched greedy generation


def generate_until(model: Any, tokenizer: Any, prompts: list[list[int]], until: tuple[str, ...] | list[str],
                   max_new_tokens: int, batch_size: int = 8, progress: bool = True, desc: str = "generate",
                   ) -> list[str]:
    """Greedy continuation of each token-id prompt, decoded without special tokens and cut before the first
    stop string of `until` (lm-evaluation-harness's generate_until), at most `max_new_tokens` tokens or EOS.

    Prompts run `batch_size` at a time, longest first, left-padded with an attention mask, so positions and
    attention of every prompt are those it would have alone: a prompt's answer does not depend on its batch
    (up to float rounding in the padded matrix products, which moves a greedy choice only where two logits tie
    to ~1e-6; the tests check batched == one at a time). A sequence that has produced a stop string or EOS
    stops counting; the batch ends when all have. The model runs in eval mode (restored afterwards) on the
    device of its parameters."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(not ids for ids in prompts):
        raise JpadaptError("generate: an empty prompt (no start token and no text) cannot be continued")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            for first in range(0, len(order), batch_size):
                batch = order[first:first + batch_size]
                width = max(len(prompts[i]) for i in batch)
                input_ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch],
                                    device=device)
                with torch.inference_mode():
                    # Stated explicitly: generate() fills unset fields from the folder's generation_config, whose
                    # repetition penalty or no-repeat n-grams must not change greedy decoding.
                    generated = model.generate(
                        input_ids=input_ids, attention_mask=mask, use_cache=True,
                        generation_config=GenerationConfig(
                            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0),
                        stopping_criteria=_stop_criteria(tokenizer, until, width))
                for row, i in enumerate(batch):
                    outputs[i] = cut_at_stops(_decode_until_eos(tokenizer, generated[row, width:].tolist()), until)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return outputs


def cut_at_stops(text: str, until: tuple[str, ...] | list[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _decode_until_eos(tokenizer: Any, ids: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:  # what follows EOS is padding of a finished row
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _stop_criteria(tokenizer: Any, until: tuple[str, ...] | list[str], prompt_width: int) -> Any:
    """A StoppingCriteria that marks each row done once its generated text holds a stop string. Only the last
    tokens are decoded each step: a stop string that first appears must end in the newest token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stops = [s for s in until if s]
    if not stops:
        return StoppingCriteriaList()
    tail = 4 * max(len(s) for s in stops) + 8  # tokens: a character is at most 4 byte-level tokens

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            new = input_ids[:, prompt_width:]
            done = [any(s in tokenizer.decode(row[-tail:].tolist(), skip_special_tokens=True) for s in stops)
                    for row in new]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])
