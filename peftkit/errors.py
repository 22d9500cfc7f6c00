"""The exceptions peftkit raises on bad input.

Every error a user can cause derives from :class:`PeftkitError`, so ``except peftkit.PeftkitError`` catches all of
them; each subclass also derives from the builtin a caller would expect (``ValueError``, ``KeyError``...), so code
written against plain Python keeps working.
"""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class of every error peftkit raises on bad input."""


class SpecError(PeftkitError, ValueError):
    """A spec (dict, YAML or JSON) does not validate; the message names the field path and the allowed values."""


class RegistryError(PeftkitError, LookupError):
    """A method name is unknown or registered twice; the message lists the known names."""


class TargetingError(PeftkitError, ValueError):
    """A selector matches nothing, or hits a module its method cannot adapt; the message names the closest paths."""


class AttachError(PeftkitError, RuntimeError):
    """Attaching, merging or detaching is not possible in the model's current state."""


class CheckpointError(PeftkitError, ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model; the model is left as it was."""
