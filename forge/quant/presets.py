"""Named quantization presets, as data. A recipe names one and may override a few fields.

The names follow llm-compressor's preset schemes (compressed_tensors.quantization.quant_scheme:
W4A16, W4A16_ASYM, FP8, FP8_DYNAMIC, NVFP4); GPTQ_W4A16 and AWQ_W4A16 are forge's names for the
same int4 storage reached by a calibrated algorithm instead of round-to-nearest, and
AWQ_TUNED_W4A16 the same again with AWQ's rounding tuned per decoder layer (`forge.quant.rounding`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from forge.quant.scheme import Scheme

# Algorithms that end in AWQ's scaled weights on AWQ's grids: AutoAWQ's storage, GEMM format included.
AWQ_ALGORITHMS = ("awq", "awq_tuned")


def needs_calibration(scheme: Scheme, algorithm: str) -> bool:
    """The one rule for whether a variant needs calibration text: AWQ and GPTQ fit to activations,
    static FP8 input scales and fp8 KV-cache scales are measured on them, and NVFP4's global
    activation scales are too (llm-compressor calibrates its NVFP4 scheme)."""
    return (
        algorithm in (*AWQ_ALGORITHMS, "gptq")
        or scheme.activations == "static_tensor"
        or scheme.kv_cache_dtype == "fp8"
        or scheme.weight_format == "fp4"
    )


@dataclass(frozen=True)
class Preset:
    scheme: Scheme
    algorithm: str  # rtn | gptq | awq | awq_tuned | none (nvfp4: planned only)
    summary: str

    @property
    def needs_calibration(self) -> bool:
        """Whether the preset as named (before a recipe's `kv_cache_dtype`) needs calibration."""
        return needs_calibration(self.scheme, self.algorithm)


def _int4(name: str, symmetric: bool, algorithm: str, summary: str) -> Preset:
    scheme = Scheme(
        preset=name,
        weight_format="int4",
        group_size=128,
        symmetric=symmetric,
        weight_granularity="group",
        activations="none",
    )
    return Preset(scheme, algorithm, summary)


PRESETS: dict[str, Preset] = {
    "FP8_DYNAMIC": Preset(
        Scheme("FP8_DYNAMIC", "fp8", None, True, "channel", "dynamic_token"),
        "rtn",
        "fp8 e4m3 weights per output channel, activations scaled per token at run time",
    ),
    "FP8": Preset(
        Scheme("FP8", "fp8", None, True, "tensor", "static_tensor"),
        "rtn",
        "fp8 e4m3 weights per tensor, static per-tensor input scales from calibration",
    ),
    "W4A16": _int4("W4A16", True, "rtn", "int4 weights, symmetric groups, round-to-nearest"),
    "W4A16_ASYM": _int4("W4A16_ASYM", False, "rtn", "int4 weights, asymmetric groups, round-to-nearest"),
    "GPTQ_W4A16": _int4("GPTQ_W4A16", True, "gptq", "int4 weights, symmetric groups, GPTQ error feedback"),
    "AWQ_W4A16": _int4(
        "AWQ_W4A16", False, "awq", "int4 weights, asymmetric groups, activation-aware scales + clipping"
    ),
    "AWQ_TUNED_W4A16": _int4(
        "AWQ_TUNED_W4A16",
        False,
        "awq_tuned",
        "AWQ_W4A16, then each code's rounding tuned against its decoder layer's output (slower, more accurate)",
    ),
    "NVFP4": Preset(
        Scheme("NVFP4", "fp4", 16, True, "group", "dynamic_token"),  # type: ignore[arg-type]
        "none",
        "fp4 e2m1 weights and activations, group 16 (Blackwell only; planned, not produced by forge yet)",
    ),
}


def is_awq(preset: str) -> bool:
    return preset in PRESETS and PRESETS[preset].algorithm in AWQ_ALGORITHMS


def resolve_scheme(
    preset: str,
    *,
    group_size: int | None = None,
    symmetric: bool | None = None,
    ignore: tuple[str, ...] | None = None,
    kv_cache_dtype: str | None = None,
    dtype: str | None = None,
) -> Scheme:
    """The preset's scheme with the recipe's explicit overrides applied (None keeps the preset's)."""
    scheme = PRESETS[preset].scheme
    overrides = {
        "group_size": group_size,
        "symmetric": symmetric,
        "ignore": ignore,
        "kv_cache_dtype": kv_cache_dtype,
        "dtype": dtype,
    }
    return replace(scheme, **{k: v for k, v in overrides.items() if v is not None})
