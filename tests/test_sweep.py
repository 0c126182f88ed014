"""`jpadapt sweep` (pipeline/sweep.py) and the runner's reuse of a sibling's stage (`Pipeline(donors=...)`).

The real sweep runs once per module: cpt.replay_ratio=0,0.25 with `--stage cpt` on a 2-layer LLaMA with hidden size
32 over the bundled LLaMA-2 tokenizer, 4 steps of 4 x 32 tokens on slices of the bundled corpora (two cpt launches,
~40 s on 2 cores). The rules for which override is swept, and the donor checks (on the fake stages of
tests/helpers/fake_stages.py), run without training.
"""

from __future__ import annotations

import html
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import reportkit
from pipeline.config import load_config
from pipeline.errors import JpadaptError
from pipeline.launch import free_port
from pipeline.rundir import RunDir
from pipeline.runner import NEVER_RUN, UP_TO_DATE, Pipeline
from pipeline.sweep import parse_sweep, safe_name, split_values
from tests.helpers.cli import REPO, assert_one_line_error, jpadapt, run_cli, state_of
from tests.helpers.configs import GOOD, doc, small_config
from tests.helpers.corpora import data_section, write_corpus_slices
from tests.helpers.fake_stages import BEHAVIOUR, CALLS, SPECS
from tests.helpers.forgetting import assert_verdict_matches
from tests.helpers.jsonl import read_jsonl
from tests.helpers.markdown import table_rows

TINY_LLAMA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True}
KEY = "cpt.replay_ratio"
VALUES = ("0", "0.25")
SWEEP = ("sweep", "pipeline.yaml", f"{KEY}={','.join(VALUES)}", "--stage", "cpt")


# ---------------------------------------------------------------------------------------------- which override


@pytest.mark.parametrize(("raw", "pieces"), [
    ("0,0.1,0.25", ["0", "0.1", "0.25"]),
    ("[0,3]", ["[0,3]"]),
    ("[0,3],[5]", ["[0,3]", "[5]"]),
    ("{a: 1, b: 2},{a: 3}", ["{a: 1, b: 2}", "{a: 3}"]),
    ("'a,b',c", ["'a,b'", "c"]),
    ('"a\\",b",c', ['"a\\",b"', "c"]),
    ("1e-4", ["1e-4"]),
])
def test_values_split_at_top_level_commas_only(raw, pieces):
    assert split_values(raw) == pieces


def test_the_override_with_several_values_is_swept_the_others_are_shared():
    args = parse_sweep(["cpt.lr=1e-3", "cpt.replay_ratio=0, 0.1,0.25", "evaluate.num_fewshot=[0,3]"])
    assert (args.key, args.texts, args.values) == ("cpt.replay_ratio", ("0", "0.1", "0.25"), (0, 0.1, 0.25))
    assert args.fixed == ("cpt.lr=1e-3", "evaluate.num_fewshot=[0,3]")
    assert parse_sweep(["evaluate.num_fewshot=[0],[0,3]"]).values == ([0], [0, 3])


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["cpt.lr=1e-3"], "no override lists several values"),
    (["evaluate.num_fewshot=[0,3]"], "no override lists several values"),
    ([], "no override lists several values"),
    (["cpt.lr=1e-3,1e-4", "cpt.replay_ratio=0,0.1"], "one key at a time"),
    (["cpt.replay_ratio=0,"], "empty value"),
    (["cpt.replay_ratio=0.1,0.2,0.1"], "lists the same value twice (0.1 and 0.1)"),
    (["cpt.replay_ratio=0,0.0"], "lists the same value twice (0 and 0.0)"),
    (["run.name=a,b"], "run.name cannot be swept"),
    (["cpt.replay_ratio=0,[1"], "override 'cpt.replay_ratio=[1'"),
])
def test_bad_sweeps_are_one_error(overrides, fragment):
    with pytest.raises(JpadaptError) as caught:
        parse_sweep(overrides)
    assert fragment in str(caught.value)


def test_folder_names_are_made_safe():
    assert safe_name("0.1") == "0.1"
    assert safe_name("[0, 3]") == "0_3"
    assert safe_name("a/b c") == "a_b_c"


