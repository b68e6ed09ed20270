"""GPU profiles as data: what each card can run, how much memory it has, what an hour costs.

Compute capabilities from NVIDIA's CUDA GPUs table (developer.nvidia.com/cuda-gpus). Prices are
typical on-demand cloud list prices per GPU-hour in 2026 (AWS/GCP/Azure/Lambda ranges, rounded);
a recipe can override them for its own cost reports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUProfile:
    name: str
    compute_capability: tuple[int, int]
    memory_gib: int
    usd_per_hour: float

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    @property
    def fp8(self) -> bool:
        # FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0).
        return self.compute_capability >= (8, 9)

    @property
    def fp4(self) -> bool:
        # NVFP4 / MXFP4 tensor cores are Blackwell only (10.x datacenter, 12.x workstation).
        return self.compute_capability >= (10, 0)


GPUS: dict[str, GPUProfile] = {
    p.name: p
    for p in [
        GPUProfile("T4", (7, 5), 16, 0.53),
        GPUProfile("A10G", (8, 6), 24, 1.01),
        GPUProfile("L4", (8, 9), 24, 0.80),
        GPUProfile("L40S", (8, 9), 48, 1.86),
        GPUProfile("A100-40GB", (8, 0), 40, 3.67),
        GPUProfile("A100-80GB", (8, 0), 80, 4.10),
        GPUProfile("H100", (9, 0), 80, 4.50),
        GPUProfile("H200", (9, 0), 141, 5.50),
        GPUProfile("B200", (10, 0), 180, 8.00),
    ]
}

# Names people write in recipes that mean one of the profiles above.
ALIASES = {"A100": "A100-80GB", "H100-80GB": "H100", "H100-SXM": "H100", "H200-141GB": "H200"}


def lookup_gpu(name: str) -> GPUProfile | None:
    return GPUS.get(ALIASES.get(name, name))
