"""The life of an adapted model: attach, activate, route, merge, unmerge, fold, combine and detach.

- :mod:`~peftkit.lifecycle.state` — what peftkit keeps on an adapted model (its spec, adapters, hooks, routing).
- :mod:`~peftkit.lifecycle.attach` — plan, attach (all or nothing, by an undo log), detach, merge_and_detach, fold.
- :mod:`~peftkit.lifecycle.merging` — merge and unmerge, refused up front when they could not be undone.
- :mod:`~peftkit.lifecycle.rewrite` — adapters that rewrite their host's weight: the original kept, restored exactly.
- :mod:`~peftkit.lifecycle.activation` — which adapters run, per model or per example (routing).
- :mod:`~peftkit.lifecycle.combine` — a new adapter from a weighted combination of attached ones.
- :mod:`~peftkit.lifecycle.precision` — what merging into a low-precision base would lose.

The functions are exported at the top level (``peftkit.attach``, ``peftkit.merge``...); import from here only
for the less common names.
"""
