"""GPU profiles as data: what each card can run, how much memory it has, what an hour costs.

Compute capabilities from NVIDIA's CUDA GPUs table (developer.nvidia.com/cuda-gpus). Prices are
typical on-demand cloud list prices per GPU-hour in 2026 (AWS/GCP/Azure/Lambda ranges, rounded);
a recipe can override them for its own cost reports.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


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


# ---------------------------------------------------------------- local detection
#
# forge asks the driver first (nvidia-smi ships with every NVIDIA driver and needs no Python GPU
# stack), then torch.cuda. Either answer is only trusted for what it reports; the profile a card
# maps to decides what forge plans for it.


@dataclass(frozen=True)
class LocalGPU:
    """One GPU the driver reports on this machine."""

    index: int
    name: str  # as the driver spells it: "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]
    memory_mib: int
    profile: str | None  # the GPUS entry it matches, None for cards forge has no profile for

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


@dataclass(frozen=True)
class LocalGPUs:
    """What detection found; `reason` says why `gpus` is empty (for deferred-stage messages)."""

    gpus: tuple[LocalGPU, ...]
    source: str  # "nvidia-smi", "torch.cuda" or "none"
    reason: str | None = None

    def __bool__(self) -> bool:
        return bool(self.gpus)


# Driver names → profile. Order matters: "L40S" before "L4", and the A100 split goes by memory.
_NAME_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bB200\b"), "B200"),
    (re.compile(r"\bH200\b"), "H200"),
    (re.compile(r"\bH100\b"), "H100"),
    (re.compile(r"\bL40S\b"), "L40S"),
    (re.compile(r"\bL4\b"), "L4"),
    (re.compile(r"\bA10G\b"), "A10G"),
    (re.compile(r"\bT4\b"), "T4"),
)

# nvidia-smi's CSV query interface (`nvidia-smi --help-query-gpu`); `compute_cap` needs driver ≥ 510.
_SMI_QUERY = ["--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"]


def match_profile(name: str, memory_mib: int | None = None) -> GPUProfile | None:
    """The profile a driver-reported card name stands for, or None when forge has none."""
    upper = name.upper().replace("-", " ")
    if re.search(r"\bA100\b", upper):
        # A100 comes in 40 and 80 GB; the name only sometimes says which, the memory always does.
        big = memory_mib is None or memory_mib > 60 * 1024 or "80GB" in upper.replace(" ", "")
        return GPUS["A100-80GB" if big else "A100-40GB"]
    for pattern, profile in _NAME_RULES:
        if pattern.search(upper):
            return GPUS[profile]
    return None


def _parse_smi(stdout: str) -> tuple[LocalGPU, ...]:
    gpus = []
    for line in stdout.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        index, name, cap, memory = fields
        profile = match_profile(name, int(float(memory)) if memory.replace(".", "").isdigit() else None)
        if re.fullmatch(r"\d+\.\d+", cap):
            major, minor = (int(p) for p in cap.split("."))
        elif profile is not None:  # old driver without compute_cap: trust the matched profile
            major, minor = profile.compute_capability
        else:
            continue
        memory_mib = int(float(memory)) if memory.replace(".", "").isdigit() else 0
        gpus.append(LocalGPU(int(index), name, (major, minor), memory_mib, profile.name if profile else None))
    return tuple(gpus)


def _detect_with_torch() -> LocalGPUs | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        memory_mib = props.total_memory // (1024 * 1024)
        profile = match_profile(props.name, memory_mib)
        gpus.append(LocalGPU(i, props.name, (props.major, props.minor), memory_mib, profile.name if profile else None))
    return LocalGPUs(tuple(gpus), "torch.cuda")


def detect_local_gpus(timeout_s: float = 15.0) -> LocalGPUs:
    """The NVIDIA GPUs on this machine, never raising: an empty result carries the reason."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        # Without the driver's device nodes there is nothing for torch to find either; skipping
        # its import keeps `forge plan` and cached rebuilds fast on CPU machines.
        if not Path("/proc/driver/nvidia").exists() and not list(Path("/dev").glob("nvidia[0-9]*")):
            return LocalGPUs((), "none", "no NVIDIA GPU detected (nvidia-smi not found)")
        found = _detect_with_torch()
        if found:
            return found
        return LocalGPUs((), "none", "no NVIDIA GPU detected (nvidia-smi not found)")
    try:
        proc = subprocess.run([smi, *_SMI_QUERY], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LocalGPUs((), "none", f"no NVIDIA GPU detected (nvidia-smi failed: {exc})")
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        detail = message[0] if message else f"exit status {proc.returncode}"
        return LocalGPUs((), "none", f"no NVIDIA GPU detected (nvidia-smi: {detail})")
    gpus = _parse_smi(proc.stdout)
    if not gpus:
        return LocalGPUs((), "none", "no NVIDIA GPU detected (nvidia-smi lists none)")
    return LocalGPUs(gpus, "nvidia-smi")


def gpu_listing(local: LocalGPUs | None = None) -> dict[str, object]:
    """What `forge gpus` prints (or emits with --json): every profile plus the local cards.

    `local` defaults to a fresh detection; pass one in to keep the CLI to a single probe.
    """
    local = detect_local_gpus() if local is None else local
    profiles = [
        {
            "name": p.name,
            "compute_capability": ".".join(map(str, p.compute_capability)),
            "sm": p.sm,
            "memory_gib": p.memory_gib,
            "usd_per_hour": p.usd_per_hour,
            "fp8": p.fp8,
            "fp4": p.fp4,
            "aliases": sorted(alias for alias, target in ALIASES.items() if target == p.name),
        }
        for p in GPUS.values()
    ]
    detected = [
        {
            "index": g.index,
            "name": g.name,
            "compute_capability": ".".join(map(str, g.compute_capability)),
            "sm": g.sm,
            "memory_mib": g.memory_mib,
            "profile": g.profile,
        }
        for g in local.gpus
    ]
    return {
        "profiles": profiles,
        "local": detected,
        "local_source": local.source,
        "local_reason": local.reason,
    }
