"""`jpadapt`: run the pipeline's stages make-style, show their status, validate a YAML.

    jpadapt run [CONFIG] [key=value ...] [--force]     every enabled stage, skipping what is up to date
    jpadapt STAGE [CONFIG] [key=value ...] [--only] [--force]
    jpadapt status [CONFIG] [key=value ...] [--verify] up to date / stale (why) / never run / incomplete
    jpadapt validate [CONFIG] [key=value ...]          check a YAML without running anything
    jpadapt report [CONFIG] [key=value ...] [--out D] the run report: runs/<name>/report.md and report.html
    jpadapt sweep [CONFIG] KEY=V1,V2,... [key=value ...] [--stage STAGE] [--force]
                                                       one run directory per value, then a comparison page

After `run` or a stage command that ran something, the run report is rewritten.

Without CONFIG the bundled demo pipeline is used. Exit codes: 0 success, 1 a stage crashed (a bug: see its
log), 2 bad input or configuration, 130 interrupted, 141 output pipe closed (`| head`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import __version__
from pipeline.config import DEFAULT_CONFIG, PipelineConfig, load_config
from pipeline.errors import JpadaptError
from pipeline.launch import node_from
from pipeline.paths import display_path, resolve_files
from pipeline.runner import ABSENT, DISABLED, UP_TO_DATE, Pipeline, StageCrashed, StageInterrupted, available_stages


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise JpadaptError(f"{message} (see `{self.prog} --help`)")


def _split_positionals(items: list[str]) -> tuple[Path | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the one argument without '=' is the config file."""
    configs = [item for item in items if "=" not in item]
    if len(configs) > 1:
        raise JpadaptError(f"expected at most one config file, got {', '.join(configs)}")
    overrides = [item for item in items if "=" in item]
    return (Path(configs[0]) if configs else None), overrides


def _load(args: argparse.Namespace) -> tuple[PipelineConfig, Path]:
    path, overrides = _split_positionals(args.args)
    cfg = load_config(path, overrides)
    return cfg, path or DEFAULT_CONFIG


# ------------------------------------------------------------------------------------ commands


