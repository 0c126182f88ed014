"""Benchmark of `prepare` at scale (issue #15): the datatrove rebuild (NEW) against the datasketch one (OLD).

    python bench/prepare_scale.py [--sizes 0.25,0.5,1] [--workdir /tmp/jpadapt-bench-prepare]
                                  [--old-ref 0fc80d4] [--new-ref REF] [--out bench/results/prepare_scale-cpu.md]

Smoke test of the harness, both sides on the OLD code (a minute on 2 cores):

    python bench/prepare_scale.py --sizes 0.005 --new-ref 0fc80d4 --out /tmp/prepare_scale-smoke.md

In one run, for each corpus size (GB of training JSONL), it

1. generates (once; cached under --workdir) a Japanese corpus of 8 JSONL files plus a held-out file: documents
   of sentences resampled, seeded, from the bundled `ja_train` text, lengths drawn like the bundled documents',
   with planted exact duplicates, near-duplicate pairs at exact character-5-gram Jaccard 0.6 ... 0.95 and
   training copies of held-out documents; every planted pair is listed in the corpus's manifest.json;
2. runs `python -m pipeline.cli prepare CONFIG` for OLD (`git archive` of --old-ref, run from that tree), NEW
   with `prepare.workers=1` and NEW with `prepare.workers=2` (the working tree, or `git archive` of --new-ref),
   each in a fresh run directory, measuring wall time and the peak RSS of every process of its tree;
3. scores each run's output against the planted pairs (recall of the later copy per Jaccard level, precision
   of the duplicate removals);
4. runs the three variants on the bundled demo corpora and lists every document whose kept/removed decision
   differs between OLD and NEW;

then writes the results as markdown (--out) and the raw numbers as JSON beside it. A variant that fails is
reported as failed, and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import lzma
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for data.text (the Japanese-ratio filter, to explain a bundled difference)
BUNDLED = ROOT / "data" / "bundled" / "corpus"
OLD_REF = "0fc80d4"  # the last commit before prepare moved to datatrove
# Bump when the generated corpora change, so cached ones are not reused.
GENERATOR_VERSION = 1
NGRAM = 5  # prepare's default dedup.ngram: the planted similarities are measured as prepare sees them
NEAR_LEVELS = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
RECALL_FROM = 0.85  # the recall target covers planted pairs at J >= 0.85
SPLITS = ("train", "heldout")
EXACT_KINDS = ("exact", "heldout_exact")
NEAR_KINDS = ("near", "heldout_near")
# The targets.
TARGET_SPEEDUP = 1.8
TARGET_RSS_SPREAD = 1.15
TARGET_RECALL = 0.95
TARGET_PRECISION = 0.99
TARGET_AGREEMENT = 0.99
POLL_S = 0.2
LISTED_DIFFERENCES = 200  # differing bundled documents written out in full; the count is always complete


# ============================================================================================ corpus generation

# One sentence: up to and including its 。！？ (and a closing 」), or a run without one; newlines on their own,
# so that "".join(segments) gives the text back exactly.
SEGMENT = re.compile(r"[^。！？\n]*[。！？]+」*|[^。！？\n]+|\n+")
PARAGRAPH_BREAK = 0.12  # chance of a newline after a sentence (the bundled texts break every ~8 sentences)
MIN_DOC_CHARS = 100  # above prepare's min_chars (50): no planted document may fall to a length filter
MIN_NEAR_BASE_CHARS = 200  # shorter documents cannot hit a 0.01-wide Jaccard band reliably
INSERT_SHARE = 0.3  # near copies: share of edits that insert a sentence rather than replace one


@dataclass(frozen=True)
class PlantSpec:
    """How much of a corpus is planted; counts are fractions of all training documents, with a floor so a
    smoke-size corpus still has every kind."""

    exact_fraction: float = 0.02
    near_fraction: float = 0.005  # per level
    near_levels: tuple[float, ...] = NEAR_LEVELS
    # A near pair's exact Jaccard lies in [level, level + band]: never below its level, so every pair planted at
    # the dedup threshold (0.8) is one dedup should remove, and every pair planted at 0.85 counts for J >= 0.85.
    band: float = 0.01
    heldout_fraction: float = 0.01
    heldout_exact_fraction: float = 0.001
    heldout_near_fraction: float = 0.0005
    heldout_near_level: float = 0.9


@dataclass(frozen=True)
class Planted:
    """A planted pair: `second` repeats `first` and comes after it, so dedup should remove `second`."""

    kind: str  # exact | near | heldout_exact | heldout_near
    first: str
    second: str
    level: float | None  # targeted Jaccard (near kinds)
    jaccard: float  # measured exact character-5-gram Jaccard of the NFKC-normalized texts


@dataclass
class Corpus:
    size_gb: float
    directory: Path
    train_files: list[Path]
    heldout_file: Path
    train_docs: int
    heldout_docs: int
    train_bytes: int
    heldout_bytes: int
    planted: list[Planted]
    generated_s: float | None  # None: reused from the cache

    @property
    def input_bytes(self) -> int:
        return self.train_bytes + self.heldout_bytes

    @property
    def input_docs(self) -> int:
        return self.train_docs + self.heldout_docs


class DocSampler:
    """Documents as seeded functions of a key, so any document (e.g. the original of a duplicate) can be
    regenerated instead of kept in memory while a GB corpus is written."""

    def __init__(self, sentences: list[str], lengths: list[int], seed: int) -> None:
        self.sentences = sentences
        self.lengths = lengths
        self.seed = seed

    def text(self, key: str) -> str:
        rng = random.Random(f"{self.seed}:{key}")
        target = max(MIN_DOC_CHARS, round(rng.choice(self.lengths) * rng.uniform(0.8, 1.2)))
        parts, size = [], 0
        while size < target:
            sentence = rng.choice(self.sentences)
            parts.append(sentence)
            size += len(sentence)
            if size < target and rng.random() < PARAGRAPH_BREAK:
                parts.append("\n")
        return "".join(parts)

    def mean_line_bytes(self, samples: int = 400) -> float:
        """Average JSONL line size, to turn a size in GB into a document count."""
        lines = (len(jsonl_line(f"b{i:08d}", self.text(f"probe{i}"))) for i in range(samples))
        return sum(lines) / samples


def load_bundled_sampler(seed: int) -> DocSampler:
    """Sentences (split on 。！？ and newlines) and document lengths of the bundled Japanese training text."""
    texts = [json.loads(line)["text"] for line in _xz_lines(BUNDLED / "ja_train.jsonl.xz")]
    sentences = [s for text in texts for s in SEGMENT.findall(text) if not s.startswith("\n")]
    # dict.fromkeys: unique, in a fixed order (a set's order would change the corpus between runs).
    return DocSampler(list(dict.fromkeys(sentences)), [len(text) for text in texts], seed)


def _xz_lines(path: Path) -> Iterator[str]:
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        yield from (line for line in handle if line.strip())


def jsonl_line(doc_id: str, text: str) -> bytes:
    return (json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")


def shingles(text: str) -> set[str]:
    """The set of 5-character substrings of the text as prepare sees it (NFKC, ends stripped)."""
    text = unicodedata.normalize("NFKC", text).strip()
    return {text[i : i + NGRAM] for i in range(max(len(text) - NGRAM + 1, 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Edit:
    """Replace the sentence at `position` with `new`, or insert `new` before it."""

    position: int
    insert: bool
    new: str

    def cost(self, old: str) -> int:
        return len(self.new) if self.insert else max(len(self.new), len(old))


def apply_edits(segments: list[str], edits: list[Edit], budget: int) -> str:
    """The text after spending `budget` characters on the edits in order; the last edit is applied partly
    (the first characters of its sentence), so the similarity moves in steps of about one 5-gram."""
    out = list(segments)
    inserted: dict[int, str] = {}
    for edit in edits:
        if budget <= 0:
            break
        old = segments[edit.position]
        chars = min(budget, edit.cost(old))
        budget -= chars
        if edit.insert:
            inserted[edit.position] = edit.new[:chars]
        else:
            out[edit.position] = edit.new[:chars] + old[chars:]
    return "".join(inserted.get(i, "") + segment for i, segment in enumerate(out))


def near_copy(
    text: str, j_min: float, j_max: float, rng: random.Random, pool: list[str]
) -> tuple[str, float] | None:
    """A copy of `text` whose exact Jaccard with it lies in [j_min, j_max], or None.

    Sentences are replaced or inserted in a random order; a binary search finds how many characters of
    edits bring the similarity down to the target (it falls almost monotonically as edits accumulate).
    """
    target = (j_min + j_max) / 2
    segments = SEGMENT.findall(text)
    positions = [i for i, segment in enumerate(segments) if not segment.startswith("\n")]
    rng.shuffle(positions)
    edits = [Edit(i, rng.random() < INSERT_SHARE, rng.choice(pool)) for i in positions]
    original = shingles(text)

    def similarity(budget: int) -> float:
        return jaccard(original, shingles(apply_edits(segments, edits, budget)))

    low, high = 0, sum(edit.cost(segments[edit.position]) for edit in edits)
    if similarity(high) > target:
        return None
    while high - low > 1:  # invariant: similarity(low) > target >= similarity(high)
        middle = (low + high) // 2
        if similarity(middle) > target:
            low = middle
        else:
            high = middle
    for budget in (low, high):
        copy = apply_edits(segments, edits, budget)
        measured = jaccard(original, shingles(copy))
        if j_min <= measured <= j_max:
            return copy, measured
    return None


@dataclass
class _Entry:
    """One line of the training files: `order` places it; its text is regenerated from `key` or literal."""

    order: float
    doc_id: str
    key: str | None = None
    text: str | None = None


def _count(fraction: float, docs: int, floor: int) -> int:
    return max(floor, round(fraction * docs))


class CorpusPlanner:
    """Decides every training document and planted pair of one corpus, keeping only near copies' texts."""

    def __init__(self, sampler: DocSampler, spec: PlantSpec, docs: int, seed: int) -> None:
        self.sampler = sampler
        self.spec = spec
        self.rng = random.Random(f"{seed}:plan")
        self.heldout_docs = _count(spec.heldout_fraction, docs, 5)
        self.near_per_level = _count(spec.near_fraction, docs, 2)
        self.counts = {
            "exact": _count(spec.exact_fraction, docs, 2),
            "near": self.near_per_level * len(spec.near_levels),
            "heldout_exact": _count(spec.heldout_exact_fraction, docs, 2),
            "heldout_near": _count(spec.heldout_near_fraction, docs, 1),
        }
        self.base_docs = docs - sum(self.counts.values())
        self.entries = [_Entry(float(k), f"b{k:08d}", key=f"b{k}") for k in range(self.base_docs)]
        self.planted: list[Planted] = []
        # Each base document is the original of at most one planted copy, so the expected outcome of every
        # pair is independent of the others.
        self._unused = list(range(self.base_docs))
        self.rng.shuffle(self._unused)

    def plan(self) -> None:
        for n in range(self.counts["exact"]):
            base = self._unused.pop()
            self._add_copy("exact", base, f"x{n:07d}", key=f"b{base}")
        for level in self.spec.near_levels:
            for n in range(self.near_per_level):
                self._add_near(level, f"n{round(level * 100)}-{n:06d}")
        for n in range(self.counts["heldout_exact"]):
            self._add_heldout_copy(n, near=False)
        for n in range(self.counts["heldout_near"]):
            self._add_heldout_copy(n, near=True)

    def _later_order(self, base: int) -> float:
        # Strictly after the original, anywhere up to the end: same file or a later one.
        return base + (self.base_docs - base) * self.rng.uniform(0.01, 1.0)

    def _add_copy(self, kind: str, base: int, doc_id: str, key: str) -> None:
        self.entries.append(_Entry(self._later_order(base), doc_id, key=key))
        self.planted.append(Planted(kind, f"b{base:08d}", doc_id, None, 1.0))

    def _add_near(self, level: float, doc_id: str) -> None:
        while True:  # a few originals are too short or miss the band; the next one is tried
            if not self._unused:
                raise RuntimeError("too few documents to plant every near pair: give a larger size")
            base = self._unused.pop()
            text = self.sampler.text(f"b{base}")
            found = self._near_text(text, level)
            if found is not None:
                break
        copy, measured = found
        self.entries.append(_Entry(self._later_order(base), doc_id, text=copy))
        self.planted.append(Planted("near", f"b{base:08d}", doc_id, level, round(measured, 4)))

    def _near_text(self, text: str, level: float) -> tuple[str, float] | None:
        if len(text) < MIN_NEAR_BASE_CHARS:
            return None
        for _ in range(4):
            found = near_copy(text, level, level + self.spec.band, self.rng, self.sampler.sentences)
            if found is not None:
                return found
        return None

    def _add_heldout_copy(self, n: int, near: bool) -> None:
        """A training document repeating a held-out one: prepare reads held-out files first, so the training
        copy is the later one wherever it sits."""
        order = self.rng.uniform(0, self.base_docs)
        heldout = self.rng.randrange(self.heldout_docs)
        if not near:
            doc_id = f"hx{n:05d}"
            self.entries.append(_Entry(order, doc_id, key=f"h{heldout}"))
            self.planted.append(Planted("heldout_exact", f"h{heldout:06d}", doc_id, None, 1.0))
            return
        level = self.spec.heldout_near_level
        for _ in range(100):  # a short held-out document cannot make a near copy: try another one
            if (found := self._near_text(self.sampler.text(f"h{heldout}"), level)) is not None:
                break
            heldout = self.rng.randrange(self.heldout_docs)
        else:
            raise RuntimeError("no held-out document makes a near copy: the corpus is too small")
        doc_id = f"hn{n:05d}"
        self.entries.append(_Entry(order, doc_id, text=found[0]))
        self.planted.append(Planted("heldout_near", f"h{heldout:06d}", doc_id, level, round(found[1], 4)))


