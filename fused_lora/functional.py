"""The functional API, ``fused_lora_linear``, and the autograd Function behind it."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import List, Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _autoselect, torch_ops
from ._backend import resolve_backend
from .dropout import Dropout, seed_tensor
from .nf4 import SUPPORTED_DTYPES as NF4_DTYPES
from .nf4 import NF4Weight

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# An NF4 base dequantizes to (and so computes in) the format's dtypes; their order also encodes NF4Weight.dtype.
_NF4_ACTIVATION_DTYPES = NF4_DTYPES


def _select_backend(x: torch.Tensor, out_features: int) -> str:
    """``"triton"``, ``"fastest"`` or ``"torch:<policy>"`` for this call (see fused_lora._backend for the rule).
    The torch path carries the CPU half-precision compute policy in force at forward, so its backward follows the
    same one."""
    backend = resolve_backend(x.device)
    # Empty problems have exact, trivial results (empty outputs, zero gradients): no kernel launch needed. float64
    # has no kernels: "auto" computes it on the torch path.
    trivial = x.numel() == 0 or out_features == 0
    if backend == "torch" or trivial or (backend == "fastest" and x.dtype == torch.float64):
        return f"torch:{torch_ops.get_cpu_half_compute()}"
    if x.dtype == torch.float64:
        raise TypeError(
            "the Triton backend computes in float32/float16/bfloat16, got float64 tensors; "
            "use set_backend('torch') (or use_backend('torch')) for float64"
        )
    return backend


def _run(backend: str, name: str, *args):
    """``lora_forward`` or ``lora_backward`` (``name``) of the implementation ``backend`` names: ``"triton"``,
    ``"fastest"`` or ``"torch"`` (optionally ``"torch:<CPU half-precision policy>"``)."""
    kind, _, policy = backend.partition(":")
    if kind == "torch":
        with torch_ops.use_cpu_half_compute(policy or torch_ops.get_cpu_half_compute()):
            return getattr(torch_ops, name)(*args)
    if kind not in ("triton", "fastest") or policy:
        raise ValueError(f"backend={backend!r}: expected 'triton', 'fastest' or 'torch[:<policy>]' (the resolved "
                         "backend of FusedLoraFunction; set_backend() takes 'auto', 'triton' or 'torch')")
    from . import kernels

    if kind == "fastest":
        return _autoselect.run_fastest(name, args, {"triton": kernels, "torch": torch_ops})
    return getattr(kernels, name)(*args)


def _dropout(dropout_p: float, seed: Optional[torch.Tensor]) -> Optional[Dropout]:
    return None if seed is None else Dropout(dropout_p, int(seed.item()))


def _autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``; nothing on the meta device, which autocast does not know."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


# ----------------------------------------------------------------------------------------------------------------
# Limits that stay: the backward is a fused computation without a derivative of its own (no double backward), and
# the autograd Function has no vmap / jvp rules (no torch.func transforms, no forward-mode AD). Both say so plainly.
# ----------------------------------------------------------------------------------------------------------------

_DOUBLE_BACKWARD_ERROR = (
    "fused-lora: double backward through fused_lora_linear / FusedLoraLinear is not supported (a gradient computed "
    "with create_graph=True was differentiated again): its backward is a fused computation without a derivative of "
    "its own. Gradients with create_graph=True are fine as long as they are not backpropagated through; for "
    "higher-order derivatives use a plain PyTorch LoRA (e.g. peft) or merge the adapter and use nn.Linear"
)


def _refuse_transforms(tensors) -> None:
    """A clear error for torch.func transforms and forward-mode AD, which the autograd Function does not support."""
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            "fused-lora: torch.func transforms (vmap, grad, jvp, jacrev, jacfwd, hessian, ...) over "
            "fused_lora_linear / FusedLoraLinear are not supported (its autograd Function has no vmap or jvp rule); call it outside the "
            "transform (e.g. batch the inputs instead of vmap, use torch.autograd.grad instead of torch.func.grad)"
        )
    if _forward_ad._current_level >= 0 and any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            "fused-lora: forward-mode AD (torch.autograd.forward_ad dual tensors) through fused_lora_linear / "
            "FusedLoraLinear is not supported (its autograd Function has no jvp rule); use reverse mode (backward)"
        )


def _refuse_double_backward(backward, ctx, grad_out):
    """``backward(ctx, grad_out)`` run without building a graph, its gradients marked so that differentiating
    them again raises :data:`_DOUBLE_BACKWARD_ERROR` (what ``torch.autograd.function.once_differentiable`` does,
    with a message that names fused-lora's limit)."""
    with torch.no_grad():
        grads = backward(ctx, grad_out)
    tensors = [g for g in grads if g is not None]
    if not tensors:
        return grads
    marked = torch._C._functions.DelayedError(_DOUBLE_BACKWARD_ERROR.encode(), len(tensors))(
        *[g.detach().requires_grad_(True) for g in tensors])
    marked = iter((marked,) if isinstance(marked, torch.Tensor) else marked)
    return tuple(None if g is None else next(marked) for g in grads)


# ----------------------------------------------------------------------------------------------------------------
# The base weight crosses the operator boundary as a list of tensors plus integers: [W] for a dense weight, or the
# NF4 tensors (packed codes, code table, then absmax or the nested statistics) with their shape and block sizes.
# ----------------------------------------------------------------------------------------------------------------

_DENSE, _NF4 = 0, 1


def pack_weight(weight) -> Tuple[List[torch.Tensor], List[int]]:
    """``(tensors, meta)`` describing a dense weight or an ``NF4Weight`` (inverse: :func:`unpack_weight`)."""
    if isinstance(weight, NF4Weight):
        stats = [weight.qabsmax, weight.absmax2, weight.code2, weight.offset] if weight.nested else [weight.absmax]
        meta = [_NF4, weight.shape[0], weight.shape[1], weight.blocksize, weight.nested_blocksize,
                _NF4_ACTIVATION_DTYPES.index(weight.dtype)]
        return [weight.data, weight.code] + stats, meta
    return [weight], [_DENSE]


def unpack_weight(tensors: List[torch.Tensor], meta: List[int]):
    if meta[0] == _DENSE:
        return tensors[0]
    _, out_f, in_f, blocksize, nested_blocksize, dtype_index = meta
    common = dict(data=tensors[0], code=tensors[1], blocksize=blocksize, shape=(out_f, in_f),
                  dtype=_NF4_ACTIVATION_DTYPES[dtype_index], nested_blocksize=nested_blocksize)
    if len(tensors) == 3:
        return NF4Weight(absmax=tensors[2], **common)
    return NF4Weight(qabsmax=tensors[2], absmax2=tensors[3], code2=tensors[4], offset=tensors[5], **common)


def _weight_shape(tensors: List[torch.Tensor], meta: List[int]) -> Tuple[int, int]:
    return tuple(tensors[0].shape) if meta[0] == _DENSE else (meta[1], meta[2])


# The forward and backward are registered as custom operators (with fake implementations for shape propagation),
# so torch.compile captures a model using them in one graph (fullgraph=True) instead of breaking at the kernels.
# The dropout seed travels as a 0-dim int64 CPU tensor: drawing it needs no graph break and no device sync.


@torch.library.custom_op("fused_lora::lora_linear_forward", mutates_args=())
def lora_linear_forward(
    x: torch.Tensor, weight: List[torch.Tensor], weight_meta: List[int], lora_A: torch.Tensor, lora_B: torch.Tensor,
    bias: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: Optional[torch.Tensor], backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for 2-D x: ``y = x W^T + scaling * xa B^T + bias`` and ``xa = D(x) A^T``."""
    return _run(backend, "lora_forward",
                x, unpack_weight(weight, weight_meta), lora_A, lora_B, bias, scaling, _dropout(dropout_p, seed))


@lora_linear_forward.register_fake
def _(x, weight, weight_meta, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    out_features = _weight_shape(weight, weight_meta)[0]
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("fused_lora::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: List[torch.Tensor], weight_meta: List[int],
    lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float,
    seed: Optional[torch.Tensor], backend: str, needs: List[bool],
) -> List[torch.Tensor]:
    """``[dx, dW, dA, dB, dbias]``; an entry not flagged in ``needs`` is an empty tensor."""
    grads = _run(backend, "lora_backward", grad_out, x, unpack_weight(weight, weight_meta), lora_A, lora_B, xa,
                 scaling, _dropout(dropout_p, seed), tuple(needs))
    return [g if g is not None else x.new_empty(0) for g in grads]


@lora_linear_backward.register_fake
def _(grad_out, x, weight, weight_meta, lora_A, lora_B, xa, scaling, dropout_p, seed, backend, needs):
    out_features = _weight_shape(weight, weight_meta)[0]
    shapes = (x.shape, _weight_shape(weight, weight_meta), lora_A.shape, lora_B.shape, (out_features,))
    return [x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


class FusedLoraFunction(torch.autograd.Function):
    r"""Autograd Function of the fused LoRA linear on 2-D inputs.

    Notation: x ``[M, K]``, frozen W ``[N, K]``, A ``[r, K]``, B ``[N, r]``, bias ``[N]``, ``s = scaling``,
    keep-probability ``q = 1 - p`` and the dropout mask ``m`` (0/1, ``[M, K]``) so that ``D(x) = (m * x) / q``.

    Forward::

        xa = D(x) A^T                      [M, r]   (saved: r values per row instead of a masked copy of x)
        y  = x W^T + s xa B^T + bias       [M, N]

    Backward, with ``g = dL/dy`` ``[M, N]``. Writing the forward element-wise,
    ``y[i,n] = sum_k x[i,k] W[n,k] + s sum_j B[n,j] sum_k (m[i,k] x[i,k] / q) A[j,k] + bias[n]``, so:

    * ``dL/dB[n,j] = s sum_i g[i,n] xa[i,j]``                        ->  ``dB = s g^T xa``            ``[N, r]``
    * define ``gb = g B`` ``[M, r]``: ``dL/dxa[i,j] = s gb[i,j]``, and through ``xa = D(x) A^T``:
      ``dL/dA[j,k] = s sum_i gb[i,j] D(x)[i,k]``                     ->  ``dA = s gb^T D(x)``         ``[r, K]``
    * x reaches y twice (base term and LoRA term; the mask is a constant of the seed):
      ``dL/dx[i,k] = sum_n g[i,n] W[n,k] + (s / q) m[i,k] sum_j gb[i,j] A[j,k]``
                                                                     ->  ``dx = g W + s D(gb A)``     ``[M, K]``
      (``D`` applied to ``gb A`` uses the same mask and the same ``1/q``: dropout is linear and its own adjoint)
    * ``dbias = sum_i g[i, :]`` and ``dW = g^T x``, computed only when bias / W require grad (W is frozen in LoRA,
      but a gradient the user asked for is never dropped).

    Saved for backward: x, W, A, B, xa and the seed -- nothing else of size ``M x K``; the mask is regenerated from
    the seed in backward. ``g`` is read once for both ``gb`` and ``dB`` (and ``dbias``) by the kernels.


    Weights: ``weight_tensors`` / ``weight_meta`` hold a dense W (``[W]``) or an NF4 W (see :func:`pack_weight`).
    An NF4 W is dequantized again in backward (never kept dense) and gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, scaling, dropout_p, seed, backend, weight_meta, *weight_tensors):
        y, xa = lora_linear_forward(x, list(weight_tensors), weight_meta, lora_A, lora_B, bias, scaling, dropout_p,
                                    seed, backend)
        ctx.save_for_backward(x, lora_A, lora_B, xa, seed, *weight_tensors)
        ctx.scaling, ctx.dropout_p, ctx.backend, ctx.weight_meta = scaling, dropout_p, backend, weight_meta
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
            return _refuse_double_backward(FusedLoraFunction.backward, ctx, grad_out)
        x, lora_A, lora_B, xa, seed, *weight_tensors = ctx.saved_tensors
        need_dw = ctx.weight_meta[0] == _DENSE and ctx.needs_input_grad[9]
        needs = [ctx.needs_input_grad[0], need_dw, *ctx.needs_input_grad[1:4]]
        with _autocast_off(grad_out.device.type):
            grads = lora_linear_backward(grad_out, x, weight_tensors, ctx.weight_meta, lora_A, lora_B, xa,
                                         ctx.scaling, ctx.dropout_p, seed, ctx.backend, needs)
        dx, dw, da, db, dbias = (g if need else None for g, need in zip(grads, needs))
        return (dx, da, db, dbias, None, None, None, None, None, dw, *[None] * (len(weight_tensors) - 1))


def _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p) -> None:
    # Messages are formatted only on failure: this runs on every call (formatting them all cost ~60 us per call).
    quantized = isinstance(weight, NF4Weight)
    names = {"x": x, "lora_A": lora_A, "lora_B": lora_B}
    if not quantized:
        names["weight"] = weight
    if bias is not None:
        names["bias"] = bias
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{' (or an NF4Weight)' if name == 'weight' else ''}, "
                            f"got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., in_features]; got a 0-dim tensor")
    if not quantized and weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    out_features, in_features = weight.shape
    if lora_A.dim() != 2:
        raise ValueError(f"lora_A must be 2-D [r, in_features], got shape {list(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, but lora_A has shape {list(lora_A.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A has shape {list(lora_A.shape)} but weight has in_features={in_features}; "
                         f"expected [{r}, {in_features}]")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B has shape {list(lora_B.shape)}; expected [out_features, r] = [{out_features}, {r}]")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension (shape {list(x.shape)}) but the layer "
                         f"expects in_features={in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {list(bias.shape)}; expected [{out_features}]")
    for name, t in names.items():
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16 (float64 on the "
                            "torch backend)")
        if t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; x, weight, lora_A, lora_B and "
                            "bias must share one dtype (cast the module with .to(dtype), or run under torch.autocast)")
        if t.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {t.device}")
    if quantized:
        if x.dtype not in _NF4_ACTIVATION_DTYPES:
            raise TypeError(f"an NF4 weight computes in float32, float16 or bfloat16, got x of dtype {x.dtype}")
        if weight.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but the NF4 weight is on {weight.device}")
    if not (isinstance(scaling, numbers.Real) and math.isfinite(scaling)):
        raise ValueError(f"scaling must be a finite real number, got {scaling!r}")
    if not (isinstance(dropout_p, numbers.Real) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def fused_lora_linear(
    x: torch.Tensor,
    weight: Union[torch.Tensor, NF4Weight],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``y = x @ W^T + scaling * (dropout(x) @ A^T) @ B^T + bias`` for x of shape ``[..., in_features]``.

    Args:
        x: activations ``[..., in_features]``; any strides.
        weight: the frozen base weight ``[out_features, in_features]``: a tensor, or an ``NF4Weight`` (QLoRA; it is
            dequantized to x's dtype on the fly, never stored dense, and gets no gradient).
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        bias: optional ``[out_features]``.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        training: dropout applies only when True.
        seed: the dropout mask's seed; drawn from torch's default generator when None. The same seed gives the same
            mask on every backend and device.

    Returns ``[..., out_features]`` in x's dtype. Gradients flow to every input that requires grad.
    Under ``torch.autocast`` the floating inputs other than float64 are cast to the autocast dtype first, as for
    ``nn.Linear``.
    """
    if isinstance(x, torch.Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        # autocast's rule for its lower-precision ops (nn.Linear's among them): floating tensors other than float64
        cast = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_A, lora_B, bias = (
            t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, weight, lora_A, lora_B, bias))
    _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p)
    _refuse_transforms((x, weight if isinstance(weight, torch.Tensor) else None, lora_A, lora_B, bias))

    p = float(dropout_p) if training else 0.0
    seed_t = seed_tensor(seed) if p > 0.0 else None

    in_features, out_features = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    # in_features == 0 (as nn.Linear(0, N) allows): -1 cannot be inferred from zero elements, so count the rows
    x2 = x.reshape(-1, in_features) if in_features else x.reshape(lead.numel(), 0)
    backend = _select_backend(x2, out_features)
    weight_tensors, weight_meta = pack_weight(weight)
    with _autocast_off(x.device.type):
        y = FusedLoraFunction.apply(x2, lora_A, lora_B, bias, float(scaling), p, seed_t, backend, weight_meta,
                                    *weight_tensors)
    if x.dim() == 2:
        return y
    # y is a fresh tensor nobody else views: give it its [..., out] shape without making it a view (as matmul does),
    # so that wrappers that refuse view outputs (FSDP2 warns about them) see a plain tensor.
    return torch.ops.aten._unsafe_view(y, (*lead, out_features))
