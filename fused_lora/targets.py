"""PEFT's module-name rules: which modules a ``LoraConfig`` selects, and the config that selects given modules.

Selection follows PEFT's ``LoraConfig`` exactly (``peft.tuners.tuners_utils.check_target_module_exists``):

* ``target_modules`` as a list / set / tuple of strings: a module named ``key`` is selected when ``key`` equals an
  entry or ends with ``"." + entry`` (a suffix at a dot boundary; entries are plain strings, not regexes);
* ``target_modules`` as a single string: a regular expression that must match the *whole* module name
  (``re.fullmatch``);
* ``"all-linear"`` (any case): every ``nn.Linear`` (and transformers ``Conv1D``, which is then rejected as
  unsupported) except the output layer: for a transformers ``PreTrainedModel``, the module returned by
  ``get_output_embeddings()`` (the ``lm_head``) is excluded, as PEFT does; so are the linears whose parent
  bypasses them (``nn.MultiheadAttention.out_proj``, ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2``:
  :func:`bypassed_linears`). Named explicitly, the first is refused and the others warn;
* ``exclude_modules``: same list / regex rules, removes modules from the selection;
* ``modules_to_save`` entries select the modules whose name *ends with* the entry (a plain string suffix, not at a
  dot boundary: PEFT's ``_set_trainable`` rule); modules at or under an entry are never adapted (PEFT's rule:
  ``re.match(r"(^|.*\\.){entry}($|\\..*)", name)``);
* ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}``; the first pattern (in dict order) for which
  ``re.match(r"(.*\\.)?(pattern)$", name)`` succeeds gives the module's ``r`` / ``lora_alpha``; others use ``r`` /
  ``lora_alpha``.

For ``"all-linear"`` the rule is PEFT's rule with ``task_type=None``. The inverse rules (:func:`target_modules_for`,
:func:`patterns_for`) write a config that PEFT resolves to exactly the given modules and values.
"""

from __future__ import annotations

import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .layers import FusedLoraLinear

__all__ = [
    "ALL_LINEAR",
    "TargetModules",
    "all_linear_names",
    "bypassed_linears",
    "check_modules_to_save_not_shared",
    "check_regexes",
    "conv1d_class",
    "name_matches",
    "normalize_names",
    "pattern_value",
    "patterns_for",
    "resolve_modules_to_save",
    "target_modules_for",
    "under_modules_to_save",
]

ALL_LINEAR = "all-linear"

TargetModules = Union[str, Sequence[str]]


def normalize_names(value, what: str, allow_none: bool = True) -> Union[None, str, Tuple[str, ...]]:
    """A regex string, or a tuple of plain names (from a list / set / tuple of str)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{what} is required: a list of module-name suffixes, a regex string, or 'all-linear'")
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} must not be an empty string")
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"{what} entries must be non-empty strings, got {bad!r}")
        if not names and not allow_none:
            raise ValueError(f"{what} is empty: no module would be adapted")
        return names
    raise TypeError(f"{what} must be a string (regex) or a list/set/tuple of strings, got {type(value).__name__}")


def name_matches(spec: Union[str, Tuple[str, ...]], key: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` rule: a string is a full-match regex; a list matches an equal
    name or a suffix at a dot boundary."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + entry) for entry in spec)


def under_modules_to_save(modules_to_save: Sequence[str], key: str) -> bool:
    """PEFT never adapts a module at or under a ``modules_to_save`` entry (entries are used as regex fragments)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def pattern_value(patterns: Optional[Mapping[str, object]], key: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``): the first pattern
    ``p`` (dict order) with ``re.match(rf"(.*\\.)?({p})$", key)`` gives the value; otherwise ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def check_regexes(target_modules=None, exclude_modules=None, modules_to_save=(), rank_pattern=None,
                  alpha_pattern=None, where: str = "") -> None:
    """``ValueError`` naming the argument (prefixed by ``where``) for a pattern that is not a valid regular
    expression, as each is used: ``target_modules`` / ``exclude_modules`` strings (full-match regexes),
    ``modules_to_save`` entries and ``rank_pattern`` / ``alpha_pattern`` keys (regex fragments, PEFT's rules)."""
    checks = [(what, spec, spec) for what, spec in (("target_modules", target_modules),
                                                      ("exclude_modules", exclude_modules)) if isinstance(spec, str)]
    checks += [("modules_to_save entry", m, rf"(^|.*\.){m}($|\..*)") for m in modules_to_save or ()]
    for what, patterns in (("rank_pattern key", rank_pattern), ("alpha_pattern key", alpha_pattern)):
        checks += [(what, p, rf"(.*\.)?({p})$") for p in (patterns or {}) if isinstance(p, str)]
    for what, shown, regex in checks:
        try:
            re.compile(regex)
        except re.error as exc:
            sep = "=" if what in ("target_modules", "exclude_modules") else " "
            raise ValueError(f"{where}{what}{sep}{shown!r} is not a valid regular expression ({exc})") from None


