"""The pipeline's stages in pipeline order. Each module has a `SPEC` and one public `run(cfg, ctx)`;
heavy libraries (torch, transformers) are imported inside `run`, so listing stages stays cheap."""

from stages import cpt, extend_vocab, plan, prepare, sft, tokenizer_report

STAGES = (prepare.SPEC, extend_vocab.SPEC, tokenizer_report.SPEC, plan.SPEC, cpt.SPEC, sft.SPEC)
