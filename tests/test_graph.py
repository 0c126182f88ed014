"""The make-style runner: skipping, stale reasons, fingerprint scope, --force, --only, crashes, atomic commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import JpadaptError
from pipeline.runner import INCOMPLETE, NEVER_RUN, STALE, UP_TO_DATE, Pipeline, StageCrashed
from tests.helpers.fake_stages import BEHAVIOUR, CALLS, SPECS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    CALLS.clear()
    BEHAVIOUR.clear()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ja.jsonl").write_text('{"text": "吾輩は猫である。"}\n', encoding="utf-8")
    yield


def pipeline(*overrides: str) -> Pipeline:
    cfg = load_config(None, [
        "data.ja.train=[ja.jsonl]", "data.ja.heldout=[]", "model.from_config={model_type: llama}",
        "cpt.max_steps=10", "sft.quantization=none", "run.output_dir=out", *overrides,
    ])
    return Pipeline(cfg, specs=SPECS, out=open(os.devnull, "w"))


def states(p: Pipeline) -> dict[str, tuple[str, list[str]]]:
    return {s.name: (s.state, s.reasons) for s in p.statuses()}


def test_first_run_runs_in_order_second_run_skips() -> None:
    assert pipeline().execute(["sft"], force=set()) is True
    assert CALLS == ["prepare", "cpt", "sft"]
    CALLS.clear()
    assert pipeline().execute(["sft"], force=set()) is False
    assert CALLS == []
    assert {name: state for name, (state, _) in states(pipeline()).items()} == dict.fromkeys(SPECS_NAMES, UP_TO_DATE)


SPECS_NAMES = [spec.name for spec in SPECS]


def test_changing_sft_does_not_rerun_cpt() -> None:
    pipeline().execute(["sft"], force=set())
    CALLS.clear()
    changed = pipeline("sft.lr=1e-5")
    assert states(changed)["sft"] == (STALE, ["sft.lr: 0.002 -> 1e-05"])
    assert states(changed)["cpt"][0] == UP_TO_DATE
    changed.execute(["sft"], force=set())
    assert CALLS == ["sft"]


def test_upstream_change_propagates_with_reasons() -> None:
    pipeline().execute(["sft"], force=set())
    changed = pipeline("prepare.min_chars=100")
    found = states(changed)
    assert found["prepare"] == (STALE, ["prepare.min_chars: 50 -> 100"])
    assert found["cpt"] == (STALE, ["prerequisite prepare is stale"])
    CALLS.clear()
    changed.execute(["sft"], force=set())
    assert CALLS == ["prepare", "cpt", "sft"]
    assert "min_chars=100" in (changed.rundir.stage_dir("sft") / "adapter.txt").read_text()


def test_identical_upstream_outputs_do_not_rerun_downstream(tmp_path: Path) -> None:
    pipeline().execute(["cpt"], force=set())
    CALLS.clear()
    # A key prepare reads but which does not change its output: prepare reruns, cpt's inputs are unchanged.
    pipeline("prepare.dedup.num_perm=64").execute(["cpt"], force=set())
    assert CALLS == ["prepare"]


def test_input_file_change_and_output_tampering_are_reasons(tmp_path: Path) -> None:
    pipeline().execute(["prepare"], force=set())
    (tmp_path / "ja.jsonl").write_text('{"text": "別の文章です。"}\n', encoding="utf-8")
    assert states(pipeline())["prepare"] == (STALE, ["input files of data.ja.train changed"])
    pipeline().execute(["prepare"], force=set())
    output = pipeline().rundir.stage_dir("prepare") / "corpus.txt"
    output.write_text("edited by hand\n")
    assert states(pipeline())["prepare"] == (STALE, ["output corpus.txt was modified"])
    output.unlink()
    assert states(pipeline())["prepare"] == (STALE, ["output corpus.txt is missing"])


def test_code_and_library_changes_are_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake stages import pipeline.paths, which imports nothing that names it in a SPEC: a change to it
    is found by following imports, as is the version of a library the imported code uses."""
    pipeline().execute(["prepare"], force=set())
    import pipeline.fingerprint as fp
    from pipeline import hashing

    real_read = hashing._read_module

    def edited(file: str, module: str, mtime_ns: int, size: int):
        digest, imports = real_read(file, module, mtime_ns, size)
        return ("0" * 64 if module == "pipeline.paths" else digest), imports

    monkeypatch.setattr(hashing, "_read_module", edited)
    monkeypatch.setattr(fp, "library_version", lambda dist: "99.0")
    reasons = states(pipeline())["prepare"][1]
    assert "code of pipeline.paths changed" in reasons
    assert any(r.startswith("pydantic ") and r.endswith("-> 99.0") for r in reasons)


def test_force_reruns_only_the_named_stage() -> None:
    pipeline().execute(["sft"], force=set())
    CALLS.clear()
    pipeline().execute(["sft"], force={"sft"})
    assert CALLS == ["sft"]


def test_only_skips_prerequisites_but_needs_their_outputs() -> None:
    with pytest.raises(JpadaptError, match="without --only"):
        pipeline().execute(["cpt"], force=set(), only=True)
    assert CALLS == []
    pipeline().execute(["cpt"], force=set())
    CALLS.clear()
    pipeline("prepare.min_chars=99", "cpt.lr=0.5").execute(["cpt"], force=set(), only=True)
    assert CALLS == ["cpt"]  # prepare is stale but --only leaves it alone


