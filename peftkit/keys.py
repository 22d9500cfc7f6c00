"""The names peftkit gives to what it adds to a model, in one leaf module that every layer may import.

Each adapted module holds its adapters in a ``ModuleDict`` attribute of this name, so their state-dict keys read
``<module path>.peftkit_adapters.<adapter name>.<parameter>`` and the host's own keys never change.
"""

from __future__ import annotations

ADAPTER_CONTAINER = "peftkit_adapters"
# The child of an entry's first adapter that holds the tensors the entry's adapters share (peftkit.lifecycle.shared).
SHARED_CHILD = "peftkit_shared"
# The attribute of the subclass a host's class is swapped for while its forward runs its adapters itself
# (peftkit.lifecycle.host_forward): the host's original class.
BASE_CLASS = "peftkit_base_class"
