"""prepare as datatrove tasks: the same bytes for any number of workers and tasks, near-duplicate quality
against exact Jaccard, held-out documents winning in both split modes, errors from worker processes, and a
SIGKILL-ed run that resumes without redoing finished tasks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.prepare import heldout_by_hash, prepare_language
from pipeline.config import CorpusConfig, PrepareConfig
from pipeline.errors import JpadaptError
from tests.helpers.cli import REPO, assert_one_line_error, jpadapt
from tests.helpers.jsonl import read_jsonl

KANA = [chr(c) for c in range(0x3041, 0x3097)]
KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def sentence(rng: random.Random) -> str:
    return "".join(rng.choices(KANA + KANJI, k=rng.randint(15, 40))) + "。"


def document(rng: random.Random, sentences: int) -> list[str]:
    return [sentence(rng) for _ in range(sentences)]


def jaccard(a: str, b: str, n: int = 5) -> float:
    grams = [{text[i : i + n] for i in range(len(text) - n + 1)} for text in (a, b)]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


def near_copy(rng: random.Random, sentences: list[str], level: float) -> str:
    """`sentences` with sentences replaced from the end while the exact 5-gram Jaccard stays at or above `level`
    (at least one is replaced: an exact copy is not a near copy)."""
    original = "".join(sentences)
    copy = sentences[:-1] + [sentence(rng)]
    for index in range(len(copy) - 2, -1, -1):
        candidate = copy[:index] + [sentence(rng)] + copy[index + 1 :]
        if jaccard(original, "".join(candidate)) < level:
            break
        copy = candidate
    return "".join(copy)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def options(**overrides) -> PrepareConfig:
    return PrepareConfig(**overrides)


def output_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "ja").iterdir())}


@pytest.fixture(scope="module")
def constructed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Five training files and a held-out file with exact copies, near copies at known Jaccard, copies of
    held-out documents and records sharing ids, spread over files so that tasks must agree across files."""
    folder = tmp_path_factory.mktemp("constructed")
    rng = random.Random(7)
    originals = [document(rng, 40) for _ in range(30)]
    held = [document(rng, 40) for _ in range(4)]
    planted: list[tuple[str, str, float]] = []
    files: list[list[dict]] = [[] for _ in range(5)]
    for index, sentences in enumerate(originals):
        files[index % 5].append({"id": f"doc{index}", "text": "".join(sentences)})
    for level_index, level in enumerate((0.6, 0.7, 0.8, 0.9)):
        for k in range(5):
            original = originals[level_index * 5 + k]
            copy = near_copy(rng, original, level)
            planted.append((f"near{level}-{k}", f"doc{level_index * 5 + k}", jaccard("".join(original), copy)))
            files[(level_index + k + 1) % 5].append({"id": f"near{level}-{k}", "text": copy})
    files[4].insert(0, {"id": "exact-early", "text": "".join(originals[29])})  # file 4 precedes doc29's later copy
    files[4].append({"id": "exact-late", "text": "".join(originals[3])})  # doc3 is in file 3: it stays
    files[2].append({"id": "leak", "text": "".join(held[1])})
    train = [write_jsonl(folder / f"train{i}.jsonl", records) for i, records in enumerate(files)]
    heldout = [write_jsonl(folder / "held.jsonl", [{"id": f"h{i}", "text": "".join(s)} for i, s in enumerate(held)])]
    return {"train": train, "heldout": heldout, "planted": planted, "files": files}


def run_prepare(constructed: dict, out: Path, heldout: bool = True, **opts) -> dict:
    return prepare_language("ja", CorpusConfig(train=["x"]), constructed["train"],
                            constructed["heldout"] if heldout else [], options(**opts), 5, out)


