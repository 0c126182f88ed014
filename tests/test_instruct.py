"""data/instruct.py: reading instruction/chat records, the Japanese chat template, loss masks and batching.

Tokenizers are the bundled LLaMA-2 (SentencePiece with byte fallback, given jpadapt's template) and Qwen (its
own chat template, which rewrites earlier assistant turns). Expected texts are written out by hand.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from jinja2 import TemplateError

from data.instruct import (
    IGNORE_INDEX,
    Conversation,
    Example,
    Sequence,
    collate,
    epoch_sequences,
    prompt_text,
    read_conversations,
    template_chat_template,
    tokenize_all,
    tokenize_conversation,
)
from pipeline.config import PromptTemplateConfig
from pipeline.errors import JpadaptError
from pipeline.paths import display_path
from tokenizer.hf import load_hf_tokenizer

PREAMBLE = "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を記述してください。"
MARKER = "### 入力:"
CHATML = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def llama():
    tok = load_hf_tokenizer("llama2")
    assert tok.chat_template is None  # so jpadapt's template is the one under test
    tok.chat_template = template_chat_template(PromptTemplateConfig())
    return tok


@pytest.fixture(scope="module")
def qwen():
    tok = load_hf_tokenizer("qwen")
    assert "<think>" in tok.chat_template  # Qwen3's own template
    return tok


@pytest.fixture(scope="module")
def chatml():
    tok = load_hf_tokenizer("qwen")
    tok.chat_template = CHATML
    return tok


def chat(*contents: str, system: str | None = None) -> Conversation:
    """A conversation alternating user and assistant messages, built the way read_conversations would."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(contents)]
    return Conversation(tuple(messages), where="t.jsonl:1", reference=contents[-1], instruction=contents[-2], input="")


def write_jsonl(path: Path, *lines: object) -> Path:
    """One line per item: bytes as they are, str encoded, anything else as JSON."""
    with path.open("wb") as out:
        for line in lines:
            if not isinstance(line, bytes):
                line = (line if isinstance(line, str) else json.dumps(line)).encode()
            out.write(line + b"\n")
    return path


def read(path: Path, marker: str = MARKER) -> list[Conversation]:
    return read_conversations([str(path)], "sft.data", marker)


def one(tmp_path: Path, record: dict) -> Conversation:
    """The conversation of a single instruction-format record, read from a file."""
    (conv,) = read(write_jsonl(tmp_path / "one.jsonl", record))
    return conv


def labeled(example: Example) -> np.ndarray:
    return example.input_ids[example.labels != IGNORE_INDEX]


def labeled_runs(example: Example) -> list[np.ndarray]:
    """The labeled token ids as maximal runs of consecutive positions."""
    positions = np.flatnonzero(example.labels != IGNORE_INDEX)
    breaks = np.flatnonzero(np.diff(positions) > 1) + 1
    return [example.input_ids[run] for run in np.split(positions, breaks)]


def example(length: int, answer: int, first: int = 100) -> Example:
    """An example of `length` tokens with ids first, first + 1, ...; its last `answer` tokens are learned."""
    ids = np.arange(first, first + length, dtype=np.int32)
    labels = np.where(np.arange(length) >= length - answer, ids, IGNORE_INDEX).astype(np.int32)
    return Example(input_ids=ids, labels=labels, where=f"e{first}")


def pieces(row: Sequence) -> list[np.ndarray]:
    """The token ids of each example packed into `row`, split where the positions restart."""
    return np.split(row.input_ids, np.flatnonzero(row.position_ids == 0)[1:])


# ------------------------------------------------------------------------------------------------- reading


def test_instruction_record_without_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", {"instruction": "日本の首都は?", "input": "", "output": "東京", "id": 7})
    (conv,) = read(path)
    assert conv.messages == ({"role": "user", "content": "日本の首都は?"}, {"role": "assistant", "content": "東京"})
    assert (conv.instruction, conv.input, conv.reference) == ("日本の首都は?", "", "東京")
    assert conv.where == f"{display_path(path)}:1"


def test_instruction_record_with_input_gets_the_marker(tmp_path):
    record = {"instruction": "要約して", "input": "長い文章", "output": "短い"}
    path = write_jsonl(tmp_path / "a.jsonl", record, {**record, "input": None})
    with_input, null_input = read(path)
    assert with_input.messages[0]["content"] == "要約して\n\n### 入力:\n長い文章"
    assert with_input.input == "長い文章"
    assert null_input.messages[0]["content"] == "要約して"
    (no_marker,) = read(write_jsonl(tmp_path / "b.jsonl", record), marker="")
    assert no_marker.messages[0]["content"] == "要約して\n\n長い文章"


