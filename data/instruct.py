"""Instruction data for SFT: read conversations, render them with a chat template, mask the prompt, batch.

    conversations = read_conversations(cfg.data, "sft.data", cfg.template.input)
    tokenizer.chat_template = template_chat_template(cfg.template)    # when the tokenizer has none
    examples, stats = tokenize_all(conversations, tokenizer, cfg.max_seq_len)
    rows = epoch_sequences(examples, packing=cfg.packing, max_seq_len=cfg.max_seq_len, seed=seed, epoch=epoch,
                           group_size=cfg.micro_batch_size * 50)
    batch = collate(rows[:cfg.micro_batch_size], tokenizer.pad_token_id, packed=cfg.packing)

Records (JSONL, optionally .gz/.xz), detected per record: instruction format `{"instruction", "input"?,
"output"}` becomes one user turn and one assistant turn; chat format `{"messages": [...]}` is an optional
system message, then user and assistant messages alternating, ending with an assistant message.

Loss mask: the whole conversation is rendered once with the chat template and tokenized once; each assistant
turn's answer is the text that rendering up to and including that turn adds to rendering up to it with the
generation prompt. Tokens starting inside an answer are learned (the end-of-turn marker too, so the model
learns to stop); every other token gets IGNORE_INDEX.

Packing: several examples per row with positions restarting at 0 at each one; transformers (v5) turns such
position ids into a block-diagonal causal mask when attention_mask is None and no KV cache is in use, so no
token attends to another example. Call the model with use_cache=False: by default it makes a cache even in
training mode, and then the mask is plain causal across the whole row.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.readers import (
    _SURROGATE_ESCAPE,
    _decode,
    _has_lone_surrogate,
    _json_type,
    _numbered_lines,
    _open_binary,
    _Problems,
    detect_format,
)
from pipeline.config import PromptTemplateConfig
from pipeline.errors import JpadaptError
from pipeline.paths import display_path, resolve_files

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label torch's cross entropy (and transformers' loss) skips
# A bad line always stops the run: a silently skipped example would change what the model learns.
_RAISE = _Problems("fail", Counter())


# ------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str  # "file.jsonl:17": the file's display name and the record's 1-based line
    reference: str  # the last assistant message's content: the expected answer
    instruction: str  # instruction format: the instruction; chat format: the last user message's content
    input: str  # instruction format: the input ('' if absent); chat format: ''


def read_conversations(patterns: list[str], key: str, input_marker: str) -> list[Conversation]:
    """Every record of the files that `patterns` (config entry `key`) name, in file and line order.

    `input_marker` goes on its own line between an instruction and its non-empty input ("" for none).
    Raises JpadaptError naming file:line for the first bad record, or naming `key` when there is no record.
    """
    files = resolve_files(patterns, key)
    conversations: list[Conversation] = []
    for path in files:
        conversations.extend(_file_conversations(path, input_marker))
    if not conversations:
        raise JpadaptError(f"{key}: no examples in {', '.join(display_path(path) for path in files)}")
    return conversations


def _file_conversations(path: Path, input_marker: str) -> Iterator[Conversation]:
    for where, record in jsonl_records(path):
        yield _conversation(record, where, input_marker)


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed record) for every non-blank line of a JSONL file (also .gz, .xz); a line that is not
    UTF-8 or not JSON raises JpadaptError naming file:line."""
    name = display_path(path)
    _, compression = detect_format(path, "jsonl")
    with _open_binary(path, name, compression) as stream:
        for lineno, raw in _numbered_lines(stream, name):
            if raw.strip():
                where = f"{name}:{lineno}"
                yield where, _parse(raw, where)


def _parse(raw: bytes, where: str) -> Any:
    # Without its line break, so that an error at the end of a cut-off line is at a column of that line.
    line = _decode(raw, where, _RAISE).rstrip("\r\n")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise JpadaptError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    # The tokenizer cannot encode a lone surrogate; the full check runs only on lines that spell one.
    if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(record):
        raise JpadaptError(f"{where}: not valid Unicode: a \\uD800-\\uDFFF escape without its pair")
    return record


def _conversation(record: Any, where: str, input_marker: str) -> Conversation:
    if not isinstance(record, dict):
        raise JpadaptError(f"{where}: expected a JSON object, got {_json_type(record)}")
    chat = "messages" in record
    instruction = "instruction" in record or "output" in record
    if chat and instruction:
        raise JpadaptError(f'{where}: the record has both "messages" and "instruction"/"output"; use one format')
    if chat:
        return _chat_conversation(record["messages"], where)
    if instruction:
        return _instruction_conversation(record, where, input_marker)
    fields = ", ".join(record) or "none"
    raise JpadaptError(f'{where}: expected "instruction"/"output" or "messages" (fields: {fields})')


