"""``python -m benchmarks``: the benchmark suite (the README's main job).

Runs on CUDA when a GPU is present (LLM shapes, bf16), on the CPU otherwise (a default set of about 3 minutes, or
``--full``). Prints a table with ratios vs ``peft`` and vs ``base``, appends rows to a CSV under
``benchmarks/results/`` and writes PNG plots next to it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import OrderedDict

import torch

from . import report, suite

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--full", action="store_true", help="the long CPU shape set")
    parser.add_argument("--providers", nargs="*", help=f"subset of {', '.join(suite.PROVIDERS)}")
    parser.add_argument("--modes", nargs="*", choices=suite.MODES)
    parser.add_argument("--tokens", nargs="*", type=int, help="only shapes with these token counts")
    parser.add_argument("--dtypes", nargs="*", choices=("float32", "float16", "bfloat16"), help="only these dtypes")
    parser.add_argument("--budget", type=float, default=1.0, help="CPU seconds of timing per case (min 3 runs)")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory of the CSV and the plots")
    parser.add_argument("--no-plots", action="store_true")
    ns = parser.parse_args(argv)

    device = torch.device("cuda" if ns.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if ns.device == "auto" else ns.device))
    if device.type == "cuda":
        plan = suite.gpu_default()
    else:
        plan = suite.cpu_full() if ns.full else suite.cpu_default()
    plan = [entry for entry in plan
            if (not ns.tokens or entry[0].tokens in ns.tokens) and (not ns.dtypes or entry[0].dtype_name in ns.dtypes)]
    cases = suite.cases_for(plan, ns.providers, ns.modes)
    label = report.device_name(device)
    print(f"fused-lora benchmarks on {label}: {len(cases)} cases ({report.library_versions()})", flush=True)

    # All providers of one shape are built together and timed side by side, once per mode.
    groups = OrderedDict()
    for case in cases:
        groups.setdefault(case.shape, OrderedDict()).setdefault(case.provider, []).append(case.mode)

    from tqdm import tqdm

    measurements = []
    with tqdm(total=len(cases), unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
        for shape, providers in groups.items():
            bar.set_description(f"{shape.label} {shape.dtype_name} r={shape.r} p={shape.p:g}")
            # a provider that cannot be built (e.g. a missing optional dependency) is reported and left out
            measurements += suite.measure_group(shape, providers, device, ns.budget, bar.update,
                                                report=lambda message: print(f"\n{message}", file=sys.stderr))

    print()
    print(report.table(measurements))
    os.makedirs(ns.out, exist_ok=True)
    csv_path = os.path.join(ns.out, f"results-{_slug(device.type)}.csv")
    report.append_csv(csv_path, report.csv_rows(measurements, device))
    print(f"\nappended {len(measurements)} measurements to {csv_path}")
    if not ns.no_plots and measurements:
        prefix = os.path.join(ns.out, _slug(device.type))
        for path in report.plot(measurements, prefix, label):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
