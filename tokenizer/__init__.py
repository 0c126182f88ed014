"""Tokenizer library: loading, metrics, vocabulary extension."""
