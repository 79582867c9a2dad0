"""The functional API, ``fused_lora_linear``, and the autograd Function behind it."""

from __future__ import annotations

import contextlib
import inspect
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _autoselect, dora, torch_ops
from ._backend import resolve_backend
from .base import WEIGHT_KINDS, kind_of
from .dropout import Dropout, seed_tensor
from .nf4 import NF4Weight
from .validation import FLOAT_DTYPES, check_alpha, check_dropout



class LoraGrads(NamedTuple):
    """The gradients of the fused LoRA linear, in the one order used everywhere: the ``needs`` flags given to the
    implementations (``torch_ops`` and the kernels), the tuples they return, and the custom backward operator."""

    x: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    lora_A: Optional[torch.Tensor]
    lora_B: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _select_backend(x: torch.Tensor, out_features: int, adapter_dtype: torch.dtype) -> str:
    """``"triton"``, ``"fastest"`` or ``"torch:<policy>"`` for this call (see fused_lora._backend for the rule).
    The torch path carries the CPU half-precision compute policy in force at forward, so its backward follows the
    same one."""
    backend = resolve_backend(x.device)
    # Empty problems have exact, trivial results (empty outputs, zero gradients): no kernel launch needed. float64
    # (activations or adapters) has no kernels: "auto" computes it on the torch path.
    trivial = x.numel() == 0 or out_features == 0
    float64 = torch.float64 in (x.dtype, adapter_dtype)
    if backend == "torch" or trivial or (backend == "fastest" and float64):
        return f"torch:{torch_ops.get_cpu_half_compute()}"
    if float64:
        raise TypeError(
            f"the Triton backend computes in float32/float16/bfloat16, got float64 tensors (x: {x.dtype}, "
            f"lora_A / lora_B: {adapter_dtype}); use set_backend('torch') (or use_backend('torch')) for float64"
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
# The base weight crosses the operator boundary flattened by its kind (fused_lora.base): the kind's name, a list of
# tensors and a list of ints. Inside, the kind turns them into what the implementations take (tensors and ints).
#
# The forward and backward are registered as custom operators (with fake implementations for shape propagation),
# so torch.compile captures a model using them in one graph (fullgraph=True) instead of breaking at the kernels.
# The dropout seed travels as a 0-dim int64 CPU tensor: drawing it needs no graph break and no device sync.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fused_lora::lora_linear_forward", mutates_args=())
def lora_linear_forward(
    x: torch.Tensor, weight_kind: str, weight: List[Optional[torch.Tensor]], weight_ints: List[int],
    lora_A: torch.Tensor, lora_B: torch.Tensor, bias: Optional[torch.Tensor], scaling: float, dropout_p: float,
    seed: Optional[torch.Tensor], backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)`` for 2-D x: ``y = x W^T + scaling * xa B^T + bias`` and ``xa = D(x) A^T``."""
    w = WEIGHT_KINDS[weight_kind].operands(weight, weight_ints)
    return _run(backend, "lora_forward", x, w, lora_A, lora_B, bias, scaling, _dropout(dropout_p, seed))


@lora_linear_forward.register_fake
def _(x, weight_kind, weight, weight_ints, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    out_features = WEIGHT_KINDS[weight_kind].flat_shape(weight, weight_ints)[0]
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("fused_lora::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight_kind: str, weight: List[Optional[torch.Tensor]],
    weight_ints: List[int], lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float,
    dropout_p: float, seed: Optional[torch.Tensor], backend: str, needs: List[bool],
) -> List[torch.Tensor]:
    """The gradients in :class:`LoraGrads` order; an entry not flagged in ``needs`` (same order) is an empty
    tensor."""
    w = WEIGHT_KINDS[weight_kind].operands(weight, weight_ints)
    grads = _run(backend, "lora_backward", grad_out, x, w, lora_A, lora_B, xa, scaling, _dropout(dropout_p, seed),
                 LoraGrads(*needs))
    return [g if g is not None else x.new_empty(0) for g in grads]


@lora_linear_backward.register_fake
def _(grad_out, x, weight_kind, weight, weight_ints, lora_A, lora_B, xa, scaling, dropout_p, seed, backend, needs):
    weight_shape = WEIGHT_KINDS[weight_kind].flat_shape(weight, weight_ints)
    shapes = LoraGrads(x.shape, weight_shape, lora_A.shape, lora_B.shape, (weight_shape[0],))
    return [x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


# FusedLoraFunction.forward's arguments after ctx, by name (the weight's tensors follow them); its backward returns
# one gradient per argument by name, so nothing depends on positions. (Module level: torch.compile does not read
# class attributes of autograd Functions.)
_FUNCTION_ARGUMENTS = ("x", "lora_A", "lora_B", "bias", "scaling", "dropout_p", "seed", "backend", "weight_kind",
                       "weight_ints")


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

    Dtypes and rounding. x, W, bias and g share the activation dtype ``t``; A and B share the adapters' dtype, which
    may be wider (PEFT keeps fp32 adapters over bf16 / fp16 activations). A and B enter every product rounded to
    ``t`` -- ``Ar = rnd_t(A)``, ``Br = rnd_t(B)`` -- as a tensor core multiplying a 16-bit x by fp32 adapters needs
    one 16-bit operand type; the Triton kernels convert each fp32 A / B tile in registers after its load (other
    adapter dtypes are rounded to ``t`` once by their launch wrappers), the torch path converts the small
    ``[r, K]`` / ``[N, r]`` matrices (to ``t``, then to the dtype it multiplies in), never x. Every product
    accumulates in fp32, and the results are rounded once:

    * ``xa = rnd_t(D(x) Ar^T)`` and ``gb = rnd_t(g Br)`` (in ``t``: operands of later products, as on a GPU);
    * ``y = rnd_t(x W^T + s xa Br^T + bias)``, ``dx = rnd_t(g W + s D(gb Ar))``;
    * ``dB = rnd_a(s g^T xa)`` and ``dA = rnd_a(s gb^T D(x))`` in the adapters' dtype ``a``: no rounding at all for
      fp32 adapters in the kernels (their fp32 accumulators are returned as they are), so the gradients of fp32
      adapters keep fp32 precision while x stays in ``t``. (Where the torch path multiplies in half precision -- on
      CUDA and under the CPU's ``"native"`` policy -- these two products come from half-precision GEMMs, rounded to
      ``t`` first.)

    Since ``rnd_t`` is the identity on ``t``-valued tensors, this is the same-dtype computation when A and B are in
    ``t``; the gradients of A and B are those of ``Ar`` and ``Br`` (the rounding passes the gradient straight
    through, as autograd's cast does). Under ``torch.autocast`` everything is cast to the autocast dtype before
    (:func:`fused_lora_linear`).

    The base weight arrives flattened by its kind (``fused_lora.base``): ``weight_kind``, ``weight_ints`` and the
    tensors ``*weight``. Only a dense W can get a gradient; an NF4 W is dequantized again in backward (never kept
    dense).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, scaling, dropout_p, seed, backend, weight_kind, weight_ints, *weight):
        y, xa = lora_linear_forward(x, weight_kind, list(weight), weight_ints, lora_A, lora_B, bias, scaling,
                                    dropout_p, seed, backend)
        ctx.save_for_backward(x, lora_A, lora_B, xa, seed, *weight)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.weight_kind, ctx.weight_ints = weight_kind, weight_ints
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
            return _refuse_double_backward(FusedLoraFunction.backward, ctx, grad_out)
        x, lora_A, lora_B, xa, seed, *weight = ctx.saved_tensors
        n_args = len(_FUNCTION_ARGUMENTS)
        requested = dict(zip(_FUNCTION_ARGUMENTS, ctx.needs_input_grad))
        # the gradient of a differentiable weight kind belongs to its first (only) tensor
        requested["weight"] = WEIGHT_KINDS[ctx.weight_kind].differentiable and ctx.needs_input_grad[n_args]
        needs = LoraGrads(*(requested[name] for name in LoraGrads._fields))
        with _autocast_off(grad_out.device.type):
            computed = lora_linear_backward(grad_out, x, ctx.weight_kind, weight, ctx.weight_ints, lora_A, lora_B, xa,
                                            ctx.scaling, ctx.dropout_p, seed, ctx.backend, list(needs))
        grads = LoraGrads(*(g if need else None for g, need in zip(computed, needs)))
        by_name = grads._asdict()
        weight_grads = [grads.weight] + [None] * (len(weight) - 1)
        return (*(by_name.get(name) for name in _FUNCTION_ARGUMENTS), *weight_grads)


# The gradients are routed by these names: they must be forward's parameters, in order.
assert tuple(inspect.signature(FusedLoraFunction.forward).parameters)[1:-1] == _FUNCTION_ARGUMENTS

# ----------------------------------------------------------------------------------------------------------------
# DoRA: its own operators and Function (more inputs, more saved tensors, another gradient), the same boundary.
# ----------------------------------------------------------------------------------------------------------------


class DoraGrads(NamedTuple):
    """The gradients of the fused DoRA linear, in the order of the ``needs`` flags, the implementations' results
    and the custom backward operator."""

    x: Optional[torch.Tensor]
    lora_A: Optional[torch.Tensor]
    lora_B: Optional[torch.Tensor]
    magnitude: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


@torch.library.custom_op("fused_lora::dora_linear_forward", mutates_args=())
def dora_linear_forward(
    x: torch.Tensor, weight_kind: str, weight: List[Optional[torch.Tensor]], weight_ints: List[int],
    lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, bias: Optional[torch.Tensor],
    weight_norm_sq: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, xa, z, c, n)`` for 2-D x (:class:`FusedDoraFunction`); the weight norm is computed inside, so that its
    data-dependent fallback stays out of compiled graphs."""
    w = WEIGHT_KINDS[weight_kind].operands(weight, weight_ints)
    scale, norm = dora.dora_scale(w, x.dtype, lora_A, lora_B, magnitude, scaling, weight_norm_sq)
    y, xa, z = _run(backend, "dora_forward", x, w, lora_A, lora_B, bias, scaling, _dropout(dropout_p, seed), scale)
    return y, xa, z, scale, norm


@dora_linear_forward.register_fake
def _(x, weight_kind, weight, weight_ints, lora_A, lora_B, magnitude, bias, weight_norm_sq, scaling, dropout_p, seed,
      backend):
    out_features = WEIGHT_KINDS[weight_kind].flat_shape(weight, weight_ints)[0]
    ndt = dora.norm_dtype(x, lora_A, lora_B, magnitude)
    return (x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0])),
            x.new_empty((x.shape[0], out_features)), x.new_empty((out_features,), dtype=ndt),
            x.new_empty((out_features,), dtype=ndt))