def _instruction_conversation(record: dict[str, Any], where: str, input_marker: str) -> Conversation:
    for field in ("instruction", "output"):
        if field not in record:
            raise JpadaptError(
                f'{where}: the record has no "{field}" field (instruction format needs instruction and output)'
            )
    instruction = _string(record["instruction"], '"instruction"', where, required=True)
    output = _string(record["output"], '"output"', where, required=True)
    # null is how many exporters (pandas, datasets) write a missing input.
    context = _string(record.get("input") or "", '"input"', where, required=False)
    messages = ({"role": "user", "content": user_message(instruction, context, input_marker)},
                {"role": "assistant", "content": output})
    return Conversation(messages=messages, where=where, reference=output, instruction=instruction, input=context)


def user_message(instruction: str, context: str, input_marker: str) -> str:
    """An instruction record's user turn: the instruction, then its input (if any) after the input marker."""
    if not context:
        return instruction
    return f"{instruction}\n\n{input_marker}\n{context}" if input_marker else f"{instruction}\n\n{context}"


def _chat_conversation(raw_messages: Any, where: str) -> Conversation:
    if not isinstance(raw_messages, list):
        raise JpadaptError(f'{where}: "messages" must be a list, got {_json_type(raw_messages)}')
    if not raw_messages:
        raise JpadaptError(f'{where}: "messages" is empty')
    messages = tuple(_message(message, number, where) for number, message in enumerate(raw_messages, 1))
    _check_turn_order([message["role"] for message in messages], where)
    last_user = next(message for message in reversed(messages) if message["role"] == "user")
    return Conversation(
        messages=messages, where=where, reference=messages[-1]["content"], instruction=last_user["content"], input=""
    )


def _message(message: Any, number: int, where: str) -> Message:
    if not isinstance(message, dict):
        raise JpadaptError(f"{where}: message {number} must be an object, got {_json_type(message)}")
    for field in ("role", "content"):
        if field not in message:
            raise JpadaptError(f'{where}: message {number} has no "{field}" field')
    role = message["role"]
    if role not in ROLES:
        shown = json.dumps(role, ensure_ascii=False)
        raise JpadaptError(f"{where}: message {number} has the unknown role {shown} (expected system, user or assistant)")
    # An empty system message is a deliberate "no preamble"; an empty turn is a broken record.
    content = _string(message["content"], f'message {number}\'s "content"', where, required=role != "system")
    return {"role": role, "content": content}


def _check_turn_order(roles: list[str], where: str) -> None:
    for number, role in enumerate(roles[1:], 2):
        if role == "system":
            raise JpadaptError(f"{where}: message {number} is a system message; only the first message may be one")
    start = 1 if roles[0] == "system" else 0
    for offset, role in enumerate(roles[start:]):
        expected = "assistant" if offset % 2 else "user"
        if role != expected:
            raise JpadaptError(
                f"{where}: message {start + offset + 1} is {role}, expected {expected} (after an optional system "
                "message, user and assistant messages alternate, starting with user)"
            )
    if roles[-1] != "assistant":
        raise JpadaptError(
            f"{where}: the last message is {roles[-1]}; a conversation must end with an assistant message "
            "(the answer to learn)"
        )


def _string(value: Any, what: str, where: str, *, required: bool) -> str:
    if not isinstance(value, str):
        raise JpadaptError(f"{where}: {what} must be a string, got {_json_type(value)}")
    if required and not value.strip():
        raise JpadaptError(f"{where}: {what} is empty")
    return value


# --------------------------------------------------------------------------------------------- chat template

# The markers are set as Jinja string literals in front of this body (see template_chat_template).
_TEMPLATE_BODY = (
    "{%- set preamble = default_system -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set preamble = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{{- bos_token if bos_token else '' -}}"
    "{%- if preamble -%}{{- preamble + '\\n\\n' -}}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ('' if loop.first else '\\n\\n') + instruction_marker + '\\n' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '\\n\\n' + response_marker + '\\n' + message['content'] + (eos_token if eos_token else '') -}}"
    "{%- else -%}"
    "{{- raise_exception('this chat template knows system (first only), user and assistant messages, not '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n\\n' + response_marker + '\\n' -}}{%- endif -%}"
)


