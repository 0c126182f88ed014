"""stages/sft/report.py: report.md, report.html and loss.png from a hand-written sft stage directory.

Expected numbers are recomputed here from the files written into the stage directory, not taken from the module.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from stages.sft.report import write_report

SUMMARY = {
    "steps": 4, "epochs": 0.8, "world_size": 1, "accelerator": "cpu", "zero_stage": 0,
    "quantization": "nf4", "precision": "fp32", "optimizer": "paged_adamw_8bit",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "base_model": "runs/demo/stages/cpt/model", "prompt_format": "template",
    "packing": True, "max_seq_len": 256, "global_batch_sequences": 4,
    "data": {"examples": 1000, "kept": 998, "truncated": 40, "dropped": 2, "tokens": 250000,
             "response_tokens": 9000, "max_tokens": 256},
    "sequences_per_epoch": 240, "padding_share": 0.03,
    "trainable_params": 412345, "total_params": 5000000, "lora_params": 390000, "new_token_rows": 16000,
    "tokens_seen": 4096, "response_tokens_seen": 1200, "train_seconds": 20.5, "wall_seconds": 31.0,
    "tokens_per_s": 1463.4, "peak_memory": {"bytes": 1234567890, "kind": "process max RSS"},
    "final_loss": 1.9,
    "initial_eval": {"step": 0, "loss": 3.1, "response_tokens": 1520, "examples": 50},
    "final_eval": {"step": 4, "loss": 2.2, "response_tokens": 1520, "examples": 50},
    "adapter_check": {"probe_tokens": 64, "max_abs_logit_diff": 0.0, "tolerance": 1e-4},
    "merged_check": {"max_abs_logit_diff": 0.01, "tolerance": 0.05, "dtype": "bfloat16"},
    "jpadapt_version": "0.1.0",
}
METRICS = [{"step": s, "loss": loss, "lr": 2e-4, "grad_norm": None if s == 1 else 1.2, "tokens": 1024 * s,
            "response_tokens": 300 * s, "tokens_per_s": 850.0, "epoch": 0.2 * s}
           for s, loss in [(1, 2.31), (2, 2.1), (3, 2.02), (4, 1.9)]]
EVALS = [{"step": 0, "loss": 3.1, "response_tokens": 1520, "examples": 50},
         {"step": 2, "loss": 2.6, "response_tokens": 1520, "examples": 50},
         {"step": 4, "loss": 2.2, "response_tokens": 1520, "examples": 50}]
GENERATIONS = [
    {"where": "bundled:instruct/ja_instruct_heldout.jsonl:3", "instruction": "次の文章の主人公の名字を答えてください。",
     "input": "稲葉さんは朝早く起きて、" * 30, "reference": "稲葉", "base_output": "わかりません", "output": "稲葉"},
    {"where": "bundled:instruct/ja_instruct_heldout.jsonl:7", "instruction": "表を作ってください。",
     "input": "", "reference": "a | b", "base_output": "", "output": "列 | 値\n1 | 2"},
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_stage(folder: Path, summary: dict = SUMMARY, metrics: list | None = METRICS, evals: list | None = EVALS,
                generations: list | None = GENERATIONS) -> Path:
    """A stage directory as the sft stage leaves it; None leaves that jsonl file out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")
    for name, records in [("metrics.jsonl", metrics), ("eval.jsonl", evals), ("generations.jsonl", generations)]:
        if records is not None:
            (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                       encoding="utf-8")
    return folder


def md_cell(text: str) -> str:
    return " ".join(text.splitlines()).replace("|", "\\|")


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def table_after(markdown: str, heading: str) -> list[str]:
    """The lines of the first Markdown table after a heading: header, separator, rows."""
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    folder = write_stage(tmp_path_factory.mktemp("sft"))
    write_report(folder)
    return folder


@pytest.fixture(scope="module")
def markdown(stage) -> str:
    return (stage / "report.md").read_text(encoding="utf-8")