@pytest.mark.parametrize("heldout", [True, False], ids=["heldout-files", "hash-split"])
def test_outputs_are_byte_identical_for_any_workers_and_tasks(constructed, tmp_path, heldout):
    runs = {}
    for name, opts in {"1 worker": {"workers": 1}, "2 workers": {"workers": 2},
                       "2 tasks": {"workers": 2, "tasks": 2}, "1 task": {"workers": 1, "tasks": 1}}.items():
        stats = run_prepare(constructed, tmp_path / name.replace(" ", "-"), heldout, **opts)
        runs[name] = (json.dumps(stats, sort_keys=True), output_bytes(tmp_path / name.replace(" ", "-")))
    first = runs["1 worker"]
    assert all(run == first for run in runs.values()), {name: run[0] for name, run in runs.items()}
    assert json.loads(first[0])["removed"]["exact_duplicate"] == (3 if heldout else 2)  # "leak" copies a held-out file
    assert not (tmp_path / "1-worker" / ".work").exists()  # the scratch folder goes when the language is done


def test_near_duplicates_follow_exact_jaccard(constructed, tmp_path):
    out = tmp_path / "out"
    stats = run_prepare(constructed, out, workers=1)
    kept = {r["id"] for split in ("train", "heldout") for r in read_jsonl(*sorted((out / "ja").glob(f"{split}-*")))}
    position = {r["id"]: (f, n) for f, records in enumerate(constructed["files"]) for n, r in enumerate(records)}
    removed_at = {}
    for copy_id, original_id, similarity in constructed["planted"]:
        earlier, later = sorted((copy_id, original_id), key=position.__getitem__)
        assert earlier in kept  # of a pair, the one read first stays
        removed_at.setdefault(round(similarity, 1), []).append(later not in kept)
    low = [r for level, rs in removed_at.items() if level < 0.75 for r in rs]
    high = [r for level, rs in removed_at.items() if level >= 0.85 for r in rs]
    assert low and not any(low)  # candidates below the threshold are verified away, never removed
    assert high and all(high)
    assert stats["removed"]["near_duplicate"] == sum(map(sum, removed_at.values()))
    assert {"exact-late", "leak", "doc29"}.isdisjoint(kept) and {"doc3", "exact-early", "h1"} <= kept
    # exact-early (file 4) precedes doc29 (file 4, later): input order decides which copy stays.
    line = {r["id"]: f"train4.jsonl:{n}" for n, r in enumerate(constructed["files"][4], 1)}
    examples = stats["duplicate_examples"]["exact_duplicate"]
    assert {"document": line["doc29"], "duplicate_of": line["exact-early"]} in examples
    assert stats["decontamination"]["exact_duplicate_of_heldout"] == 1


def test_hash_split_keeps_the_heldout_copy(tmp_path):
    rng = random.Random(3)
    texts = ["".join(document(rng, 10)) for _ in range(40)]
    # A text whose own id goes to held-out, copied under an id that goes to train, earlier in the file.
    seed = 11
    held_id = next(f"h{i}" for i in range(1000) if heldout_by_hash(f"h{i}", seed, 0.2))
    train_id = next(f"t{i}" for i in range(1000) if not heldout_by_hash(f"t{i}", seed, 0.2))
    records = [{"id": train_id, "text": texts[0]}] + [{"id": f"d{i}", "text": t} for i, t in enumerate(texts[1:])]
    records.append({"id": held_id, "text": texts[0]})
    path = write_jsonl(tmp_path / "c.jsonl", records)
    stats = prepare_language("ja", CorpusConfig(train=["x"]), [path], [], options(workers=1, heldout_fraction=0.2),
                             seed, tmp_path / "out")
    held = [r["id"] for r in read_jsonl(*sorted((tmp_path / "out" / "ja").glob("heldout-*")))]
    assert held_id in held and stats["decontamination"]["exact_duplicate_of_heldout"] == 1


def test_a_corrupt_record_in_a_worker_names_file_and_line(constructed, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "正しい行です。"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(JpadaptError, match=r"^ja scan: bad\.jsonl:2: "):
        prepare_language("ja", CorpusConfig(train=["x"]), [*constructed["train"], bad], constructed["heldout"],
                         options(workers=2), 5, tmp_path / "out")


def test_a_corrupt_record_fails_the_stage_in_one_line_and_commits_nothing(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "正しい行です。"}\n{"text": oops}\n', encoding="utf-8")
    result = jpadapt("prepare", "data.ja.train=[bundled:corpus/ja_train.jsonl, bad.jsonl]", "prepare.workers=2",
                     cwd=tmp_path)
    assert_one_line_error(result, "bad.jsonl:2")
    assert not (tmp_path / "runs/demo/stages/prepare").exists()


def stage_bytes(stage: Path) -> dict[str, str]:
    return {p.relative_to(stage).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage.rglob("*"))
            if p.is_file() and p.name not in {"manifest.json", "log.txt", "attempt.json"}}


