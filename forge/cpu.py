"""How many threads forge's own compute (quantization, evaluation) and the CPU servers it starts use.

One torch thread per core this process may run on, set explicitly rather than left to each
library: torch sizes its pool from the machine's cores, which a `taskset` mask or a CPU-limited
container does not shrink, and every thread beyond the cores a job really has only waits for one
(OpenMP threads spin before they sleep, so oversubscribed threads slow every stage). When another
job shares the machine, FORGE_THREADS gives forge its share.
"""

from __future__ import annotations

import os
import platform
import sys

from forge.errors import InputError


def cpu_threads() -> int:
    """FORGE_THREADS when set, else the cores this process may run on."""
    value = os.environ.get("FORGE_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"FORGE_THREADS: {value!r} is not a positive whole number of threads")
        return int(value)
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def use_cpu_threads() -> int:
    """Apply `cpu_threads()` to torch in this process and, through OMP_NUM_THREADS, to the servers
    and tools it starts (torch reads it when imported)."""
    threads = cpu_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # imported already (a test, a library caller): set its pool directly
        sys.modules["torch"].set_num_threads(threads)
    return threads


def cpu_description() -> str:
    """The processor's model name and the threads forge computes with, for build reports: float
    results differ in their last bits from one CPU family or thread count to another (BLAS kernels
    and reduction orders differ), which moves rounding decisions and so quantized figures a little."""
    model = platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = " ".join(value.split())
                    break
    except OSError:
        pass  # not Linux: the architecture name is what there is
    return f"{model}, {cpu_threads()} threads"
