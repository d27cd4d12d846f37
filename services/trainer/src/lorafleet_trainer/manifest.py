"""The job manifest: what to train, on what, and how.

Parsed from YAML or JSON bytes; every problem is reported with its field path
(``training.learning_rate: must be > 0``) so a caller fixes them all at once.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet_common.adapters import check_adapter_config
from lorafleet_common.names import InvalidName, validate_adapter_name

DatasetFormat = Literal["alpaca", "sharegpt", "messages", "auto"]


# The message travels as a gRPC status detail (metadata, a few KiB at most): a manifest with a
# million unknown keys, or a 10 MB adapter name, must still give a short one. ``problems`` keeps all.
MAX_PROBLEMS_IN_MESSAGE = 20
MAX_PROBLEM_CHARS = 300


def _clip(text: str, limit: int) -> str:
    text = text if len(text) <= limit else f"{text[: limit - 3]}..."
    # A JSON "\ud800" escape decodes to a lone surrogate, which gRPC cannot encode: spell it out instead.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ManifestError(ValueError):
    """The manifest cannot be used; ``problems`` lists every reason with its field path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(_clip(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS_IN_MESSAGE])
        more = len(problems) - MAX_PROBLEMS_IN_MESSAGE
        super().__init__(f"invalid manifest: {shown}" + (f"; and {more} more" if more > 0 else ""))


class DatasetSpec(BaseModel):
    """One dataset file and how much of it to use."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(min_length=1, description="s3://bucket/key, file:///abs/path, or a key in the trainer's store.")
    format: DatasetFormat = Field(default="auto", description="Row format; 'auto' detects it per row.")
    samples: int | None = Field(
        default=None, ge=1, description="Use N rows: a seeded sample, or whole repeats plus a sample when N > rows."
    )


class LoraSpec(BaseModel):
    """The adapter's shape."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1, description="LoRA rank r (must not exceed the serving max_lora_rank).")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear",
        description="'all-linear' (every linear layer but lm_head) or a list of module names such as q_proj.",
    )
    quantization: Literal["none", "nf4"] = Field(
        default="none",
        description="'nf4' loads the frozen base in 4-bit NF4 (QLoRA, bitsandbytes, bf16 compute); needs a CUDA GPU.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or any(not m.strip() for m in value)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return value

    def peft_config_fields(self) -> dict[str, Any]:
        """The adapter_config.json fields the serving rules look at, as this manifest will write them."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
        }


class TrainingSpec(BaseModel):
    """Optimisation settings."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the (sampled) training rows.")
    learning_rate: float = Field(default=1.0e-4, gt=0, le=1, description="Peak AdamW learning rate.")
    batch_size: int = Field(default=1, ge=1, le=1024, description="Rows per forward pass (padded to the longest).")
    gradient_accumulation_steps: int = Field(
        default=16, ge=1, le=4096, description="Forward passes per optimizer step."
    )
    max_length: int = Field(
        default=2048, ge=8, le=1_048_576, description="Longest row in tokens; longer rows are dropped (reported)."
    )
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Share of steps with a linear LR warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient norm to this value; null disables clipping."
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for sampling, shuffling and LoRA init.")
    packing: bool = Field(
        default=False,
        description="Pack several rows into each sequence of up to max_length tokens (no attention across rows); "
        "batch_size then counts packed sequences.",
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass (less memory, ~30% more compute); null = off on "
        "CPU; on a CUDA GPU a memory probe (one forward and backward pass of the job's largest micro-batch before "
        "the first step) turns it on only if that micro-batch does not fit in 90% of the memory the process can "
        "reach without it.",
    )
    compile: bool = Field(
        default=False,
        description="Run the decoder layers through torch.compile, each layer on its own: less per-forward overhead "
        "after a one-off compilation (tens of seconds); a compilation failure falls back to eager training.",
    )
    checkpoint_every_steps: int = Field(
        default=50,
        ge=0,
        description="Save a resumable checkpoint every N optimizer steps; 0 = no step-based checkpoints.",
    )
    checkpoint_every_minutes: float = Field(
        default=15.0,
        ge=0,
        description="Save a resumable checkpoint when this many minutes passed since the last one; 0 = off.",
    )


MAX_DEVICES = 64  # one host: 8 GPUs is the usual most; the trainer's host check is the real bound


class ResourcesSpec(BaseModel):
    """What the job runs on."""

    model_config = ConfigDict(extra="forbid")

    devices: int = Field(
        default=1,
        ge=1,
        le=MAX_DEVICES,
        description="GPUs the job trains on, one process each, data parallel on one host (torchrun); the "
        "result is the same as with 1. On a host without CUDA: CPU processes (gloo), at most its CPU count.",
    )


