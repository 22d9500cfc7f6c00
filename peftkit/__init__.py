"""peftkit: composable parameter-efficient fine-tuning.

Methods are plugins found through a registry; a declarative spec says which adapter goes where; the core attaches,
merges, saves and loads them without knowing which method it drives.
"""

from peftkit import zoo
from peftkit.errors import (
    AttachError,
    CheckpointError,
    PeftkitError,
    RegistryError,
    SpecError,
    TargetingError,
)
from peftkit.interop.peft import from_peft, to_peft
from peftkit.interop.serving import export_merged, load_adapter
from peftkit.io import load, read_spec, save
from peftkit.lifecycle.activation import activate, active_adapters, disabled, route, set_trainable
from peftkit.lifecycle.attach import (
    TrainableParameters,
    attach,
    detach,
    fold,
    merge_and_detach,
    plan,
    trainable_parameters,
)
from peftkit.lifecycle.combine import combine
from peftkit.lifecycle.merging import merge, unmerge
from peftkit.lifecycle.optimizer import parameter_groups
from peftkit.lifecycle.precision import merge_error
from peftkit.lifecycle.rules import add_rule
from peftkit.lifecycle.schedule import after_optimizer_step, check_schedule, regularization
from peftkit.method import (
    ALL_RULES,
    DEFAULT_RULES,
    Adapter,
    Capabilities,
    Method,
    MethodConfig,
    ParameterGroup,
    SharedState,
)
from peftkit.quantization import Quantization, load_quantized, prepare_for_kbit_training
from peftkit.registry import (
    broken_plugins,
    get_method,
    known_methods,
    rediscover,
    register_method,
    registered,
    unregister_method,
)
from peftkit.sites.fused import unfused
from peftkit.spec import Spec
from peftkit.targeting import Plan, PlanRow

__version__ = "0.1.0"

__all__ = [
    "ALL_RULES",
    "DEFAULT_RULES",
    "Adapter",
    "AttachError",
    "Capabilities",
    "CheckpointError",
    "Method",
    "MethodConfig",
    "ParameterGroup",
    "PeftkitError",
    "Plan",
    "PlanRow",
    "Quantization",
    "RegistryError",
    "SharedState",
    "Spec",
    "SpecError",
    "TargetingError",
    "TrainableParameters",
    "activate",
    "active_adapters",
    "add_rule",
    "after_optimizer_step",
    "attach",
    "broken_plugins",
    "check_schedule",
    "combine",
    "detach",
    "disabled",
    "export_merged",
    "fold",
    "from_peft",
    "get_method",
    "known_methods",
    "load",
    "load_adapter",
    "load_quantized",
    "merge",
    "merge_and_detach",
    "merge_error",
    "parameter_groups",
    "plan",
    "prepare_for_kbit_training",
    "read_spec",
    "rediscover",
    "register_method",
    "registered",
    "regularization",
    "route",
    "save",
    "set_trainable",
    "to_peft",
    "trainable_parameters",
    "unfused",
    "unmerge",
    "unregister_method",
    "zoo",
]
