"""The run report (pipeline/run_report.py, `jpadapt report`): one page per run directory, built from the committed
stages' files only.

The run directories are real: `jpadapt run` on a tiny pipeline (a 2-layer LLaMA with hidden size 32 over the
bundled LLaMA-2 tokenizer, 200 new tokens, 4 cpt and 4 sft steps on slices of the bundled corpora; ~25 s on 2
cores), and a prepare + tokenizer-report run. Expected numbers are recomputed here from the run directory's files.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import lzma
import re
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from PIL import Image

from data.assets import stored_path
from pipeline import cli, reportkit, run_report
from pipeline.run_report import write_run_report
from tests.helpers.browser import dump_dom
from tests.helpers.cli import assert_one_line_error, jpadapt, run_cli
from tests.helpers.corpora import data_section, write_corpus_slices, write_jsonl
from tests.helpers.forgetting import assert_verdict_matches
from tests.helpers.jsonl import read_jsonl
from tests.helpers.markdown import table_rows

TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True}
FULL_SECTIONS = ["Overview", "Data (prepare)", "Vocabulary extension (extend-vocab)",
                 "Tokenizer comparison (tokenizer-report)", "Plan vs measured (plan)", "Continued pretraining (cpt)",
                 "Instruction tuning (QLoRA, sft)", "Evaluation (evaluate)", "Reproduce"]
SMALL_SECTIONS = ["Overview", "Data (prepare)", "Tokenizer comparison (tokenizer-report)", "Reproduce"]
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
GIB = 2**30


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Slices of the bundled corpora and instructions, and two pipeline YAMLs: full.yaml (every stage this
    version has, tiny) and small.yaml (prepare + tokenizer-report)."""
    root = tmp_path_factory.mktemp("run-report")
    write_corpus_slices(root)
    with lzma.open(stored_path("instruct/ja_instruct_train.jsonl"), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line, _ in zip(f, range(16), strict=False)]
    records = [{"instruction": r["instruction"], "input": r["input"][:30], "output": r["output"]} for r in records]
    write_jsonl(root / "sft_train.jsonl", records)
    write_jsonl(root / "sft_heldout.jsonl", records[:4])

    data = data_section(root)
    small = {"run": {"name": "small", "seed": 7, "output_dir": str(root / "runs")}, "data": data,
             "prepare": {"min_chars": 20},
             "tokenizer_report": {"tokenizers": {"llama2": "llama2"}, "baseline": "llama2", "max_documents": 3}}
    full = {
        **small,
        "run": {**small["run"], "name": "full"},
        "model": {"tokenizer": "llama2", "from_config": TINY_LLAMA, "dtype": "float32"},
        "extend_vocab": {"new_tokens": 200, "pad_to_multiple_of": 64, "init": "mean"},
        "plan": {"gpu": "RTX4090-24GB"},
        "cpt": {"replay_ratio": 0.25, "seq_len": 32, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 4,
                "lr": 1e-3, "warmup_steps": 1, "precision": "fp32", "gradient_checkpointing": False, "zero_stage": 0,
                "num_gpus": 1, "accelerator": "cpu", "eval_every": 2, "eval_chars": 2000, "save_every": 4,
                "keep_checkpoints": 1},
        "sft": {"data": str(root / "sft_train.jsonl"), "heldout": str(root / "sft_heldout.jsonl"),
                "max_seq_len": 192, "quantization": "nf4", "precision": "fp32", "lora_r": 4, "lora_alpha": 8,
                "max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "optimizer": "adamw",
                "gradient_checkpointing": False, "accelerator": "cpu", "eval_every": 2, "eval_examples": 4,
                "generate": 2, "max_new_tokens": 4},
        "evaluate": {"max_chars": 2000, "window": 32, "stride": 16, "limit": 4, "max_new_tokens": 4,
                     "tasks": ["jcommonsenseqa", "hellaswag"], "num_fewshot": [0], "accelerator": "cpu"},
    }
    for name, config in (("small", small), ("full", full)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root


def run_pipeline(workspace: Path, name: str) -> tuple[Path, str]:
    result = jpadapt("run", str(workspace / f"{name}.yaml"), cwd=workspace)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workspace / "runs" / name, result.stdout


@pytest.fixture(scope="module")
def full(workspace) -> tuple[Path, str]:
    return run_pipeline(workspace, "full")


@pytest.fixture(scope="module")
def small(workspace) -> tuple[Path, str]:
    return run_pipeline(workspace, "small")


def copy_run(run_dir: Path, dest: Path) -> Path:
    """The run directory without its model weights and checkpoints (the report never reads them)."""
    return Path(shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(
        "checkpoints", "model", "adapter", "tensorboard", ".cache", "*.npz")))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def headings(md: str, level: int) -> list[str]:
    prefix = "#" * level + " "
    return [line[len(prefix):] for line in md.splitlines() if line.startswith(prefix)]