def generate_corpus(directory: Path, size_gb: float, files: int, sampler: DocSampler, spec: PlantSpec) -> None:
    """Write train-NN.jsonl (contiguous slices of the planned order), heldout.jsonl and manifest.json (last:
    its presence marks a complete corpus)."""
    docs = max(50, round(size_gb * 1e9 / sampler.mean_line_bytes()))
    planner = CorpusPlanner(sampler, spec, docs, sampler.seed)
    planner.plan()
    entries = sorted(planner.entries, key=lambda entry: entry.order)
    directory.mkdir(parents=True, exist_ok=True)
    train_names = []
    per_file = -(-len(entries) // files)
    for index in range(files):
        name = f"train-{index:02d}.jsonl"
        with open(directory / name, "wb") as handle:
            for entry in entries[index * per_file : (index + 1) * per_file]:
                text = entry.text if entry.text is not None else sampler.text(entry.key)
                handle.write(jsonl_line(entry.doc_id, text))
        train_names.append(name)
    with open(directory / "heldout.jsonl", "wb") as handle:
        handle.writelines(jsonl_line(f"h{k:06d}", sampler.text(f"h{k}")) for k in range(planner.heldout_docs))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "size_gb": size_gb,
        "seed": sampler.seed,
        "spec": asdict(spec),
        "train_files": train_names,
        "heldout_file": "heldout.jsonl",
        "train_docs": len(entries),
        "heldout_docs": planner.heldout_docs,
        "planted": [asdict(pair) for pair in planner.planted],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def ensure_corpus(workdir: Path, size_gb: float, files: int, seed: int,
                  sampler_factory: Callable[[], DocSampler]) -> Corpus:
    """The corpus of this size from the cache, generating it first if it is missing or incomplete."""
    directory = workdir / f"corpus-{size_gb:g}GB-{files}files-seed{seed}-v{GENERATOR_VERSION}"
    manifest_path = directory / "manifest.json"
    generated_s = None
    if not manifest_path.exists():
        shutil.rmtree(directory, ignore_errors=True)
        log(f"generating the {size_gb:g} GB corpus in {directory}")
        start = time.perf_counter()
        generate_corpus(directory, size_gb, files, sampler_factory(), PlantSpec())
        generated_s = time.perf_counter() - start
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    train_files = [directory / name for name in manifest["train_files"]]
    heldout_file = directory / manifest["heldout_file"]
    return Corpus(
        size_gb=size_gb,
        directory=directory,
        train_files=train_files,
        heldout_file=heldout_file,
        train_docs=manifest["train_docs"],
        heldout_docs=manifest["heldout_docs"],
        train_bytes=sum(path.stat().st_size for path in train_files),
        heldout_bytes=heldout_file.stat().st_size,
        planted=[Planted(**pair) for pair in manifest["planted"]],
        generated_s=generated_s,
    )


# ============================================================================================ code trees


@dataclass
class CodeTree:
    """Where one side's code lives, and whether its CLI runs from there."""

    label: str  # "OLD" / "NEW"
    root: Path
    commit: str  # a commit, or "working tree (HEAD abc, modified)"
    problem: str | None = None  # why its runs cannot start, when they cannot


def archived_tree(ref: str, workdir: Path, label: str) -> CodeTree:
    """`git archive` of `ref`, extracted once per commit under workdir/code/."""
    commit = _git("rev-parse", f"{ref}^{{commit}}")
    root = workdir / "code" / commit
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
        (root / ".complete").write_text(commit + "\n")
    return CodeTree(label, root, commit)


def working_tree() -> CodeTree:
    head = _git("rev-parse", "HEAD")
    modified = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return CodeTree("NEW", ROOT, f"working tree (HEAD {head}{', modified' if modified else ''})")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def code_env(tree: CodeTree) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree.root), PYTHONUNBUFFERED="1")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(name, "1")
    return env


