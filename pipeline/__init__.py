"""jpadapt orchestration: config schema, stage graph, fingerprints, run directory, CLI. Never imports torch."""

__version__ = "0.1.0"