def table_after(md: str, heading: str) -> list[dict[str, str]]:
    """Rows of the first table after the line `heading` in report.md, keyed by column title."""
    lines = md.splitlines()
    return table_rows(lines, lines.index(heading))


# ---------------------------------------------------------------------------------------------- sections


def test_a_section_for_each_committed_stage_and_nested_headings(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert headings(md, 1) == ["Run report: full"]
    assert headings(md, 2) == FULL_SECTIONS
    # Headings never skip a level on the way down: the stage reports' own headings sit under their section.
    levels = [len(line) - len(line.lstrip("#")) for line in md.splitlines() if re.match(r"#+ ", line)]
    assert all(b <= a + 1 for a, b in itertools.pairwise(levels)), levels
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count("<h1>") == 1
    assert re.findall(r"<h2>(.*?)</h2>", page) == FULL_SECTIONS
    for stage in ("Forgetting curve", "Generations", "Benchmark suite"):
        assert f"<h3>{stage}</h3>" in page


def test_only_committed_stages_appear(small, tmp_path):
    run_dir, _ = small
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert headings(md, 2) == SMALL_SECTIONS
    for absent in ("extend-vocab", "stages/plan", "stages/cpt", "stages/sft", "evaluate"):
        assert absent not in md, absent
    # An attempt in progress (even one that already wrote its manifest) and a folder without a manifest don't count.
    copy = copy_run(run_dir, tmp_path / "small")
    partial = copy / "stages" / "cpt.partial"
    partial.mkdir()
    manifest = read_json(copy / "stages" / "prepare" / "manifest.json")
    (partial / "manifest.json").write_text(json.dumps({**manifest, "stage": "cpt"}), encoding="utf-8")
    (copy / "stages" / "sft").mkdir()
    (copy / "stages" / "sft" / "summary.json").write_text("{}", encoding="utf-8")
    write_run_report(copy)
    md = (copy / "report.md").read_text(encoding="utf-8")
    assert headings(md, 2) == SMALL_SECTIONS
    assert [row["stage"] for row in table_after(md, "## Overview")] == ["prepare", "tokenizer-report"]


def test_a_run_with_only_prepare_gives_a_valid_report(small, tmp_path):
    copy = copy_run(small[0], tmp_path / "small")
    shutil.rmtree(copy / "stages" / "tokenizer-report")
    paths = write_run_report(copy)
    assert [p.name for p in paths] == ["report.md", "report.html"]
    md = paths[0].read_text(encoding="utf-8")
    assert headings(md, 2) == ["Overview", "Data (prepare)", "Reproduce"]
    page = paths[1].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<img" not in page


# ---------------------------------------------------------------------------------------------- numbers


def test_overview_numbers_come_from_the_manifests_and_config(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    digest = hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    assert f"config hash: sha256 of config.yaml = {digest}" in md
    rows = table_after(md, "## Overview")
    assert [row["stage"] for row in rows] == ["prepare", "extend-vocab", "tokenizer-report", "plan", "cpt", "sft",
                                             "evaluate"]
    for row in rows:
        manifest = read_json(run_dir / "stages" / row["stage"] / "manifest.json")
        assert row["status"] == "done"
        assert row["finished"] == manifest["finished"]
        assert row["duration"] == f"{manifest['duration_s']:.1f} s"
        assert row["fingerprint"] == manifest["fingerprint"][:12]
    environment = read_json(run_dir / "stages" / "cpt" / "manifest.json")["environment"]
    assert "- seed: 7" in md and f"- python: {environment['python']}" in md
    assert f"- jpadapt: {environment['jpadapt']}" in md
    libraries = {row["library"]: row["version"] for row in table_after(md, "Every stage that records a library "
                                                                           "recorded the same version.")}
    assert libraries["torch"] == environment["libraries"]["torch"]
    assert libraries["datatrove"] == read_json(run_dir / "stages/prepare/manifest.json")["environment"][
        "libraries"]["datatrove"]


def test_data_and_tokenizer_numbers_come_from_their_files(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    stats = read_json(run_dir / "stages" / "prepare" / "stats.json")["languages"]
    rows = table_after(md, "## Data (prepare)")
    assert [(r["language"], r["split"]) for r in rows] == [(lang, split) for lang in stats for split in
                                                          stats[lang]["splits"]]
    for row in rows:
        split = stats[row["language"]]["splits"][row["split"]]
        assert row["documents kept"] == f"{split['documents']:,}"
        assert row["characters kept"] == f"{split['chars']:,}"
    ja = read_json(run_dir / "stages" / "extend-vocab" / "summary.json")["efficiency"]["ja_heldout"]
    assert (f"Japanese held-out chars/token: {ja['base_chars_per_token']:.3f} -> "
            f"{ja['extended_chars_per_token']:.3f}") in md
    metrics = read_json(run_dir / "stages" / "tokenizer-report" / "metrics.json")
    headline = {r["tokenizer"]: r for r in table_after(md, "#### ja_heldout")}
    for name, row in (("llama2 (baseline)", metrics["tokenizers"]["llama2"]),
                      ("extended", metrics["tokenizers"]["extended"])):
        assert headline[name]["chars/token"] == f"{row['ja_heldout']['chars_per_token']:.2f}"
        assert headline[name]["tokens"] == f"{row['ja_heldout']['tokens']:,}"


def test_plan_vs_measured_shows_both_and_says_they_measure_different_things(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    plans = {p["stage"]: p for p in read_json(run_dir / "stages" / "plan" / "plan.json")}
    rows = {r["stage"]: r for r in table_after(md, "## Plan vs measured (plan)")}
    assert set(rows) == set(plans)
    for stage in ("cpt", "sft"):
        summary = read_json(run_dir / "stages" / stage / "summary.json")
        assert rows[stage]["planned GiB per GPU"] == f"{plans[stage]['memory']['gpu_bytes'] / GIB:.2f}"
        assert rows[stage]["measured peak GiB"] == f"{summary['peak_memory']['bytes'] / GIB:.2f}"
        assert rows[stage]["measured as"].startswith(f"{summary['peak_memory']['kind']}, cpu")
        assert rows[stage]["planned for"].startswith("1 x RTX4090-24GB")
        assert (f"- {stage}: the plan is for 1 x RTX4090-24GB (GPU memory per device), but the run was measured on "
                "the cpu") in md
    assert md.count("so the two numbers measure different things") == 2
    times = {r["stage"]: r for r in table_after(md, "### Time")}
    cpt = read_json(run_dir / "stages" / "cpt" / "summary.json")
    assert times["cpt"]["planned tokens"] == f"{plans['cpt']['compute']['tokens']:,}"
    assert times["cpt"]["trained tokens"] == f"{cpt['tokens_seen']:,}"
    assert times["cpt"]["measured training time"] == reportkit.fmt_seconds(cpt["train_seconds"])
    assert times["cpt"]["stage duration"] == reportkit.fmt_seconds(
        read_json(run_dir / "stages" / "cpt" / "manifest.json")["duration_s"])


def test_plan_vs_measured_on_a_gpu_compares_without_the_framework_allowance(full, tmp_path):
    copy = copy_run(full[0], tmp_path / "full")
    path = copy / "stages" / "cpt" / "summary.json"
    summary = read_json(path)
    summary.update(accelerator="cuda", peak_memory={"bytes": 3 * GIB // 4, "kind": "torch.cuda.max_memory_allocated"})
    path.write_text(json.dumps(summary), encoding="utf-8")
    md = write_run_report(copy)[0].read_text(encoding="utf-8")
    plan = next(p for p in read_json(copy / "stages" / "plan" / "plan.json") if p["stage"] == "cpt")
    overhead = sum(t["bytes"] for t in plan["memory"]["terms"] if t["name"] == "framework overhead")
    assert overhead > 0
    assert (f"- cpt: both numbers are GPU memory. The measured peak (torch.cuda.max_memory_allocated) counts tensors "
            f"only; the plan adds a {overhead / GIB:.2f} GiB framework allowance, so compare "
            f"{(plan['memory']['gpu_bytes'] - overhead) / GIB:.2f} GiB planned without it against 0.75 GiB "
            "measured.") in md
    assert md.count("so the two numbers measure different things") == 1  # sft still ran on the CPU


def test_training_sections_show_the_curves_numbers(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    evals = read_jsonl(run_dir / "stages" / "cpt" / "forgetting.jsonl")
    first, last = evals[0], evals[-1]
    assert (f"Japanese bits per byte: {first['ja']['bits_per_byte']:.4f} at step {first['step']} -> "
            f"{last['ja']['bits_per_byte']:.4f} at step {last['step']}") in md
    assert "![forgetting curves](stages/cpt/forgetting.png)" in md
    sft_evals = read_jsonl(run_dir / "stages" / "sft" / "eval.jsonl")
    assert (f"held-out loss {sft_evals[0]['loss']:.4f} at step 0 -> {sft_evals[-1]['loss']:.4f} at step "
            f"{sft_evals[-1]['step']}") in md
    generations = read_jsonl(run_dir / "stages" / "sft" / "generations.jsonl")
    assert len(generations) == 2
    rows = table_after(md, "### Generations")
    assert [row["instruction"] for row in rows] == [g["instruction"] for g in generations]
    for png in ("stages/cpt/forgetting.png", "stages/sft/loss.png", "stages/evaluate/bits_per_byte.png",
                "stages/evaluate/tasks.png"):
        assert (run_dir / png).is_file() and f"]({png})" in md


def test_the_cpt_verdict_heads_the_overview_and_the_forgetting_section(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    evals = read_jsonl(run_dir / "stages" / "cpt" / "forgetting.jsonl")
    overview = md.split("## Overview\n")[1].split("\n## ")[0]
    lines = [line for line in overview.splitlines() if line.startswith("- cpt: ")]
    assert len(lines) == 1, overview
    verdict = lines[0].removeprefix("- cpt: ")
    assert_verdict_matches(verdict, evals)
    forgetting = md.split("### Forgetting curve\n")[1]
    assert forgetting.lstrip("\n").startswith(f"Verdict: {verdict}.\n")
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert f"<li>cpt: {html.escape(verdict)}</li>" in page


def test_evaluation_section_shows_every_model_of_the_run(full):
    run_dir, _ = full
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    results = read_json(run_dir / "stages" / "evaluate" / "results.json")
    assert [m["name"] for m in results["models"]] == ["base", "extended", "cpt", "sft"]
    rows = table_after(md, "### Held-out text: bits per byte")
    assert [row["model"] for row in rows] == ["base", "extended", "cpt", "sft"]
    for row in rows:
        lm = results["lm"][row["model"]]
        assert row["Japanese bits/byte"] == f"{lm['ja']['bits_per_byte']:.4f}"
        assert row["English bits/byte"] == f"{lm['en']['bits_per_byte']:.4f}"
    section = md.split("## Evaluation (evaluate)")[1].split("## Reproduce")[0]
    assert headings(section, 3)[:3] == ["What each stage did", "Held-out text: bits per byte",
                                           "Benchmark suite"]


def test_library_and_environment_differences_between_stages_are_shown(small, tmp_path):
    copy = copy_run(small[0], tmp_path / "small")
    path = copy / "stages" / "tokenizer-report" / "manifest.json"
    manifest = read_json(path)
    manifest["environment"]["libraries"]["numpy"] = "0.0.1"
    manifest["environment"]["python"] = "3.99.0"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    md = write_run_report(copy)[0].read_text(encoding="utf-8")
    prepare_env = read_json(copy / "stages" / "prepare" / "manifest.json")["environment"]
    assert "Library versions differ between stages: numpy" in md
    assert f"| numpy | {prepare_env['libraries']['numpy']} | prepare | differs between stages |" in md
    assert "| numpy | 0.0.1 | tokenizer-report | differs between stages |" in md
    assert (f"- python differs between stages: {prepare_env['python']} in prepare; 3.99.0 in tokenizer-report"
            in md)


# ---------------------------------------------------------------------------------------------- html


def test_html_is_self_contained_and_every_image_decodes(full):
    page = (full[0] / "report.html").read_text(encoding="utf-8")
    payloads = IMG_RE.findall(page)
    # chars/token, forgetting curves, sft loss, evaluate's bits per byte and task suite
    assert len(payloads) == page.count("<img") == 5
    for payload in payloads:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
        assert image.format == "PNG" and image.width >= 600
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    for forbidden in ("<link", "<script", "url(", "@import"):
        assert forbidden not in page, forbidden


def test_browser_decodes_every_image_and_logs_no_console_errors(full, tmp_path):
    result = dump_dom(full[0] / "report.html", tmp_path / "profile")
    assert result.stdout.count("<img") == 5
    assert 'data-broken=""' not in result.stdout  # the attribute the images' onerror handler sets
    assert "CONSOLE" not in result.stderr, result.stderr
    # The check can fail: a corrupted image is marked by the browser.
    page = (full[0] / "report.html").read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(IMG_RE.search(page).group(1), base64.b64encode(b"not a png").decode(), 1),
                      encoding="utf-8")
    assert dump_dom(broken, tmp_path / "profile").stdout.count('data-broken=""') == 1


# ---------------------------------------------------------------------------------------------- CLI and writing


def test_run_prints_the_run_report_path(full, small):
    for run_dir, stdout in (full, small):
        assert stdout.rstrip().splitlines()[-1] == f"Run report: {run_dir / 'report.html'}"
        assert (run_dir / "report.md").is_file()


def test_report_command_rewrites_the_same_bytes(small, workspace):
    run_dir, _ = small
    before = {name: (run_dir / name).read_bytes() for name in ("report.md", "report.html")}
    result = run_cli("report", str(workspace / "small.yaml"), cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(run_dir / "report.md"), str(run_dir / "report.html")]
    assert result.stderr == ""
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name  # every number comes from the files: deterministic


def test_report_command_without_a_committed_stage_is_one_error_line(workspace):
    empty = workspace / "runs" / "empty"
    (empty / "stages" / "prepare.partial").mkdir(parents=True)  # an attempt that never finished
    result = run_cli("report", str(workspace / "small.yaml"), "run.name=empty", cwd=workspace)
    assert_one_line_error(result, str(empty), "no committed stage")
    result = run_cli("report", str(workspace / "small.yaml"), "run.name=never", cwd=workspace)
    assert_one_line_error(result, "no committed stage")
    assert not (empty / "report.md").exists() and not (workspace / "runs" / "never").exists()


def test_a_failed_write_leaves_the_previous_report_intact(small, tmp_path, monkeypatch):
    copy = copy_run(small[0], tmp_path / "small")
    before = {name: (copy / name).read_bytes() for name in ("report.md", "report.html")}

    def broken(*args, **kwargs):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(reportkit, "render_html", broken)
    with pytest.raises(RuntimeError, match="renderer broke"):
        write_run_report(copy)
    assert {name: (copy / name).read_bytes() for name in before} == before
    # Writing fails half way (the second rename): each file is still whole, and no temporary file stays behind.
    monkeypatch.undo()
    real_replace = reportkit.os.replace
    calls = []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(reportkit.os, "replace", replace_once)
    with pytest.raises(OSError, match="disk full"):
        write_run_report(copy)
    assert (copy / "report.html").read_bytes() == before["report.html"]
    assert (copy / "report.md").read_text(encoding="utf-8").startswith("# Run report: small\n")
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]


def test_a_report_failure_after_a_stage_is_a_warning_not_a_failure(workspace, monkeypatch, capsys):
    def broken(run_dir):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(run_report, "write_run_report", broken)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["prepare", str(workspace / "small.yaml"), "run.name=warn"])
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() installs its own; the test session keeps pytest's
    out, err = capsys.readouterr()
    assert code == 0
    assert err.strip().splitlines() == ["warning: run report not written: RuntimeError: renderer broke"]
    assert "Outputs in" in out and "Run report:" not in out
    run_dir = workspace / "runs" / "warn"
    assert (run_dir / "stages" / "prepare" / "manifest.json").is_file()
    assert not (run_dir / "report.md").exists() and not (run_dir / "report.html").exists()