def test_an_invalid_value_is_named_and_nothing_runs(tmp_path):
    path = small_config(tmp_path, GOOD)
    result = run_cli("sweep", str(path), "prepare.min_chars=5,-1,x", cwd=tmp_path)
    assert_one_line_error(result, "sweep value prepare.min_chars=-1", "prepare.min_chars")
    assert not (tmp_path / "runs").exists()
    result = run_cli("sweep", str(path), "prepare.min_chars=5,6", "--stage", "cpt", cwd=tmp_path)
    assert_one_line_error(result, "sweep value prepare.min_chars=5", "stage cpt is not in the config")
    assert not (tmp_path / "runs").exists()


def test_the_sweep_and_the_cpt_report_code_import_no_torch(tmp_path):
    """pipeline/ never imports torch; the sweep page reads cpt's files through stages/cpt/report.py, which must not
    either (nor the stages.cpt package it loads)."""
    code = ("import sys, pipeline.sweep, stages.cpt.report\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]", out.stderr


def test_help_lists_the_sweep_command(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert "jpadapt sweep [CONFIG] KEY=V1,V2,..." in result.stdout
    assert run_cli("sweep", "--help", cwd=tmp_path).stdout.startswith("usage: jpadapt sweep")


# ---------------------------------------------------------------------------------------------- a sweep without cpt


def test_a_prepare_sweep_lists_each_run_and_a_failing_value_stops_it(tmp_path):
    path = small_config(tmp_path, GOOD)
    result = run_cli("sweep", str(path), "prepare.min_chars=5,6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = tmp_path / "runs" / "t-sweep-prepare.min_chars"
    assert sorted(p.name for p in page.iterdir()) == ["comparison.html", "comparison.md", "sweep.json"]
    record = json.loads((page / "sweep.json").read_text(encoding="utf-8"))
    md = (page / "comparison.md").read_text(encoding="utf-8")
    rows = table_rows(md.splitlines(), md.splitlines().index("## Stages"))
    for row, run in zip(rows, record["runs"], strict=True):
        manifest = json.loads((tmp_path / run["run_dir"] / "stages/prepare/manifest.json").read_text())
        assert run["manifests"]["prepare"]["fingerprint"] == manifest["fingerprint"]
        assert (row["prepare.min_chars"], row["stage"], row["fingerprint"]) == (run["text"], "prepare",
                                                                                manifest["fingerprint"][:12])
        assert row["summary"] == f"ja: {manifest['summary']['ja']}"

    (tmp_path / "bad.jsonl").write_bytes(b"".join([*GOOD[:3], b"{not json\n", doc("x" * 40, "y")]))
    result = run_cli("sweep", str(path), "data.ja.train=ja.jsonl,bad.jsonl", cwd=tmp_path)
    assert_one_line_error(result, "runs/t-data.ja.train-bad.jsonl: prepare:", "bad.jsonl:4",
                          "finished: data.ja.train=ja.jsonl", "comparison page is written once every value")
    assert not (tmp_path / "runs" / "t-sweep-data.ja.train").exists()


# ---------------------------------------------------------------------------------------------- donors (fake stages)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    CALLS.clear()
    BEHAVIOUR.clear()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ja.jsonl").write_text('{"text": "吾輩は猫である。"}\n', encoding="utf-8")
    yield tmp_path
    CALLS.clear()


def fake_pipeline(name: str, *overrides: str, donors: tuple[str, ...] = ()) -> Pipeline:
    cfg = load_config(None, ["data.ja.train=[ja.jsonl]", "data.ja.heldout=[]", "model.from_config={model_type: llama}",
                             "cpt.max_steps=10", "sft.quantization=none", "run.output_dir=out", f"run.name={name}",
                             *overrides])
    return Pipeline(cfg, specs=SPECS, out=io.StringIO(), donors=[RunDir(Path("out") / donor) for donor in donors])


def manifest(run: str, stage: str) -> dict:
    return json.loads((Path("out") / run / "stages" / stage / "manifest.json").read_text(encoding="utf-8"))


def test_a_stage_with_the_same_fingerprint_is_linked_from_the_donor(fake):
    fake_pipeline("a", "cpt.lr=1e-3").execute(["cpt"], force=set())
    CALLS.clear()
    b = fake_pipeline("b", "cpt.lr=1e-4", donors=("a",))
    assert b.execute(["cpt"], force=set()) is True
    assert CALLS == ["cpt"]  # prepare was reused, cpt (another lr) ran
    assert "prepare: reused from out/a (same fingerprint)" in b.out.getvalue()
    assert manifest("b", "prepare") == manifest("a", "prepare")
    linked, source = (Path("out") / run / "stages/prepare/corpus.txt" for run in ("b", "a"))
    assert linked.stat().st_ino == source.stat().st_ino  # a hard link, not a copy
    assert {s.name: s.state for s in b.statuses()} == {"prepare": UP_TO_DATE, "cpt": UP_TO_DATE, "sft": NEVER_RUN}


def test_a_damaged_donor_is_not_reused(fake):
    fake_pipeline("a").execute(["prepare"], force=set())
    output = Path("out/a/stages/prepare/corpus.txt")
    output.write_text(output.read_text().replace("5", "6"))  # same size, other bytes: only the hash tells
    CALLS.clear()
    fake_pipeline("b", donors=("a",)).execute(["prepare"], force=set())
    assert CALLS == ["prepare"]
    assert Path("out/b/stages/prepare/corpus.txt").read_text() == "min_chars=50\n"


def test_a_donor_with_another_fingerprint_or_a_lock_or_a_forced_stage_is_not_reused(fake):
    fake_pipeline("a", "prepare.min_chars=100").execute(["prepare"], force=set())
    CALLS.clear()
    fake_pipeline("b", donors=("a",)).execute(["prepare"], force=set())
    assert CALLS == ["prepare"]
    assert manifest("b", "prepare")["fingerprint"] != manifest("a", "prepare")["fingerprint"]

    fake_pipeline("c").execute(["prepare"], force=set())
    busy = RunDir(Path("out/c"))
    busy.lock()  # another command running there
    try:
        CALLS.clear()
        fake_pipeline("d", donors=("c",)).execute(["prepare"], force=set())
        assert CALLS == ["prepare"]
    finally:
        busy.unlock()
    CALLS.clear()
    fake_pipeline("e", donors=("c",)).execute(["prepare"], force={"prepare"})  # --force: run, never reuse
    assert CALLS == ["prepare"]


# ---------------------------------------------------------------------------------------------- the real sweep


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_corpus_slices(root)
    config = {
        "run": {"name": "demo", "seed": 7, "output_dir": "runs"},
        "model": {"tokenizer": "llama2", "from_config": TINY_LLAMA, "dtype": "float32"},
        "data": data_section(root),
        "prepare": {"min_chars": 20},
        # 4 steps x 4 sequences x 32 tokens = 512 tokens; evaluations at steps 0, 2 and 4.
        "cpt": {"replay_ratio": 0.1, "seq_len": 32, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 4,
                "lr": 1e-2, "warmup_steps": 1, "precision": "fp32", "gradient_checkpointing": False, "zero_stage": 0,
                "num_gpus": 1, "accelerator": "cpu", "eval_every": 2, "eval_chars": 2000, "save_every": 4,
                "keep_checkpoints": 1, "master_port": free_port()},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def swept(workspace) -> str:
    """The sweep as a user runs it (a real process); its stdout."""
    result = jpadapt(*SWEEP, cwd=workspace)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def rerun(workspace, swept) -> str:
    result = run_cli(*SWEEP, cwd=workspace)
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_dir(workspace: Path, value: str) -> Path:
    return workspace / "runs" / f"demo-{KEY}-{value}"


def page(workspace: Path) -> Path:
    return workspace / "runs" / f"demo-sweep-{KEY}"


def test_each_value_has_a_run_directory_whose_config_is_up_to_date(workspace, swept):
    for value in VALUES:
        folder = run_dir(workspace, value)
        assert (folder / "report.md").is_file() and (folder / "report.html").is_file()
        status = run_cli("status", str(folder.relative_to(workspace) / "config.yaml"), cwd=workspace)
        assert status.returncode == 0, status.stderr
        assert f"run dir: runs/demo-{KEY}-{value}" in status.stdout
        assert {stage: state_of(status.stdout, stage) for stage in ("prepare", "cpt")} == {
            "prepare": UP_TO_DATE, "cpt": UP_TO_DATE}, status.stdout
        assert state_of(status.stdout, "sft") == "not in config"
        assert load_config(folder / "config.yaml").cpt.replay_ratio == float(value)


def test_shared_prerequisites_ran_once_and_cpt_ran_per_value(workspace, swept):
    first, second = (run_dir(workspace, value) for value in VALUES)
    assert swept.count("prepare: running") == 1
    assert f"prepare: reused from runs/demo-{KEY}-0 (same fingerprint)" in swept
    assert swept.count("cpt: running") == 2
    prepared = [json.loads((folder / "stages/prepare/manifest.json").read_text()) for folder in (first, second)]
    assert prepared[0] == prepared[1]  # fingerprint, times, outputs: the same commit
    assert all((first / "stages/prepare" / rel).stat().st_ino == (second / "stages/prepare" / rel).stat().st_ino
               for rel in prepared[0]["outputs"])
    trained = [json.loads((folder / "stages/cpt/manifest.json").read_text()) for folder in (first, second)]
    assert trained[0]["fingerprint"] != trained[1]["fingerprint"]
    assert [m["config"]["cpt.replay_ratio"] for m in trained] == [0.0, 0.25]


def test_every_number_on_the_page_comes_from_each_runs_files(workspace, swept):
    folder = page(workspace)
    assert sorted(p.name for p in folder.iterdir()) == ["comparison.html", "comparison.md", "forgetting.png",
                                                         "sweep.json"]
    record = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    assert (record["key"], record["values"], record["texts"]) == (KEY, [0, 0.25], list(VALUES))
    md = (folder / "comparison.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    rows = table_rows(lines, lines.index("## Forgetting"))
    assert len(rows) == len(record["runs"]) == 2
    for value, run, row in zip(VALUES, record["runs"], rows, strict=True):
        assert run["run_dir"] == f"runs/demo-{KEY}-{value}"
        stage = workspace / run["run_dir"] / "stages" / "cpt"
        evals = read_jsonl(stage / "forgetting.jsonl")
        summary = json.loads((stage / "summary.json").read_text(encoding="utf-8"))
        en = (evals[0]["en"]["bits_per_byte"], evals[-1]["en"]["bits_per_byte"])
        ja = (evals[0]["ja"]["bits_per_byte"], evals[-1]["ja"]["bits_per_byte"])
        assert run["cpt"] == {
            "en_bits_per_byte": {"base": en[0], "final": en[1], "change": en[1] - en[0]},
            "ja_bits_per_byte": {"base": ja[0], "final": ja[1], "gain": ja[0] - ja[1]},
            "tokens_by_language": summary["tokens_by_language"],
            "realized_en_share": summary["realized_en_share"],
            "wall_seconds": summary["wall_seconds"],
            "verdict": run["cpt"]["verdict"],
        }
        assert_verdict_matches(run["cpt"]["verdict"], evals)
        assert f"- {KEY}={value}: {run['cpt']['verdict']}" in md
        assert row == {
            KEY: value,
            "EN bits/byte base -> final": f"{en[0]:.4f} -> {en[1]:.4f}",
            "EN change": f"{en[1] - en[0]:+.4f}",
            "JA bits/byte base -> final": f"{ja[0]:.4f} -> {ja[1]:.4f}",
            "JA gain": f"{ja[0] - ja[1]:+.4f}",
            "JA tokens": f"{summary['tokens_by_language']['ja']:,}",
            "EN tokens": f"{summary['tokens_by_language']['en']:,}",
            "realized EN share": f"{summary['realized_en_share']:.2%}",
            "cpt wall time": reportkit.fmt_seconds(summary["wall_seconds"]),
        }
        assert f"](../demo-{KEY}-{value}/report.md)" in md
        # The run report of each sibling carries the same verdict in its overview.
        report = (workspace / run["run_dir"] / "report.md").read_text(encoding="utf-8")
        assert f"- cpt: {run['cpt']['verdict']}" in report
    assert record["runs"][0]["cpt"]["tokens_by_language"]["en"] == 0  # replay 0: Japanese only
    assert "![forgetting curves per value](forgetting.png)" in md
    assert (folder / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = (folder / "comparison.html").read_text(encoding="utf-8")
    assert comparison.count("<img") == 1 and 'src="data:image/png;base64,' in comparison
    assert f'<a href="../demo-{KEY}-0.25/report.html">' in comparison
    assert html.escape(record["runs"][1]["cpt"]["verdict"]) in comparison


def test_the_same_sweep_again_runs_nothing_and_rewrites_the_page(workspace, swept, rerun):
    assert "running" not in rerun and "reused" not in rerun
    assert rerun.count("prepare: up to date") == 2 and rerun.count("cpt: up to date") == 2
    assert "Nothing to do: every value's stages are up to date; the comparison page is rewritten." in rerun
    assert rerun.rstrip().splitlines()[-1] == f"Comparison: runs/demo-sweep-{KEY}/comparison.html"
    assert json.loads((page(workspace) / "sweep.json").read_text())["runs"][0]["run_dir"] == f"runs/demo-{KEY}-0"