def probe(tree: CodeTree, python: str) -> None:
    """Check that `python -m pipeline.cli --help` runs and imports this tree's code, not another copy (an
    editable install, or the current directory, which `python -m` puts first on sys.path: so every command
    runs with the tree as its working directory)."""
    check = "import pipeline.cli, sys; sys.stdout.write(pipeline.cli.__file__)"
    options = {"cwd": tree.root, "env": code_env(tree), "capture_output": True, "text": True}
    imported = subprocess.run([python, "-c", check], check=False, **options)
    helped = subprocess.run([python, "-m", "pipeline.cli", "--help"], check=False, **options)
    if imported.returncode or helped.returncode:
        tree.problem = f"the CLI does not start: {_tail(imported.stderr + helped.stderr, 1)}"
    elif Path(imported.stdout).resolve() != (tree.root / "pipeline" / "cli.py").resolve():
        tree.problem = f"pipeline.cli is imported from {imported.stdout}, not from {tree.root}"


# ============================================================================================ running a variant


@dataclass(frozen=True)
class Variant:
    name: str  # OLD, NEW-1, NEW-2
    side: str  # old | new
    overrides: tuple[str, ...] = ()


VARIANTS = (
    Variant("OLD", "old"),
    Variant("NEW-1", "new", ("prepare.workers=1",)),
    Variant("NEW-2", "new", ("prepare.workers=2",)),
)


