"""Running ``peftkit train`` as one of N processes: ``torchrun --nproc_per_node N`` or ``accelerate launch``.

Both launchers say everything through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), so nothing here takes a flag: :func:`session` joins the process group when ``WORLD_SIZE > 1`` and
leaves it however the run ends. The rest are the few collective steps training needs, written so that a single
process takes the same code path with every collective a no-op: sharding a model (DDP or FSDP2), clipping
gradients that may be DTensors, gathering adapter weights and optimiser state to full tensors for rank 0 to
write, and running a write on rank 0 so that its failure stops every rank instead of leaving them at a barrier.
"""

from __future__ import annotations

import gc
import importlib
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.quantization import is_quantized

Strategy = Literal["ddp", "fsdp2"]
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Runtime:
    """The runtime the launcher describes; one process on CPU (or the first GPU) when nothing was launched."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Runtime(rank, world_size, local_rank, device)


@contextmanager
def session() -> Iterator[Runtime]:
    """Join the launcher's process group (nccl on GPUs, gloo on CPUs) and always leave it, error or not."""
    runtime = from_environment()
    owned = runtime.distributed and not dist.is_initialized()  # a caller's own group is the caller's to end
    if owned:
        if runtime.device.type == "cuda":
            torch.cuda.set_device(runtime.device)
        # Its functions default to `group=group.WORLD`, a value taken when the module is imported. DDP and FSDP2
        # import it (by way of torch.distributed._shard) once the group exists, so it would hold the group until
        # the interpreter ends and `_leave` could not destroy it; imported first, those defaults are None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
    try:
        yield runtime
    finally:
        if owned:
            _leave()


# The meshes `wrap` built for FSDP2, which `_leave` must make let go of the group: each mesh holds it, and torch's
# DTensor caches (sharding propagation, redistribution plans) keep the mesh alive long after the model.
_meshes: list[weakref.ref[Any]] = []


def _leave() -> None:
    """Destroy the process group so that its backend goes now, its worker threads joined, not at interpreter exit.

    A backend still referred to outlives `destroy_process_group`, and its threads run on into interpreter
    finalisation. A gloo worker that has just completed the last collective then frees that work's tensors, which
    takes the GIL; Python ends a thread that takes the GIL during finalisation with pthread_exit, and unwinding
    through the work's noexcept destructor calls std::terminate: SIGABRT after a run that succeeded. Destroying the
    backend waits for its queue to drain and joins its threads (with the GIL released), so nothing is left to race.
    """
    # The wrapped model and optimiser sit in reference cycles that hold the group (DDP's reducer, FSDP2's state):
    # collect them while the world still holds it too, so that its last reference goes below, not inside gc.
    gc.collect()
    dist.destroy_process_group()
    for mesh in (ref() for ref in _meshes):
        registry = getattr(mesh, "_pg_registry", None)  # only torch.compile reads it; the group is gone anyway
        if registry is not None:
            registry.clear()
    _meshes.clear()


def local_rows(batch: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of the global batch's rows (shares differ by at most one row)."""
    return {key: torch.tensor_split(value, runtime.world_size)[runtime.rank] for key, value in batch.items()}


def all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value)
    return value


def gather_objects(value: T, runtime: Runtime) -> list[T]:
    """Every rank's ``value``, in rank order (a collective)."""
    if not runtime.distributed:
        return [value]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def on_main(runtime: Runtime, write: Callable[[], T]) -> T | None:
    """Run ``write`` on rank 0 only; every rank returns after it, and all raise if it failed (a collective)."""
    if not runtime.distributed:
        return write()
    result, failure, error = None, [None], None
    if runtime.is_main:
        try:
            result = write()
        except BaseException as caught:  # re-raised below, once the other ranks know
            error, failure[0] = caught, f"{type(caught).__name__}: {caught}"
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise PeftkitError(f"rank 0 failed while writing, so rank {runtime.rank} stops too: {failure[0]}")
    return result


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of blocks, found without naming the architecture: its largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise PeftkitError(f"FSDP2 shards per transformer block, but {type(model).__name__} holds no nn.ModuleList")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def wrap(model: nn.Module, strategy: Strategy, runtime: Runtime) -> nn.Module:
    """The module to call for training: DDP around ``model``, or ``model`` itself sharded in place by FSDP2.

    Only parameters with ``requires_grad`` (the adapters) get gradients, so only they are all-reduced (DDP) or
    reduce-scattered (FSDP2); FSDP2 shards the frozen base as well, which is where its memory saving comes from.
    """
    if not is_quantized(model):  # a quantised model was loaded onto its device
        model.to(runtime.device)
    if not runtime.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    _meshes.append(weakref.ref(mesh))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head, and any adapters outside the blocks
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` for plain or DTensor (FSDP2-sharded) gradients: the norm is over the full gradients."""
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = _full(torch.nn.utils.get_total_norm(grads))  # sharded grads give a partial norm; make it whole
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, gathered whole and on the CPU (a collective under FSDP2: every rank must call it)."""
    with torch.no_grad():
        return {key: _full(tensor.detach()).cpu() for key, tensor in tensors.items()}


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state keyed by parameter name, full and on the CPU (rank 0 holds it; others get ``{}``).

    Keys are names, not positions, so a checkpoint resumes under any world size and either strategy.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, optimizer, options=options)


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], runtime: Runtime
) -> None:
    """Every rank loads the full state; under FSDP2 each keeps the slices of its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # a single process has nothing to distribute, and the full-state path insists on a device mesh
    options = StateDictOptions(full_state_dict=runtime.distributed)
    set_optimizer_state_dict(module, optimizer, state, options=options)