def test_crash_leaves_stage_incomplete_and_reruns(tmp_path: Path) -> None:
    pipeline().execute(["prepare"], force=set())
    BEHAVIOUR["cpt"] = "crash"
    with pytest.raises(StageCrashed, match="cpt crashed: ValueError: boom"):
        pipeline().execute(["cpt"], force=set())
    p = pipeline()
    assert states(p)["cpt"] == (INCOMPLETE, [states(p)["cpt"][1][0]])
    assert "crashed: ValueError: boom" in states(p)["cpt"][1][0]
    assert not p.rundir.stage_dir("cpt").exists()  # nothing committed, nothing that looks done
    assert "Traceback" in (p.rundir.partial_dir("cpt") / "log.txt").read_text()
    BEHAVIOUR.clear()
    CALLS.clear()
    pipeline().execute(["cpt"], force=set())
    assert CALLS == ["cpt"]
    assert not p.rundir.partial_dir("cpt").exists()
    assert (p.rundir.stage_dir("cpt") / "partial-work.txt").read_text() != ""  # fresh attempt wrote again


def test_failed_rerun_of_a_done_stage_is_incomplete_not_done() -> None:
    pipeline().execute(["prepare"], force=set())
    BEHAVIOUR["prepare"] = "fail"
    with pytest.raises(JpadaptError, match="prepare: corpus.jsonl:3: invalid JSON"):
        pipeline().execute(["prepare"], force={"prepare"})
    state, reasons = states(pipeline())["prepare"]
    assert state == INCOMPLETE and "failed: corpus.jsonl:3: invalid JSON" in reasons[0]
    BEHAVIOUR.clear()
    CALLS.clear()
    pipeline().execute(["prepare"], force=set())
    assert CALLS == ["prepare"]


def test_missing_declared_output_is_a_crash() -> None:
    BEHAVIOUR["prepare"] = "no-output"
    with pytest.raises(StageCrashed, match="without writing corpus.txt"):
        pipeline().execute(["prepare"], force=set())
    assert states(pipeline())["prepare"][0] == INCOMPLETE


def test_sigkill_mid_stage_reads_incomplete(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.runner import Pipeline\n"
        "from tests.helpers.fake_stages import SPECS, BEHAVIOUR\n"
        "BEHAVIOUR['prepare'] = 'kill'\n"
        "cfg = load_config(None, ['data.ja.train=[ja.jsonl]', 'data.ja.heldout=[]', 'run.output_dir=out'])\n"
        "Pipeline(cfg, specs=SPECS[:1]).execute(['prepare'], force=set())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            check=False)
    assert result.returncode == -9, result.stderr
    state, reasons = states(pipeline())["prepare"]
    assert state == INCOMPLETE
    assert "ended without finishing" in reasons[0]
    CALLS.clear()
    pipeline().execute(["prepare"], force=set())
    assert CALLS == ["prepare"] and states(pipeline())["prepare"][0] == UP_TO_DATE


def test_manifest_records_what_the_issue_asks_for() -> None:
    p = pipeline()
    p.execute(["cpt"], force=set())
    manifest = json.loads((p.rundir.stage_dir("prepare") / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["seed"] == 1234
    assert manifest["config"]["prepare"]["min_chars"] == 50 and "enabled" not in manifest["config"]["prepare"]
    assert manifest["inputs"]["data.ja.train"][0]["path"] == "ja.jsonl"
    assert set(manifest["inputs"]["data.ja.train"][0]) == {"path", "sha256", "size"}
    assert list(manifest["outputs"]) == ["corpus.txt", "partial-work.txt"]  # bookkeeping files are not outputs
    assert manifest["outputs"]["corpus.txt"]["size"] == len("min_chars=50\n")
    for key in ("fingerprint", "started", "finished", "duration_s", "environment", "summary"):
        assert key in manifest
    assert {"git_commit", "python", "libraries"} <= set(manifest["environment"])
    cpt = json.loads((p.rundir.stage_dir("cpt") / "manifest.json").read_text())
    assert set(cpt["upstream"]) == {"prepare"}
    assert (p.rundir.root / "config.yaml").read_text().startswith("run:\n  name: demo\n")


def test_never_run_and_disabled_states() -> None:
    found = states(pipeline("sft.enabled=false"))
    assert found["prepare"] == (NEVER_RUN, [])
    assert found["cpt"][0] == NEVER_RUN and "waits on prepare" in found["cpt"][1][0]
    assert found["sft"] == ("disabled", [])
    with pytest.raises(JpadaptError, match="stage sft is disabled"):
        pipeline("sft.enabled=false").execute(["sft"], force=set())


def test_required_stage_disabled_is_a_config_error() -> None:
    with pytest.raises(JpadaptError, match="stage cpt needs stage prepare, which is disabled"):
        pipeline("prepare.enabled=false")


def test_missing_input_file_is_reported_before_any_stage_runs() -> None:
    with pytest.raises(JpadaptError, match="data.ja.train: file not found: missing.jsonl"):
        pipeline("data.ja.train=[missing.jsonl]").execute(["prepare"], force=set())
    assert CALLS == []


def test_run_directory_lock(tmp_path: Path) -> None:
    first = pipeline()
    first.rundir.lock()
    try:
        with pytest.raises(JpadaptError, match="another jpadapt command is running"):
            pipeline().execute(["prepare"], force=set())
    finally:
        first.rundir.unlock()
