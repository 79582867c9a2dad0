"""``FusedLoraLinear``: a drop-in LoRA linear layer running the fused kernels, on a dense or an NF4 (QLoRA) base."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fused_lora_linear
from .nf4 import SUPPORTED_DTYPES as NF4_DTYPES
from .nf4 import NF4Weight, _dtype_name, bitsandbytes_classes, quantize_nf4


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass that keeps ``nn.Linear.forward``, e.g. ``NonDynamicallyQuantizableLinear``):
    what FusedLoraLinear can stand in for without dropping behaviour."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _check_lora_args(r, lora_dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


# Buffers holding an NF4 base weight (see fused_lora.nf4.NF4Weight for their meaning).
_NF4_BUFFERS = ("data", "code", "absmax", "qabsmax", "absmax2", "code2", "offset")


class FusedLoraLinear(nn.Module):
    """``y = x W^T + (lora_alpha / r) * B(A(dropout(x))) + bias`` with a frozen ``W`` and trainable ``A``, ``B``.

    Parameters (PEFT's layout): ``weight`` ``[out, in]`` and ``bias`` ``[out]`` frozen; ``lora_A`` ``[r, in]``
    initialised with ``kaiming_uniform_(a=sqrt(5))`` and ``lora_B`` ``[out, r]`` with zeros, so a new adapter
    starts as the identity update. Dropout applies to the LoRA branch's input in training mode only.

    QLoRA: ``from_linear(..., quantize="nf4")`` and ``from_bnb(linear4bit)`` return a :class:`FusedLoraLinearNF4`,
    which keeps the base weight only in its 4-bit form.

    ``merge()`` folds ``scaling * B @ A`` into the base weight (a plain linear forward, for inference);
    ``unmerge()`` subtracts it again. A merged layer does not train its adapter: unmerge before training. On an NF4
    base both re-quantize (see :meth:`merge`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_lora_args(r, lora_dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, factory)
        self._reset_base_parameters()

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, factory) -> None:
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        # Whether W holds the adapter's delta: a buffer, so that a state dict carries it with the weight it
        # describes (loading one restores both); the Python bool is what forward reads (no device sync).
        self.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool, device=factory["device"]))
        self._merged = False
        # Names of the model's other tensors overlapping W's memory (tied weights), found by apply_lora /
        # from_peft: merging into W in place would change them too.
        self.weight_shared_with: Tuple[str, ...] = ()
        self.reset_lora_parameters()

    @property
    def merged(self) -> bool:
        """True while ``scaling * B @ A`` is folded into the base weight (:meth:`merge`)."""
        return self._merged

    # The state-dict key of the base weight (the NF4 layer's packed codes).
    _BASE_KEY = "weight"

    def _set_merged(self, merged: bool) -> None:
        self._merged = merged
        self._sync_merged_buffer()

    def _sync_merged_buffer(self) -> None:
        # The Python bool is the truth; the buffer only carries it into state dicts (and may hold garbage after
        # to_empty()).
        if self.lora_merged.device.type != "meta":
            self.lora_merged.fill_(self._merged)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_merged_buffer()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        flag_key = prefix + "lora_merged"
        flag = state_dict.get(flag_key)
        loads_base = prefix + self._BASE_KEY in state_dict
        loads_adapter = any(prefix + name in state_dict for name in ("lora_A", "lora_B"))
        # New adapter matrices for a merged base weight that stays: unmerge first and merge again after, so that W
        # never holds a delta the layer does not know.
        remerge = self.merged and loads_adapter and not loads_base and flag is None
        if remerge:
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if flag_key in missing_keys:  # state dicts written before the flag existed
            missing_keys.remove(flag_key)
        if flag is not None and flag.device.type != "meta":
            self._merged = bool(flag)  # the loaded weight is merged or not as its state dict says
        elif loads_base:
            self._merged = False  # a base weight without the flag is an unmerged one
        if remerge:
            self.merge()
        self._sync_merged_buffer()

    def _reset_base_parameters(self) -> None:
        # nn.Linear's initialisation, for layers built from scratch (from_linear keeps the given weights).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: A ~ kaiming-uniform(a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------------------------------------------------------
    # construction from existing layers

    @classmethod
    def _wrap(cls, in_features, out_features, bias, r, lora_alpha, lora_dropout, use_rslora, factory):
        _check_lora_args(r, lora_dropout)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.bias = bias
        if bias is not None:
            bias.requires_grad_(False)
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, factory)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        quantize: Optional[str] = None,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> "FusedLoraLinear":
        """Wrap an existing ``nn.Linear``.

        ``quantize=None``: its ``weight`` and ``bias`` Parameters are shared (no copy) and frozen.
        ``quantize="nf4"``: the weight is quantized to NF4 exactly as ``bitsandbytes.functional.quantize_4bit``
        does (``blocksize``, ``double_quant`` = bitsandbytes' ``compress_statistics``); only the 4-bit form is
        kept. ``compute_dtype`` (default: the linear's dtype) is the dtype of the adapters and of the math.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        bnb_bases = bitsandbytes_classes(linear)
        if "Linear4bit" in bnb_bases:
            raise TypeError(f"from_linear got a bitsandbytes {type(linear).__name__} (a 4-bit base): use "
                            "FusedLoraLinear.from_bnb(module, ...) to wrap its NF4 weight as it is")
        if "Linear8bitLt" in bnb_bases:
            raise TypeError(f"from_linear got a bitsandbytes {type(linear).__name__}: 8-bit (LLM.int8) bases are not "
                            "supported")
        if not is_plain_linear(linear):
            raise TypeError(
                f"from_linear expects an nn.Linear; {type(linear).__module__}.{type(linear).__qualname__} is a "
                "subclass with its own forward, whose behaviour FusedLoraLinear would drop: not supported"
            )
        if quantize is None:
            if compute_dtype is not None and compute_dtype != linear.weight.dtype:
                raise ValueError("compute_dtype applies to quantized bases; cast the linear itself for a dense one")
            factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
            layer = cls._wrap(linear.in_features, linear.out_features, linear.bias, r, lora_alpha, lora_dropout,
                              use_rslora, factory)
            layer.weight = linear.weight
            layer.weight.requires_grad_(False)
            return layer
        if quantize != "nf4":
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        nf4 = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return FusedLoraLinearNF4.from_nf4(nf4, linear.bias, r, lora_alpha, lora_dropout, use_rslora,
                                           compute_dtype or linear.weight.dtype)

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "FusedLoraLinear":
        """Wrap a bitsandbytes ``Linear4bit`` (NF4) without re-quantizing: its packed weight and statistics are
        shared, its bias Parameter too. ``compute_dtype`` defaults to the Linear4bit's own, else the weight's
        original dtype. fp4 and other unsupported quantizations raise a ValueError."""
        nf4 = NF4Weight.from_bnb(linear4bit)
        dtype = compute_dtype or getattr(linear4bit, "compute_dtype", None) or nf4.dtype
        return FusedLoraLinearNF4.from_nf4(nf4, linear4bit.bias, r, lora_alpha, lora_dropout, use_rslora, dtype)

    @property
    def quantized(self) -> bool:
        """True when the base weight is stored as NF4 (:class:`FusedLoraLinearNF4`)."""
        return False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the adapters and of the math."""
        return self.lora_A.dtype

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The base weight as a dense ``[out, in]`` tensor (here: ``weight`` itself, cast if ``dtype`` is given)."""
        return self.weight if dtype is None else self.weight.to(dtype)

    # ------------------------------------------------------------------------------------------------------------
    # forward, merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return fused_lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, bias=self.bias,
            dropout_p=self.lora_dropout, training=self.training,
        )

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``scaling * B @ A`` ``[out, in]``, computed in ``dtype`` (default: fp32, or float64 for a float64 layer:
        at least the precision of the weight it is added to)."""
        dtype = dtype or torch.promote_types(self.compute_dtype, torch.float32)
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        self.weight.copy_(self.weight.to(compute) + sign * self.delta_weight(compute))

    def _check_not_shared(self, what: str) -> None:
        if self.weight_shared_with:
            raise RuntimeError(
                f"FusedLoraLinear.{what}(): the base weight is shared with {', '.join(self.weight_shared_with)} "
                f"(tied weights); {what} would change {'it' if len(self.weight_shared_with) == 1 else 'them'} "
                "too. Use fused_lora.merge_and_unload(model), which writes the merged weight into a new tensor, or "
                "untie the weights first"
            )

    def merge(self) -> None:
        """``W += scaling * B @ A``, computed in fp32 (float64 for float64 weights) and rounded once to the
        weight's dtype. On an NF4 base the merged weight is re-quantized to NF4 (see
        :meth:`FusedLoraLinearNF4.merge`). Refused (RuntimeError) when W is shared with another module."""
        if self.merged:
            warnings.warn("FusedLoraLinear.merge(): already merged, nothing to do", stacklevel=2)
            return
        self._check_not_shared("merge")
        self._apply_delta(+1.0)
        self._set_merged(True)

    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= scaling * B @ A`` (restores a dense weight up to the rounding of the two
        updates; an NF4 weight exactly, see :meth:`FusedLoraLinearNF4.merge`)."""
        if not self.merged:
            warnings.warn("FusedLoraLinear.unmerge(): not merged, nothing to do", stacklevel=2)
            return
        self._apply_delta(-1.0)
        self._set_merged(False)

    @torch.no_grad()
    def set_adapter_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Copy new adapter matrices into ``lora_A`` / ``lora_B`` (cast to their dtype). A merged layer is unmerged
        first and merged again with the new adapter, so W never holds a delta the layer does not know."""
        for name, new, have in (("lora_A", lora_A, self.lora_A), ("lora_B", lora_B, self.lora_B)):
            if tuple(new.shape) != tuple(have.shape):
                raise ValueError(f"set_adapter_weights: {name} has shape {list(new.shape)}, the layer expects "
                                 f"{list(have.shape)}")
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        if was_merged:
            self.merge()

    def _base_repr(self) -> str:
        return "dense"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, bias={self.bias is not None}, "
            f"use_rslora={self.use_rslora}, base={self._base_repr()}, merged={self.merged}"
        )