class ValidationSpec(BaseModel):
    """Held-out rows whose mean next-token loss (``eval_loss``) is reported while training."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetSpec] | None = Field(
        default=None, description="Validation files (same form as datasets); exclusive with split."
    )
    split: float | None = Field(
        default=None,
        gt=0,
        lt=0.5,
        description="Hold out this share of the training rows (seeded) instead; exclusive with datasets.",
    )
    every_steps: int = Field(
        default=0, ge=0, description="Evaluate every N optimizer steps; 0 = at the end of each epoch only."
    )

    @field_validator("datasets", mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        return expand_short_forms(value)

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSpec:
        if (self.datasets is None) == (self.split is None):
            raise ValueError("give exactly one of datasets and split")
        if self.datasets is not None and not self.datasets:
            raise ValueError("datasets must not be empty")
        return self


class JobManifest(BaseModel):
    """A training job: base model, datasets, LoRA shape and training settings."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="Base model id, local folder or s3:// prefix.")
    adapter_name: str = Field(description="Name the adapter is published under (version = job id).")
    datasets: list[DatasetSpec] = Field(min_length=1, description="Training files, mixed and shuffled together.")
    system_prompt: str | None = Field(
        default=None, description="System prompt for rows without one; null keeps the chat template's default."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="What the job runs on.")
    validation: ValidationSpec | None = Field(
        default=None, description="Held-out rows to report an eval_loss on; null = no evaluation."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels copied onto the job.")

    @field_validator("adapter_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return validate_adapter_name(value)
        except InvalidName as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("datasets", mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        return expand_short_forms(value)


def expand_short_forms(value: Any) -> Any:
    """A datasets list with its ``"uri#N"`` strings turned into DatasetSpec mappings; anything else unchanged."""
    if isinstance(value, list):
        return [parse_dataset_short_form(item) if isinstance(item, str) else item for item in value]
    return value


def parse_dataset_short_form(text: str) -> dict[str, Any]:
    """``"uri"`` or ``"uri#N"`` (ms-swift style) → a DatasetSpec mapping."""
    uri, sep, count = text.rpartition("#")
    if not sep or not (count.isascii() and count.isdigit()):  # int() refuses some isdigit() digits ('²')
        return {"uri": text}  # no '#N' suffix: a '#' elsewhere belongs to the name
    return {"uri": uri, "samples": int(count)}  # the DatasetSpec checks report a bad uri or N with their path


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _describe(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    messages = {
        "missing": "is required",
        "extra_forbidden": "unknown field",
        "greater_than": f"must be > {_number(ctx.get('gt'))}",
        "greater_than_equal": f"must be >= {_number(ctx.get('ge'))}",
        "less_than": f"must be < {_number(ctx.get('lt'))}",
        "less_than_equal": f"must be <= {_number(ctx.get('le'))}",
        "too_short": "must not be empty",
    }
    if kind in messages:
        return messages[kind]
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("list[str]", "literal['all-linear']"):
            continue  # union member tags say nothing useful to the caller
        else:
            name = _clip(str(part), 64)  # an unknown key may be any YAML scalar, of any length
            path += f".{name}" if path else name
    return path or "manifest"


def _lora_field(problem: str) -> str:
    if "rank" in problem:
        return "lora.rank"
    if "target" in problem:
        return "lora.target_modules"
    return "lora"


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _load_json_or_yaml(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError([f"manifest: neither valid JSON nor YAML: {exc}"]) from exc
    except (ValueError, TypeError, OverflowError) as exc:
        # PyYAML's scalar constructors raise these for values its resolver accepted: a 2001-13-45 date,
        # an integer of more digits than Python converts.
        raise ManifestError([f"manifest: invalid YAML value: {exc}"]) from exc


def parse_manifest(data: bytes, *, max_lora_rank: int) -> JobManifest:
    """Parse and validate manifest bytes (YAML or JSON); ManifestError lists every problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([f"manifest: not UTF-8 text ({exc})"]) from exc
    try:
        raw = _load_json_or_yaml(text)
    except RecursionError:  # json and yaml both recurse once per nesting level
        raise ManifestError(["manifest: nested too deeply"]) from None
    if not isinstance(raw, dict):
        raise ManifestError([f"manifest: must be a mapping, got {type(raw).__name__}"])
    try:
        manifest = JobManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(_dedupe([f"{_field_path(e['loc'])}: {_describe(e)}" for e in exc.errors()])) from exc
    problems = check_adapter_config(manifest.lora.peft_config_fields(), max_rank=max_lora_rank)
    if problems:
        raise ManifestError([f"{_lora_field(p)}: {p}" for p in problems])
    return manifest
