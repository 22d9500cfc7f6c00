"""Other libraries' checkpoint formats, read and written with equal outputs.

- :mod:`~peftkit.interop.peft` — Hugging Face PEFT folders (``peftkit.from_peft`` / ``peftkit.to_peft``), and the
  helpers a method plugin uses to map its tensors to PEFT's keys and refuse what it cannot represent.
- :mod:`~peftkit.interop.serving` — a base model folder with an adapter folder (either kind) merged in, written as
  a plain transformers folder for inference servers (``peftkit merge`` / ``peftkit.export_merged``).
"""
