"""Evaluation library: perplexity / bits per byte, JGLUE, generations, reports."""
