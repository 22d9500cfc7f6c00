"""Sites: the places on a model where an adapter can act, and what each kind of host offers to an adapter.

A **weight site** is a linear-like module (nn.Linear, GPT-2's Conv1D, nn.Embedding, nn.Conv2d) seen uniformly as
a map from ``in_features`` to ``out_features`` with a weight matrix of shape (out_features, in_features). It
offers the pieces an adapter needs to act on that map without materialising a new weight: ``project_in`` (the
host's own operation with ``r`` output channels, e.g. a strided convolution), ``project_out_`` (a 1x1 map back to
``out_features``, accumulated into the host's output in place), ``add_dense_update_`` (the host's operation with a
full (out_features, in_features) update, for methods whose update is not a product of two thin factors), and for
merging ``add_to_weight_`` and ``scale_features_``, which do their arithmetic in float32 or wider
(:func:`widened`) and round once to the weight's dtype. The per-type facts (Conv1D stores its weight transposed; an
embedding's input is an index) live here, in one small class per host type, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.keys import BASE_CLASS
from peftkit.sites.fused import fusable_autograd, fusion_enabled, low_rank_linear
from peftkit.sites.kinds import SiteContext, register_site_kind

try:  # GPT-2 and a few other transformers models use a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the core does not need it
    Conv1D = None  # type: ignore[assignment,misc]


# the floating dtypes autocast casts to its own (it leaves float64 alone)
_AUTOCAST_CASTS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def host_class(module: nn.Module) -> type[nn.Module]:
    """The module's class as its library defined it: while peftkit runs a host's adapters from its forward, the
    host's class is a subclass of it (peftkit.lifecycle.host_forward) whose forward must not count as the host's."""
    return getattr(type(module), BASE_CLASS, type(module))


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or as it is when it is float32 or wider (float64): the precision a merge computes its
    update in, so that a bf16 or fp16 model rounds once, when the sum is cast back to the weight's dtype."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class WeightSite:
    """A linear-like host module, seen as a map in_features -> out_features."""

    kind = "weight"
    input_is_index = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    in_features: int
    out_features: int

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Apply the host's operation with weight ``a`` of shape (r, in_features): features -> r channels.

        Computed as ``(a @ x.T).T``, a transposed view of an (r, tokens) product: CPU BLAS runs a product whose
        output is r (~8) columns wide 1.5-2x slower than the same product laid out r rows tall, and this one runs in
        every forward (measured with one thread, benchmarks/lora_overhead.py; docs/performance.md).
        """
        tokens = x.reshape(-1, x.shape[-1])  # "... d_in -> (...) d_in"
        return torch.mm(a, tokens.t()).t().reshape(*x.shape[:-1], a.shape[0])  # "(...) r -> ... r", a view

    def project_out_(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """Return ``out + scale * (h @ b.T)`` over the feature axis, added into ``out`` in place when safe.

        In place saves a full-size temporary (the host output is never saved by autograd for these hosts); the
        scale multiplies inside the matmul, so it never costs a pass over a full-size tensor either.
        """
        b = self._scaled(b).to(h.dtype)
        if out.dtype == h.dtype and out.is_contiguous():
            # When B trains, B^T is copied to a contiguous (r, out_features) matrix (r * out_features values):
            # autograd lays out B's gradient like this input, so it is computed as h^T @ grad, r rows tall, not as
            # (grad^T @ h)^T, r columns wide, which CPU BLAS runs 2-5x slower (a rank-8 training step -6 %). Without
            # autograd the copy buys nothing, so inference uses the view.
            b_t = b.t().contiguous() if b.requires_grad and torch.is_grad_enabled() else b.t()
            out.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), b_t, alpha=scale)
            return out
        return out + torch.matmul(h, (b * scale).t()).to(out.dtype)  # the scale on the small (o, r) matrix

    def add_dense_update_(
        self, out: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        """Return ``out + scale * host_op(x, delta)``: the host's own operation (a linear map, a lookup, a strided
        convolution) run with a full (out_features, in_features) update ``delta`` in place of its weight, added into
        ``out`` in place when safe. For methods whose update is dense (a Hadamard or Kronecker product of factors);
        a thin product ``B A`` is cheaper as ``project_in`` then ``project_out_``. ``delta`` may be wider than the
        activations (float32 from :func:`widened` factors); it is cast to their dtype (the output's, for an embedding's
        ids), and gradients flow through."""
        delta = self._scaled(delta).to(out.dtype if self.input_is_index else x.dtype)  # ids have no float dtype
        if type(self).project_in is not WeightSite.project_in:  # an embedding lookup, a convolution
            update = self.project_in(x, delta * scale)
            return out.add_(update) if out.dtype == update.dtype else out + update.to(out.dtype)
        if out.dtype == x.dtype and out.is_contiguous():
            out.view(-1, self.out_features).addmm_(x.reshape(-1, x.shape[-1]), delta.t(), alpha=scale)
            return out
        return out + F.linear(x, delta * scale).to(out.dtype)

    # True where the host's forward is exactly ``x Wᵀ + b`` (nn.Linear, Conv1D, or a subclass that keeps their forward), so
    # that :func:`~peftkit.sites.fused.low_rank_linear` can compute it together with a low-rank update.
    fused_host = False

    def fuses(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, host: nn.Module) -> bool:
        """Whether :meth:`fused_product` computes ``host``'s output for input ``x`` with factors ``a``, ``b``: only
        where it is faster than the host's forward plus the update, i.e. when autograd will differentiate a factor
        (without a backward the hook path is already one GEMM and an in-place ``addmm_``), the weight and bias are
        frozen (the fused backward gives them no gradient), everything is on one device, and all dtypes agree, or
        autocast will cast them all to its dtype (as it would cast the host's and the adapter's products on the hook
        path). ``host`` is the module being called: ``site.module`` or a replica of it (``nn.DataParallel``)."""
        if not (self.fused_host and fusion_enabled() and torch.is_grad_enabled()):
            return False
        if not (a.requires_grad or b.requires_grad) or not fusable_autograd():
            return False
        weight, bias = host.weight, getattr(host, "bias", None)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if not x.device == weight.device == a.device == b.device:  # an offloaded adapter loads in its own call
            return False
        if torch.is_autocast_enabled(x.device.type):
            return all(t.dtype in _AUTOCAST_CASTS for t in (x, weight, a, b))
        return x.dtype == weight.dtype == a.dtype == b.dtype

    def fused_product(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, host: nn.Module
    ) -> torch.Tensor:
        """``host``'s output plus ``scale * (x Aᵀ) Bᵀ``, forward and backward in one autograd function (only where
        :meth:`fuses` said so). Under autocast every operand is cast to its dtype first, as autocast casts the
        host's ``F.linear`` and the adapter's products, and the function runs with autocast off."""
        operands = [x, self._as_matrix(host.weight), getattr(host, "bias", None), a, self._scaled(b)]
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return low_rank_linear(*operands, scale)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return low_rank_linear(*(None if t is None else t.to(dtype) for t in operands), scale)

    def _as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight of this host type (this site's or a replica's) as (out_features, in_features), a view."""
        return weight

    # A host whose forward multiplies its own output by a constant (Gemma's and BART's scaled word embeddings): the
    # update is scaled the same way, so that the unmerged forward equals the merged one, scale * (W + dW).
    output_scale: torch.Tensor | float | None = None

    def _scaled(self, b: torch.Tensor) -> torch.Tensor:
        """``b`` times the host's output scale, applied to the small (out_features, r) factor."""
        if self.output_scale is None:
            return b
        scale = self.output_scale
        return b * (scale.to(device=b.device, dtype=b.dtype) if isinstance(scale, torch.Tensor) else scale)

    def merge_refusal(self) -> str | None:
        """Why an update cannot be folded into this host's weight (a quantised weight would be re-quantised), or
        None; :func:`peftkit.merge` asks before any weight changes, and so does an adapter that rewrites its host."""
        return None

    def dequantized(self, dtype: torch.dtype) -> nn.Module | None:
        """For a host whose weight is stored quantised: a new floating-point module of ``dtype`` computing the same
        map (``merge_and_detach(dequantize=...)`` merges into it and puts it in the host's place). None for a
        host that already holds floating-point weights."""
        return None

    def requantized(self, weight: torch.Tensor) -> torch.Tensor | None:
        """For a quantised host: ``weight`` (out_features, in_features) after a round trip through the host's
        storage format, what merging into it would keep (:func:`peftkit.merge_error` reports the difference).
        None for a floating-point host, whose rounding is its dtype's."""
        return None

    def weight_view(self) -> torch.Tensor:
        """The weight as (out_features, in_features) in its own dtype: a view, never a copy, for computations that
        must not materialise a second weight-sized tensor (a norm per output feature, a product with a thin factor)."""
        return self._as_matrix(self.weight)

    def weight_as_matrix(self) -> torch.Tensor:
        """The weight as (out_features, in_features), in float32 or wider (a copy only for lower precisions)."""
        return widened(self.weight_view())

    def along_features(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector (out_features,) shaped to broadcast against the host's output: the feature
        axis is last for linear maps and lookups, second for a convolution's (batch, channels, height, width)."""
        return vector

    def _delta_in_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def add_to_weight_(self, delta: torch.Tensor) -> None:
        """Add an (out_features, in_features) delta computed in float32; cast once to the weight's dtype."""
        weight = self.weight
        delta = self._delta_in_layout(delta).reshape(weight.shape)
        with torch.no_grad():
            if weight.dtype in (torch.float32, torch.float64):
                weight.add_(delta.to(weight.dtype))
            else:
                weight.copy_((weight.float() + delta.float()).to(weight.dtype))

    def write_weight_(self, matrix: torch.Tensor) -> None:
        """Replace the weight by an (out_features, in_features) matrix computed in float32 or wider, cast once. For a
        merge whose result is not W plus a small update (a rescaled weight): adding ``new - W`` would round at W's
        magnitude, which a later division (an unmerge) magnifies."""
        weight = self.weight
        with torch.no_grad():
            weight.copy_(self._delta_in_layout(matrix).reshape(weight.shape).to(weight.dtype))

    def scale_features_(self, factor: torch.Tensor, side: Literal["out", "in"] = "out") -> None:
        """Fold a per-feature scale into the host: ``side="out"`` multiplies each output feature's weights and its
        bias by ``factor`` (out_features,), i.e. ``W <- diag(f) W, b <- f * b``; ``side="in"`` multiplies each input
        feature's weights, ``W <- W diag(f)`` (the bias is untouched). Computed in float32 or wider, rounded once."""
        factor = widened(factor.detach())
        weight = self.weight_as_matrix().to(factor.dtype)  # (out_features, in_features)
        change = factor - 1.0
        self.add_to_weight_(weight * (change[:, None] if side == "out" else change[None, :]))
        bias = getattr(self.module, "bias", None)
        if side == "out" and isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_((widened(bias) * factor).to(bias.dtype))


class LinearSite(WeightSite):
    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.fused_host = host_class(module).forward is nn.Linear.forward


class Conv1DSite(WeightSite):
    """transformers' Conv1D: ``x @ W + b`` with W stored as (in_features, out_features)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.in_features, self.out_features = module.weight.shape
        self.fused_host = host_class(module).forward is Conv1D.forward

    def _as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def _delta_in_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()


class EmbeddingSite(WeightSite):
    """nn.Embedding as a linear map from one-hot ids: weight (num_embeddings, dim) is the transposed matrix."""

    input_is_index = True

    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(module)
        self.in_features, self.out_features = module.num_embeddings, module.embedding_dim

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, a.t())

    def _as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def _delta_in_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t()


class Conv2dSite(WeightSite):
    """nn.Conv2d as a map from each (in_channels x kernel) patch to out_channels."""

    def __init__(self, module: nn.Conv2d) -> None:
        super().__init__(module)
        kh, kw = module.kernel_size
        self.in_features, self.out_features = module.in_channels * kh * kw, module.out_channels

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        kernel = a.reshape(a.shape[0], conv.in_channels, *conv.kernel_size)
        return F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)

    def project_out_(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        # "n r y x, o r -> n o y x" as a 1x1 convolution; the scale goes on the small (o, r) matrix.
        update = F.conv2d(h, (self._scaled(b) * scale).to(h.dtype)[:, :, None, None])
        if out.dtype == update.dtype:
            return out.add_(update)
        return out + update.to(out.dtype)

    def weight_view(self) -> torch.Tensor:
        return self.weight.reshape(self.out_features, -1)  # a view of a contiguous weight

    def along_features(self, vector: torch.Tensor) -> torch.Tensor:
        return vector[:, None, None]


def _embedding_site(module: nn.Module) -> WeightSite | str:
    site = EmbeddingSite(module)  # type: ignore[arg-type]
    if type(module).forward is not nn.Embedding.forward:
        scale = output_scale_of(module)
        if isinstance(scale, str):
            return scale
        site.output_scale = scale
    return site


def output_scale_of(module: nn.Module) -> torch.Tensor | float | str:
    """The constant an nn.Embedding subclass multiplies its lookup by (transformers' ``embed_scale``: Gemma, BART,
    M2M100...), or a sentence saying why the subclass's forward cannot be followed.

    The subclass is trusted only when it declares a scalar ``embed_scale`` and, where the weight holds values, one
    lookup through its forward equals ``embed_scale`` times the plain lookup."""
    name = type(module).__name__
    refusal = (
        f"{name} overrides nn.Embedding.forward without a scalar `embed_scale`, so peftkit cannot tell how its "
        "output follows from its weight (an adapter's merged and unmerged forward could disagree); register a weight "
        "site for it with peftkit.sites.register_weight_site"
    )
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.reshape(())
    elif not isinstance(scale, int | float) or isinstance(scale, bool):
        return refusal
    weight = module.weight
    if not weight.is_meta and not (isinstance(scale, torch.Tensor) and scale.is_meta):
        ids = torch.arange(min(2, weight.shape[0]), device=weight.device)
        with torch.no_grad():
            expected = F.embedding(ids, weight) * (scale.to(weight.dtype) if isinstance(scale, torch.Tensor) else scale)
            if not torch.allclose(type(module).forward(module, ids), expected):  # the host's own forward, no hooks
                return f"{name}'s forward is not `embed_scale` times its lookup; " + refusal.split("; ")[1]
    return scale


def _linear_site(module: nn.Module) -> WeightSite | str:
    return LinearSite(module)  # type: ignore[arg-type]


def _conv2d_site(module: nn.Module) -> WeightSite | str:
    conv: nn.Conv2d = module  # type: ignore[assignment]
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) is not supported"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} with padding_mode={conv.padding_mode!r}: only numeric zero padding"
    return Conv2dSite(conv)


# Order matters only for subclasses: the first isinstance match wins.
_WEIGHT_SITE_TYPES: list[tuple[type[nn.Module], Callable[[nn.Module], WeightSite | str]]] = [
    (nn.Linear, _linear_site),
    (nn.Embedding, _embedding_site),
    (nn.Conv2d, _conv2d_site),
]
if Conv1D is not None:
    _WEIGHT_SITE_TYPES.append((Conv1D, lambda module: Conv1DSite(module)))
_REGISTERED_TYPES: dict[type[nn.Module], type[nn.Module]] = {}  # registered host type -> the type it stands for


def register_weight_site(
    module_type: type[nn.Module],
    factory: Callable[[nn.Module], WeightSite | str],
    *,
    stands_for: type[nn.Module] = nn.Linear,
) -> None:
    """Teach the core a new linear-like host type (e.g. a quantised linear from another library); the factory then
    vouches for how the type's forward follows from its weight. ``stands_for`` is the built-in host type it
    computes like: a method that adapts that type (its ``Capabilities.module_types``) adapts this one too, so a
    method written before the host was registered, or without knowing of it, still reaches it."""
    _WEIGHT_SITE_TYPES.insert(0, (module_type, factory))
    _REGISTERED_TYPES[module_type] = stands_for


def packed_dtype(module: nn.Module) -> str | None:
    """The dtype's name of a module's weight that is not floating point (packed quantised values), else None."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not (weight.is_floating_point() or weight.is_complex()):
        return str(weight.dtype).removeprefix("torch.")
    return None


def host_plugin_hint(module: nn.Module) -> str:
    """For a module whose weight is not floating point (a quantised layer of a type no plugin registered): how
    such a type becomes a host; else empty."""
    dtype = packed_dtype(module)
    if dtype is not None:
        return (
            f" Its weight is {dtype} (a quantised layer): a quantised layer type "
            "becomes a host through a host plugin that calls peftkit.sites.register_weight_site (the peftkit.hosts "
            "entry points, docs/quantization.md)."
        )
    return ""


def adapts(module: nn.Module, module_types: tuple[type[nn.Module], ...]) -> bool:
    """Whether a method adapting ``module_types`` can take ``module``: an instance of one of them, or of a
    registered host type that stands for one of them."""
    if isinstance(module, module_types):
        return True
    return any(
        isinstance(module, registered) and issubclass(stand_in, module_types)
        for registered, stand_in in _REGISTERED_TYPES.items()
    )


def weight_site_types() -> tuple[type[nn.Module], ...]:
    return tuple(module_type for module_type, _ in _WEIGHT_SITE_TYPES)


def _unfollowable(module: nn.Module, module_type: type[nn.Module]) -> str | None:
    """Why a host of a known type cannot be treated as that type, or None.

    A weight site adapts the map the weight defines: its weight must hold real numbers (a quantised weight is
    packed integers), and a subclass must not change what its forward computes from the weight, or the merge rule
    and the unmerged forward would disagree. Scaled embeddings are the one change the embedding site follows; a
    type registered with :func:`register_weight_site` is trusted by its registration."""
    if module_type in _REGISTERED_TYPES:
        return None
    name = type(module).__name__
    dtype = packed_dtype(module)
    if dtype is not None:
        return (
            f"{name}'s weight is {dtype}, not floating point (a quantised layer): "
            "peftkit adapts a quantised layer type only through a host plugin (the peftkit.hosts entry points; "
            "bitsandbytes' Linear4bit and Linear8bitLt are built in, docs/quantization.md); load the base in a "
            "floating-point dtype or leave this module out of the target"
        )
    if host_class(module).forward is module_type.forward:
        return None
    if module_type is nn.Embedding:
        return None  # the embedding factory follows a scaled lookup and refuses every other override
    if module_type is nn.Linear and _computes_a_linear_map(module):
        return None  # e.g. Falcon's FalconLinear, which writes out x @ W.T + b
    return (
        f"{name} overrides {module_type.__name__}.forward, so peftkit cannot tell how its output follows from its "
        "weight (an adapter's merged and unmerged forward could disagree); leave it out of the target, or register "
        "a weight site for it with peftkit.sites.register_weight_site"
    )


def _computes_a_linear_map(module: nn.Module) -> bool:
    """Whether an nn.Linear subclass's own forward (no hooks) gives ``F.linear`` on two probe inputs, one of them
    large (a clamp or a normalisation shows there). Unknowable on the meta device: False, so the host is refused."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.is_meta or not weight.is_floating_point():
        return False
    generator = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn(2, weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for x in (probe, probe * 1000):
            got, want = host_class(module).forward(module, x), F.linear(x, weight, bias)
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                return False
            tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if not torch.allclose(got, want, rtol=tolerance, atol=tolerance * float(want.abs().max())):
                return False
    return True


def make_weight_site(module: nn.Module, context: SiteContext | None = None) -> WeightSite | str:
    """The weight site of the first registered type ``module`` is an instance of, or why it has none."""
    for module_type, factory in _WEIGHT_SITE_TYPES:
        if isinstance(module, module_type):
            return _unfollowable(module, module_type) or factory(module)
    names = ", ".join(t.__name__ for t in weight_site_types())
    return f"{type(module).__name__} is not a linear-like module (weight sites are {names})"


register_site_kind("weight", make_weight_site)
