"""Other libraries' checkpoint formats, read and written with equal outputs.

- :mod:`~peftkit.interop.peft` — Hugging Face PEFT folders (``peftkit.from_peft`` / ``peftkit.to_peft``), and the
  helpers a method plugin uses to map its tensors to PEFT's keys and refuse what it cannot represent.
"""