def template_chat_template(template: PromptTemplateConfig) -> str:
    """The Japanese instruction format as a Hugging Face chat template (Jinja), rendered as

        {bos}{system}\\n\\n{instruction}\\n{user}\\n\\n{response}\\n{assistant}{eos}\\n\\n{instruction}\\n{user}...

    A system message replaces `template.system`; an empty preamble leaves out its blank line. With
    add_generation_prompt the text ends with "\\n\\n{response}\\n". `template.input` is not used here:
    read_conversations already wrote it into the user content.
    """
    markers = {
        "default_system": template.system,
        "instruction_marker": template.instruction,
        "response_marker": template.response,
    }
    header = "".join(f"{{%- set {name} = {_jinja_string(value)} -%}}" for name, value in markers.items())
    return header + _TEMPLATE_BODY


def _jinja_string(text: str) -> str:
    # Jinja reads string literals with Python's escapes (quotes, backslashes, \n, \u, \U), so repr is one.
    return repr(text)


# ------------------------------------------------------------------------------------------ tokenize and mask


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32 (any vocabulary fits; half the memory of int64), the rendered conversation
    labels: np.ndarray  # int32, the token id where it is learned, IGNORE_INDEX elsewhere
    where: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        return int(np.count_nonzero(np.asarray(self.labels) != IGNORE_INDEX))


def tokenize_conversation(conv: Conversation, tokenizer: Any, max_seq_len: int) -> tuple[Example | None, bool]:
    """(example, truncated): the conversation rendered by `tokenizer.chat_template`, tokenized, prompt masked.

    A conversation longer than `max_seq_len` tokens keeps its first `max_seq_len`; the example is None when no
    answer token is left. Raises JpadaptError when the template renders an earlier part of the conversation
    differently inside the whole (then prompt and answer cannot be told apart).
    """
    text, answers = _answer_spans(conv, tokenizer)
    # The template writes bos and the end-of-turn markers itself, so no special tokens are added here.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    starts = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
    learned = np.zeros(len(input_ids), dtype=bool)
    for begin, end in answers:
        learned |= (starts >= begin) & (starts < end)
    labels = np.where(learned, input_ids, IGNORE_INDEX).astype(np.int32)
    truncated = len(input_ids) > max_seq_len
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if not (labels != IGNORE_INDEX).any():
        return None, truncated
    return Example(input_ids=input_ids, labels=labels, where=conv.where), truncated


