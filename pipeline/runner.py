"""Make-style execution: order stages, decide what is up to date, run the rest, commit atomically."""

from __future__ import annotations

import logging
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline import __version__
from pipeline.config import PipelineConfig, resolved_yaml
from pipeline.errors import JpadaptError
from pipeline.fingerprint import ConfigView, explain_change, fingerprint, stage_state
from pipeline.hashing import HashCache
from pipeline.launch import Node
from pipeline.paths import display_path
from pipeline.rundir import RunDir, link_stage, now_iso
from pipeline.stage import BOOKKEEPING, JOB, LOG, StageContext, StageSpec

UP_TO_DATE = "up to date"
STALE = "stale"
NEVER_RUN = "never run"
INCOMPLETE = "incomplete"
RUNNING = "running"
DISABLED = "disabled"
ABSENT = "not in config"
ERROR = "error"


# Reaches the stage's log.txt (through the root logger) but not the console, where the CLI prints the error.
_LOG_ONLY = logging.getLogger("jpadapt.runner")


class StageCrashed(Exception):
    """A stage raised something other than JpadaptError: a bug, reported with a pointer to its log."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while a stage ran: its attempt is recorded as interrupted (the CLI names the stage; an
    interrupt between stages or while the report is written leaves nothing incomplete)."""

    def __init__(self, stage: str, node: int = 0):
        super().__init__(stage)
        self.stage = stage
        self.node = node  # K > 0: a joining node of a per-node launch, which records nothing itself


@dataclass
class StageStatus:
    name: str
    state: str
    reasons: list[str] = field(default_factory=list)
    current: dict[str, Any] | None = None


def available_stages() -> list[StageSpec]:
    from stages import stage_specs

    return stage_specs()