def cmd_report(args: argparse.Namespace) -> int:
    """Write the run report (report.md, report.html at the top of the run directory) from its committed stages."""
    cfg, _ = _load(args)
    root = Pipeline(cfg).rundir.root
    from pipeline.run_report import committed_stages, write_run_report

    if not committed_stages(root):
        raise JpadaptError(f"{root}: no committed stage to report on yet (run `jpadapt run` first)")
    try:
        paths = write_run_report(root, args.out)
    except OSError as exc:  # a read-only run directory (a colleague's results, a read-only mount)
        where = args.out or root
        hint = "" if args.out else "; give --out DIR to write it elsewhere"
        raise JpadaptError(f"{where}: cannot write the run report ({exc.strerror}){hint}") from None
    for path in paths:
        print(path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg, path = _load(args)
    pipeline = Pipeline(cfg)
    targets = [name for name in pipeline.stage_names() if cfg.enabled(name)]
    if not targets:
        raise JpadaptError(f"{path}: no enabled stage to run")
    ran = pipeline.execute(targets, force=set(targets) if args.force else set())
    _finish(pipeline, ran)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    cfg, _ = _load(args)
    node = None
    if hasattr(args, "node_rank"):  # a stage that runs on several nodes
        node = node_from(cfg.section(args.command), args.command, args.node_rank, args.master_addr, dict(os.environ))
    pipeline = Pipeline(cfg, node=node)
    if node is not None and node.rank > 0:
        pipeline.join(args.command, node, force=args.force)
        return 0
    ran = pipeline.execute([args.command], force={args.command} if args.force else set(), only=args.only)
    _finish(pipeline, ran)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run every value of one key in its own run directory (runs/<name>-<KEY>-<value>), sharing the stages the key
    does not touch, then write the comparison page (runs/<name>-sweep-<KEY>/)."""
    from pipeline.sweep import plan_sweep, run_sweep, write_page

    path, overrides = _split_positionals(args.args)
    sweep = plan_sweep(path, overrides, args.stage)
    if not run_sweep(sweep, args.force, _finish):
        print("Nothing to do: every value's stages are up to date; the comparison page is rewritten.")
    paths = write_page(sweep)
    print(f"Comparison: {paths[-1]}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg, path = _load(args)
    pipeline = Pipeline(cfg, verify=args.verify)
    print(f"config:  {display_path(path)}")
    print(f"run dir: {pipeline.rundir.root}")
    rows = pipeline.statuses()
    width = max(len(row.name) for row in rows)
    for row in rows:
        detail = _status_detail(pipeline, row.name, row.state)
        print(f"  {row.name:<{width}}  {row.state}{detail}")
        for reason in row.reasons:
            print(f"  {'':<{width}}    - {reason}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    cfg, path = _load(args)
    pipeline = Pipeline(cfg)
    enabled = [name for name in pipeline.stage_names() if cfg.enabled(name)]
    planned = [name.replace("_", "-") for name in _sections_without_stage(cfg, pipeline)]
    print(f"{display_path(path)}: valid (run {cfg.run.name}, stages: {', '.join(enabled) or 'none'})")
    if planned:
        print(f"  sections for stages this version does not run yet: {', '.join(planned)}")
    for problem in _input_problems(pipeline, enabled):
        print(f"  not found yet (the stage will stop here): {problem}")
    return 0


def _input_problems(pipeline: Pipeline, stages: list[str]) -> list[str]:
    problems = []
    for name in stages:
        spec = pipeline.spec(name)
        if spec.inputs is None:
            continue
        try:
            spec.inputs(pipeline.cfg)
        except JpadaptError as exc:
            problems.append(str(exc))
    return problems


def cmd_compare_tokenizers(args: argparse.Namespace) -> int:
    """Ad-hoc comparison on any corpus, no YAML: writes metrics.json/.csv, report.md and report.html."""
    from tokenizer.compare import Corpus, compare, corpus_stem, reference_notes, write_outputs
    from tokenizer.load import BUNDLED, load_tokenizer

    corpora = _corpora_from_args(args.corpus, corpus_stem)
    specs = _tokenizer_args(args.tokenizer or list(BUNDLED))
    baseline = args.baseline or next(iter(specs))
    if baseline not in specs:
        raise JpadaptError(f"--baseline {baseline!r} is not one of the tokenizers ({', '.join(specs)})")
    tokenizers = {name: load_tokenizer(spec, name=name) for name, spec in specs.items()}
    metrics = compare(
        [Corpus(stem, files) for stem, files in corpora.items()],
        tokenizers,
        baseline=baseline,
        compute_params=args.compute_params,
        context_length=args.context_length,
        max_documents=args.max_documents,
        text_field=args.text_field,
    )
    for stem, files in corpora.items():
        if [display_path(f) for f in files] == ["bundled:corpus/ja_heldout.jsonl"] and args.max_documents is None:
            metrics["notes"] += reference_notes(metrics, stem, "Same text as the reference: differences are rounding.")
    written = write_outputs(metrics, args.out)
    _print_chars_per_token(metrics)
    print(f"Report: {written[-1] if written else args.out}")
    return 0


def _corpora_from_args(items: list[str], corpus_stem: Callable[[Path], str]) -> dict[str, list[Path]]:
    corpora: dict[str, list[Path]] = {}
    for item in items:
        files = resolve_files([item], f"--corpus {item}")
        stem = corpus_stem(files[0]) if len(files) == 1 else Path(item).parent.name or "corpus"
        if stem in corpora:
            raise JpadaptError(f"--corpus {item}: another corpus is already named {stem!r}")
        corpora[stem] = files
    return corpora


def _tokenizer_args(items: list[str]) -> dict[str, str]:
    """`NAME=PATH_OR_BUNDLED` or just a bundled name."""
    specs: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name, spec = (name, spec) if sep else (item, item)
        if not name or not spec:
            raise JpadaptError(f"--tokenizer {item!r}: expected NAME=PATH_OR_BUNDLED, e.g. qwen=bundled or mine=./tok")
        if name in specs:
            raise JpadaptError(f"--tokenizer {item!r}: the name {name!r} is given twice")
        specs[name] = spec
    return specs


def _print_chars_per_token(metrics: dict) -> None:
    stems = list(metrics["corpora"])
    width = max(len(name) for name in metrics["tokenizers"]) + 2
    print("chars/token".ljust(width) + "".join(stem.rjust(14) for stem in stems))
    for name, per_corpus in metrics["tokenizers"].items():
        values = [per_corpus[stem]["chars_per_token"] for stem in stems]
        print(name.ljust(width) + "".join(f"{v:14.3f}" if v is not None else "n/a".rjust(14) for v in values))


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    """`jpadapt plan [CONFIG]` runs the stage; `jpadapt plan --model ...` answers without a YAML."""
    if args.model is None:
        return cmd_stage(args)
    if args.args:
        raise JpadaptError("give either a pipeline YAML or --model, not both")
    from pipeline.planner.gpus import gpu
    from pipeline.planner.memory import Setup
    from pipeline.planner.plan import plan_stage, render_markdown
    from pipeline.planner.presets import resolve_model

    shape = resolve_model(args.model)
    if args.vocab is not None:
        shape = shape.with_vocab(args.vocab)
    optimizer = args.optimizer or ("paged_adamw_8bit" if args.method == "qlora" else "adamw")
    setup = Setup(method=args.method, micro_batch=args.micro_batch, seq_len=args.seq_len, gpus=args.gpus,
                  zero_stage=args.zero, precision=args.precision, optimizer=optimizer,
                  activation_checkpointing=not args.no_checkpointing, offload_optimizer=args.offload_optimizer,
                  offload_params=args.offload_params, lora_rank=args.lora_rank)
    if args.tokens is not None and args.method != "inference" and args.gpus * args.micro_batch * args.seq_len > args.tokens:
        raise JpadaptError(f"--gpus {args.gpus}: more GPUs than the method can use: {args.tokens:,} tokens are "
                           f"fewer than one micro batch on every GPU ({args.gpus} x {args.micro_batch} x {args.seq_len})")
    result = plan_stage("plan", shape, setup, args.tokens, args.nodes, gpu(args.gpu), args.mfu, args.price)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(render_markdown([result]), end="")
    return 0


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    ad_hoc = parser.add_argument_group(
        "without a YAML", "jpadapt plan --model llama2-7b --method full --gpus 8 --zero 3 --micro-batch 4 --seq-len 4096")
    ad_hoc.add_argument("--model", metavar="PRESET_OR_CONFIG", help="a preset (llama2-7b, qwen2.5-7b, ...) or a config.json/model folder")
    ad_hoc.add_argument("--method", choices=("full", "lora", "qlora", "inference"), default="full")
    ad_hoc.add_argument("--gpus", type=_positive_int, default=1, help="data-parallel GPUs, all nodes (default 1)")
    ad_hoc.add_argument("--nodes", type=_positive_int, default=1, help="nodes the GPUs are spread over (default 1)")
    ad_hoc.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    ad_hoc.add_argument("--micro-batch", type=_positive_int, default=1, help="sequences per GPU per step")
    ad_hoc.add_argument("--seq-len", type=_positive_int, default=2048)
    ad_hoc.add_argument("--gpu", default="H100-80GB", help="GPU kind for the verdict and time (default H100-80GB)")
    ad_hoc.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    ad_hoc.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "paged_adamw_8bit"),
                        help="default: adamw (paged_adamw_8bit for qlora)")
    ad_hoc.add_argument("--no-checkpointing", action="store_true", help="without activation checkpointing")
    ad_hoc.add_argument("--offload-optimizer", action="store_true")
    ad_hoc.add_argument("--offload-params", action="store_true")
    ad_hoc.add_argument("--lora-rank", type=_positive_int, default=16)
    ad_hoc.add_argument("--vocab", type=_positive_int, help="vocabulary size override (extended vocabularies)")
    ad_hoc.add_argument("--tokens", type=_positive_int, help="training tokens D, for FLOPs, time and cost")
    ad_hoc.add_argument("--mfu", type=_fraction, default=0.4, help="model FLOPs utilisation for time (default 0.4)")
    ad_hoc.add_argument("--price", type=_non_negative, default=2.5, help="$ per GPU-hour (default 2.5)")
    ad_hoc.add_argument("--json", action="store_true", help="every term in bytes, as JSON")


# Training stages a cluster can start once per node (`--node-rank`, `--master-addr`).
PER_NODE = ("cpt", "sft")


def _node_rank(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a node rank 0, 1, ..., got {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _sections_without_stage(cfg: PipelineConfig, pipeline: Pipeline) -> list[str]:
    from pipeline.config import STAGE_SECTIONS

    built = {name.replace("-", "_") for name in pipeline.stage_names()}
    return [s for s in STAGE_SECTIONS if s not in built and cfg.enabled(s)]


def _status_detail(pipeline: Pipeline, name: str, state: str) -> str:
    if state in (ABSENT, DISABLED):
        return ""
    manifest = pipeline.rundir.manifest(name)
    if manifest is None:
        return ""
    return f"  (last finished {manifest['finished']}, {manifest['duration_s']:.1f} s)"


def _finish(pipeline: Pipeline, ran: bool) -> None:
    root = pipeline.rundir.root
    if not ran:
        print(f"Nothing to do: every stage asked for is {UP_TO_DATE} ({root}).")
    else:
        print(f"Outputs in {root}")
    if ran or not (root / "report.html").is_file():
        _write_run_report(root)


def _write_run_report(root: Path) -> None:
    """Rewrite the run report after stages ran. The stages' work is committed by now, so a report that cannot be
    written is a warning, not a failed command."""
    try:
        from pipeline.run_report import write_run_report

        paths = write_run_report(root)
    except Exception as exc:  # noqa: BLE001 - whatever fails here, the stages' work stands
        detail = str(exc) if isinstance(exc, JpadaptError) else f"{type(exc).__name__}: {exc}"
        print(f"warning: run report not written: {detail}", file=sys.stderr)
        return
    print(f"Run report: {paths[-1]}")


# ------------------------------------------------------------------------------------ parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help="pipeline YAML and overrides")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = _Parser(prog="jpadapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jpadapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    run = sub.add_parser("run", help="run every enabled stage, skipping what is up to date")
    _add_common(run)
    run.add_argument("--force", action="store_true", help="rerun every stage even if up to date")
    commands["run"] = cmd_run

    status = sub.add_parser("status", help="show each stage: up to date, stale (and why), never run, ...")
    _add_common(status)
    status.add_argument("--verify", action="store_true",
                        help="re-hash every input and output file instead of trusting the hash cache")
    commands["status"] = cmd_status

    validate = sub.add_parser("validate", help="check a pipeline YAML without running anything")
    _add_common(validate)
    commands["validate"] = cmd_validate

    report = sub.add_parser("report", help="write the run report (report.md, report.html) from the committed stages")
    _add_common(report)
    report.add_argument("--out", type=Path, metavar="DIR",
                        help="write report.md and report.html here instead of the run directory (e.g. read-only)")
    commands["report"] = cmd_report

    sweep = sub.add_parser(
        "sweep", help="run the pipeline once per value of one key (KEY=V1,V2,...) and compare the runs",
        description="Example: jpadapt sweep cpt.replay_ratio=0,0.1,0.25 --stage cpt. Each value runs in "
        "<output_dir>/<run.name>-<KEY>-<value>/; stages the key does not change run once and are reused by the other "
        "values; the comparison page is <output_dir>/<run.name>-sweep-<KEY>/comparison.html.")
    _add_common(sweep)
    sweep.add_argument("--stage", choices=[spec.name for spec in available_stages()],
                       help="run this stage and its prerequisites for each value (default: every enabled stage)")
    sweep.add_argument("--force", action="store_true",
                       help="rerun the stages asked for even if up to date, and reuse none of them from a sibling")
    commands["sweep"] = cmd_sweep

    compare = sub.add_parser(
        "compare-tokenizers", help="compare tokenizers on any Japanese (or other) corpus; no YAML needed",
        description="Example: jpadapt compare-tokenizers --corpus my_ja.jsonl --tokenizer llama2 "
        "--tokenizer qwen --tokenizer mine=./my_tokenizer --out reports/tok",
    )
    compare.add_argument("--corpus", action="append", required=True, metavar="PATH",
                         help="JSONL (with a text field) or plain text, .gz/.xz ok, bundled:NAME or a glob; repeatable")
    compare.add_argument("--tokenizer", action="append", metavar="NAME=PATH_OR_BUNDLED",
                         help="a bundled name (llama2, llama3, qwen, llm-jp, mistral) or NAME=path to a tokenizer "
                         "folder, tokenizer.json, SentencePiece .model or tiktoken rank file; repeatable "
                         "(default: the five bundled ones)")
    compare.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the report is written")
    compare.add_argument("--baseline", help="costs are relative to this tokenizer (default: the first)")
    compare.add_argument("--compute-params", type=_positive_int, default=7_000_000_000, metavar="N",
                         help="model parameters N in 6*N*D training FLOPs (default 7e9)")
    compare.add_argument("--context-length", type=_positive_int, default=4096, metavar="T",
                         help="context size for the characters-per-context figure (default 4096)")
    compare.add_argument("--max-documents", type=_positive_int, metavar="N", help="use the first N documents per corpus")
    compare.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    commands["compare-tokenizers"] = cmd_compare_tokenizers

    for spec in available_stages():
        stage = sub.add_parser(spec.name, help=spec.description)
        _add_common(stage)
        stage.add_argument("--only", action="store_true", help="do not run out-of-date prerequisites")
        stage.add_argument("--force", action="store_true", help="rerun this stage even if up to date")
        if spec.name in PER_NODE:
            stage.add_argument("--node-rank", type=_node_rank, metavar="K",
                               help="this node's rank when the cluster starts one jpadapt per node (default: "
                                    "NODE_RANK or SLURM_NODEID); node 0 runs the stage, the others join")
            stage.add_argument("--master-addr", metavar="HOST", help="node 0's address (default: MASTER_ADDR)")
        commands[spec.name] = cmd_stage
        if spec.name == "plan":
            _add_plan_arguments(stage)
            commands["plan"] = cmd_plan
    return parser, commands


def _unknown_command(name: str, commands: dict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(commands), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown command {name!r} ({hint}commands: {', '.join(commands)})"


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (a scheduler or `kill`) unwinds like Ctrl-C, so the attempt is recorded as interrupted.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        parser, commands = build_parser()
        argv = sys.argv[1:] if argv is None else argv
        if argv and not argv[0].startswith("-") and argv[0] not in commands:
            raise JpadaptError(_unknown_command(argv[0], commands))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        code = commands[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be answered, rather than at exit
        return code
    except JpadaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageCrashed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StageInterrupted as exc:
        if exc.node:
            print(f"interrupted: node {exc.node}'s workers of stage {exc.stage} stopped (node 0 marks the stage "
                  "incomplete); start every node again to resume from the last checkpoint", file=sys.stderr)
        else:
            print(f"interrupted: stage {exc.stage} is marked incomplete; run the command again to redo it "
                  "(cpt resumes from its last checkpoint)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: no stage was running; finished stages are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `jpadapt status | head`: the reader has gone. Point stdout at /dev/null so that the flush at exit does
        # not raise again, and exit as a command killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
