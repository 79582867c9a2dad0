"""Adapter files in PEFT's format: ``save_adapter`` / ``load_adapter``.

A directory holds ``adapter_config.json`` (a ``LoraConfig`` as JSON) and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``). Tensor keys are PEFT's, without an adapter name:

* ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``;
* DoRA (``use_dora: true`` in the config): also ``base_model.model.<module path>.lora_magnitude_vector`` ``[out]``
  (PEFT's key: its parameter ``lora_magnitude_vector.<adapter>.weight`` saved without ``.weight``);
* for each ``modules_to_save`` module, its whole ``state_dict`` as ``base_model.model.<module path>.<key>``
  (PEFT saves its trained copy under the original module's name).

Files written here load with ``peft.PeftModel.from_pretrained(base, path)``; files written by PEFT's
``save_pretrained`` (LoRA or DoRA on ``nn.Linear`` / bitsandbytes 4-bit layers) load here. Nothing is skipped
silently: a tensor without a layer, a layer without its tensors, a wrong shape, or a config field fused-lora cannot
honour is an error.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import warnings
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .conversion import execute_plan, get_meta, lora_layers, plan_lora, set_trainability, unwrap_model
from .hyperparams import Hyperparams, LayerHyperparams
from .targets import check_modules_to_save_not_shared, check_regexes, resolve_modules_to_save, target_modules_for

__all__ = ["load_adapter", "save_adapter", "CONFIG_NAME", "SAFETENSORS_NAME", "BIN_NAME"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's key suffix (no ".weight") and the layer's Parameter name

PathLike = Union[str, "os.PathLike[str]"]

# init_lora_weights values whose adapters are plain LoRA on the unmodified base (others -- pissa, olora, corda,
# loftq, lora_ga, ... -- change the base weights at initialisation, so the file alone does not reproduce the model).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

# Config fields that must hold exactly these values (anything else changes what the adapter computes).
_REQUIRED_VALUES = {
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "ensure_weight_tying": (False, None),
}
# Config fields that must be empty / null (features fused-lora does not implement).
_MUST_BE_EMPTY = (
    "layer_replication", "layers_to_transform", "layers_pattern", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config", "velora_config", "megatron_config",
    "loftq_config",
)
# Metadata, or settings that only matter for an initialisation that the file's tensors overwrite.
_IGNORED = (
    "peft_version", "auto_mapping", "revision", "inference_mode", "megatron_core", "qalora_group_size", "eva_config",
    "corda_config", "lora_ga_config", "init_lora_weights",
)
_USED = (
    "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora",
)


# --------------------------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------------------------


def _tensor_for_file(t: torch.Tensor, seen: Dict[int, str], key: str) -> torch.Tensor:
    """Detached, contiguous; cloned when its storage is already used by another saved tensor (safetensors refuses
    shared storage)."""
    t = t.detach()
    if type(t).__name__ == "DTensor":
        raise ValueError(
            f"save_adapter: {key} is a sharded DTensor (FSDP2 / tensor parallel); save the adapter from an unsharded "
            "copy of the model (e.g. gather with torch.distributed.checkpoint's get_model_state_dict(full_state_dict="
            "True) and load it into one)"
        )
    if t.device.type == "meta":
        raise ValueError(f"save_adapter: {key} is on the meta device (no data)")
    t = t.contiguous()
    ptr = t.untyped_storage().data_ptr()
    if ptr in seen:
        t = t.clone()
    else:
        seen[ptr] = key
    return t


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(tensors: Mapping[str, torch.Tensor], filename: str, metadata: Dict[str, str]) -> None:
    """Write floating-point tensors in the safetensors format, without numpy (``safetensors.torch.save_file`` needs
    it; fused-lora does not depend on it). The format: an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to a
    multiple of 8 bytes, then each tensor's little-endian bytes back to back, in the header's order."""
    if sys.byteorder != "little":  # the raw bytes below are the host's
        from safetensors.torch import save_file

        save_file(dict(tensors), filename, metadata=metadata)
        return
    header: Dict[str, object] = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: cannot write {t.dtype} tensors (floating point only)")
        t = t.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        blobs.append(ctypes.string_at(t.data_ptr(), size) if size else b"")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def _json_number(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def save_adapter(
    model: nn.Module,
    path: PathLike,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> None:
    """Write ``model``'s LoRA adapter to the directory ``path`` (created if needed) in PEFT's format.

    ``adapter_model.safetensors``: each layer's A and B (as stored: same dtype, contiguous), keys
    ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``, for DoRA layers the magnitude
    ``base_model.model.<module path>.lora_magnitude_vector``, plus the full state of every ``modules_to_save``
    module; metadata ``{"format": "pt"}``. PEFT's ``save_pretrained`` writes the same keys in the same dtypes for the
    same weights: it too saves each tensor in its own dtype (fp32 adapters and magnitudes over a bf16 model, PEFT's
    and fused-lora's default, as fp32).

    ``adapter_config.json``: a complete ``LoraConfig``: ``r`` / ``lora_alpha`` are the most common values over the
    layers and ``rank_pattern`` / ``alpha_pattern`` list (by module name) the layers that differ; ``target_modules`` is
    the shortest list of name suffixes that selects exactly the adapted layers in this model (PEFT's list rule),
    ``use_dora`` the layers' (true for DoRA layers), ``fan_in_fan_out``, ``lora_bias`` false, ``bias`` "none",
    ``init_lora_weights`` true.
    ``base_model_name_or_path`` / ``task_type`` default to what ``load_adapter`` recorded (else the
    model's ``name_or_path`` / None).

    Raises ``ValueError`` when the layers cannot be described by one ``LoraConfig``: different ``lora_dropout``,
    ``use_rslora`` or ``use_dora`` across layers, or a layer whose ``scaling`` was set to a value other than the one
    ``r``, ``lora_alpha`` and ``use_rslora`` give (``layer.custom_scaling``).
    Models wrapped by DDP / DataParallel / ``torch.compile`` are unwrapped; module paths are the unwrapped model's.
    """
    model = unwrap_model(model)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no fused-lora layers")
    meta = get_meta(model, create=False)

    per_layer = {name: LayerHyperparams.of(layer) for name, layer in layers}
    for name, layer in layers:
        if layer.custom_scaling is not None:
            raise ValueError(
                f"save_adapter: layer {name!r} has scaling={layer.scaling!r} but r={layer.r}, "
                f"lora_alpha={layer.lora_alpha}, use_rslora={layer.use_rslora} give {per_layer[name].scaling!r}; "
                "a PEFT adapter_config cannot express a changed scaling"
            )
    hyperparams = Hyperparams.from_layers(per_layer, where="save_adapter: ")

    adapted = list(per_layer)
    others = [n for n, _ in model.named_modules() if n and n not in per_layer]
    target_modules = target_modules_for(adapted, others)

    tensors: Dict[str, torch.Tensor] = {}
    seen: Dict[int, str] = {}
    for name, layer in layers:
        for part in _parts(layer.use_dora):
            key = _file_key(name, part)
            tensors[key] = _tensor_for_file(getattr(layer, part), seen, key)
    for name in meta.modules_to_save_names:
        for k, v in model.get_submodule(name).state_dict().items():
            key = f"{PREFIX}{name}.{k}"
            tensors[key] = _tensor_for_file(v, seen, key)

    if base_model_name_or_path is None:
        base_model_name_or_path = meta.base_model_name_or_path or getattr(model, "name_or_path", None) or None
    if task_type is None:
        task_type = meta.task_type
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(hyperparams.r),
        "lora_alpha": _json_number(hyperparams.lora_alpha),
        "lora_dropout": hyperparams.lora_dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "use_rslora": hyperparams.use_rslora,
        "use_dora": hyperparams.use_dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": list(meta.modules_to_save) or None,
        "rank_pattern": dict(hyperparams.rank_pattern),
        "alpha_pattern": {k: _json_number(v) for k, v in hyperparams.alpha_pattern.items()},
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "auto_mapping": None if task_type is not None else {
            "base_model_class": type(model).__name__, "parent_library": type(model).__module__,
        },
    }
    os.makedirs(path, exist_ok=True)
    write_safetensors(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------------------------


def read_adapter_config(path: PathLike) -> Tuple[dict, Hyperparams]:
    """The validated ``adapter_config.json`` of an adapter directory (errors name the offending field), and the
    LoRA settings it gives."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {os.fspath(path)!r}")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config, _validate_config(config, config_path)


def _validate_config(config: dict, where: str) -> Hyperparams:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type={peft_type!r}; only 'LORA' adapters are supported")
    for key, allowed in _REQUIRED_VALUES.items():
        if key in config and config[key] not in allowed:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (fused-lora needs {allowed[0]!r})")
    for key in _MUST_BE_EMPTY:
        if config.get(key):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (must be null / empty)")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} modifies the base weights at initialisation, so this adapter "
            "does not apply to the original base model; convert it to plain LoRA first (PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...))"
        )
    for key, value in config.items():
        if key in _USED or key in _IGNORED or key in _REQUIRED_VALUES or key in _MUST_BE_EMPTY:
            continue
        if value not in (None, False, {}, [], ""):
            raise ValueError(f"{where}: unknown LoraConfig field {key}={value!r}; refusing to guess what it means")
    if config.get("target_modules") is None:
        raise ValueError(f"{where}: target_modules is null; fused-lora does not guess PEFT's per-architecture default")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{where}: missing field {key!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{where}: {key} must be an object {{pattern: value}}, got {config[key]!r}")
    # PEFT writes ranks as JSON integers: 0, "4", 4.0 and true are refused. Every value is checked, also a pattern
    # that no module matches, for new and existing layers alike.
    hyperparams = Hyperparams.checked(
        config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config.get("use_rslora", False),
        config.get("rank_pattern"), config.get("alpha_pattern"), where=f"{where}: ", check_patterns=True,
        use_dora=False if config.get("use_dora") is None else config["use_dora"],  # a JSON boolean, or refused
    )
    mts = config.get("modules_to_save")
    check_regexes(config.get("target_modules"), config.get("exclude_modules"),
                  mts if isinstance(mts, (list, tuple)) else (), config.get("rank_pattern"),
                  config.get("alpha_pattern"), where=f"{where}: ")
    return hyperparams


def read_adapter_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of an adapter directory: ``adapter_model.safetensors``, else ``adapter_model.bin`` (torch)."""
    st_path, bin_path = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st_path):
        from safetensors.torch import load_file

        return load_file(st_path, device="cpu")
    if os.path.isfile(bin_path):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{bin_path}: expected a dict of tensors")
        return state
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} (or {BIN_NAME}) in adapter directory {os.fspath(path)!r}")


def _parts(use_dora: bool) -> Tuple[str, ...]:
    """The adapter tensors of a layer, by Parameter name."""
    return ("lora_A", "lora_B", MAGNITUDE) if use_dora else ("lora_A", "lora_B")


def _file_key(name: str, part: str) -> str:
    """PEFT's file key of a layer's adapter tensor (``part``: a Parameter name of :func:`_parts`)."""
    return f"{PREFIX}{name}.{MAGNITUDE}" if part == MAGNITUDE else f"{PREFIX}{name}.{part}.weight"


def _check_lora_tensor(key: str, t: torch.Tensor, where: str) -> None:
    """A LoRA A / B (or DoRA magnitude) from a file must hold finite floating-point values (copying would silently
    truncate integers or spread NaN / inf into every output)."""
    if not t.is_floating_point():
        raise TypeError(f"{where}: {key} has dtype {t.dtype}; LoRA A / B weights and DoRA magnitudes must be "
                        "floating point")
    bad = ~torch.isfinite(t)
    if bad.any():
        first = bad.nonzero()[0].tolist()
        raise ValueError(f"{where}: {key} has {int(bad.sum())} non-finite value(s) (NaN / inf), the first at index "
                         f"{first}: {t[tuple(first)].item()}")


def _split_keys(tensors: Mapping[str, torch.Tensor], mts_names: List[str], where: str, use_dora: bool):
    """``{module: {"lora_A": t, "lora_B": t[, "lora_magnitude_vector": t]}}`` and ``{modules_to_save module: {key:
    t}}``; anything else is an error (a magnitude too, when the config is not DoRA's)."""
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    saved: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in mts_names}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r} (PEFT LoRA keys start with {PREFIX!r})")
        rest = key[len(PREFIX):]
        owner = next((n for n in mts_names if rest.startswith(n + ".")), None)
        if owner is not None:
            saved[owner][rest[len(owner) + 1:]] = t
            continue
        suffixes = (("lora_A", LORA_SUFFIXES[0]), ("lora_B", LORA_SUFFIXES[1]))
        if use_dora:
            suffixes += ((MAGNITUDE, "." + MAGNITUDE),)
        for part, suffix in suffixes:
            if rest.endswith(suffix):
                _check_lora_tensor(key, t, where)
                lora.setdefault(rest[: -len(suffix)], {})[part] = t
                break
        else:
            hint = ""
            if MAGNITUDE in rest and use_dora:
                hint = f" (a DoRA magnitude vector? PEFT writes it as <module path>.{MAGNITUDE})"
            elif MAGNITUDE in rest:
                hint = " (a DoRA magnitude vector, but the adapter config has use_dora=false)"
            elif "lora_embedding" in rest:
                hint = " (an Embedding LoRA layer)"
            elif rest.endswith(".lora_B.bias"):
                hint = " (lora_bias)"
            raise ValueError(f"{where}: unexpected key {key!r}{hint}: not a LoRA A/B of a Linear layer")
    return lora, saved


def _shapes(r: int, in_features: int, out_features: int) -> Dict[str, Tuple[int, ...]]:
    """The shape of each adapter tensor of a layer (by Parameter name)."""
    return {"lora_A": (r, in_features), "lora_B": (out_features, r), MAGNITUDE: (out_features,)}


def _rounds(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether copying ``source`` values into a ``target`` tensor can change them: any other dtype but a wider
    floating-point one (bf16 and fp16 fit in fp32, neither in the other)."""
    widens = source.is_floating_point and target.is_floating_point and torch.promote_types(source, target) == target
    return source != target and not widens


def load_adapter(model: nn.Module, path: PathLike, is_trainable: bool = True,
                 adapter_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load the adapter in directory ``path`` (written by :func:`save_adapter` or PEFT's ``save_pretrained``) into
    ``model``, in place; returns ``model``.

    * If ``model`` has no fused-lora layers yet, they are created first with :func:`~fused_lora.apply_lora` from
      the config (``target_modules``, ``exclude_modules``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
      ``use_dora``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``) -- the modules PEFT would adapt,
      DoRA layers for a DoRA adapter (PEFT's ``use_dora``, also over bitsandbytes 4-bit bases) -- with adapters in
      ``adapter_dtype`` (apply_lora's argument: by default PEFT's rule, as ``PeftModel.from_pretrained`` with its
      default ``autocast_adapter_dtype=True``: fp32 over fp16 / bf16 layers).
    * If it has some, they must be exactly the modules the file holds tensors for, with the config's ``r``,
      ``lora_alpha``, ``use_rslora`` and ``use_dora`` (their ``lora_dropout`` and adapter dtype are kept: neither
      changes what the file means); ``modules_to_save`` are resolved on the model. A DoRA adapter is refused by
      LoRA layers and a LoRA adapter by DoRA layers, like a different ``r``: the file would compute another
      function there, and turning a layer into the other kind would change its set of trainable Parameters under
      an optimizer that was built for the old one. Load into the base model (layers created as above) or build the
      layers with ``apply_lora(..., use_dora=...)`` as the file says.

    Every LoRA layer receives the file's A and B (DoRA: and magnitude), copied into its parameters' dtype: exactly
    when that dtype holds the file's values (e.g. bf16 or fp16 into fp32), rounded with a warning otherwise; a merged
    layer is unmerged first and merged again with the new adapter.
    ``modules_to_save`` modules receive their full saved state. Afterwards A, B (DoRA magnitudes) and the
    ``modules_to_save`` parameters have ``requires_grad=is_trainable``; everything else is frozen.

    Errors (before the model is modified) name the key or field: a layer without its tensors (missing key), a tensor
    for no layer (unexpected key), a shape that does not match, a config fused-lora cannot honour (``peft_type`` other
    than LORA, ``use_dora`` that is not a boolean, ``fan_in_fan_out``, ``lora_bias``, ``bias`` other than "none",
    ``layer_replication``, ``layers_to_transform``, non-plain ``init_lora_weights``, unknown fields with non-default
    values, ...), an ``r`` / ``rank_pattern`` value that is not a positive JSON integer, an ``lora_alpha`` /
    ``alpha_pattern`` value that is not a finite number, an invalid regular expression; a LoRA A / B (or magnitude)
    tensor of an integer dtype (``TypeError``) or holding NaN / inf (``ValueError``); a DoRA adapter for LoRA layers
    or the reverse.
    """
    model = unwrap_model(model)
    config, hyperparams = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    where = os.fspath(path)
    mts = list(config.get("modules_to_save") or [])

    use_dora = hyperparams.use_dora
    existing = dict(lora_layers(model))
    plan = None
    if existing:
        mts_names = resolve_modules_to_save(model, mts) if mts else []
        if mts_names:
            check_modules_to_save_not_shared(model, mts_names)
        shapes = {n: _shapes(l.r, l.in_features, l.out_features) for n, l in existing.items()}
        for name, layer in existing.items():
            want = hyperparams.for_module(name)
            if layer.use_dora != want.use_dora:
                kinds = {True: "a DoRA layer (use_dora=True)", False: "a LoRA layer (use_dora=False)"}
                raise ValueError(
                    f"{where}: layer {name!r} is {kinds[layer.use_dora]} but the adapter config has "
                    f"use_dora={want.use_dora}; load the adapter into the base model (load_adapter creates the "
                    f"layers it describes) or build them with apply_lora(..., use_dora={want.use_dora})"
                )
            if not LayerHyperparams.of(layer).same_adapter_math(want) or layer.custom_scaling is not None:
                raise ValueError(
                    f"{where}: layer {name!r} has r={layer.r}, lora_alpha={layer.lora_alpha}, "
                    f"use_rslora={layer.use_rslora}, scaling={layer.scaling} but the adapter config gives r={want.r}, "
                    f"lora_alpha={want.lora_alpha}, use_rslora={want.use_rslora}, scaling={want.scaling}"
                )
    else:
        plan = plan_lora(
            model, config["target_modules"], r=hyperparams.r, lora_alpha=hyperparams.lora_alpha,
            lora_dropout=hyperparams.lora_dropout, use_rslora=hyperparams.use_rslora, modules_to_save=mts or None,
            exclude_modules=config.get("exclude_modules"), rank_pattern=hyperparams.rank_pattern,
            alpha_pattern=hyperparams.alpha_pattern, adapter_dtype=adapter_dtype, use_dora=use_dora,
        )
        mts_names = plan.modules_to_save_names
        shapes = {t.name: _shapes(t.hyperparams.r, t.module.in_features, t.module.out_features)
                  for t in plan.targets}

    parts = _parts(use_dora)
    lora, saved = _split_keys(tensors, mts_names, where, use_dora)
    missing = [_file_key(n, part) for n in shapes for part in parts if part not in lora.get(n, {})]
    if missing:
        why = ""
        if use_dora and any(k.endswith(MAGNITUDE) for k in missing):
            why = " (the config has use_dora=True: each DoRA layer needs its magnitude vector)"
        raise ValueError(f"{where}: missing tensors for adapted layers{why}: {missing[:6]}"
                         + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
    unexpected = [_file_key(n, part) for n in lora if n not in shapes for part in lora[n]]
    if unexpected:
        raise ValueError(
            f"{where}: unexpected tensors (no such LoRA layer in the model, given target_modules="
            f"{config['target_modules']!r}): {unexpected[:6]}" + (" ..." if len(unexpected) > 6 else "")
        )
    for name, layer_shapes in shapes.items():
        for part in parts:
            got, shape = tuple(lora[name][part].shape), layer_shapes[part]
            if got != shape:
                raise ValueError(f"{where}: {_file_key(name, part)} has shape {list(got)}, the layer expects "
                                 f"{list(shape)}")
    for name, state in saved.items():
        module_state = model.get_submodule(name).state_dict()
        want, have = set(module_state), set(state)
        if want != have:
            raise ValueError(
                f"{where}: modules_to_save {name!r}: missing {sorted(want - have)}, unexpected {sorted(have - want)}"
            )
        for k, t in state.items():
            if t.shape != module_state[k].shape:
                raise ValueError(f"{where}: {PREFIX}{name}.{k} has shape {list(t.shape)}, the module expects "
                                 f"{list(module_state[k].shape)}")

    meta = get_meta(model)
    if plan is not None:
        execute_plan(model, plan)  # also records the plan's modules_to_save
    else:
        meta.add_modules_to_save(mts, mts_names)
    meta.task_type = config.get("task_type")
    meta.base_model_name_or_path = config.get("base_model_name_or_path")

    rounded = set()  # (file dtype, parameter dtype) pairs that cannot hold every value of the file
    with torch.no_grad():
        for name, layer in lora_layers(model):
            rounded.update((lora[name][part].dtype, getattr(layer, part).dtype) for part in parts
                           if _rounds(lora[name][part].dtype, getattr(layer, part).dtype))
            # unmerges / re-merges
            layer.set_adapter_weights(lora[name]["lora_A"], lora[name]["lora_B"], lora[name].get(MAGNITUDE))
        for name, state in saved.items():
            module = model.get_submodule(name)
            rounded.update((t.dtype, module_state_t.dtype) for k, t in state.items()
                           for module_state_t in (module.state_dict()[k],) if _rounds(t.dtype, module_state_t.dtype))
            module.load_state_dict(state, strict=True)
    if rounded:
        warnings.warn(f"load_adapter: adapter tensors were rounded to the layers' dtype ({sorted(map(str, rounded))})",
                      stacklevel=2)
    set_trainability(model, adapters_trainable=is_trainable)
    return model
