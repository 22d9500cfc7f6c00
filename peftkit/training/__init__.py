"""Training with adapters: the ``peftkit train`` loop, its config, its processes and its crash-safe checkpoints.

- :mod:`~peftkit.training.loop` — :func:`train`: checks everything, then trains and resumes bit for bit.
- :mod:`~peftkit.training.config` — :class:`TrainConfig`, the YAML training config.
- :mod:`~peftkit.training.distributed` — one process, DDP or FSDP2 under ``torchrun`` / ``accelerate launch``.
- :mod:`~peftkit.training.checkpoints` and :mod:`~peftkit.training.state_file` — checkpoints a kill cannot break,
  with the optimiser state in safetensors (no pickle).
- :mod:`~peftkit.training.trainer` — ``AdapterTrainer`` for ``transformers.Trainer`` (imports transformers).
"""

from peftkit.training.config import TrainConfig
from peftkit.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