def test_chat_record(tmp_path):
    messages = [
        {"role": "system", "content": "丁寧に"},
        {"role": "user", "content": "一"},
        {"role": "assistant", "content": "いち"},
        {"role": "user", "content": "二", "name": "ignored"},
        {"role": "assistant", "content": "に"},
    ]
    (conv,) = read(write_jsonl(tmp_path / "c.jsonl", {"messages": messages}))
    assert conv.messages[3] == {"role": "user", "content": "二"}
    assert (conv.instruction, conv.input, conv.reference) == ("二", "", "に")
    assert len(conv.messages) == 5


def test_blank_lines_are_skipped_and_lines_counted_gzip_and_bom(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    body = '\n  \n{"instruction": "a", "output": "b"}\n\n{"messages": [{"role": "user", "content": "c"}, ' \
           '{"role": "assistant", "content": "d"}]}\n'
    with gzip.open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + body.encode())
    first, second = read(path)
    assert (first.where, second.where) == (f"{display_path(path)}:3", f"{display_path(path)}:5")


BAD_RECORDS = [
    ({"instruction": "q"}, 'the record has no "output" field (instruction format needs instruction and output)'),
    ({"output": "a"}, 'the record has no "instruction" field'),
    ({"instruction": "q", "output": 3}, '"output" must be a string, got a number'),
    ({"instruction": "q", "output": "  "}, '"output" is empty'),
    ({"instruction": "", "output": "a"}, '"instruction" is empty'),
    ({"instruction": "q", "input": ["x"], "output": "a"}, '"input" must be a string, got an array'),
    ({"text": "hello"}, 'expected "instruction"/"output" or "messages" (fields: text)'),
    ([1, 2], "expected a JSON object, got an array"),
    ({"instruction": "q", "output": "a", "messages": []}, 'has both "messages" and "instruction"/"output"'),
    ({"messages": "hi"}, '"messages" must be a list, got a string'),
    ({"messages": []}, '"messages" is empty'),
    ({"messages": [{"role": "user", "content": "q"}, "a"]}, "message 2 must be an object, got a string"),
    ({"messages": [{"content": "q"}]}, 'message 1 has no "role" field'),
    ({"messages": [{"role": "user"}]}, 'message 1 has no "content" field'),
    ({"messages": [{"role": "tool", "content": "q"}]}, 'message 1 has the unknown role "tool"'),
    ({"messages": [{"role": "user", "content": 5}]}, 'message 1\'s "content" must be a string, got a number'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     'message 2\'s "content" is empty'),
    ({"messages": [{"role": "user", "content": "q"}]},
     "the last message is user; a conversation must end with an assistant message"),
    ({"messages": [{"role": "system", "content": "s"}]}, "the last message is system"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "message 1 is assistant, expected user"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "message 2 is assistant, expected user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "message 2 is user, expected assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "message 2 is a system message; only the first"),
    ('{"instruction": "q", "output": "a"', "not valid JSON (Expecting ',' delimiter at column 35)"),
    ('{"instruction": "q\\ud800", "output": "a"}', "not valid Unicode"),
    (b'{"instruction": "\xff", "output": "a"}', "not valid UTF-8 (byte 18 of the line: 0xff)"),
]