@dataclass
class RunOutcome:
    """What one `prepare` run did: resources, and the documents it kept."""

    ok: bool
    error: str | None = None
    wall_s: float | None = None
    stage_s: float | None = None  # the stage's own "done in" time (without interpreter start and hashing)
    rss_main_mb: float | None = None
    rss_worker_mb: float | None = None  # max over the worker processes (see is_worker)
    processes: list[dict] = field(default_factory=list)  # every process seen: pid, peak RSS, command line
    prepare_settings: dict = field(default_factory=dict)  # the config's prepare section, before overrides
    stats: dict = field(default_factory=dict)  # stats.json
    kept: dict[str, str] = field(default_factory=dict)  # id -> split


class TreeRssMonitor(threading.Thread):
    """Polls the process tree under `pid` and keeps each process's largest resident set size."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.parents: dict[int, int] = {}
        self.commands: dict[int, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for pid, (parent, rss) in tree_rss(self.pid).items():
                self.peaks[pid] = max(rss, self.peaks.get(pid, 0))
                if pid not in self.commands:
                    self.parents[pid] = parent
                    self.commands[pid] = _command_line(pid)
            self._stop_event.wait(POLL_S)

    def is_worker(self, pid: int) -> bool:
        """A Python process doing the work. Not: the main process; a helper that the CLI or a library runs (a
        `git`, `ldconfig` or `uname` lookup, multiprocessing's resource tracker), whose few MB would pass for a
        worker's peak; datatrove's default forkserver, a child of the main process whose own children, forked
        from it with the same command line, are the workers."""
        command = self.commands[pid]
        if pid == self.pid or not Path(command.split(" ", 1)[0]).name.startswith("python"):
            return False
        if "resource_tracker" in command or "semaphore_tracker" in command:
            return False
        return not ("forkserver" in command and self.parents[pid] == self.pid)

    def worker_peaks(self) -> list[int]:
        return [rss for pid, rss in self.peaks.items() if self.is_worker(pid)]

    def processes(self) -> list[dict]:
        return [
            {"pid": pid, "parent": self.parents[pid], "peak_rss_mib": _mib(rss), "worker": self.is_worker(pid),
             "command": self.commands[pid][:200]}
            for pid, rss in self.peaks.items()
        ]

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def tree_rss(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, RSS in bytes) of `root` and all its descendants (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _tree_rss_proc(root)
    try:
        parent = psutil.Process(root)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):  # it may exit between listing and reading
            out[process.pid] = (process.ppid(), process.memory_info().rss)
    return out


def _tree_rss_proc(root: int) -> dict[int, tuple[int, int]]:
    parents = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    out = {}
    for pid in tree:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            rss_kib = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
            out[pid] = (parents.get(pid, 0), rss_kib * 1024)
    return out


def demo_config(tree: CodeTree) -> dict:
    """The side's own demo pipeline: each side gets a prepare section its code accepts."""
    return yaml.safe_load((tree.root / "pipeline" / "configs" / "demo.yaml").read_text(encoding="utf-8"))


def write_config(path: Path, name: str, runs_dir: Path, demo: dict, data: dict | None) -> dict:
    """The demo pipeline cut down to `prepare`: run, model (as is), data (the demo's when None) and the demo's
    prepare section; returns that section. Stage sections that are absent are not part of the pipeline, so
    `prepare` is all there is to run."""
    config = {
        "run": {**demo["run"], "name": name, "output_dir": str(runs_dir)},
        "model": demo["model"],
        "data": demo["data"] if data is None else data,
        "prepare": demo["prepare"],
    }
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return demo["prepare"]


def run_prepare(tree: CodeTree, python: str, config: Path, overrides: tuple[str, ...], log_path: Path,
                timeout_s: float, langs: tuple[str, ...]) -> RunOutcome:
    """Run `prepare` in a fresh process group, timing it and sampling the RSS of its process tree."""
    if tree.problem:
        return RunOutcome(ok=False, error=tree.problem)
    command = [python, "-m", "pipeline.cli", "prepare", str(config), *overrides]
    with open(log_path, "wb") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=tree.root, env=code_env(tree), stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        monitor = TreeRssMonitor(process.pid)
        monitor.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process, monitor)
            return RunOutcome(ok=False, error=f"timed out after {timeout_s:.0f} s")
        except KeyboardInterrupt:
            _kill_group(process, monitor)
            raise
        wall = time.perf_counter() - start
        monitor.stop()
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    if returncode != 0:
        return RunOutcome(ok=False, error=f"exit code {returncode}: {_tail(log_text, 3)}", wall_s=wall)
    outcome = RunOutcome(ok=True, wall_s=wall, processes=monitor.processes())
    outcome.rss_main_mb = _mib(monitor.peaks.get(process.pid))
    workers = monitor.worker_peaks()
    outcome.rss_worker_mb = _mib(max(workers)) if workers else None
    if found := re.search(r"prepare: done in ([\d.]+) s", log_text):
        outcome.stage_s = float(found.group(1))
    read_outputs(outcome, stage_dir(config), langs)
    return outcome


def _kill_group(process: subprocess.Popen, monitor: TreeRssMonitor) -> None:
    """End the run and its workers: the process group is this run's alone (start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    monitor.stop()


def stage_dir(config: Path) -> Path:
    run = yaml.safe_load(config.read_text(encoding="utf-8"))["run"]
    return Path(run["output_dir"]) / run["name"] / "stages" / "prepare"


def record_key(record: dict) -> str | None:
    """What identifies an input document in the outputs: its id, plus its part for the bundled English books,
    whose parts share the book's id. datatrove may keep the other fields under "metadata"."""
    fields_ = {**record.get("metadata", {}), **record} if isinstance(record.get("metadata"), dict) else record
    if fields_.get("id") is None:
        return None
    part = fields_.get("part")
    return str(fields_["id"]) + (f"#part{part}" if part is not None else "")


