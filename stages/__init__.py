"""The pipeline's stages in pipeline order. Each module has a `SPEC` and one public `run(cfg, ctx)`;
heavy libraries (torch, transformers) are imported inside `run`, so listing stages stays cheap.

The modules are imported on request, not with the package: training workers run as `python -m stages.cpt.worker`,
and a package that imported its own submodules would load that module twice (and runpy warns about it)."""

from importlib import import_module

ORDER = ("prepare", "extend_vocab", "tokenizer_report", "plan", "cpt", "sft", "evaluate")


def stage_specs() -> list:
    return [import_module(f"stages.{name}").SPEC for name in ORDER]