@torch.library.custom_op("fused_lora::dora_linear_backward", mutates_args=())
def dora_linear_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight_kind: str, weight: List[Optional[torch.Tensor]],
    weight_ints: List[int], lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, z: torch.Tensor,
    scale: torch.Tensor, norm: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
    backend: str, needs: List[bool],
) -> List[torch.Tensor]:
    """The gradients in :class:`DoraGrads` order; an entry not flagged in ``needs`` is an empty tensor."""
    w = WEIGHT_KINDS[weight_kind].operands(weight, weight_ints)
    grads = _run(backend, "dora_backward", grad_out, x, w, lora_A, lora_B, xa, z, scale, norm, scaling,
                 _dropout(dropout_p, seed), DoraGrads(*needs))
    return [g if g is not None else x.new_empty(0) for g in grads]


@dora_linear_backward.register_fake
def _(grad_out, x, weight_kind, weight, weight_ints, lora_A, lora_B, xa, z, scale, norm, scaling, dropout_p, seed,
      backend, needs):
    shapes = DoraGrads(x.shape, lora_A.shape, lora_B.shape, scale.shape, scale.shape)
    dtypes = DoraGrads(x.dtype, lora_A.dtype, lora_B.dtype, scale.dtype, x.dtype)
    return [x.new_empty(shape if need else (0,), dtype=dt) for shape, dt, need in zip(shapes, dtypes, needs)]