class FusedLoraLinearNF4(FusedLoraLinear):
    """A :class:`FusedLoraLinear` whose frozen base weight is stored only as NF4 (QLoRA).

    Built by ``FusedLoraLinear.from_linear(..., quantize="nf4")`` or ``FusedLoraLinear.from_bnb(linear4bit)``.
    The packed 4-bit codes and their block statistics are buffers ``nf4_data``, ``nf4_code`` and ``nf4_absmax`` or
    (double quantization) ``nf4_qabsmax``, ``nf4_absmax2``, ``nf4_code2``, ``nf4_offset``: about 0.5 byte per
    weight, in bitsandbytes' layout (``nf4_weight.to_state_dict()`` gives bitsandbytes' own keys). ``weight`` is
    None. The layer computes in ``compute_dtype``: inputs are cast to it and outputs back to the input dtype, as
    bitsandbytes' ``Linear4bit`` does; the compute dtype is the adapters' dtype (``module.to(dtype)`` changes it and
    leaves the NF4 buffers exact). W is dequantized on the fly in forward and again in backward, never stored
    dense: inside the GEMM main loop for short inputs, through a transient buffer for long ones (the threshold is
    ``fused_lora.kernels.lora.NF4_FUSED_MAX_TOKENS``); the torch path dequantizes into a transient tensor.
    """

    _BASE_KEY = "nf4_data"

    @classmethod
    def from_nf4(cls, nf4: NF4Weight, bias: Optional[torch.Tensor] = None, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16) -> "FusedLoraLinearNF4":
        """A layer around an existing :class:`NF4Weight` (its tensors are used as they are, not copied)."""
        if compute_dtype not in NF4_DTYPES:
            raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        factory = {"device": nf4.device, "dtype": compute_dtype}
        layer = cls._wrap(nf4.shape[1], nf4.shape[0], bias, r, lora_alpha, lora_dropout, use_rslora, factory)
        layer.weight = None
        for name in _NF4_BUFFERS:
            layer.register_buffer(f"nf4_{name}", getattr(nf4, name), persistent=True)
        layer._nf4_meta = dict(blocksize=nf4.blocksize, shape=list(nf4.shape), dtype=_dtype_name(nf4.dtype),
                               nested_blocksize=nf4.nested_blocksize)
        layer._premerge = None  # the NF4 buffers before merge() (see merge)
        return layer

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .half() / .bfloat16() cast floating-point buffers, which would destroy the NF4
        # statistics (fp32 by format): they follow device moves only. The adapters (and with them the compute
        # dtype) are cast as usual.
        nf4 = {name: getattr(self, f"nf4_{name}") for name in _NF4_BUFFERS if getattr(self, f"nf4_{name}") is not None}
        super()._apply(fn, recurse)
        for name, before in nf4.items():
            after = getattr(self, f"nf4_{name}")
            if after.dtype != before.dtype:
                self._buffers[f"nf4_{name}"] = before.to(after.device)
        if getattr(self, "_premerge", None) is not None:  # kept codes follow the buffers' device
            device = self.nf4_data.device
            self._premerge = {k: None if t is None else t.to(device) for k, t in self._premerge.items()}
        return self

    @property
    def quantized(self) -> bool:
        return True

    @property
    def nf4_weight(self) -> NF4Weight:
        """The NF4 base weight (a view of this layer's buffers)."""
        meta = self._nf4_meta
        return NF4Weight(blocksize=meta["blocksize"], shape=tuple(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                         nested_blocksize=meta["nested_blocksize"],
                         **{name: getattr(self, f"nf4_{name}") for name in _NF4_BUFFERS})

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The NF4 weight dequantized to ``dtype`` (default: the compute dtype): a new ``[out, in]`` tensor."""
        return self.nf4_weight.dequantize(dtype or self.compute_dtype)

    def get_extra_state(self):
        return dict(self._nf4_meta)

    def set_extra_state(self, state) -> None:
        self._nf4_meta = dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        xc = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.merged:
            y = F.linear(xc, self.base_weight(dtype), bias)
        else:
            y = fused_lora_linear(
                xc, self.nf4_weight, self.lora_A, self.lora_B, self.scaling, bias=bias,
                dropout_p=self.lora_dropout, training=self.training,
            )
        return y.to(x.dtype)

    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into the NF4 weight: dequantize, add in fp32, re-quantize with the same block
        size and statistics layout (as PEFT does for bitsandbytes bases). Every element moves to the nearest NF4
        level of its block's new absmax: an error of up to half the gap between neighbouring levels (from about
        0.04 x absmax near 0 to 0.14 x absmax near +-1). The pre-merge codes are kept while merged (another 0.5 byte
        per weight), so :meth:`unmerge` restores them exactly and merge/unmerge cycles do not compound that error.
        A layer loaded in the merged state has no pre-merge codes: its unmerge re-quantizes ``W - scaling * B @ A``
        (with a warning)."""
        super().merge()

    def _apply_delta(self, sign: float) -> None:
        if sign < 0 and getattr(self, "_premerge", None) is not None:
            for name, t in self._premerge.items():
                setattr(self, f"nf4_{name}", t)
            self._premerge = None
            return
        if sign < 0:
            warnings.warn("FusedLoraLinearNF4.unmerge(): the pre-merge NF4 codes are not known (the layer was loaded "
                          "merged); re-quantizing W - scaling * B @ A, which adds one more re-quantization error",
                          stacklevel=3)
        old = self.nf4_weight
        with torch.no_grad():
            merged = old.dequantize(torch.float32) + sign * self.delta_weight(torch.float32)
            new = quantize_nf4(merged.to(old.dtype), blocksize=old.blocksize, double_quant=old.nested)
        if sign > 0:
            self._premerge = {name: getattr(self, f"nf4_{name}") for name in _NF4_BUFFERS}
        for name in _NF4_BUFFERS:
            setattr(self, f"nf4_{name}", getattr(new, name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        replaces_base = prefix + self._BASE_KEY in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if replaces_base:
            self._premerge = None  # codes of the weight that was replaced

    def _base_repr(self) -> str:
        meta = self._nf4_meta
        return (f"nf4(blocksize={meta['blocksize']}, double_quant={self.nf4_qabsmax is not None}, "
                f"compute_dtype={_dtype_name(self.compute_dtype)})")