class Pipeline:
    """One pipeline YAML bound to its run directory."""

    def __init__(self, cfg: PipelineConfig, specs: list[StageSpec] | None = None, out: TextIO | None = None,
                 verify: bool = False, node: Node | None = None, donors: list[RunDir] | None = None):
        """`verify`: re-hash every file instead of trusting the hash cache. `node`: node 0 of a per-node launch
        (the stages it runs launch this node's ranks); node K > 0 runs `join`, not `execute`. `donors`: other run
        directories (a sweep's siblings), tried in order, whose committed stages `execute` reuses instead of
        running a stage with exactly the same fingerprint (`_donor`)."""
        self.cfg = cfg
        self.node = node
        self.specs = {spec.name: spec for spec in _ordered(specs if specs is not None else available_stages())}
        self.rundir = RunDir(Path(cfg.run.output_dir) / cfg.run.name)
        self.donors = [d for d in donors or [] if d.root.resolve() != self.rundir.root.resolve()]
        self.cache = HashCache(self.rundir.root / ".cache" / "hashes.json", verify=verify)
        self.out = out if out is not None else sys.stdout  # looked up now: callers may redirect stdout
        self._check_requirements()

    # ------------------------------------------------------------------ graph

    def stage_names(self) -> list[str]:
        return list(self.specs)

    def spec(self, name: str) -> StageSpec:
        if name not in self.specs:
            raise JpadaptError(f"unknown stage {name!r} (stages: {', '.join(self.specs)})")
        return self.specs[name]

    def reads(self, name: str) -> list[str]:
        """Prerequisites whose outputs the stage reads in this config."""
        spec = self.specs[name]
        return [*spec.requires, *(u for u in spec.uses if u in self.specs and self.cfg.enabled(u))]

    def closure(self, name: str) -> list[str]:
        """The stage and everything it reads, transitively, in pipeline order."""
        wanted = {name}
        for stage in reversed(self.stage_names()):
            if stage in wanted:
                wanted.update(self.reads(stage))
        return [stage for stage in self.stage_names() if stage in wanted]

    def _check_requirements(self) -> None:
        for name, spec in self.specs.items():
            if not self.cfg.enabled(name):
                continue
            for required in spec.requires:
                if not self.cfg.enabled(required):
                    why = "not in the config" if self.cfg.section(required) is None else "disabled"
                    raise JpadaptError(f"stage {name} needs stage {required}, which is {why}")

    # ------------------------------------------------------------------ status

    def status(self, name: str, prerequisite_states: dict[str, StageStatus] | None = None) -> StageStatus:
        spec = self.specs[name]
        if self.cfg.section(name) is None:
            return StageStatus(name, ABSENT)
        if not self.cfg.enabled(name):
            return StageStatus(name, DISABLED)
        attempt = self.rundir.attempt(name)
        if self.rundir.attempt_running(attempt):
            return StageStatus(name, RUNNING, [f"pid {attempt.pid} since {attempt.started}"])
        manifest = self.rundir.manifest(name)
        damage = self.rundir.manifest_damage(name) if manifest is None else None
        upstream = {}
        for required in self.reads(name):
            upstream_manifest = self.rundir.manifest(required)
            if upstream_manifest is None:
                state = INCOMPLETE if attempt is not None else NEVER_RUN
                return StageStatus(name, state, [f"waits on {required}, which has no finished outputs"])
            upstream[required] = upstream_manifest
        try:
            current = stage_state(spec, self.cfg, upstream, self.cache)
        except JpadaptError as exc:
            return StageStatus(name, ERROR, [str(exc)])
        if attempt is not None:
            return StageStatus(name, INCOMPLETE, [attempt.describe()], current)
        if damage is not None:
            return StageStatus(name, INCOMPLETE, [damage], current)
        if manifest is None:
            return StageStatus(name, NEVER_RUN, [], current)
        reasons = []
        if manifest["fingerprint"] != fingerprint(current):
            reasons += explain_change(manifest["state"], current)
        reasons += changed_outputs(self.rundir.stage_dir(name), manifest, self.cache)
        for required in self.reads(name):
            before = (prerequisite_states or {}).get(required)
            if before is not None and before.state != UP_TO_DATE:
                reasons.append(f"prerequisite {required} is {before.state}")
        return StageStatus(name, STALE if reasons else UP_TO_DATE, reasons, current)

    def statuses(self) -> list[StageStatus]:
        result: dict[str, StageStatus] = {}
        for name in self.stage_names():
            result[name] = self.status(name, result)
        if self.rundir.root.exists():  # `status` on a run that never started leaves no trace
            self.cache.save()
        return list(result.values())

    # ------------------------------------------------------------------ execution

    def plan(self, targets: list[str], only: bool = False) -> list[str]:
        """The stages `execute` goes through, in order: `targets` and, unless `only`, what they read. Checks first
        that every target is enabled and that every planned stage's external files exist."""
        for name in targets:
            if not self.cfg.enabled(name):
                why = "not in the config" if self.cfg.section(name) is None else "disabled (enabled: false)"
                raise JpadaptError(f"stage {name} is {why}")
        plan = targets if only else _merge_ordered([self.closure(t) for t in targets], self.stage_names())
        self._check_inputs(plan)
        return plan

    def execute(self, targets: list[str], force: set[str], only: bool = False) -> bool:
        """Run `targets` (and, unless `only`, their out-of-date prerequisites). True if anything ran or was reused
        from a donor. A forced stage runs even if up to date, and is never reused."""
        plan = self.plan(targets, only)
        self.rundir.lock()
        try:
            self._write_config()
            ran = False
            states: dict[str, StageStatus] = {}
            for name in plan:
                status = self.status(name, states)
                if status.state == ERROR:
                    raise JpadaptError(status.reasons[0])
                if status.state == RUNNING:
                    raise JpadaptError(f"stage {name} is running in another process ({status.reasons[0]})")
                if only and any(self.rundir.manifest(r) is None for r in self.reads(name)):
                    raise JpadaptError(f"{name}: {status.reasons[0]}; run `jpadapt {name}` without --only first")
                if status.state == UP_TO_DATE and name not in force:
                    self._say(f"{name}: up to date")
                else:
                    donor = None if name in force else self._donor(name, status)
                    if donor is not None:
                        self._reuse(name, *donor)
                    else:
                        self._run_one(name, status, forced=name in force)
                    ran = True
                    status = StageStatus(name, UP_TO_DATE)
                states[name] = status
            return ran
        finally:
            self.cache.save()
            self.rundir.unlock()

    def join(self, name: str, node: Node, force: bool = False) -> None:
        """Node K > 0 of a per-node launch of training stage `name`: run this node's ranks of the job node 0
        launches. Node 0 alone takes the run directory's lock, prepares the stage (tokenizing, job.json) and
        commits it; this process takes no lock and writes nothing itself, so any number of nodes can share
        the run directory. The stages before `name` must be done already: node 0 would run them first,
        while these ranks wait for a job that is not there yet."""
        from pipeline.training import join_workers, pick_accelerator

        states: dict[str, StageStatus] = {}
        for stage in self.closure(name)[:-1]:
            status = self.status(stage, states)
            states[stage] = status
            if status.state != UP_TO_DATE:
                raise JpadaptError(f"node {node.rank}: stage {stage} is {status.state}; run it (e.g. `jpadapt "
                                   f"{name} CONFIG` on one node) before starting {name} on every node")
        if self.status(name, states).state == UP_TO_DATE and not force:
            self._say(f"{name}: up to date")  # node 0 finds it so too and launches nothing
            return
        settings: Any = self.cfg.section(name)
        accelerator = pick_accelerator(name, settings.accelerator, settings.num_gpus, settings.precision)
        log = logging.getLogger(f"jpadapt.{name}")
        job = self.rundir.partial_dir(name) / JOB
        try:
            returncode = join_workers(str(self.specs[name].worker), job, settings, accelerator, node, log)
        except KeyboardInterrupt:
            raise StageInterrupted(name, node.rank) from None
        if returncode != 0:
            raise StageCrashed(f"{name}: node {node.rank}'s workers exited with code {returncode} (their output is "
                               f"above; a worker's traceback is in {display_path(job.parent / LOG)})")
        self._say(f"{name}: node {node.rank} done (node 0 commits the stage)")

    def _check_inputs(self, plan: list[str]) -> None:
        """Resolve every planned stage's external files first: a missing file stops the command before any
        stage runs, not after an hour of the stages before it."""
        for name in plan:
            spec = self.specs[name]
            if spec.inputs is not None:
                spec.inputs(self.cfg)

    def _donor(self, name: str, status: StageStatus) -> tuple[RunDir, dict[str, Any]] | None:
        """The first donor whose committed `name` has exactly the fingerprint this run would give it, outputs
        intact (sizes and sha256 as its manifest records them) and no other command running in it."""
        if status.current is None:
            return None
        wanted = fingerprint(status.current)
        for donor in self.donors:
            manifest = donor.manifest(name)
            if manifest is None or manifest["fingerprint"] != wanted or donor.locked_elsewhere():
                continue
            # The donor's own hash cache knows its files, so gigabytes of shards are not read again. It is only
            # read: this command writes in its own run directory alone.
            cache = HashCache(donor.root / ".cache" / "hashes.json", verify=self.cache.verify)
            if not changed_outputs(donor.stage_dir(name), manifest, cache):
                return donor, manifest
        return None

    def _reuse(self, name: str, donor: RunDir, manifest: dict[str, Any]) -> None:
        """Commit the donor's stage here as if it had run here: its files linked into `<stage>.partial/`, its
        manifest (fingerprint, times, environment) as is, then the usual rename."""
        work, _ = self.rundir.begin(name, manifest["fingerprint"], keep_partial=False)
        try:
            link_stage(donor.stage_dir(name), work, manifest)
        except OSError as exc:
            self.rundir.fail(name, "failed", f"reusing {donor.root}: {exc}")
            raise JpadaptError(f"{name}: cannot reuse the outputs of {donor.root} ({exc})") from None
        except KeyboardInterrupt:
            self.rundir.fail(name, "interrupted", None)
            raise StageInterrupted(name) from None
        final = self.rundir.commit(name, manifest)
        # The hashes were just checked on these very files (hard links) or their sources (copies). A new link
        # changes the file's ctime, which the hash cache keys on, so the donor (and any other run directory sharing
        # the file) re-hashes it once.
        for rel, entry in manifest["outputs"].items():
            self.cache.remember(final / rel, entry["sha256"])
        self._say(f"{name}: reused from {donor.root} (same fingerprint)")

    def _run_one(self, name: str, status: StageStatus, forced: bool) -> None:
        spec = self.specs[name]
        current = status.current
        if current is None:
            raise JpadaptError(f"{name}: {'; '.join(status.reasons) or 'cannot compute its inputs'}")
        why = "forced" if forced else (status.state if not status.reasons else f"{status.state}: {'; '.join(status.reasons)}")
        self._say(f"{name}: running ({why})")
        fp = fingerprint(current)
        work, resuming = self.rundir.begin(name, fp, spec.resumable)
        logger, handlers = _stage_logger(name, work / LOG)
        from data.seed import set_seed

        ctx = StageContext(
            name=name,
            out_dir=work,
            run_dir=self.rundir.root,
            seed=set_seed(self.cfg.run.seed),
            log=logger,
            resuming=resuming,
            forced=forced,
            prerequisites={r: self.rundir.stage_dir(r) for r in self.reads(name)},
            node=self.node,
        )
        started, clock = now_iso(), time.monotonic()
        try:
            summary = spec.run(ConfigView.of(self.cfg, spec), ctx) or {}
            missing = [rel for rel in spec.outputs if not (work / rel).exists()]
            if missing:
                raise RuntimeError(f"stage finished without writing {', '.join(missing)}")
        except JpadaptError as exc:
            _LOG_ONLY.error("%s", exc)
            self.rundir.fail(name, "failed", str(exc))
            raise JpadaptError(f"{name}: {exc}") from None
        except KeyboardInterrupt:
            self.rundir.fail(name, "interrupted", None)
            raise StageInterrupted(name) from None
        except SystemExit:
            self.rundir.fail(name, "interrupted", None)
            raise
        except Exception as exc:
            _LOG_ONLY.error("stage crashed:\n%s", traceback.format_exc())
            self.rundir.fail(name, "crashed", f"{type(exc).__name__}: {exc}")
            raise StageCrashed(
                f"{name} crashed: {type(exc).__name__}: {exc} (traceback in {work / LOG})"
            ) from exc
        finally:
            _close_handlers(logger, handlers)
        duration = time.monotonic() - clock
        manifest = self._manifest(spec, current, fp, started, duration, summary, work)
        self.rundir.commit(name, manifest)
        self._say(f"{name}: done in {duration:.1f} s{_summary_line(summary)}")

    def _manifest(
        self, spec: StageSpec, current: dict, fp: str, started: str, duration: float, summary: dict, work: Path
    ) -> dict[str, Any]:
        inputs = {}
        if spec.inputs is not None:
            for key, files in spec.inputs(self.cfg).items():
                inputs[key] = [{"path": display_path(p), **self.cache.describe(p)} for p in files]
        outputs = {
            path.relative_to(work).as_posix(): self.cache.describe(path)
            for path in sorted(work.rglob("*"))
            if path.is_file() and path.relative_to(work).as_posix() not in BOOKKEEPING
        }
        return {
            "stage": spec.name,
            "status": "done",
            "fingerprint": fp,
            "started": started,
            "finished": now_iso(),
            "duration_s": round(duration, 3),
            "seed": self.cfg.run.seed,
            "config": current["params"],
            "inputs": inputs,
            "upstream": current["upstream"],
            "outputs": outputs,
            "summary": summary,
            "environment": _environment(current["libraries"]),
            "state": current,
        }

    def _write_config(self) -> None:
        path = self.rundir.root / "config.yaml"
        tmp = path.with_name(".config.yaml.tmp")
        tmp.write_text(resolved_yaml(self.cfg), encoding="utf-8")
        tmp.replace(path)

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def changed_outputs(stage_dir: Path, manifest: dict[str, Any], cache: HashCache) -> list[str]:
    """Why the outputs in `stage_dir` are not those its manifest records; none when they are."""
    reasons = []
    for rel, entry in manifest["outputs"].items():
        path = stage_dir / rel
        if not path.is_file():
            reasons.append(f"output {rel} is missing")
        elif path.stat().st_size != entry["size"] or cache.sha256(path) != entry["sha256"]:
            reasons.append(f"output {rel} was modified")
    return reasons


