"""Benchmarks shipped with peftkit (installed as ``peftkit_benchmarks``): the ``peftkit compare`` harness."""