@pytest.mark.parametrize(("record", "problem"), BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_bad_record_names_file_and_line(tmp_path, record, problem):
    good = {"instruction": "q", "output": "a"}
    path = write_jsonl(tmp_path / "bad.jsonl", good, "", record)
    with pytest.raises(JpadaptError) as error:
        read(path)
    message = str(error.value)
    assert message.startswith(f"{display_path(path)}:3: ")
    assert problem in message
    assert "\n" not in message


def test_empty_data_is_an_error_naming_the_key(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = write_jsonl(tmp_path / "blank.jsonl", "", "   ")
    with pytest.raises(JpadaptError, match="^sft.data: no examples in ") as error:
        read_conversations([str(empty), str(blank)], "sft.data", MARKER)
    assert display_path(empty) in str(error.value) and display_path(blank) in str(error.value)


def test_bundled_data_reads():
    train = read_conversations(["bundled:instruct/ja_instruct_train.jsonl"], "sft.data", MARKER)
    heldout = read_conversations(["bundled:instruct/ja_instruct_heldout.jsonl"], "sft.heldout", MARKER)
    assert (len(train), len(heldout)) == (1000, 500)
    assert train[0].where == "bundled:instruct/ja_instruct_train.jsonl:1"
    assert train[0].reference == "稲葉"
    assert train[0].messages[0]["content"].startswith(train[0].instruction + "\n\n### 入力:\n")


def test_bundled_heldout_tokenizes_with_the_answer_learned(llama):
    heldout = read_conversations(["bundled:instruct/ja_instruct_heldout.jsonl"], "sft.heldout", MARKER)
    examples, stats = tokenize_all(heldout, llama, 1024)
    assert stats.examples == 500 and stats.kept + stats.dropped == 500 and stats.kept > 450
    references = {conv.where: conv.reference for conv in heldout}
    untruncated = [e for e in examples if e.input_ids[-1] == llama.eos_token_id]
    assert len(untruncated) == stats.kept - stats.truncated
    assert all(llama.decode(labeled(e)) == references[e.where] + "</s>" for e in untruncated)


# --------------------------------------------------------------------------------------------- chat template


def test_template_renders_the_japanese_format(llama, tmp_path):
    conv = one(tmp_path, {"instruction": "要約して", "input": "本文", "output": "答え"})
    expected_prompt = f"<s>{PREAMBLE}\n\n### 指示:\n要約して\n\n### 入力:\n本文\n\n### 応答:\n"
    assert prompt_text(conv, llama) == expected_prompt
    whole = llama.apply_chat_template(list(conv.messages), tokenize=False)
    assert whole == expected_prompt + "答え</s>"


def test_template_multi_turn_system_message_and_no_preamble(llama):
    conv = chat("一", "いち", "二", "に")
    assert llama.apply_chat_template(list(conv.messages), tokenize=False) == (
        f"<s>{PREAMBLE}\n\n### 指示:\n一\n\n### 応答:\nいち</s>\n\n### 指示:\n二\n\n### 応答:\nに</s>"
    )
    with_system = chat("一", "いち", system="短く答えて")
    assert llama.apply_chat_template(list(with_system.messages), tokenize=False) == (
        "<s>短く答えて\n\n### 指示:\n一\n\n### 応答:\nいち</s>"
    )
    empty_system = chat("一", "いち", system="")
    assert prompt_text(empty_system, llama) == "<s>### 指示:\n一\n\n### 応答:\n"
    no_preamble = template_chat_template(PromptTemplateConfig(system=""))
    assert llama.apply_chat_template(list(conv.messages[:1]), tokenize=False, chat_template=no_preamble) == (
        "<s>### 指示:\n一"
    )


def test_template_markers_are_literal_text(chatml):
    # Quotes, backslashes, Jinja syntax, newlines and a non-BMP character must come out exactly as written.
    template = PromptTemplateConfig(system="It's \"x\" \\n {{ y }} 😀\n", instruction="[指示] {% if %}", response="'応答'")
    chat_template = template_chat_template(template)
    conv = chat("q", "a")
    text = chatml.apply_chat_template(list(conv.messages), tokenize=False, chat_template=chat_template)
    # Qwen has no bos: the template must not write "None".
    assert text == "It's \"x\" \\n {{ y }} 😀\n\n\n[指示] {% if %}\nq\n\n'応答'\na<|im_end|>"


def test_template_rejects_other_roles(llama):
    with pytest.raises(TemplateError, match="not tool"):
        llama.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ------------------------------------------------------------------------------------------------ loss mask


def test_single_turn_mask_learns_exactly_the_answer_and_eos(llama, tmp_path):
    conv = one(tmp_path, {"instruction": "戦後に塩田だった地域は?", "input": "稲葉は…", "output": "稲葉"})
    ex, truncated = tokenize_conversation(conv, llama, 1024)
    assert not truncated
    assert llama.decode(labeled(ex)) == "稲葉</s>"
    first = int(np.flatnonzero(ex.labels != IGNORE_INDEX)[0])
    assert (ex.labels[:first] == IGNORE_INDEX).all() and (ex.labels[first:] == ex.input_ids[first:]).all()
    # Everything before the first learned token is exactly the prompt, response marker included.
    assert llama.decode(ex.input_ids[:first]) == prompt_text(conv, llama)
    assert ex.input_ids[0] == llama.bos_token_id and ex.input_ids[-1] == llama.eos_token_id


def test_multi_turn_mask_learns_both_answers_not_the_user_turn(llama, chatml):
    conv = chat("最初の質問", "答え一", "次の質問", "答え二")
    runs = [llama.decode(run) for run in labeled_runs(tokenize_conversation(conv, llama, 1024)[0])]
    assert runs == ["答え一</s>", "答え二</s>"]
    runs = [chatml.decode(run) for run in labeled_runs(tokenize_conversation(conv, chatml, 1024)[0])]
    assert runs == ["答え一<|im_end|>\n", "答え二<|im_end|>\n"]


def test_qwen_own_template_single_turn(qwen):
    conv = chat("日本の首都は?", "東京")
    ex, _ = tokenize_conversation(conv, qwen, 1024)
    # Qwen3 writes an empty thinking block into the answer; it is part of what the model learns to emit.
    assert qwen.decode(labeled(ex)) == "<think>\n\n</think>\n\n東京<|im_end|>\n"
    first = int(np.flatnonzero(ex.labels != IGNORE_INDEX)[0])
    assert qwen.decode(ex.input_ids[:first]) == prompt_text(conv, qwen) == (
        "<|im_start|>user\n日本の首都は?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_own_template_multi_turn_is_not_prefix_stable(qwen):
    # Qwen3 drops the thinking block from earlier answers, so an earlier answer renders differently in the whole.
    with pytest.raises(JpadaptError, match=r"^t\.jsonl:1: the chat template is not prefix-stable at message 2"):
        tokenize_conversation(chat("一", "いち", "二", "に"), qwen, 1024)


def test_truncation_and_dropping_are_counted(llama, tmp_path):
    limit = 200
    long_prompt = one(tmp_path, {"instruction": "長い文章です。" * 200, "output": "短い答え"})
    long_answer = chat("質問", "答え" * 300)
    short = chat("質問", "はい")
    for conv in (long_prompt, long_answer):
        assert len(tokenize_conversation(conv, llama, 10_000)[0]) > limit
    examples, stats = tokenize_all([long_prompt, long_answer, short], llama, limit)
    # The long prompt leaves no answer token within the limit: dropped. The long answer is cut but kept.
    assert tokenize_conversation(long_prompt, llama, limit) == (None, True)
    cut, truncated = tokenize_conversation(long_answer, llama, limit)
    assert truncated and len(cut) == limit and llama.decode(labeled(cut)).startswith("答え答え")
    assert [llama.decode(labeled(e)) for e in examples] == [llama.decode(labeled(cut)), "はい</s>"]
    assert stats.to_dict() == {
        "examples": 3, "kept": 2, "truncated": 1, "dropped": 1,
        "tokens": limit + len(examples[1]), "response_tokens": cut.response_tokens + examples[1].response_tokens,
        "max_tokens": limit,
    }


# ------------------------------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, 200)
    return [example(int(n), int(rng.integers(1, n)), first=1000 * i) for i, n in enumerate(lengths)]


def test_packing_fills_rows_without_splitting_or_losing_examples(examples):
    rows = epoch_sequences(examples, packing=True, max_seq_len=128, seed=1, epoch=0, group_size=8, batch_rows=8)
    assert all(len(row) <= 128 for row in rows)
    assert sum(row.examples for row in rows) == len(examples)
    assert sum(int((row.labels != IGNORE_INDEX).sum()) for row in rows) == sum(e.response_tokens for e in examples)
    by_first_id = {int(e.input_ids[0]): e for e in examples}
    seen = []
    for row in rows:
        assert len(pieces(row)) == row.examples
        for piece, start in zip(pieces(row), np.flatnonzero(row.position_ids == 0)):
            source = by_first_id[int(piece[0])]
            assert (piece == source.input_ids).all()
            assert (row.position_ids[start : start + len(piece)] == np.arange(len(piece))).all()
            assert (row.labels[start : start + len(piece)] == source.labels).all()
            seen.append(source.where)
    assert sorted(seen) == sorted(e.where for e in examples)
    # Greedy: a row was closed only because the next example did not fit into it.
    # First fit decreasing, window by window (8 examples each): rows come longest first, and no window uses more
    # rows than FFD's bound over the optimum (11/9 OPT + 6/9, OPT >= the tokens over the row size).
    window_rows: list[list] = [[]]
    for row in rows:
        if sum(r.examples for r in window_rows[-1]) == 8:
            window_rows.append([])
        window_rows[-1].append(row)
    for window in window_rows:
        assert [len(r) for r in window] == sorted((len(r) for r in window), reverse=True)
        optimum = math.ceil(sum(len(r) for r in window) / 128)
        assert len(window) <= 11 / 9 * optimum + 6 / 9
    assert len(rows) < len(examples) / 2  # 200 examples of 2-59 tokens: most rows hold several


def test_epoch_order_is_seeded(examples):
    def order(packing: bool, seed: int, epoch: int) -> list[tuple[int, ...]]:
        rows = epoch_sequences(examples, packing=packing, max_seq_len=128, seed=seed, epoch=epoch, group_size=8, batch_rows=8)
        return [tuple(row.input_ids.tolist()) for row in rows]

    for packing in (True, False):
        assert order(packing, 1, 0) == order(packing, 1, 0)
        assert order(packing, 1, 0) != order(packing, 1, 1)
        assert order(packing, 1, 0) != order(packing, 2, 0)


def test_length_grouping_sorts_each_chunk(examples):
    rows = epoch_sequences(examples, packing=False, max_seq_len=128, seed=3, epoch=0, group_size=16, batch_rows=16)
    assert len(rows) == len(examples) and all(row.examples == 1 for row in rows)
    lengths = [len(row) for row in rows]
    chunks = [lengths[i : i + 16] for i in range(0, len(lengths), 16)]
    assert all(chunk == sorted(chunk, reverse=True) for chunk in chunks)
    assert lengths != sorted(lengths, reverse=True)  # the chunks themselves stay shuffled
    assert sorted(lengths) == sorted(len(e) for e in examples)
    assert all((row.position_ids == np.arange(len(row))).all() for row in rows)


def test_examples_longer_than_the_limit_are_refused(examples):
    with pytest.raises(ValueError, match="longer than max_seq_len 10"):
        epoch_sequences(examples, packing=True, max_seq_len=10, seed=0, epoch=0, group_size=1, batch_rows=1)


def test_collate_unpacked_pads_right_with_a_mask():
    rows = epoch_sequences([example(5, 2), example(3, 1)], packing=False, max_seq_len=8, seed=0, epoch=0,
                           group_size=2, batch_rows=2)
    batch = collate(rows, pad_id=0, packed=False)
    assert batch.input_ids.shape == (2, 5)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.input_ids[1, 3:].tolist() == [0, 0] and (batch.labels[1, 3:] == IGNORE_INDEX).all()
    assert batch.position_ids[1, :3].tolist() == [0, 1, 2]
    assert (batch.tokens, batch.response_tokens) == (8, 3)


def test_collate_packed_padding_is_its_own_block():
    packed = epoch_sequences([example(5, 2), example(3, 1), example(4, 1)], packing=True, max_seq_len=8, seed=0,
                             epoch=0, group_size=64, batch_rows=64)
    assert sorted(len(row) for row in packed) == [4, 8]
    batch = collate(packed, pad_id=0, packed=True)
    assert batch.attention_mask is None
    short = int(np.argmin([len(row) for row in packed]))
    assert batch.position_ids[short].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (batch.labels[short, 4:] == IGNORE_INDEX).all() and (batch.input_ids[short, 4:] == 0).all()
    assert (batch.tokens, batch.response_tokens) == (12, 4)


def test_packed_examples_do_not_attend_to_each_other(llama):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(llama), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    pair = [tokenize_conversation(chat("一つ目の質問", "答え"), llama, 1024)[0],
            tokenize_conversation(chat("二つ目", "長めの答えです"), llama, 1024)[0]]
    (row,) = epoch_sequences(pair, packing=True, max_seq_len=1024, seed=0, epoch=0, group_size=64, batch_rows=64)
    (single,) = epoch_sequences(pair[:1], packing=True, max_seq_len=1024, seed=0, epoch=0, group_size=64, batch_rows=64)
    # The shorter second row gets padding, which must stay out of the real tokens' way too.
    batch = collate([row, single], pad_id=0, packed=True)

    def logits(ids: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids.astype(np.int64)), position_ids=torch.from_numpy(positions),
                         attention_mask=None, use_cache=False).logits

    def alone(ids: np.ndarray) -> torch.Tensor:
        return logits(ids[None], np.arange(len(ids))[None])[0]

    packed = logits(batch.input_ids, batch.position_ids)
    starts = np.flatnonzero(row.position_ids == 0)
    for piece, start in zip(pieces(row), starts):
        torch.testing.assert_close(packed[0, start : start + len(piece)], alone(piece), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, : len(single)], alone(single.input_ids), atol=1e-5, rtol=0)
    # Without the restart the second example sees the first one, and its logits change.
    plain = logits(batch.input_ids[:1], np.arange(len(row))[None])[0]
    second = slice(int(starts[1]), len(row))
    assert not torch.allclose(plain[second], packed[0, second], atol=1e-3)
