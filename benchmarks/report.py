"""Tables, CSV rows and plots of benchmark measurements."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from .suite import Measurement

CSV_FIELDS = ["timestamp", "device", "provider", "mode", "metric", "tokens", "in_features", "out_features", "shape",
              "dtype", "r", "p", "p20", "p50", "p80", "versions", "auto_path"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def _git_revision() -> str:
    """The checkout's commit (with "+dirty" for uncommitted changes), or "" outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("+dirty" if rev and dirty else "")


def library_versions() -> str:
    import fused_lora

    parts = [f"fused_lora={fused_lora.__version__}", f"torch={torch.__version__}"]
    revision = _git_revision()
    if revision:
        parts[0] += f"@{revision}"
    for name in ("triton", "peft", "bitsandbytes"):
        try:
            module = __import__(name)
            parts.append(f"{name}={module.__version__}")
        except ImportError:
            pass
    return " ".join(parts)


def csv_rows(measurements: List[Measurement], device: torch.device, device_label: Optional[str] = None
             ) -> List[Dict[str, object]]:
    """CSV rows of ``measurements``; ``device_label`` (default: :func:`device_name` of ``device``) fills the
    device column."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dev, versions = device_label or device_name(device), library_versions()
    rows = []
    for m in measurements:
        s = m.case.shape
        metrics = {"time_ms": m.time_ms, "tflops": m.tflops, "saved_mib": (m.saved_mib,) * 3}
        if m.peak_mem_mib is not None:
            metrics["peak_mem_mib"] = (m.peak_mem_mib,) * 3
        for metric, (q20, q50, q80) in metrics.items():
            rows.append(dict(timestamp=stamp, device=dev, provider=m.case.provider, mode=m.case.mode, metric=metric,
                             tokens=s.tokens, in_features=s.in_features, out_features=s.out_features, shape=s.label,
                             dtype=s.dtype_name, r=s.r, p=s.p, p20=f"{q20:.6g}", p50=f"{q50:.6g}", p80=f"{q80:.6g}",
                             versions=versions, auto_path=m.auto_path))
    return rows


def append_csv(path: str, rows: List[Dict[str, object]]) -> None:
    """Append ``rows``; a file written with fewer columns (an older CSV_FIELDS) is first rewritten with the current
    header, its rows keeping their values and leaving the new columns empty."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    new = not os.path.exists(path)
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, old_rows = reader.fieldnames or [], list(reader)
        if header != CSV_FIELDS:
            unknown = set(header) - set(CSV_FIELDS)
            if unknown:
                raise ValueError(f"{path} has columns {sorted(unknown)} this version does not write")
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(old_rows)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _key(m: Measurement):
    s = m.case.shape
    return (s.label, s.dtype_name, s.r, s.p, m.case.mode)


def table(measurements: List[Measurement]) -> str:
    """One line per case: median time, TFLOP/s, memory, and the time ratio to ``peft`` and to ``base`` timed in the
    same interleaved group (same shape, dtype, r, p and mode)."""
    by_key: Dict[tuple, Dict[str, Measurement]] = defaultdict(dict)
    for m in measurements:
        by_key[_key(m)][m.case.provider] = m

    head = ["shape MxKxN", "dtype", "r", "p", "mode", "provider", "ms p50", "p20-p80", "TFLOP/s", "saved MiB",
            "peak MiB", "vs peft", "vs base", "auto ran"]  # "vs peft": vs the provider's peft_counterpart
    lines = [head]
    for key in sorted(by_key, key=lambda k: (k[1], int(k[0].split("x")[0]), k[0], k[2], k[3], k[4])):
        group = by_key[key]
        label, dtype, r, p, mode = key
        base = group.get("base")
        for provider in sorted(group, key=_provider_order):
            m = group[provider]
            t20, t50, t80 = m.time_ms
            peft = group.get(peft_counterpart(provider))
            ratio_peft = f"{t50 / peft.time_ms[1]:.2f}x" if peft else "-"
            ratio_base = f"{t50 / base.time_ms[1]:.2f}x" if base else "-"
            lines.append([label, dtype, str(r), f"{p:g}", mode, provider, f"{t50:.3f}", f"{t20:.3f}-{t80:.3f}",
                          f"{m.tflops[1]:.3f}", f"{m.saved_mib:.1f}",
                          "-" if m.peak_mem_mib is None else f"{m.peak_mem_mib:.1f}", ratio_peft, ratio_base,
                          m.auto_path or "-"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) if 6 <= i < len(head) - 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


_ORDER = ["fused", "fused-in-peft", "fused-nf4", "peft", "peft-nf4", "nf4-dequant", "fused-dora",
          "fused-dora-in-peft", "fused-dora-nf4", "peft-dora", "peft-dora-nf4", "naive", "naive+compile", "base"]


def peft_counterpart(provider: str) -> str:
    """The PEFT provider a row is compared with: PEFT's DoRA for the DoRA providers, PEFT on bitsandbytes for the
    NF4 providers (both for QDoRA), plain PEFT otherwise."""
    name = "peft-dora" if "dora" in provider else "peft"
    return name + "-nf4" if provider.endswith("-nf4") else name


def _provider_order(name: str) -> int:
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)


def _panels(measurements: List[Measurement]):
    """Forward+backward rows grouped into plot panels by (K x N, dtype, r, p), each {provider: {tokens: m}}.
    Panels with a single token count are left out (nothing to plot along the token axis)."""
    panels = defaultdict(lambda: defaultdict(dict))
    for m in measurements:
        if m.case.mode != "full":
            continue
        s = m.case.shape
        panels[(f"{s.in_features}x{s.out_features}", s.dtype_name, s.r, s.p)][m.case.provider][s.tokens] = m
    return {k: v for k, v in sorted(panels.items())
            if len({t for points in v.values() for t in points}) > 1}


def plot(measurements: List[Measurement], out_dir: str, device_label: str) -> List[str]:
    """PNG plots along the token axis, one panel per (K x N, dtype, r, p): the speed-up of each provider over its
    PEFT counterpart (forward+backward, p50) and the bytes saved for backward. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    panels = _panels(measurements)
    if not panels:
        return []
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    paths = []
    for kind in ("speedup", "memory"):
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
        for ax, ((kn, dtype, r, p), providers) in zip(axes.flat, panels.items()):
            for provider in sorted(providers, key=_provider_order):
                points = providers[provider]
                if kind == "speedup":
                    ref = providers.get(peft_counterpart(provider))
                    if provider.startswith("peft") or not ref:
                        continue
                    tokens = sorted(t for t in points if t in ref)
                    values = [ref[t].time_ms[1] / points[t].time_ms[1] for t in tokens]
                else:
                    tokens = sorted(points)
                    values = [points[t].saved_mib for t in tokens]
                ax.plot(tokens, values, marker="o", label=provider, color=f"C{_provider_order(provider)}")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            if kind == "speedup":
                ax.axhline(1.0, color="grey", lw=0.8)
                ax.set_ylabel("speed-up over PEFT (x)")
            else:
                ax.set_ylabel("MiB saved for backward")
            ax.set_xlabel("tokens (M)")
            ax.set_title(f"{kn} {dtype} r={r} p={p:g}", fontsize=9)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        what = ("forward+backward speed-up over PEFT (its NF4 / DoRA counterpart for those rows), p50"
                if kind == "speedup" else "activation memory saved for backward (parameters excluded)")
        fig.suptitle(f"{what}\n{device_label}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "speedup_vs_tokens.png" if kind == "speedup" else "saved_memory_vs_tokens.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
