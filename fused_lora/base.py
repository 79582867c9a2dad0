"""The frozen base weight of a LoRA layer: one contract, one class per storage format.

A :class:`BaseWeight` is an ``nn.Module`` that owns (or shares, without copying) the storage of a ``[out, in]``
weight and everything that depends on its format:

* ``value()``: the weight as ``fused_lora_linear`` takes it -- a dense tensor, or an :class:`~fused_lora.nf4.NF4Weight`
  viewing the module's buffers;
* ``dequantize(dtype)``: a dense tensor (the weight itself when it is already dense in that dtype);
* ``compute_dtype``: the dtype the layer's math runs in over this base (a dense weight's own dtype; a quantized
  weight's is chosen, and the layer casts its input to it);
* ``merge(delta)`` / ``unmerge(delta)``: fold an additive update ``delta`` (fp32 or float64 ``[out, in]``: LoRA's
  ``s B A``, or DoRA's ``W' - W``) into the weight and take it out again;
* its device and dtype rules (``module.to(dtype)`` casts a dense weight, never NF4 codes or statistics, and sets the
  compute dtype of both) and its state-dict entries;
* for the custom-operator boundary, a pair of class methods: ``flatten(value)`` into a list of tensors plus a list of
  ints, and ``operands(tensors, ints)``, what the kernels and the torch path take (tensors and ints only).

``WEIGHT_KINDS`` maps each kind's name to its class; :func:`kind_of` finds the class of a weight value. A new storage
format (8-bit, say) is one subclass plus one entry there: its ``operands`` object needs a ``dequantize(dtype)`` for
the torch path, which then runs it everywhere; the Triton kernels read the operands of the formats they decode
(``fused_lora.kernels.lora._weight_args``).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn

from .nf4 import NF4Weight, quantize_nf4
from .validation import FLOAT_DTYPES, HALF_AND_SINGLE, check_compute_dtype

WeightValue = Union[torch.Tensor, NF4Weight]


class BaseWeight(nn.Module):
    """The contract every base-weight format implements (see the module docstring)."""

    kind: str = ""  # the key of WEIGHT_KINDS
    value_type: type = object  # the type of value()
    # Whether the weight itself can get a gradient (a dense weight the user unfroze); a quantized one cannot.
    differentiable: bool = False
    # Whether the layer casts its input to compute_dtype and its output back (bitsandbytes' Linear4bit semantics
    # for quantized bases); a dense base computes in the input's dtype like nn.Linear.
    casts_input: bool = False

    # The dtypes the layer may compute in over this base.
    compute_dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES

    in_features: int
    out_features: int

    @classmethod
    def check_value(cls, value, x: torch.Tensor) -> None:
        """Raise a clear error when ``value`` (this kind's weight) cannot be used with activations ``x``."""
        raise NotImplementedError

    def value(self) -> WeightValue:
        raise NotImplementedError

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the dense weight this base stands for."""
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the layer's math over this base (activations, W as the products take it, the output)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def merge(self, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def unmerge(self, delta: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def dense_with(self, delta: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``W + delta`` (or W alone when ``delta`` is None) as a new dense tensor in ``dtype``: added in at least
        fp32 (float64 for a float64 weight), or in the delta's dtype where that is wider (a DoRA delta ``W' - W``
        in float64 over an fp32 W: ``W + delta`` is then ``W'`` before the one rounding), and rounded once. The one
        definition of a merged weight."""
        stored = torch.promote_types(self.dtype, torch.float32)
        w = self.dequantize(stored)
        if delta is not None:
            compute = torch.promote_types(stored, delta.dtype)
            w = w.to(compute) + delta.to(compute)
        return w.to(dtype, copy=True)

    # the custom-operator boundary
    @classmethod
    def flatten(cls, value) -> Tuple[List[Optional[torch.Tensor]], List[int]]:
        raise NotImplementedError

    @classmethod
    def operands(cls, tensors: List[Optional[torch.Tensor]], ints: List[int]):
        raise NotImplementedError

    @classmethod
    def flat_shape(cls, tensors: List[Optional[torch.Tensor]], ints: List[int]) -> Tuple[int, int]:
        raise NotImplementedError


class DenseBase(BaseWeight):
    """A dense frozen weight: the Parameter ``weight`` ``[out, in]`` (an ``nn.Linear``'s own, when wrapping one)."""

    kind = "dense"
    value_type = torch.Tensor
    differentiable = True
    casts_input = False

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.weight = weight

    @classmethod
    def check_value(cls, value: torch.Tensor, x: torch.Tensor) -> None:
        if value.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(value.shape)}")
        # dtype and device are checked with the other tensors (fused_lora.functional)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of the weight."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def value(self) -> torch.Tensor:
        return self.weight

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.weight if dtype is None else self.weight.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The weight's own dtype: a dense base computes like ``nn.Linear``."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @torch.no_grad()
    def merge(self, delta: torch.Tensor) -> None:
        self.weight.copy_(self.dense_with(delta, self.weight.dtype))

    @torch.no_grad()
    def unmerge(self, delta: torch.Tensor) -> None:
        self.weight.copy_(self.dense_with(-delta, self.weight.dtype))

    @classmethod
    def flatten(cls, value: torch.Tensor):
        return [value], []

    @classmethod
    def operands(cls, tensors, ints) -> torch.Tensor:
        return tensors[0]

    @classmethod
    def flat_shape(cls, tensors, ints):
        return tuple(tensors[0].shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


# The NF4 fields stored as fp32: kept in buffers as int32 bit patterns, so that module.to(dtype) / .half() (which
# cast floating-point tensors) leave these format bits exact; the state dict holds them as fp32, as bitsandbytes
# writes them.
_FP32_FIELDS = frozenset(name for name in NF4Weight.TENSOR_FIELDS if name not in ("data", "qabsmax"))
_PREFIX = "nf4_"  # buffer names: nf4_data, nf4_absmax, ... (the state-dict keys)
_PREMERGE = "premerge_"  # the codes before merge(), kept so that unmerge() restores them exactly (not saved)


def _to_storage(name: str, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.view(torch.int32) if t is not None and name in _FP32_FIELDS else t


def _from_storage(name: str, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.view(torch.float32) if t is not None and name in _FP32_FIELDS else t


class NF4Base(BaseWeight):
    """An NF4 (QLoRA) frozen weight in bitsandbytes' layout, about 0.5 byte per weight, never stored dense.

    Buffers ``nf4_data``, ``nf4_code`` and ``nf4_absmax`` or (double quantization) ``nf4_qabsmax``,
    ``nf4_absmax2``, ``nf4_code2``, ``nf4_offset`` (see :class:`~fused_lora.nf4.NF4Weight`); the block size, shape
    and original dtype travel in the state dict's extra state. The buffers may be views of a bitsandbytes
    ``Params4bit``'s tensors (``from_bnb``: shared, not copied).

    ``compute_dtype`` (float32, float16 or bfloat16; default: the original weight's dtype) is what W is dequantized
    to and the layer computes in, like bitsandbytes' ``Linear4bit.compute_dtype``: independent of the adapters'
    dtype (fp32 adapters over bf16 math, as PEFT keeps them on a QLoRA base). ``module.to(dtype)`` / ``.half()`` /
    ``.bfloat16()`` / ``.float()`` set it.

    Merging re-quantizes ``W + delta`` with the same block size and statistics layout, as PEFT does for bitsandbytes
    bases: every element moves to the nearest NF4 level of its block's new absmax, an error of up to half the gap
    between neighbouring levels (about 0.04 x absmax near 0 to 0.14 x absmax near +-1). The pre-merge codes are kept
    while merged (another 0.5 byte per weight), so :meth:`unmerge` restores them exactly and merge / unmerge cycles
    do not compound that error. A base loaded merged has no pre-merge codes: its unmerge re-quantizes
    ``W - delta``, with a warning.
    """

    kind = "nf4"
    value_type = NF4Weight
    differentiable = False
    casts_input = True
    compute_dtypes = HALF_AND_SINGLE

    @classmethod
    def check_value(cls, value: NF4Weight, x: torch.Tensor) -> None:
        if x.dtype not in cls.compute_dtypes:
            raise TypeError(f"an NF4 weight computes in float32, float16 or bfloat16, got x of dtype {x.dtype}")
        if value.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but the NF4 weight is on {value.device}")

    def __init__(self, nf4: NF4Weight, compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.out_features, self.in_features = nf4.shape
        self._store(_PREFIX, nf4, persistent=True)
        self._store(_PREMERGE, None, persistent=False)
        self.compute_dtype = compute_dtype or nf4.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute_dtype_tag.dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        check_compute_dtype(dtype, self.compute_dtypes)
        # Held as the dtype of an empty buffer: nn.Module.to(dtype) / .half() / ... cast floating buffers, so they
        # set it exactly when they would cast a dense weight (nn.Module has no other hook into a dtype cast), while
        # the NF4 fields, stored as integers, stay exact. Not saved: a state dict holds the format, not how this
        # process computes with it (bitsandbytes does not save its compute_dtype either).
        self.register_buffer("compute_dtype_tag", torch.empty(0, dtype=dtype, device=self.nf4_data.device),
                             persistent=False)

    def _store(self, prefix: str, nf4: Optional[NF4Weight], persistent: bool) -> None:
        for name in NF4Weight.TENSOR_FIELDS:
            t = None if nf4 is None else getattr(nf4, name)
            self.register_buffer(prefix + name, _to_storage(name, t), persistent=persistent)
        if nf4 is not None and prefix == _PREFIX:
            self._meta = dict(blocksize=nf4.blocksize, shape=list(nf4.shape), dtype=str(nf4.dtype).replace("torch.", ""),
                              nested_blocksize=nf4.nested_blocksize)

    def _stored(self, prefix: str) -> Dict[str, Optional[torch.Tensor]]:
        return {name: _from_storage(name, getattr(self, prefix + name)) for name in NF4Weight.TENSOR_FIELDS}

    def value(self) -> NF4Weight:
        """The NF4 weight (views of this module's buffers)."""
        meta = self._meta
        return NF4Weight(blocksize=meta["blocksize"], shape=tuple(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                         nested_blocksize=meta["nested_blocksize"], **self._stored(_PREFIX))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A new dense ``[out, in]`` tensor in ``dtype`` (default: the original weight's dtype)."""
        return self.value().dequantize(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._meta["dtype"])

    @property
    def device(self) -> torch.device:
        return self.nf4_data.device

    @property
    def double_quant(self) -> bool:
        return self.nf4_qabsmax is not None

    @property
    def blocksize(self) -> int:
        return self._meta["blocksize"]

    def _requantized(self, delta: torch.Tensor) -> NF4Weight:
        """``W + delta`` quantized again with this weight's block size and statistics layout."""
        old = self.value()
        return quantize_nf4(self.dense_with(delta, old.dtype), blocksize=old.blocksize, double_quant=old.nested)

    @torch.no_grad()
    def merge(self, delta: torch.Tensor) -> None:
        new = self._requantized(delta)
        self._store(_PREMERGE, self.value(), persistent=False)
        self._store(_PREFIX, new, persistent=True)

    @torch.no_grad()
    def unmerge(self, delta: torch.Tensor) -> None:
        if self.premerge_data is not None:  # the codes from before merge(): restored exactly
            for name in NF4Weight.TENSOR_FIELDS:
                setattr(self, _PREFIX + name, getattr(self, _PREMERGE + name))
            self._store(_PREMERGE, None, persistent=False)
            return
        warnings.warn("unmerge(): the pre-merge NF4 codes are not known (the layer was loaded merged); "
                      "re-quantizing W - delta (scaling * B @ A; DoRA: W' - W), which adds one more re-quantization "
                      "error", stacklevel=3)
        self._store(_PREFIX, self._requantized(-delta), persistent=True)

    # state dict: the fp32 fields as fp32 (bitsandbytes' dtypes), the non-tensor fields as extra state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _FP32_FIELDS:
            key = prefix + _PREFIX + name
            if key in destination:
                destination[key] = _from_storage(name, destination[key])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        replaces = prefix + _PREFIX + "data" in state_dict
        for name in NF4Weight.TENSOR_FIELDS:
            key = prefix + _PREFIX + name
            t = state_dict.get(key)
            if t is not None and name in _FP32_FIELDS and t.is_floating_point():
                state_dict[key] = _to_storage(name, t.to(torch.float32))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if replaces:
            self._store(_PREMERGE, None, persistent=False)  # codes of the weight that was replaced

    def get_extra_state(self):
        return dict(self._meta)

    def set_extra_state(self, state) -> None:
        self._meta = dict(state)

    @classmethod
    def flatten(cls, value: NF4Weight):
        return value.flatten()

    @classmethod
    def operands(cls, tensors, ints):
        return NF4Weight.operands_from_flat(tensors, ints)

    @classmethod
    def flat_shape(cls, tensors, ints):
        return NF4Weight.flat_shape(ints)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}")


WEIGHT_KINDS: Dict[str, Type[BaseWeight]] = {cls.kind: cls for cls in (DenseBase, NF4Base)}


def kind_of(value) -> Type[BaseWeight]:
    """The :class:`BaseWeight` class whose ``value()`` has the type of ``value`` (a tensor or an NF4Weight)."""
    for cls in WEIGHT_KINDS.values():
        if isinstance(value, cls.value_type):
            return cls
    raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(value).__name__}")
