"""``FusedLoraLinear``: a drop-in LoRA linear layer running the fused kernels, on a dense or an NF4 (QLoRA) base."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import BaseWeight, DenseBase, NF4Base
from .dora import WeightNormCache, dora_weight_norm
from .functional import fused_lora_linear
from .nf4 import NF4Weight, bitsandbytes_classes, quantize_nf4
from .validation import (adapter_dtype_for, check_alpha, check_compute_dtype, check_dropout, check_rank, check_use_dora,
                         quantized_math_dtype)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass that keeps ``nn.Linear.forward``, e.g. ``NonDynamicallyQuantizableLinear``):
    what FusedLoraLinear can stand in for without dropping behaviour."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class FusedLoraLinear(nn.Module):
    """``y = x W^T + (lora_alpha / r) * B(A(dropout(x))) + bias`` with a frozen base ``W`` and trainable ``A``, ``B``.

    The base weight is a submodule ``base`` (:mod:`fused_lora.base`): dense (:class:`DenseBase`, the Parameter
    ``weight``) or NF4 (:class:`NF4Base`, QLoRA: 4-bit codes and block statistics in bitsandbytes' layout, never
    stored dense). ``bias`` ``[out]`` is frozen; ``lora_A`` ``[r, in]`` is initialised with
    ``kaiming_uniform_(a=sqrt(5))`` and ``lora_B`` ``[out, r]`` with zeros, so a new adapter starts as the identity
    update (PEFT's layout and initialisation). Dropout applies to the LoRA branch's input in training mode only.

    State-dict keys follow the module tree, as PEFT's ``base_layer.weight`` does: ``base.weight`` (dense) or
    ``base.nf4_data``, ``base.nf4_absmax``, ... (NF4, bitsandbytes' tensors), ``bias``, ``lora_A``, ``lora_B``,
    ``lora_merged`` -- the names ``named_parameters()`` gives, which FSDP's state-dict handling requires. State
    dicts with the base's entries directly under the layer (``weight``, ``nf4_data``: fused-lora before 0.1.0's
    base-weight contract) load too.

    A dense base computes in the input's dtype, like ``nn.Linear``. A quantized base computes in its
    ``compute_dtype`` (``module.to(dtype)`` changes it and leaves the NF4 buffers exact), or in the input's dtype
    where that is wider (fp32 activations over bf16 compute: :func:`~fused_lora.validation.quantized_math_dtype`,
    which keeps a young fp32 adapter's term from being rounded away): inputs are cast to it and outputs back to the
    input dtype, as bitsandbytes' ``Linear4bit`` does. An NF4 W is dequantized on the fly in
    forward and again in backward: inside the GEMM main loop for short inputs, through a transient buffer for long
    ones (``fused_lora.kernels.lora.NF4_FUSED_MAX_TOKENS``); the torch path dequantizes into a transient tensor.

    The adapters have their own dtype, ``adapter_dtype``: by default PEFT's (``autocast_adapter_dtype=True``),
    float32 over float16 / bfloat16 math and the compute dtype otherwise (:func:`~fused_lora.validation.
    adapter_dtype_for`); an explicit dtype is kept (e.g. ``torch.bfloat16`` for all-bf16 training). fp32 adapters
    are multiplied with half-precision activations without an fp32 copy of them, and their gradients are fp32
    (:class:`~fused_lora.functional.FusedLoraFunction`). ``module.to(dtype)`` casts the adapters too, as for any
    ``nn.Module`` (and PEFT's layers).

    ``merge()`` folds ``scaling * B @ A`` into the base weight (a plain linear forward, for inference);
    ``unmerge()`` takes it out again. A merged layer does not train its adapter: unmerge before training.

    DoRA (``use_dora=True``, PEFT's ``use_dora``): one more trainable Parameter, ``lora_magnitude_vector`` ``m``
    ``[out]`` in the adapter dtype, and, with ``n = ||W + s B A||`` per output row (detached) and ``c = m / n``::

        y = c * (x W^T + s x A^T B^T) + b                                   (eval, or lora_dropout = 0)
        y = x W^T + b + (c - 1) * (D(x) W^T) + c * s * D(x) A^T B^T        (training with dropout D)

    ``m`` starts as ``n`` (``||W||`` with B = 0), so a new DoRA layer computes exactly its base layer. ``||W_i||^2``
    of the frozen W (the dequantized NF4 weight in the math dtype, for a QDoRA base) is computed once and cached
    (:class:`~fused_lora.dora.WeightNormCache`, dropped on merge / unmerge / load / ``.to()``); the rest of ``n``
    costs one thin ``W A^T`` product per step (:func:`fused_lora.dora.dora_row_norm_sq`). ``merge()`` folds PEFT's
    merged weight ``W' = c[:, None] * (W + s B A)`` into the base, keeping ``n`` for ``unmerge()``.
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
        adapter_dtype: Optional[torch.dtype] = None,
        use_dora: bool = False,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        base = DenseBase(nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False))
        bias_param = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._setup(base, bias_param, r, lora_alpha, lora_dropout, use_rslora, device,
                    adapter_dtype_for(base.compute_dtype, adapter_dtype), use_dora, init_magnitude=False)
        # nn.Linear's initialisation (after the adapters', an order kept for seeded runs)
        base.reset_parameters()
        if bias_param is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(bias_param, -bound, bound)
        if self.use_dora:  # m = ||W + s B A|| needs W's values: after them (no random numbers drawn)
            self.reset_magnitude()

    @classmethod
    def from_base(cls, base: BaseWeight, bias: Optional[torch.Tensor] = None, r: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0, use_rslora: bool = False, compute_dtype: Optional[torch.dtype] = None,
                  adapter_dtype: Optional[torch.dtype] = None, use_dora: bool = False) -> "FusedLoraLinear":
        """A layer around an existing base weight (its storage is used as it is, not copied) and an optional bias
        Parameter (shared, frozen). ``compute_dtype``: the dtype of the math, set on a quantized base (default: the
        base's own); a dense base computes in its weight's dtype. ``adapter_dtype``: the dtype of A and B (and of
        DoRA's magnitude; default: :func:`~fused_lora.validation.adapter_dtype_for` the compute dtype, PEFT's rule).
        ``use_dora``: a DoRA layer (see the class), its magnitude initialised from the base weight."""
        if compute_dtype is not None and compute_dtype != base.compute_dtype:
            if not base.casts_input:
                raise ValueError(f"compute_dtype={compute_dtype} differs from the dense base weight's {base.dtype}: a "
                                 "dense base computes in its own dtype (cast the weight instead)")
            base.compute_dtype = compute_dtype
        check_compute_dtype(base.compute_dtype, base.compute_dtypes)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(base, bias, r, lora_alpha, lora_dropout, use_rslora, base.device,
                     adapter_dtype_for(base.compute_dtype, adapter_dtype), use_dora)
        return layer

    def _setup(self, base, bias, r, lora_alpha, lora_dropout, use_rslora, device, adapter_dtype, use_dora=False,
               init_magnitude=True) -> None:
        self.r = check_rank(r)
        self.lora_alpha = check_alpha(lora_alpha)
        self.lora_dropout = check_dropout(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.use_dora = check_use_dora(use_dora)
        self.custom_scaling: Optional[float] = None
        self.in_features, self.out_features = base.in_features, base.out_features
        for t in base.parameters():  # frozen, once the arguments are known to be valid
            t.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.base = base
        self.bias = bias
        factory = {"device": device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        else:  # None: no entry in parameters() or the state dict, which stay exactly those of a LoRA layer
            self.register_parameter("lora_magnitude_vector", None)
        # ||W_i||^2 of the frozen base weight, for DoRA's norm (computed on first use, per weight and math dtype)
        self._weight_norm = WeightNormCache()
        # Whether W holds the adapter's delta: a buffer, so that a state dict carries it with the weight it
        # describes (loading one restores both); the Python bool is what forward reads (no device sync).
        self.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool, device=device))
        self._merged = False
        # Names of the model's other tensors overlapping W's memory (tied weights), found by apply_lora: merging
        # into W in place would change them too.
        self.weight_shared_with: Tuple[str, ...] = ()
        if use_dora:
            # DoRA's n at merge time, which unmerge() needs and cannot recover from W' (any positive c_i gives
            # ||W'_i / c_i|| = |m_i| / c_i = n_i): a buffer, so that a merged layer's state dict carries it. None
            # while unmerged (no state-dict entry then). Held as the int bit pattern of its fp32 / float64 values,
            # so that module.to(dtype) / .half() (which cast floating buffers) leave it exact.
            self.register_buffer("dora_merge_norm", None)
        self.reset_lora_parameters(init_magnitude=init_magnitude)

    def reset_lora_parameters(self, init_magnitude: bool = True) -> None:
        """PEFT's default initialisation: A ~ kaiming-uniform(a=sqrt(5)), B = 0; then, for DoRA, the magnitude
        (:meth:`reset_magnitude`, unless ``init_magnitude=False``). Refused on a merged layer (W holds the old
        adapter's update, which unmerge() must take out first)."""
        if getattr(self, "_merged", False):
            raise RuntimeError("reset_lora_parameters(): the layer is merged; unmerge() first")
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora and init_magnitude:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: ``m = ||W + s B A||`` per output row (PEFT's initialisation; ``||W||`` while B = 0), so that the
        layer computes what it computed before (``c = m / n = 1``). Computed in fp32 (float64 for float64 weights or
        adapters) without an ``[out, in]`` temporary (:func:`fused_lora.dora.dora_weight_norm`) and rounded to the
        adapter dtype; an NF4 weight dequantized to the compute dtype, the values its forward multiplies with.
        (PEFT computes it before casting its adapters to fp32, so over a bf16 base its initial m is rounded to bf16
        and c starts within a bf16 ulp of 1 instead.) On the meta device nothing is computed."""
        if not self.use_dora:
            raise RuntimeError("reset_magnitude(): not a DoRA layer (use_dora=False)")
        if self.merged:
            raise RuntimeError("reset_magnitude(): the layer is merged; unmerge() first")
        if self.lora_magnitude_vector.device.type == "meta" or self.base.device.type == "meta":
            return
        dtype = self.compute_dtype if self.quantized else None
        norm = dora_weight_norm(self.base.value(), self.lora_A, self.lora_B, self.scaling, dtype=dtype)
        self.lora_magnitude_vector.copy_(norm)

    # ------------------------------------------------------------------------------------------------------------
    # scaling

    @property
    def scaling(self) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), unless set to another value (:attr:`custom_scaling`)."""
        if self.custom_scaling is not None:
            return self.custom_scaling
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @scaling.setter
    def scaling(self, value: float) -> None:
        # e.g. PEFT's set_scale(): kept as an explicit override, which a PEFT adapter_config cannot express
        value = float(check_alpha(value, "scaling"))
        derived = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.custom_scaling = None if value == derived else value

    # ------------------------------------------------------------------------------------------------------------
    # the base weight

    @property
    def quantized(self) -> bool:
        """True when the base weight is stored quantized (NF4)."""
        return not isinstance(self.base, DenseBase)

    @property
    def weight(self) -> Optional[nn.Parameter]:
        """The dense base weight Parameter ``[out, in]`` (as ``nn.Linear.weight``); None for a quantized base
        (use :meth:`base_weight` or :attr:`nf4_weight`). Assigning a Parameter of the same shape replaces it (e.g.
        transformers tying an adapted ``lm_head`` to the input embeddings)."""
        return self.base.weight if isinstance(self.base, DenseBase) else None

    def __setattr__(self, name, value):
        # nn.Module.__setattr__ would register a Parameter named "weight" on the layer itself; it belongs to the base
        if name == "weight" and "base" in self._modules:
            type(self).weight.fset(self, value)
        else:
            super().__setattr__(name, value)

    @weight.setter
    def weight(self, value: nn.Parameter) -> None:
        if not isinstance(self.base, DenseBase):
            raise AttributeError("weight: this FusedLoraLinear has a quantized base; its weight cannot be replaced")
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected shape {[self.out_features, self.in_features]}, got {list(value.shape)}")
        self.base.weight = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)

    @property
    def nf4_weight(self) -> NF4Weight:
        """The NF4 base weight (views of the base's buffers); AttributeError for a dense base."""
        if not isinstance(self.base, NF4Base):
            raise AttributeError("nf4_weight: this FusedLoraLinear has a dense base weight (use .weight)")
        return self.base.value()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the math: the activations (a quantized base casts its input to it), W as the products take
        it, the output of the fused op."""
        return self.base.compute_dtype

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of ``lora_A`` and ``lora_B`` (and of their gradients; DoRA's magnitude too)."""
        return self.lora_A.dtype

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The base weight as a dense ``[out, in]`` tensor: the Parameter itself for a dense base (cast if ``dtype``
        is given), a new dequantized tensor in ``dtype`` (default: the compute dtype) for a quantized one."""
        if self.quantized:
            return self.base.dequantize(dtype or self.compute_dtype)
        return self.base.dequantize(dtype)

    # ------------------------------------------------------------------------------------------------------------
    # construction from existing layers

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
        adapter_dtype: Optional[torch.dtype] = None,
        use_dora: bool = False,
    ) -> "FusedLoraLinear":
        """Wrap an existing ``nn.Linear``.

        ``quantize=None``: its ``weight`` and ``bias`` Parameters are shared (no copy) and frozen.
        ``quantize="nf4"``: the weight is quantized to NF4 exactly as ``bitsandbytes.functional.quantize_4bit``
        does (``blocksize``, ``double_quant`` = bitsandbytes' ``compress_statistics``); only the 4-bit form is
        kept. ``compute_dtype`` (default: the linear's dtype) is the dtype of the math over the NF4 base.
        ``adapter_dtype``: the dtype of A and B (default: PEFT's, fp32 over fp16 / bf16 math, see the class).
        ``use_dora``: a DoRA layer (QDoRA over NF4), its magnitude initialised to the rows' norms (see the class).
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
        lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                    adapter_dtype=adapter_dtype, use_dora=use_dora)
        if quantize is None:
            if compute_dtype is not None and compute_dtype != linear.weight.dtype:
                raise ValueError("compute_dtype applies to quantized bases; cast the linear itself for a dense one")
            return cls.from_base(DenseBase(linear.weight), linear.bias, **lora)
        if quantize != "nf4":
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        nf4 = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls.from_base(NF4Base(nf4, compute_dtype), linear.bias, **lora)

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        use_dora: bool = False,
    ) -> "FusedLoraLinear":
        """Wrap a bitsandbytes ``Linear4bit`` (NF4) without re-quantizing: its packed weight and statistics are
        shared, its bias Parameter too. ``compute_dtype`` defaults to the Linear4bit's own, else the weight's
        original dtype; ``adapter_dtype`` to PEFT's rule (fp32 over fp16 / bf16 math, see the class);
        ``use_dora``: QDoRA (see the class). fp4 and other unsupported quantizations raise a ValueError."""
        nf4 = NF4Weight.from_bnb(linear4bit)
        dtype = compute_dtype or getattr(linear4bit, "compute_dtype", None) or nf4.dtype
        return cls.from_base(NF4Base(nf4, dtype), linear4bit.bias, r, lora_alpha, lora_dropout, use_rslora,
                             adapter_dtype=adapter_dtype, use_dora=use_dora)

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = self.base.casts_input
        if cast:
            dtype = quantized_math_dtype(self.compute_dtype, x.dtype)
            xc, bias = x.to(dtype), None if self.bias is None else self.bias.to(dtype)
        else:
            dtype, xc, bias = None, x, self.bias
        if self.merged:
            y = F.linear(xc, self.base.dequantize(dtype), bias)
        else:
            weight = self.base.value()
            dora = {}
            if self.use_dora:
                dora = dict(magnitude=self.lora_magnitude_vector, weight_norm_sq=self._weight_norm_sq(weight, dtype))
            y = fused_lora_linear(
                xc, weight, self.lora_A, self.lora_B, self.scaling, bias=bias,
                dropout_p=self.lora_dropout, training=self.training, **dora,
            )
        return y.to(x.dtype) if cast else y

    def _weight_norm_sq(self, weight, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        """The cached ``||W_i||^2`` (NF4: of W dequantized to the math dtype ``dtype``). None while torch.compile
        traces: the cache checks tensor identity and version counters in Python, which a compiled graph would bake
        in; ``fused_lora_linear`` then computes it in the graph (one extra pass over W per call)."""
        if torch.compiler.is_compiling():
            return None
        return self._weight_norm.get(weight, dtype)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() / to_empty(): new tensors (the cache would notice), or a new compute dtype for
        # NF4 (a new key): dropped explicitly anyway, so that a cached norm never outlives the weight it describes.
        self._weight_norm.invalidate()
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------------------------------------------------
    # merge

    @property
    def merged(self) -> bool:
        """True while the adapter is folded into the base weight (:meth:`merge`)."""
        return self._merged

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """What :meth:`merge` adds to the base weight, ``W' - W``, as a new ``[out, in]`` tensor in ``dtype``.

        LoRA: ``scaling * B @ A``, by default in fp32 (float64 for a float64 weight or float64 adapters: at least
        the precision of the weight it is added to and of the adapters, so that the merged weight is rounded once,
        into the weight's dtype).

        DoRA: ``W' - W`` with PEFT's merged weight ``W' = (m / n)[:, None] * (W + s B A)``, ``n = ||W + s B A||``
        per row, W the unmerged base weight (dense, or dequantized exactly to fp32). While merged, W is recovered
        from the merged one as PEFT's unmerge does, ``W = W' / (m / n)[:, None] - s B A`` with the ``n`` kept at
        merge time. By default in float64, whatever the weight's dtype: ``W + (W' - W)`` is then ``W'`` to float64
        accuracy before its one rounding to the weight's dtype (in fp32, the rounding of ``W' - W`` is relative to
        ``|W|``, which exceeds half an ulp of a ``W'_ij`` that ``c`` made much smaller than ``W_ij``, even in bf16).
        Unlike LoRA's, it depends on W and on the magnitude, and costs a few ``[out, in]`` float64 temporaries."""
        if self.use_dora:
            return self._dora_delta(dtype)[0]
        dtype = dtype or torch.promote_types(torch.promote_types(self.base.dtype, self.adapter_dtype), torch.float32)
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    @torch.no_grad()
    def _dora_delta(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """DoRA's ``(W' - W, n)`` (see :meth:`delta_weight`); ``n`` in ``dtype``."""
        dtype = dtype or torch.float64
        # the dense W exactly as BaseWeight.dense_with adds the delta to it (an NF4 W dequantized to fp32: exact)
        # (a dense weight already in that dtype is the Parameter itself: never modified in place below)
        current = self.base.dequantize(torch.promote_types(self.base.dtype, torch.float32)).to(dtype)
        lora = (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)).mul_(self.scaling)
        m = self.lora_magnitude_vector.detach().to(dtype)
        if not self.merged:
            # PEFT's n, of the materialised W + s B A (needed for W' anyway: no cancellation concern here)
            unscaled = current + lora
            n = torch.linalg.vector_norm(unscaled, dim=1)
            merged = unscaled.mul_((m / n)[:, None])
            return merged.sub_(current), n
        n = self._merge_norm()
        if n is None:
            raise RuntimeError(
                "FusedLoraLinear: this DoRA layer was loaded merged from a state dict without its merge norm "
                "(dora_merge_norm), which unmerging needs (W = W' / (m / n) - s B A; n is not recoverable from W'); "
                "load the state dict it was saved with, or an unmerged one"
            )
        n = n.to(dtype)
        original = current.div((m / n)[:, None]).sub_(lora)
        return current - original, n  # (current may be the weight Parameter itself: not in place)

    def _merge_norm(self) -> Optional[torch.Tensor]:
        stored = getattr(self, "dora_merge_norm", None)
        if stored is None:
            return None
        return stored.view(torch.float64 if stored.dtype == torch.int64 else torch.float32)

    def _set_merge_norm(self, n: Optional[torch.Tensor]) -> None:
        if n is not None:
            n = n.detach().to(torch.float64 if n.dtype == torch.float64 else torch.float32).contiguous()
            n = n.view(torch.int64 if n.dtype == torch.float64 else torch.int32)
        self.dora_merge_norm = n

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
        weight's dtype; DoRA: ``W = (m / n)[:, None] * (W + scaling * B @ A)`` as PEFT merges it (``n`` kept for
        :meth:`unmerge`; see :meth:`delta_weight`). A quantized base re-quantizes and keeps its pre-merge codes for an
        exact unmerge (see :class:`~fused_lora.base.NF4Base`). Refused (RuntimeError) when W is shared with another
        module."""
        if self.merged:
            warnings.warn("FusedLoraLinear.merge(): already merged, nothing to do", stacklevel=2)
            return
        self._check_not_shared("merge")
        if self.use_dora:
            delta, n = self._dora_delta()
            self.base.merge(delta)
            self._set_merge_norm(n)
        else:
            self.base.merge(self.delta_weight())
        self._set_merged(True)

    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W -= scaling * B @ A`` (DoRA: ``W = W' / (m / n)[:, None] - scaling * B @ A``);
        restores a dense weight up to the rounding of the two updates, an NF4 weight exactly."""
        if not self.merged:
            warnings.warn("FusedLoraLinear.unmerge(): not merged, nothing to do", stacklevel=2)
            return
        self.base.unmerge(self.delta_weight())
        if self.use_dora:
            self._set_merge_norm(None)
        self._set_merged(False)

    @torch.no_grad()
    def set_adapter_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            magnitude: Optional[torch.Tensor] = None) -> None:
        """Copy new adapter matrices into ``lora_A`` / ``lora_B`` (cast to their dtype), and for a DoRA layer the
        magnitude into ``lora_magnitude_vector`` (None: kept as it is). A merged layer is unmerged first and merged
        again with the new adapter, so W never holds a delta the layer does not know."""
        new = [("lora_A", lora_A, self.lora_A), ("lora_B", lora_B, self.lora_B)]
        if magnitude is not None:
            if not self.use_dora:
                raise ValueError("set_adapter_weights: got a magnitude, but this is not a DoRA layer (use_dora=False)")
            new.append(("magnitude", magnitude, self.lora_magnitude_vector))
        for name, value, have in new:
            if tuple(value.shape) != tuple(have.shape):
                raise ValueError(f"set_adapter_weights: {name} has shape {list(value.shape)}, the layer expects "
                                 f"{list(have.shape)}")
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        for _, value, have in new:
            have.copy_(value)
        if was_merged:
            self.merge()

    # ------------------------------------------------------------------------------------------------------------
    # state dict: the merged flag travels with the weight it describes

    def _set_merged(self, merged: bool) -> None:
        self._merged = merged
        self._weight_norm.invalidate()  # W changed (merge: DoRA's norm is not used while merged; unmerge: W again)
        self._sync_merged_buffer()

    def _sync_merged_buffer(self) -> None:
        # The Python bool is the truth; the buffer only carries it into state dicts (and may hold garbage after
        # to_empty()).
        if self.lora_merged.device.type != "meta":
            self.lora_merged.fill_(self._merged)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_merged_buffer()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        norm_key = prefix + "dora_merge_norm"
        if norm_key in destination:  # the values, not the bit pattern the buffer holds them as
            destination[norm_key] = self._merge_norm()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if "." not in name and name not in self._parameters and name not in self._buffers \
                    and prefix + "base." + name not in state_dict:  # a base entry of the earlier flat layout
                state_dict[prefix + "base." + name] = state_dict.pop(key)
        flag_key = prefix + "lora_merged"
        flag = state_dict.get(flag_key)
        norm_key = prefix + "dora_merge_norm"
        # DoRA's merge norm exists only while merged: read here, not by nn.Module (present or not, never an error)
        norm = state_dict.pop(norm_key, None) if self.use_dora else None
        loads_base = any(k.startswith(prefix + "base.") for k in state_dict)
        loads_adapter = any(prefix + name in state_dict for name in ("lora_A", "lora_B", "lora_magnitude_vector"))
        # New adapter matrices for a merged base weight that stays: unmerge first and merge again after, so that W
        # never holds a delta the layer does not know.
        remerge = self.merged and loads_adapter and not loads_base and flag is None
        if remerge:
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if flag_key in missing_keys:  # state dicts written before the flag existed
            missing_keys.remove(flag_key)
        if norm_key in missing_keys:
            missing_keys.remove(norm_key)
        if flag is not None and flag.device.type != "meta":
            self._merged = bool(flag)  # the loaded weight is merged or not as its state dict says
            if self.use_dora:  # and the norm it was merged with (None: unmerge() will say it is missing)
                self._set_merge_norm(norm.to(self.lora_merged.device) if self._merged and norm is not None else None)
        elif loads_base:
            self._merged = False  # a base weight without the flag is an unmerged one
            if self.use_dora:
                self._set_merge_norm(None)
        if loads_base:
            self._weight_norm.invalidate()
        if remerge:
            self.merge()
        self._sync_merged_buffer()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, bias={self.bias is not None}, "
            f"use_rslora={self.use_rslora}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}, "
            f"adapter_dtype={str(self.adapter_dtype).replace('torch.', '')}, merged={self.merged}"
            + (", use_dora=True" if self.use_dora else "")
        )