def test_bundled_corpora_give_the_same_bytes_with_1_or_2_workers_and_do_not_rerun(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert jpadapt("prepare", "prepare.workers=2", cwd=two).returncode == 0
    assert jpadapt("prepare", "prepare.workers=1", "prepare.tasks=1", cwd=one).returncode == 0
    stage = Path("runs/demo/stages/prepare")
    assert stage_bytes(one / stage) == stage_bytes(two / stage)
    assert {"stats.json", "ja/train-00001-00000.jsonl", "en/heldout-00000-00000.jsonl"} <= set(stage_bytes(one / stage))
    status = jpadapt("status", "prepare.workers=1", "prepare.tasks=1", cwd=two)
    assert status.returncode == 0 and "prepare" in status.stdout and "up to date" in status.stdout, status.stdout


# --------------------------------------------------------------------------------------------- SIGKILL, resume


def kill_after_scan_tasks(cwd: Path, config: Path, finished: int) -> None:
    """Start `jpadapt prepare` and SIGKILL its whole process group once `finished` scan tasks are complete."""
    completions = cwd / "runs/scale/stages/prepare.partial/.work/ja/logs/scan/completions"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "prepare", str(config)], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if completions.is_dir() and len(list(completions.iterdir())) >= finished:
                break
            time.sleep(0.02)
        assert process.poll() is None, "prepare finished before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_a_killed_prepare_resumes_without_redoing_finished_tasks(tmp_path):
    rng = random.Random(1)
    for index in range(6):
        write_jsonl(tmp_path / f"part{index}.jsonl", [{"text": "".join(document(rng, 60))} for _ in range(150)])
    config = tmp_path / "scale.yaml"
    config.write_text(
        "run: {name: scale}\nmodel: {tokenizer: llama2}\n"
        "data: {ja: {train: 'part*.jsonl'}}\nprepare: {workers: 1, heldout_fraction: 0.1}\n",
        encoding="utf-8",
    )
    kill_after_scan_tasks(tmp_path, config, finished=2)
    status = jpadapt("status", str(config), cwd=tmp_path)
    assert "prepare" in status.stdout and "up to date" not in status.stdout.split("prepare", 1)[1].splitlines()[0]
    result = jpadapt("prepare", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "runs/scale/stages/prepare/log.txt").read_text(encoding="utf-8")
    assert "finished by an earlier attempt" in log
    resumed = output_bytes(tmp_path / "runs/scale/stages/prepare")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for path in tmp_path.glob("part*.jsonl"):
        (fresh / path.name).write_bytes(path.read_bytes())
    (fresh / "scale.yaml").write_text(config.read_text(encoding="utf-8"), encoding="utf-8")
    assert jpadapt("prepare", "scale.yaml", cwd=fresh).returncode == 0
    assert output_bytes(fresh / "runs/scale/stages/prepare") == resumed


def test_default_task_count_is_one_per_file_up_to_a_cap():
    from data.prepare import DEFAULT_MAX_TASKS, InputFile, _assign

    files = [InputFile(i, f"/f{i}", f"f{i}", "train", size=1000 + i) for i in range(DEFAULT_MAX_TASKS + 50)]
    groups = _assign(files, None)
    assert len(groups) == DEFAULT_MAX_TASKS and sorted(i for g in groups for i in g) == list(range(len(files)))
    assert len(_assign(files[:3], None)) == 3 and len(_assign(files, 1000)) == len(files)


def test_a_bucket_task_raises_its_open_file_limit():
    code = (
        "import resource\n"
        "from data.dedup import _allow_open_files\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "_allow_open_files()\n"
        "raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "assert raised > 64 or hard <= 64, (raised, hard)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