def read_ids(path: Path) -> Iterator[str]:
    """The `record_key` of every record of a JSONL file."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            key = record_key(json.loads(line))  # ~3 s per GB
            if key is None:
                raise ValueError(f"{path}:{number}: a record without an id")
            yield key


def read_outputs(outcome: RunOutcome, directory: Path, langs: tuple[str, ...]) -> None:
    """Kept ids from the output shards (both the old `train-NNNNN` and the new `train-FFFFF-KKKKK` names),
    and stats.json."""
    stats_path = directory / "stats.json"
    if stats_path.exists():
        outcome.stats = json.loads(stats_path.read_text(encoding="utf-8"))
    try:
        for lang in langs:
            for split in SPLITS:
                for shard in sorted((directory / lang).glob(f"{split}-*.jsonl")):
                    for doc_id in read_ids(shard):
                        outcome.kept[f"{lang}/{doc_id}" if len(langs) > 1 else doc_id] = split
    except ValueError as exc:  # unreadable output: report this variant as failed, go on with the others
        outcome.ok, outcome.error = False, f"reading the outputs: {exc}"
        return
    if not outcome.kept:
        outcome.ok = False
        outcome.error = f"no output shards under {directory}"


def language_stats(stats: dict, lang: str) -> dict:
    """One language's statistics, from stats.json's "languages" (OLD) or top level."""
    return stats.get("languages", stats).get(lang) or {}


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _tail(text: str, lines: int) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    # " / ", not " | ": the text goes into markdown table cells.
    return " / ".join(kept).replace("|", "/")[-400:] or "(no output)"


def warm_page_cache(paths: list[Path]) -> None:
    """Read the inputs once so every variant finds them in the page cache (the first would pay the disk)."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


# ============================================================================================ quality


@dataclass
class Quality:
    recall_by_level: dict[str, float | None]  # near pairs, bucketed by their exact Jaccard
    pairs_by_level: dict[str, int]
    recall_high: float | None  # near pairs at J >= RECALL_FROM
    pairs_high: int
    recall_exact: float | None  # exact copies, held-out copies included
    recall_decontamination: float | None  # training copies of held-out documents (exact and near)
    precision: float | None
    dedup_removed: int  # exact_duplicate + near_duplicate in stats.json
    true_removals: int  # removed documents that are planted copies (exact, or exact J >= threshold)
    filter_removed: int  # removed by the non-dedup rules (the generator plants none)
    first_removed: int  # pairs whose earlier document was removed (first-wins broken)
    wrong_removals: list[str]  # removed documents that are not planted copies (first few)


def score(corpus: Corpus, input_ids: set[str], outcome: RunOutcome) -> Quality:
    removed = input_ids - outcome.kept.keys()
    threshold = outcome.prepare_settings.get("dedup", {}).get("threshold", 0.8)
    planted = corpus.planted
    near = [pair for pair in planted if pair.kind in NEAR_KINDS]
    buckets: dict[str, list[Planted]] = defaultdict(list)
    for pair in near:
        level = min(NEAR_LEVELS, key=lambda lvl: abs(lvl - pair.jaccard))
        buckets[f"{level:g}"].append(pair)
    high = [pair for pair in near if pair.jaccard >= RECALL_FROM]
    positives = {pair.second for pair in planted if pair.kind in EXACT_KINDS or pair.jaccard >= threshold}
    counts = language_stats(outcome.stats, "ja").get("removed", {})
    dedup_removed = counts.get("exact_duplicate", 0) + counts.get("near_duplicate", 0) if counts else len(removed)
    true_removals = len(removed & positives)
    return Quality(
        recall_by_level={f"{level:g}": _recall(buckets.get(f"{level:g}", []), removed) for level in NEAR_LEVELS},
        pairs_by_level={f"{level:g}": len(buckets.get(f"{level:g}", [])) for level in NEAR_LEVELS},
        recall_high=_recall(high, removed),
        pairs_high=len(high),
        recall_exact=_recall([pair for pair in planted if pair.kind in EXACT_KINDS], removed),
        recall_decontamination=_recall([pair for pair in planted if pair.kind.startswith("heldout")], removed),
        # min(): a planted copy removed by a length or script filter would otherwise count as a dedup hit (the
        # generator plants none that a filter removes, and filter_removed shows it).
        precision=min(true_removals, dedup_removed) / dedup_removed if dedup_removed else None,
        dedup_removed=dedup_removed,
        true_removals=true_removals,
        filter_removed=sum(counts.values()) - dedup_removed if counts else 0,
        first_removed=sum(pair.first in removed for pair in planted),
        wrong_removals=sorted(removed - positives)[:20],
    )


def _recall(pairs: list[Planted], removed: set[str]) -> float | None:
    """Share of pairs whose later document was removed."""
    return sum(pair.second in removed for pair in pairs) / len(pairs) if pairs else None


# ============================================================================================ bundled agreement


@dataclass
class Difference:
    key: str  # lang/id (see record_key)
    origin: str  # bundled:corpus/FILE:LINE
    removed_by: str  # OLD or NEW-n
    rule: str


@dataclass
class Agreement:
    variant: str
    documents: int
    agreeing: float | None
    differing: int
    split_differences: int  # kept by both, in different splits
    listed: list[Difference]


BUNDLED_FILES = {  # language -> (held-out, train): the order prepare reads them in
    "ja": ("ja_heldout.jsonl", "ja_train.jsonl"),
    "en": ("en_heldout.jsonl", "en_train.jsonl"),
}


@dataclass(frozen=True)
class BundledDoc:
    origin: str  # how prepare names it in stats.json: bundled:corpus/NAME:LINE
    text: str