def test_writes_the_three_files(stage):
    assert (stage / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert (stage / "report.md").is_file() and (stage / "report.html").is_file()


def test_markdown_shows_numbers_recomputed_from_the_files(stage, markdown):
    summary = json.loads((stage / "summary.json").read_text(encoding="utf-8"))
    data = summary["data"]
    trainable_share = summary["trainable_params"] / summary["total_params"]
    first, last = EVALS[0]["loss"], EVALS[-1]["loss"]
    expected = [
        "# Instruction tuning (QLoRA)",
        f"{summary['trainable_params']:,} of {summary['total_params']:,} ({100 * trainable_share:.2f}%)",
        f"{summary['new_token_rows']:,} new token rows train too",
        f"({100 * data['truncated'] / data['examples']:.1f}%)",
        f"({100 * data['response_tokens'] / data['tokens']:.1f}%)",
        f"training loss {METRICS[0]['loss']:.4f} at step 1 -> {METRICS[-1]['loss']:.4f} at step 4",
        (f"held-out loss {first:.4f} at step 0 -> {last:.4f} at step 4 "
         f"({last - first:+.4f}, {100 * (last - first) / first:+.1f}%)"),
        f"{summary['tokens_per_s']:,.0f} tokens/s over {summary['train_seconds']:.1f} s",
        f"{summary['peak_memory']['bytes'] / 2**30:.2f} GiB (process max RSS)",
        "the jpadapt Japanese instruction template",
        "merged into a bfloat16 copy",
        "![training and held-out loss per step](loss.png)",
    ]
    for text in expected:
        assert text in markdown, text
    assert "| 2 | 2.6000 | 1,520 | 50 |" in markdown


def test_generation_table_has_one_escaped_row_per_generation(markdown):
    table = table_after(markdown, "## Generations")
    header, rows = table[0], table[2:]
    assert len(rows) == len(GENERATIONS)
    assert {unescaped_pipes(line) for line in table} == {unescaped_pipes(header)}  # 7 columns -> 8 pipes everywhere
    for row, generation in zip(rows, GENERATIONS):
        for key in ("instruction", "reference", "output"):
            assert md_cell(generation[key]) in row
    assert "列 \\| 値 1 \\| 2" in rows[1]  # the newline became a space, the pipes stayed text


def test_long_input_is_shortened(markdown):
    row = table_after(markdown, "## Generations")[2]
    shown = GENERATIONS[0]["input"][:119] + "…"
    assert f"| {shown} |" in row
    assert GENERATIONS[0]["input"][:121] not in row


def test_html_is_self_contained(stage):
    page = (stage / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?https?://""", page)
    assert "<title>Instruction tuning (QLoRA)</title>" in page
    assert page.count('<img src="data:image/png;base64,') == 1
    assert "列 | 値 1 | 2" in page  # HTML keeps the pipes as text; no Markdown escaping leaks in
    assert "\\|" not in page


def test_missing_eval_and_generations_still_render(tmp_path):
    summary = {**copy.deepcopy(SUMMARY), "initial_eval": None, "final_eval": None, "merged_check": None,
               "new_token_rows": 0}
    folder = write_stage(tmp_path, summary, evals=None, generations=[])
    write_report(folder)
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    assert "## Generations" not in markdown
    assert "held-out loss 3" not in markdown and "| step |" not in markdown
    assert "new token rows" not in markdown and "merged" not in markdown
    assert "training loss 2.3100 at step 1 -> 1.9000 at step 4" in markdown
    assert (folder / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_unquantized_run_is_titled_lora(tmp_path):
    folder = write_stage(tmp_path, {**SUMMARY, "quantization": "none", "prompt_format": "chat_template"})
    write_report(folder)
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Instruction tuning (LoRA)\n")
    assert "the tokenizer's chat template" in markdown


def test_output_is_byte_identical_when_written_twice(stage, tmp_path):
    again = write_stage(tmp_path)
    write_report(again)
    for name in ("report.md", "report.html", "loss.png"):
        assert (again / name).read_bytes() == (stage / name).read_bytes(), name
