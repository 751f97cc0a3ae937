"""Benchmarks on real pretrained weights (issue 14): an encoder track (all-MiniLM-L6-v2 with four text
classification experts) whose experts and scorer any merge method can use. See ``__main__.py`` for the
commands and benchmarks/README.md ("Real pretrained weights") for the results."""