_DORA_ARGUMENTS = ("x", "lora_A", "lora_B", "magnitude", "bias", "weight_norm_sq", "scaling", "dropout_p", "seed",
                   "backend", "weight_kind", "weight_ints")


class FusedDoraFunction(torch.autograd.Function):
    r"""Autograd Function of the fused DoRA linear (PEFT 0.21's DoRA) on 2-D inputs.

    Notation as in :class:`FusedLoraFunction`, plus the trainable magnitude m ``[N]`` and, per output feature,
    the weight norm ``n = ||W + s B A||_row`` -- **detached**: a constant of the step, no gradient flows through it
    (DoRA paper, section 4.3; PEFT) -- and the column scale ``c = m / n`` ``[N]``. ``c`` scales columns of
    ``[M, N]`` tensors (``c * z``). n is computed without ``[N, K]`` temporaries
    (:func:`fused_lora.dora.dora_row_norm_sq`: ``||W_i||^2`` cached per frozen W, one thin ``W A^T``).

    Forward, with ``L = xa B^T`` and ``xa = D(x) A^T``::

        z = D(x) W^T + s L                                  [M, N]   (saved: dm needs it)
        y = (x W^T + s L) + (c - 1) * z + b
          = x W^T + b + (c - 1) * (D(x) W^T) + c * s L      (PEFT's form, expanded)
        p = 0 (D = identity):  z = x W^T + s L,  y = c * z + b

    Backward, ``g = dL/dy``. Element-wise, ``y[i,n] = sum_k x[i,k] W[n,k] + b[n] + (c_n - 1) bd[i,n]
    + c_n s sum_j xa[i,j] B[n,j]`` with ``bd = D(x) W^T``, and ``c_n = m_n / n_n`` with n a constant:

    * ``dL/dm_n = sum_i g[i,n] (bd[i,n] + s L[i,n]) / n_n``            ->  ``dm = colsum(g * z) / n``
    * with ``gc = g * c`` (columns scaled): ``dL/dB[n,j] = s sum_i gc[i,n] xa[i,j]``  ->  ``dB = s gc^T xa``
    * ``gb = gc B`` ``[M, r]``; through ``xa = D(x) A^T``:                ->  ``dA = s gb^T D(x)``
    * x reaches y through ``x W^T`` (weight 1), through ``bd`` (weight ``c - 1``, behind D) and through xa (behind
      D); D is linear and its own adjoint (same mask, same ``1/q``)::

          dx = g W + D( (g * (c - 1)) W + s gb A )
          p = 0:  dx = gc W + s gb A                  (g W + (g * (c - 1)) W = (g * c) W)

    * ``dbias = colsum(g)``. W gets no gradient (a W requiring grad is refused), nor does n.

    Saved for backward: x, W (or its NF4 codes), A, B, xa ``[M, r]``, z ``[M, N]`` (in x's dtype), c and n
    ``[N]``, the seed: nothing of size ``M x K`` but x; the mask is regenerated from the seed.

    Dtypes and rounding follow :class:`FusedLoraFunction` (A, B rounded to x's dtype where they enter products,
    fp32 accumulation, xa / gb / z kept in x's dtype). ``gc = g * c`` and ``g * (c - 1)`` are rounded to x's dtype
    as GEMM operands. c, n and the column epilogues are fp32 (float64 for float64 inputs); dm is computed in fp32
    and returned in m's dtype.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, bias, weight_norm_sq, scaling, dropout_p, seed, backend,
                weight_kind, weight_ints, *weight):
        y, xa, z, scale, norm = dora_linear_forward(x, weight_kind, list(weight), weight_ints, lora_A, lora_B,
                                                    magnitude, bias, weight_norm_sq, scaling, dropout_p, seed,
                                                    backend)
        ctx.save_for_backward(x, lora_A, lora_B, xa, z, scale, norm, seed, *weight)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.weight_kind, ctx.weight_ints = weight_kind, weight_ints
        ctx.magnitude_dtype = magnitude.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
            return _refuse_double_backward(FusedDoraFunction.backward, ctx, grad_out)
        x, lora_A, lora_B, xa, z, scale, norm, seed, *weight = ctx.saved_tensors
        requested = dict(zip(_DORA_ARGUMENTS, ctx.needs_input_grad))
        needs = DoraGrads(*(requested[name] for name in DoraGrads._fields))
        with _autocast_off(grad_out.device.type):
            computed = dora_linear_backward(grad_out, x, ctx.weight_kind, weight, ctx.weight_ints, lora_A, lora_B,
                                            xa, z, scale, norm, ctx.scaling, ctx.dropout_p, seed, ctx.backend,
                                            list(needs))
        grads = DoraGrads(*(g if need else None for g, need in zip(computed, needs)))
        grads = grads._replace(
            magnitude=None if grads.magnitude is None else grads.magnitude.to(ctx.magnitude_dtype),
            bias=None if grads.bias is None else grads.bias.to(ctx.bias_dtype))
        by_name = grads._asdict()
        return (*(by_name.get(name) for name in _DORA_ARGUMENTS), *([None] * len(weight)))


assert tuple(inspect.signature(FusedDoraFunction.forward).parameters)[1:-1] == _DORA_ARGUMENTS


def _validate_dora(x, weight, magnitude, weight_norm_sq) -> None:
    out_features = weight.shape[0]
    for name, t in (("magnitude", magnitude), ("weight_norm_sq", weight_norm_sq)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (out_features,):
            raise ValueError(f"{name} has shape {list(t.shape)}; expected [out_features] = [{out_features}]")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")
        if t.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {t.device}")
    if weight_norm_sq is not None and weight_norm_sq.requires_grad:
        raise ValueError("weight_norm_sq is the cached ||W_i||^2 of the frozen weight: it takes no gradient "
                         "(pass it detached)")
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("DoRA: the base weight must be frozen (no gradient flows through W or the weight norm); "
                         "got a weight that requires grad")



def _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p):
    """The checks of every call; returns the weight's kind (fused_lora.base). Messages are formatted only on
    failure (formatting them all cost ~60 us per call)."""
    names = {"x": x, "lora_A": lora_A, "lora_B": lora_B}
    if isinstance(weight, torch.Tensor):  # a dense weight: dtype and device checked with the other tensors
        names["weight"] = weight
    if bias is not None:
        names["bias"] = bias
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        kind = kind_of(weight)
    except TypeError:
        raise TypeError(f"weight must be a torch.Tensor (or an NF4Weight), got {type(weight).__name__}") from None
    if x.dim() < 1:
        raise ValueError("x must have shape [..., in_features]; got a 0-dim tensor")
    kind.check_value(weight, x)
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
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16 (float64 on the "
                            "torch backend)")
        if name in ("lora_A", "lora_B"):
            if t.dtype != lora_A.dtype:  # (lora_A: always equal to itself)
                raise TypeError(f"dtype mismatch: lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}; the "
                                "adapters must share one dtype (which may differ from x's)")
        elif t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {x.dtype} but {name} is {t.dtype}; x, weight and bias must share "
                            "one dtype (lora_A / lora_B may differ; cast the module with .to(dtype), or run under "
                            "torch.autocast)")
        if t.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {t.device}")
    check_alpha(scaling, "scaling")
    check_dropout(dropout_p, "dropout_p")
    return kind


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
    *,
    magnitude: Optional[torch.Tensor] = None,
    weight_norm_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x @ W^T + scaling * (dropout(x) @ A^T) @ B^T + bias`` for x of shape ``[..., in_features]``; with
    ``magnitude``, PEFT's DoRA linear.

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
        magnitude: DoRA's trainable magnitude m ``[out_features]`` (PEFT's ``lora_magnitude_vector``), any floating
            dtype: then ``y = x W^T + b + (c - 1) * (D(x) W^T) + c * scaling * D(x) A^T B^T`` with
            ``c = m / ||W + scaling B A||_row`` (the norm detached; with D = identity, ``y = c * (x W^T + scaling
            x A^T B^T) + b``). W must be frozen. A zero row of ``W + scaling B A`` (``in_features = 0`` too) has
            ``n = 0`` and gives ``c = m / 0``, as in PEFT. Details: :class:`FusedDoraFunction`.
        weight_norm_sq: DoRA only: the cached ``||W_i||^2`` of the frozen W (``fused_lora.dora.WeightNormCache``;
            for an NF4 W, of W dequantized to x's dtype), ``[out_features]`` in fp32 (float64 for a float64 W);
            computed when None.

    Dtypes: x, a dense weight and bias share one dtype (float32, float16 or bfloat16; float64 on the torch backend).
    lora_A and lora_B share one floating dtype, which may differ from x's -- PEFT keeps fp32 adapters over bf16 /
    fp16 activations -- (float64 adapters on the torch backend only). A and B are rounded to x's dtype where they
    enter a product (no copy of x is made in another dtype), every product accumulates in fp32, and ``xa`` / ``gb``
    are kept in x's dtype; the gradients of A and B are returned in the adapters' dtype (details:
    :class:`FusedLoraFunction`).

    Returns ``[..., out_features]`` in x's dtype. Gradients flow to every input that requires grad.
    Under ``torch.autocast`` the floating inputs other than float64 are cast to the autocast dtype first, as for
    ``nn.Linear`` (fp32 adapters too: the computation is then the same-dtype one).
    """
    if isinstance(x, torch.Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        # autocast's rule for its lower-precision ops (nn.Linear's among them): floating tensors other than float64
        cast = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_A, lora_B, bias = (
            t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, weight, lora_A, lora_B, bias))
    kind = _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p)
    if magnitude is not None:
        _validate_dora(x, weight, magnitude, weight_norm_sq)
    elif weight_norm_sq is not None:
        raise ValueError("weight_norm_sq is DoRA's cached weight norm: it needs magnitude")
    _refuse_transforms((x, weight if isinstance(weight, torch.Tensor) else None, lora_A, lora_B, bias, magnitude))

    p = float(dropout_p) if training else 0.0
    seed_t = seed_tensor(seed) if p > 0.0 else None

    in_features, out_features = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    # in_features == 0 (as nn.Linear(0, N) allows): -1 cannot be inferred from zero elements, so count the rows
    x2 = x.reshape(-1, in_features) if in_features else x.reshape(lead.numel(), 0)
    backend = _select_backend(x2, out_features, lora_A.dtype)
    weight_tensors, weight_ints = kind.flatten(weight)
    with _autocast_off(x.device.type):
        if magnitude is None:
            y = FusedLoraFunction.apply(x2, lora_A, lora_B, bias, float(scaling), p, seed_t, backend, kind.kind,
                                        weight_ints, *weight_tensors)
        else:
            y = FusedDoraFunction.apply(x2, lora_A, lora_B, magnitude, bias, weight_norm_sq, float(scaling), p,
                                        seed_t, backend, kind.kind, weight_ints, *weight_tensors)
    if x.dim() == 2:
        return y
    # y is a fresh tensor nobody else views: give it its [..., out] shape without making it a view (as matmul does),
    # so that wrappers that refuse view outputs (FSDP2 warns about them) see a plain tensor.
    return torch.ops.aten._unsafe_view(y, (*lead, out_features))