def _answer_spans(conv: Conversation, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the [begin, end) character span of each assistant answer in it."""
    whole = _render(tokenizer, conv.messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, conv.messages[:index], generation_prompt=True)
        turn = _render(tokenizer, conv.messages[: index + 1], generation_prompt=False)
        if not (turn.startswith(prompt) and whole.startswith(turn)):
            raise JpadaptError(
                f"{conv.where}: the chat template is not prefix-stable at message {index + 1} (the rendering up to "
                "that answer is not the start of the whole conversation's rendering, or does not start with the "
                "rendered prompt), so prompt and answer cannot be told apart; use jpadapt's own template "
                "(sft.prompt_format: template)"
            )
        spans.append((len(prompt), len(turn)))
    return whole, spans


def _render(tokenizer: Any, messages: tuple[Message, ...], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(conv: Conversation, tokenizer: Any) -> str:
    """What the model is given to answer the conversation's last turn: all but the last message, rendered
    with the generation prompt."""
    return _render(tokenizer, conv.messages[:-1], generation_prompt=True)


@dataclass(frozen=True)
class DataStats:
    examples: int  # conversations tokenized
    kept: int  # examples with an answer token left
    truncated: int  # kept examples that were cut to max_seq_len
    dropped: int  # examples with no answer token left after truncation (examples = kept + dropped)
    tokens: int  # the rest are over kept examples, after truncation
    response_tokens: int
    max_tokens: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def tokenize_all(
    convs: list[Conversation], tokenizer: Any, max_seq_len: int, desc: str = "tokenize sft"
) -> tuple[list[Example], DataStats]:
    """The kept examples in input order, and what tokenizing did to them."""
    examples: list[Example] = []
    truncated = 0
    for conv in tqdm(convs, desc=desc, unit="example", disable=None, leave=False):
        example, cut = tokenize_conversation(conv, tokenizer, max_seq_len)
        if example is not None:
            examples.append(example)
            truncated += cut
    lengths = [len(example) for example in examples]
    stats = DataStats(
        examples=len(convs),
        kept=len(examples),
        truncated=truncated,
        dropped=len(convs) - len(examples),
        tokens=sum(lengths),
        response_tokens=sum(example.response_tokens for example in examples),
        max_tokens=max(lengths, default=0),
    )
    return examples, stats


# ------------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Sequence:
    """One row of a batch before padding: one example, or several packed back to back."""

    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    position_ids: np.ndarray  # int64, restarting at 0 at every example
    examples: int

    def __len__(self) -> int:
        return len(self.input_ids)


def epoch_sequences(
    examples: list[Example], *, packing: bool, max_seq_len: int, seed: int, epoch: int, group_size: int,
    batch_rows: int,
) -> list[Sequence]:
    """The rows of one epoch, a pure function of the arguments; every example appears in exactly one row.

    The example order is a fresh seeded shuffle per epoch, cut into windows of `group_size` examples that keep
    that order. packing: each window's examples are packed into rows of at most `max_seq_len` tokens, first fit
    in decreasing length (an example is never split), which leaves far less room unused than appending in order
    (examples of 300 tokens in rows of 512 pack one per row in order, but pair up with shorter ones here).
    Otherwise one example per row. Either way each window's rows are sorted by length and cut into runs of
    `batch_rows` (the rows one micro step reads over all ranks), so a micro batch holds rows of similar length
    and little padding; the runs are then put in a seeded random order, so that long and short rows do not come
    as a curriculum from long to short.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    too_long = [example.where for example in examples if len(example) > max_seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_seq_len {max_seq_len}, e.g. {too_long[0]}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    rng = np.random.default_rng([seed, epoch])
    shuffled = [examples[i] for i in rng.permutation(len(examples))]
    rows: list[Sequence] = []
    for start in range(0, len(shuffled), group_size):
        window = shuffled[start : start + group_size]
        groups = _first_fit_decreasing(window, max_seq_len) if packing else [[example] for example in window]
        # sorted() is stable, so ties keep their shuffled order: the result stays deterministic.
        ordered = sorted((_sequence(group) for group in groups), key=len, reverse=True)
        runs = [ordered[i : i + batch_rows] for i in range(0, len(ordered), batch_rows)]
        rows.extend(row for index in rng.permutation(len(runs)) for row in runs[index])
    return rows


def _first_fit_decreasing(examples: list[Example], max_seq_len: int) -> list[list[Example]]:
    """Longest example first, each into the first row with room for it, else into a new row."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        for index, room in enumerate(free):
            if len(example) <= room:
                rows[index].append(example)
                free[index] -= len(example)
                break
        else:
            rows.append([example])
            free.append(max_seq_len - len(example))
    return rows


def _sequence(examples: list[Example]) -> Sequence:
    # Labels are concatenated as they are: every example starts with a prompt token (IGNORE_INDEX), so the
    # shifted loss never asks one example's last token to predict the next example.
    return Sequence(
        input_ids=np.concatenate([example.input_ids for example in examples]).astype(np.int64),
        labels=np.concatenate([example.labels for example in examples]).astype(np.int64),
        position_ids=np.concatenate([np.arange(len(example), dtype=np.int64) for example in examples]),
        examples=len(examples),
    )


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # (rows, width) int64, pad_id in the padding
    labels: np.ndarray  # (rows, width) int64, IGNORE_INDEX in the padding
    position_ids: np.ndarray  # (rows, width) int64
    attention_mask: np.ndarray | None  # None when packed (the mask comes from position_ids), else 1 real / 0 pad
    tokens: int  # real (non-pad) tokens
    response_tokens: int  # tokens with a label


def collate(seqs: list[Sequence], pad_id: int, packed: bool) -> Batch:
    """Right-pad `seqs` to the longest of them.

    Packed rows have no attention mask, so their padding gets positions 0, 1, 2, ...: a block of its own that
    no real token attends to. Unpacked rows get an attention mask, and the padding's positions just continue.
    """
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    width = max(len(seq) for seq in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((len(seqs), width), dtype=np.int64)
    attention_mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        n = len(seq)
        input_ids[row, :n] = seq.input_ids
        labels[row, :n] = seq.labels
        position_ids[row, :n] = seq.position_ids
        position_ids[row, n:] = np.arange(width - n) if packed else np.arange(n, width)
        attention_mask[row, :n] = 1
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        attention_mask=None if packed else attention_mask,
        tokens=int(attention_mask.sum()),
        response_tokens=int((labels != IGNORE_INDEX).sum()),
    )
