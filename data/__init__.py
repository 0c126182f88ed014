"""Corpus library: readers, normalization, filters, dedup, the prepare pipeline, bundled assets."""