def resolve_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> List[str]:
    """Names of the modules selected by ``modules_to_save`` (PEFT's rule: the module name ends with the entry, a
    plain string suffix). Every entry must select at least one module."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    selected, unmatched = [], []
    for entry in modules_to_save:
        hits = [n for n in names if n.endswith(entry)]
        if not hits:
            unmatched.append(entry)
        selected.extend(h for h in hits if h not in selected)
    if unmatched:
        raise ValueError(f"modules_to_save entries {unmatched} match no module of {type(model).__name__}")
    # a module inside another selected module is covered by its parent
    return [n for n in selected if not any(n.startswith(p + ".") for p in selected if p != n)]


def check_modules_to_save_not_shared(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse a ``modules_to_save`` module whose parameters are also reachable outside it (tied weights): fused-lora
    trains these modules in place, where PEFT trains a copy."""
    # state-dict names: what the user sees in checkpoints
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    owned = {id(p): pname for pname, p in params.items()
             if any(pname == n or pname.startswith(n + ".") for n in names)}
    for pname, p in params.items():
        if id(p) in owned and not any(pname == n or pname.startswith(n + ".") for n in names):
            raise ValueError(
                f"modules_to_save: parameter {owned[id(p)]} is shared with {pname} (tied weights). fused-lora trains "
                "modules_to_save in place, which would also change the tied module, whereas PEFT trains a copy; untie "
                "the weights first (e.g. tie_word_embeddings=False with a cloned lm_head) or do not save this module"
            )


def _output_embedding_names(model: nn.Module) -> set:
    """PEFT's ``all-linear`` exclusion: the output embedding layer of a transformers ``PreTrainedModel``."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not isinstance(model, pretrained):
        return set()
    output_emb = model.get_output_embeddings()
    if output_emb is None:
        return set()
    return {n for n, m in model.named_modules() if m is output_emb}


def conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` if transformers is loaded (a model holding one implies it is)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def all_linear_names(model: nn.Module) -> set:
    """Module names ``target_modules="all-linear"`` selects: PEFT's rule (``nn.Linear`` and ``Conv1D`` modules,
    existing LoRA layers, minus the output embedding of a ``PreTrainedModel``), minus the linears whose parent
    bypasses them (:func:`bypassed_linears`), where an adapter would not (always) run."""
    classes = tuple(c for c in (nn.Linear, conv1d_class(), FusedLoraLinear) if c is not None)
    names = {n for n, m in model.named_modules() if n and isinstance(m, classes)}
    return names - _output_embedding_names(model) - set(bypassed_linears(model))


def bypassed_linears(model: nn.Module) -> Dict[str, Tuple[bool, str]]:
    """``{name: (never_runs, why)}`` for the linear modules whose parent reads their weight instead of calling them:
    ``nn.MultiheadAttention.out_proj`` always (an adapter there never runs), ``nn.TransformerEncoderLayer``'s
    ``linear1`` / ``linear2`` in its inference fast path (eval mode without grad)."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            out[prefix + "out_proj"] = (True, "nn.MultiheadAttention uses out_proj.weight directly and never calls "
                                              "out_proj, so an adapter there would never run")
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                out[prefix + child] = (False, "nn.TransformerEncoderLayer's inference fast path (eval mode without "
                                              "grad) uses its weight directly, skipping the adapter; call "
                                              "torch.backends.mha.set_fastpath_enabled(False) for inference")
    return out


# --------------------------------------------------------------------------------------------------------------------
# The inverse rules: a config for given modules
# --------------------------------------------------------------------------------------------------------------------


def target_modules_for(adapted: List[str], others: List[str]) -> Union[List[str], str]:
    """A ``target_modules`` value selecting exactly ``adapted`` among ``adapted + others`` under PEFT's list rule:
    for each adapted name, its shortest dot-suffix that no other module name equals or ends with. Falls back to a
    full-match regex of the escaped names when a list cannot separate them (a name that is a suffix of another)."""
    def clashes(suffix):
        return any(o == suffix or o.endswith("." + suffix) for o in others)

    chosen: Optional[List[str]] = []
    for name in sorted(adapted):
        if name_matches(tuple(chosen), name):
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if not clashes(suffix):
                chosen.append(suffix)
                break
        else:
            chosen = None
            break
    if chosen is not None and {n for n in adapted + others if name_matches(tuple(chosen), n)} == set(adapted):
        return sorted(chosen)
    regex = "(?:" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"
    assert {n for n in adapted + others if name_matches(regex, n)} == set(adapted)
    return regex


def patterns_for(values: Mapping[str, object], default) -> Dict[str, object]:
    """``rank_pattern`` / ``alpha_pattern`` entries for the modules whose value differs from ``default``, keyed by
    module name (escaped when a plain name would also match another module under PEFT's regex rule); verified by
    resolving every module with :func:`pattern_value`."""
    for escape in (False, True):
        pattern = {(re.escape(n) if escape else n): v for n, v in values.items() if v != default}
        if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
            return pattern
    raise ValueError(
        "cannot express the per-layer r / lora_alpha values as a PEFT rank_pattern / alpha_pattern (a module name "
        f"is a suffix of another): {dict(values)}"
    )
