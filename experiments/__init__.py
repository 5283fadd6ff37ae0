"""Experiments: the SmolLM2 study and the recall probes (what the recipe was chosen by), apart from the
speed benchmarks. Run from the repository root as modules: ``python -m experiments.<name> --help``.
"""
