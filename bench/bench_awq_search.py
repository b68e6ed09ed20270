"""AWQ's scale search at Llama-3.1-8B shapes: the output error through the Gram matrix vs through
the calibration inputs themselves, side by side, in one process.

    .venv/bin/python bench/bench_awq_search.py [--tokens 1024] [--grid 2]

For each scale group of an 8B decoder layer (q/k/v after the input norm, o after v, gate/up after
the post-attention norm, down after up), `forge.quant.awq.search_scales` runs twice on the same
random weights (bf16-like std 0.02) and random inputs with uneven channels: once with only the
Gram matrix (`InputStats.gram`, out·in² flops per candidate) and once with the inputs kept
(`InputStats.inputs`, out·in·tokens), as `forge.quant.run` does when the calibration has fewer
tokens than the linear has input channels. `--grid` cuts the α grid (2 → 4 candidates instead of
AutoAWQ's 40) so the Gram side ends in minutes; seconds per candidate are printed, with the chosen
scale's agreement between the two.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from forge.quant import awq
from forge.quant.awq import ScaleGroup, search_scales
from forge.quant.layerwise import InputStats
from forge.quant.presets import resolve_scheme

# (group, input channels, output rows of the linears sharing that input): Llama-3.1-8B.
GROUPS = [("q/k/v", 4096, 4096 + 1024 + 1024), ("o", 4096, 4096), ("gate/up", 4096, 2 * 14336), ("down", 14336, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens (bench_scale.py: 4 × 256)")
    parser.add_argument("--grid", type=int, default=2, help="α grid points (forge: 20, so 40 candidates)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, tokens {args.tokens}", flush=True)
    scheme = resolve_scheme("AWQ_W4A16", group_size=128)
    awq.SCALE_GRID = args.grid
    candidates = 2 * args.grid
    print("| group | out × in | Gram s/candidate | inputs s/candidate | ratio | same scales |")
    print("|---|---|---:|---:|---:|---|")
    for name, in_features, out_features in GROUPS:
        torch.manual_seed(0)
        x = torch.randn(args.tokens, in_features) * (torch.rand(in_features) * 2).exp()
        w = torch.randn(out_features, in_features) * 0.02
        common = {"tokens": args.tokens, "abs_sum": x.abs().sum(0).double(), "gram": x.T @ x}
        group = ScaleGroup("smooth", (name,))
        seconds, chosen = [], []
        for stats in (InputStats(**common), InputStats(**common, inputs=x)):
            began = time.perf_counter()
            scales, _, _ = search_scales([w], [True], stats, scheme, group)
            seconds.append((time.perf_counter() - began) / candidates)
            chosen.append(scales)
        differ = float(((chosen[0] - chosen[1]) / chosen[0]).abs().max())
        same = "yes" if torch.equal(*chosen) else f"no (max rel diff {differ:.1e})"
        print(f"| {name} | {out_features} × {in_features} | {seconds[0]:.2f} | {seconds[1]:.2f} "
              f"| {seconds[0] / seconds[1]:.1f}× | {same} |", flush=True)  # fmt: skip
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