def _ordered(specs: list[StageSpec]) -> list[StageSpec]:
    """Keep the registry order, but check it is a valid topological order of `requires`/`uses`."""
    seen: set[str] = set()
    names = {spec.name for spec in specs}
    for spec in specs:
        for dep in (*spec.requires, *spec.uses):
            if dep in names and dep not in seen:
                raise ValueError(f"stage {spec.name} is listed before its prerequisite {dep}")
        seen.add(spec.name)
    return specs


def _merge_ordered(groups: list[list[str]], order: list[str]) -> list[str]:
    wanted = {name for group in groups for name in group}
    return [name for name in order if name in wanted]


def _stage_logger(name: str, path: Path) -> tuple[logging.Logger, list[logging.Handler]]:
    """Stage messages go to stdout and to the stage's log.txt; library warnings to the log too.
    stderr stays for the one `error:` line a failure prints."""
    logger = logging.getLogger(f"jpadapt.{name}")
    logger.setLevel(logging.INFO)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(f"  [{name}] %(message)s"))
    logger.addHandler(console)
    logging.getLogger().addHandler(file_handler)
    return logger, [console, file_handler]


def _close_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    console, file_handler = handlers
    logger.removeHandler(console)
    logging.getLogger().removeHandler(file_handler)
    file_handler.close()


def _summary_line(summary: dict[str, Any]) -> str:
    scalars = [f"{key} {value}" for key, value in summary.items() if isinstance(value, (str, int, float))]
    return f" ({', '.join(scalars)})" if scalars else ""


def _environment(libraries: dict[str, str]) -> dict[str, Any]:
    """`libraries`: the versions fingerprinted, i.e. the distributions the stage's code imports."""
    commit, dirty = _git_commit()
    return {
        "jpadapt": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "libraries": libraries,
    }


def _git_commit() -> tuple[str | None, bool | None]:
    """The commit of the jpadapt source in use, when it runs from a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(changes.strip())