def bundled_documents() -> dict[str, BundledDoc]:
    """'lang/key' (see record_key) -> document, in the order prepare reads them."""
    docs = {}
    for lang, names in BUNDLED_FILES.items():
        for name in names:
            with lzma.open(BUNDLED / f"{name}.xz", "rt", encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        record = json.loads(line)
                        docs[f"{lang}/{record_key(record)}"] = BundledDoc(f"bundled:corpus/{name}:{number}", record["text"])
    return docs


def compare_decisions(old: RunOutcome, new: RunOutcome, variant: str, docs: dict[str, BundledDoc]) -> Agreement:
    total = sum(language_stats(old.stats, lang).get("input", {}).get("records", 0) for lang in BUNDLED_FILES)
    total = total or len(docs)
    differing = sorted(old.kept.keys() ^ new.kept.keys())
    explainers = {side: RemovalExplainer(docs, outcome.prepare_settings) for side, outcome in (("old", old), ("new", new))}
    listed = []
    for key in differing[:LISTED_DIFFERENCES]:
        remover, side, outcome = (variant, "new", new) if key in old.kept else ("OLD", "old", old)
        origin = docs[key].origin if key in docs else "?"
        listed.append(Difference(key, origin, remover, explainers[side].rule(key, outcome.stats)))
    both = old.kept.keys() & new.kept.keys()
    return Agreement(
        variant=variant,
        documents=total,
        agreeing=1 - len(differing) / total if total else None,
        differing=len(differing),
        split_differences=sum(old.kept[key] != new.kept[key] for key in both),
        listed=listed,
    )


class RemovalExplainer:
    """Best guess of the rule that removed a bundled document: the run's stats.json when it lists it among its
    duplicate examples, else the filters re-applied here, else an exact repeat of an earlier document."""

    def __init__(self, docs: dict[str, BundledDoc], opts: dict) -> None:
        self.docs = docs
        self.opts = opts
        self.exact_of: dict[str, str] = {}  # doc key -> origin of the first document with the same text
        first: dict[str, str] = {}
        for key, doc in docs.items():
            lang = key.split("/", 1)[0]
            digest = lang + hashlib.blake2b(self._normal(doc.text).encode(), digest_size=16).hexdigest()
            if digest in first:
                self.exact_of[key] = first[digest]
            else:
                first[digest] = doc.origin

    def _normal(self, text: str) -> str:
        """As prepare normalizes (data/text.py): line ends to LF, Unicode form, ends stripped."""
        form = self.opts.get("normalization", "NFKC")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return (text if form == "none" else unicodedata.normalize(form, text)).strip()

    def rule(self, key: str, stats: dict) -> str:
        lang = key.split("/", 1)[0]
        doc = self.docs.get(key)
        if doc is None:
            return "unknown (not a bundled document)"
        for rule, examples in language_stats(stats, lang).get("duplicate_examples", {}).items():
            for example in examples:
                if example.get("document") == doc.origin:
                    return f"{rule} of {example.get('duplicate_of')} (stats.json)"
        text = self._normal(doc.text)
        if not text:
            return "empty (inferred)"
        if len(text) < self.opts.get("min_chars", 50):
            return "too_short (inferred)"
        if lang == "ja" and _japanese_ratio(text) < self.opts.get("min_japanese_ratio", 0.5):
            return "low_japanese_ratio (inferred)"
        if key in self.exact_of:
            return f"exact_duplicate of {self.exact_of[key]} (inferred)"
        return "near_duplicate or another rule (not in the stats' examples)"


def _japanese_ratio(text: str) -> float:
    from data.text import japanese_ratio  # numpy, and a 1 MB table: only when a difference needs explaining

    return japanese_ratio(text)


# ============================================================================================ the benchmark


@dataclass
class ScaleRow:
    size_gb: float
    variant: str
    input_bytes: int
    input_docs: int
    outcome: RunOutcome
    quality: Quality | None

    @property
    def mb_s(self) -> float | None:
        return self.input_bytes / 1e6 / self.outcome.wall_s if self.outcome.ok else None

    @property
    def docs_s(self) -> float | None:
        return self.input_docs / self.outcome.wall_s if self.outcome.ok else None

    @property
    def rss_per_worker(self) -> float | None:
        """The RSS that grows with the work: a worker's, or the main process's when the work runs in it."""
        return self.outcome.rss_worker_mb if self.outcome.rss_worker_mb is not None else self.outcome.rss_main_mb

    def as_json(self) -> dict:
        # Not asdict(): it would deep-copy every kept id.
        outcome = {f.name: getattr(self.outcome, f.name) for f in fields(RunOutcome) if f.name not in ("kept", "stats")}
        outcome["removed"] = language_stats(self.outcome.stats, "ja").get("removed")
        outcome["decontamination"] = language_stats(self.outcome.stats, "ja").get("decontamination")
        return {
            "size_gb": self.size_gb,
            "variant": self.variant,
            "input_bytes": self.input_bytes,
            "input_docs": self.input_docs,
            "mb_s": self.mb_s,
            "docs_s": self.docs_s,
            **outcome,
            "quality": asdict(self.quality) if self.quality else None,
        }


@dataclass
class Bench:
    args: argparse.Namespace
    trees: dict[str, CodeTree]
    rows: list[ScaleRow] = field(default_factory=list)
    corpora: list[Corpus] = field(default_factory=list)
    agreements: list[Agreement] = field(default_factory=list)
    agreement_errors: dict[str, str] = field(default_factory=dict)

    @property
    def workdir(self) -> Path:
        return self.args.workdir

    def run_variant(self, variant: Variant, name: str, data: dict | None, langs: tuple[str, ...]) -> RunOutcome:
        runs_dir = self.workdir / "runs"
        shutil.rmtree(runs_dir / name, ignore_errors=True)  # a fresh run directory every time
        (self.workdir / "configs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "configs" / f"{name}.yaml"
        tree = self.trees[variant.side]
        settings = write_config(config, name, runs_dir, demo_config(tree), data)
        log(f"{name}: {variant.name} ({tree.commit}) {' '.join(variant.overrides)}")
        outcome = run_prepare(tree, self.args.python, config, variant.overrides, self.workdir / "logs" / f"{name}.log",
                              self.args.timeout_s, langs)
        outcome.prepare_settings = settings
        if outcome.ok:
            log(f"{name}: {outcome.wall_s:.1f} s, peak RSS main {outcome.rss_main_mb} MiB, "
                f"worker {outcome.rss_worker_mb} MiB, {len(outcome.kept)} documents kept")
        else:
            log(f"{name}: FAILED: {outcome.error}")
        if not self.args.keep_runs:
            shutil.rmtree(runs_dir / name, ignore_errors=True)
        return outcome

    def run_size(self, size_gb: float) -> None:
        corpus = ensure_corpus(self.workdir, size_gb, self.args.files, self.args.seed,
                               lambda: load_bundled_sampler(self.args.seed))
        self.corpora.append(corpus)
        input_ids = {doc_id for path in [*corpus.train_files, corpus.heldout_file] for doc_id in read_ids(path)}
        data = {"ja": {"train": [str(p) for p in corpus.train_files], "heldout": [str(corpus.heldout_file)]}}
        for variant in VARIANTS:
            warm_page_cache([*corpus.train_files, corpus.heldout_file])
            outcome = self.run_variant(variant, f"s{size_gb:g}-{variant.name.lower()}", data, ("ja",))
            quality = score(corpus, input_ids, outcome) if outcome.ok else None
            self.rows.append(ScaleRow(size_gb, variant.name, corpus.input_bytes, corpus.input_docs, outcome, quality))

    def run_agreement(self) -> None:
        outcomes = {v.name: self.run_variant(v, f"bundled-{v.name.lower()}", None, ("ja", "en")) for v in VARIANTS}
        old = outcomes["OLD"]
        if not old.ok:
            self.agreement_errors["OLD"] = old.error or "failed"
            return
        docs = bundled_documents()
        unknown = [doc_id for doc_id in old.kept if doc_id not in docs]
        if unknown:  # the ids do not match the bundled records': the listed rules would be guesses
            self.agreement_errors["OLD"] = f"{len(unknown)} kept ids are not bundled records' ids, e.g. {unknown[0]}"
        for variant in VARIANTS[1:]:
            new = outcomes[variant.name]
            if new.ok:
                self.agreements.append(compare_decisions(old, new, variant.name, docs))
            else:
                self.agreement_errors[variant.name] = new.error or "failed"


def log(message: str) -> None:
    print(f"[prepare_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ============================================================================================ report


def machine() -> dict:
    mem_kb = 0
    with contextlib.suppress(OSError, StopIteration):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line for line in cpuinfo if line.startswith("model name")).split(":", 1)[1].strip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value >= target if higher_is_better else value <= target) else "FAIL"


def size_table(rows: list[ScaleRow]) -> list[str]:
    lines = [
        (
            "| variant | wall s | MB/s | docs/s | peak RSS main (MiB) | peak RSS per worker (MiB) | "
            f"recall J>={RECALL_FROM} | precision |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        outcome, quality = row.outcome, row.quality
        if not outcome.ok:
            lines.append(f"| {row.variant} | failed: {outcome.error} | | | | | | |")
            continue
        worker = _fmt(outcome.rss_worker_mb) if outcome.rss_worker_mb is not None else "— (in main)"
        lines.append(
            f"| {row.variant} | {_fmt(outcome.wall_s, 2)} | {_fmt(row.mb_s, 2)} | {_fmt(row.docs_s, 0)} | "
            f"{_fmt(outcome.rss_main_mb)} | {worker} | {_fmt(quality.recall_high, 3)} ({quality.pairs_high}) | "
            f"{_fmt(quality.precision, 4)} |"
        )
    return lines


def quality_table(rows: list[ScaleRow]) -> list[str]:
    levels = [f"{level:g}" for level in NEAR_LEVELS]
    lines = [
        "| variant | " + " | ".join(f"J≈{level}" for level in levels)
        + " | exact copies | held-out copies | removed as dup (stats) | of them planted | earlier doc removed |",
        "|---|" + "---:|" * (len(levels) + 5),
    ]
    for row in rows:
        q = row.quality
        if q is None:
            continue
        recalls = " | ".join(f"{_fmt(q.recall_by_level[level], 2)} ({q.pairs_by_level[level]})" for level in levels)
        lines.append(
            f"| {row.variant} | {recalls} | {_fmt(q.recall_exact, 3)} | {_fmt(q.recall_decontamination, 3)} | "
            f"{q.dedup_removed} | {q.true_removals} | {q.first_removed} |"
        )
    return lines


def ratios(bench: Bench) -> tuple[list[str], list[tuple[str, float | None, str]]]:
    """Markdown lines for the ratios, and (target, value, verdict) for the summary."""
    by = {(row.size_gb, row.variant): row for row in bench.rows}
    sizes = sorted({row.size_gb for row in bench.rows})
    header = (
        "| size GB | NEW-2 / NEW-1 MB/s | NEW-1 / OLD MB/s | NEW-2 / OLD MB/s | NEW-1 worker RSS / OLD RSS | "
        "NEW-2 worker RSS / OLD RSS |"
    )
    lines = [header, "|---:|---:|---:|---:|---:|---:|"]
    targets: list[tuple[str, float | None, str]] = []
    for size in sizes:
        old, new1, new2 = (by.get((size, name)) for name in ("OLD", "NEW-1", "NEW-2"))
        mbs = {name: row.mb_s if row else None for name, row in (("OLD", old), ("NEW-1", new1), ("NEW-2", new2))}
        rss = {name: row.rss_per_worker if row and row.outcome.ok else None
               for name, row in (("OLD", old), ("NEW-1", new1), ("NEW-2", new2))}
        speedup = _ratio(mbs["NEW-2"], mbs["NEW-1"])
        lines.append(
            f"| {size:g} | {_fmt(speedup, 2)} | {_fmt(_ratio(mbs['NEW-1'], mbs['OLD']), 2)} | "
            f"{_fmt(_ratio(mbs['NEW-2'], mbs['OLD']), 2)} | {_fmt(_ratio(rss['NEW-1'], rss['OLD']), 2)} | "
            f"{_fmt(_ratio(rss['NEW-2'], rss['OLD']), 2)} |"
        )
        targets.append((f"{size:g} GB: NEW-2 / NEW-1 throughput >= {TARGET_SPEEDUP}", speedup,
                        _verdict(speedup, TARGET_SPEEDUP)))
    lines += ["", "Peak RSS per worker across sizes (largest / smallest; OLD: its main process, where the work runs):",
              "", "| variant | " + " | ".join(f"{size:g} GB" for size in sizes) + " | max / min |",
              "|---|" + "---:|" * (len(sizes) + 1)]
    for variant in (v.name for v in VARIANTS):
        values = [by[(size, variant)].rss_per_worker if (size, variant) in by else None for size in sizes]
        known = [value for value in values if value is not None]
        spread = max(known) / min(known) if len(known) >= 2 and len(known) == len(sizes) else None
        lines.append(f"| {variant} | " + " | ".join(_fmt(value) for value in values) + f" | {_fmt(spread, 3)} |")
        if variant != "OLD":
            targets.append((f"{variant}: peak RSS per worker max/min across sizes <= {TARGET_RSS_SPREAD}", spread,
                            _verdict(spread, TARGET_RSS_SPREAD, higher_is_better=False)))
    for row in bench.rows:
        if row.variant == "OLD":
            continue
        q = row.quality
        recall, precision = (q.recall_high, q.precision) if q else (None, None)
        targets.append((f"{row.size_gb:g} GB {row.variant}: recall J>={RECALL_FROM} >= {TARGET_RECALL}", recall,
                        _verdict(recall, TARGET_RECALL)))
        targets.append((f"{row.size_gb:g} GB {row.variant}: precision >= {TARGET_PRECISION}", precision,
                        _verdict(precision, TARGET_PRECISION)))
    for agreement in bench.agreements:
        targets.append((f"bundled agreement OLD vs {agreement.variant} >= {TARGET_AGREEMENT:.0%}", agreement.agreeing,
                        _verdict(agreement.agreeing, TARGET_AGREEMENT)))
    for variant, error in bench.agreement_errors.items():
        targets.append((f"bundled agreement ({variant}: {error})", None, "n/a"))
    return lines, targets


def agreement_section(bench: Bench) -> list[str]:
    about = (
        "Demo config's data.ja and data.en, its prepare settings; a document's decision is kept or removed, "
        "matched by the record's id (plus its part for the English books, whose parts share the book's id)."
    )
    lines = ["## Agreement on the bundled corpora", "", about, ""]
    if bench.agreement_errors:
        lines += [f"- {variant}: {error}" for variant, error in bench.agreement_errors.items()] + [""]
    for agreement in bench.agreements:
        lines.append(
            f"- OLD vs {agreement.variant}: {_fmt(100 * agreement.agreeing if agreement.agreeing is not None else None, 2)}% "
            f"of {agreement.documents} documents agree; {agreement.differing} differ; "
            f"{agreement.split_differences} kept by both in different splits"
        )
        if agreement.listed:
            lines += ["", "  | document | line | removed by | rule |", "  |---|---|---|---|"]
            lines += [f"  | {d.key} | {d.origin} | {d.removed_by} | {d.rule} |" for d in agreement.listed]
            if agreement.differing > len(agreement.listed):
                lines.append(f"  ({agreement.differing - len(agreement.listed)} more, see the JSON)")
    return lines + [""]


METHOD = (
    "Each variant is `python -m pipeline.cli prepare CONFIG` in a fresh run directory, with the prepare section "
    "of its own code's demo.yaml (in the JSON; today NFKC, min_chars 50, Japanese ratio 0.5, exact + near dedup "
    "at 0.8), the `prepare.workers` override for NEW. Wall time is the whole command "
    "(interpreter start, input hashing, the stage); MB = 10^6 bytes of input JSONL (train + held-out); peak RSS "
    f"is sampled every {POLL_S} s per process of the command's tree. Recall: share of planted near-duplicate "
    f"pairs with exact character-5-gram Jaccard >= {RECALL_FROM} whose later document was removed (pair count "
    "in brackets). Precision: removed documents that are planted copies (exact, or Jaccard >= the threshold) "
    "over the exact_duplicate + near_duplicate removals in stats.json."
)


def render(bench: Bench, info: dict) -> str:
    trees = bench.trees
    lines = [
        "# prepare at scale: datatrove (NEW) vs datasketch (OLD)",
        "",
        (
            f"Machine: {info['nproc']}-core CPU ({info['cpu']}), {info['ram_gib']} GiB RAM, "
            f"Python {info['python']}; {info['date']}. OLD: `{trees['old'].commit}`; NEW: `{trees['new'].commit}`."
        ),
        "",
        f"Command: `python bench/prepare_scale.py {' '.join(info['argv'])}`",
        "",
        METHOD,
        "",
    ]
    for corpus in bench.corpora:
        rows = [row for row in bench.rows if row.size_gb == corpus.size_gb]
        kinds = defaultdict(int)
        for pair in corpus.planted:
            kinds[pair.kind] += 1
        lines += [
            f"## {corpus.size_gb:g} GB corpus",
            "",
            f"{corpus.input_bytes / 1e6:,.1f} MB ({corpus.train_docs:,} training documents in "
            f"{len(corpus.train_files)} files + {corpus.heldout_docs:,} held-out); planted: "
            + ", ".join(f"{kind} {count}" for kind, count in kinds.items())
            + (f"; generated in {corpus.generated_s:.0f} s." if corpus.generated_s is not None else " (cached)."),
            "",
            *size_table(rows),
            "",
            "Recall per planted level (pairs bucketed by their exact Jaccard; pair count in brackets):",
            "",
            *quality_table(rows),
            "",
        ]
    ratio_lines, targets = ratios(bench)
    lines += ["## Ratios", "", *ratio_lines, "", *agreement_section(bench), "## Targets (issue #15)", "",
              "| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {name} | {_fmt(value, 3)} | {verdict} |" for name, value, verdict in targets]
    return "\n".join(lines) + "\n"


def raw_results(bench: Bench, info: dict) -> dict:
    return {
        "machine": info,
        "code": {side: asdict(tree) | {"root": str(tree.root)} for side, tree in bench.trees.items()},
        "corpora": [
            {key: value for key, value in asdict(corpus).items() if key != "planted"}
            | {"directory": str(corpus.directory), "train_files": [str(p) for p in corpus.train_files],
               "heldout_file": str(corpus.heldout_file), "planted_pairs": len(corpus.planted)}
            for corpus in bench.corpora
        ],
        "runs": [row.as_json() for row in bench.rows],
        "agreement": [asdict(agreement) for agreement in bench.agreements],
        "agreement_errors": bench.agreement_errors,
    }


def parse_sizes(text: str) -> list[float]:
    sizes = [float(item) for item in text.split(",") if item.strip()]
    if not sizes or any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError("give positive sizes in GB, e.g. 0.25,0.5,1")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=[0.25, 0.5, 1.0], help="corpus sizes in GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jpadapt-bench-prepare"),
                        help="corpora (cached), code trees, configs, logs and run directories")
    parser.add_argument("--files", type=int, default=8, help="training JSONL files per corpus")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--old-ref", default=OLD_REF, help="commit of the OLD implementation")
    parser.add_argument("--new-ref", default=None,
                        help="run NEW from this commit instead of the working tree (e.g. the OLD ref, to test the harness)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the jpadapt environment")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600, help="per prepare run")
    parser.add_argument("--skip-agreement", action="store_true", help="skip the bundled-corpora comparison")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories (outputs) under --workdir")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/prepare_scale-cpu.md")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    trees = {
        "old": archived_tree(args.old_ref, args.workdir, "OLD"),
        "new": archived_tree(args.new_ref, args.workdir, "NEW") if args.new_ref else working_tree(),
    }
    for tree in trees.values():
        probe(tree, args.python)
        log(f"{tree.label}: {tree.commit} at {tree.root}" + (f": {tree.problem}" if tree.problem else ""))
    bench = Bench(args, trees)
    for size in args.sizes:
        bench.run_size(size)
    if not args.skip_agreement:
        bench.run_agreement()

    info = machine() | {"argv": sys.argv[1:]}
    report = render(bench, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    args.out.with_suffix(".json").write_text(
        json.dumps(raw_results(bench, info), indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(report)
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
