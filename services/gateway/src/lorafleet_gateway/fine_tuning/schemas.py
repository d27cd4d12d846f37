"""The fine-tuning job request, with the `lorafleet` extension object (openai client: extra_body)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from lorafleet_gateway.schemas import InternalModel, OpenAIRequest


def _auto(value: Any) -> Any:
    # OpenAI hyperparameters take "auto" or a number; None here means "the trainer's default".
    return None if value == "auto" else value


class Hyperparameters(OpenAIRequest):
    n_epochs: Annotated[int | None, BeforeValidator(_auto)] = Field(default=None, ge=1, le=1000)
    batch_size: Annotated[int | None, BeforeValidator(_auto)] = Field(default=None, ge=1, le=4096)
    learning_rate_multiplier: Annotated[float | None, BeforeValidator(_auto)] = Field(default=None, gt=0, le=1000)


class SupervisedMethod(OpenAIRequest):
    hyperparameters: Hyperparameters | None = None


class Method(OpenAIRequest):
    type: Literal["supervised"]
    supervised: SupervisedMethod | None = None


# A tenant asking for a billion samples would make the trainer build a billion-row index list: cap it here.
MAX_DATASET_SAMPLES = 1_000_000
MAX_EXTRA_DATASETS = 16
DatasetFormat = Literal["alpaca", "sharegpt", "messages", "auto"]


def _dataset_short_form(value: Any) -> Any:
    """``"file-abc"`` or ``"file-abc#500"`` (ms-swift's ``dataset#N``) as a DatasetRef mapping."""
    if not isinstance(value, str):
        return value
    file, sep, count = value.partition("#")
    if not sep:
        return {"file": value}
    if not (count.isascii() and count.isdigit()):  # int() refuses some isdigit() digits, such as '²'
        raise ValueError(f"expected '<file id>' or '<file id>#<samples>', got {value!r}")
    return {"file": file, "samples": int(count)}


class DatasetRef(InternalModel):
    """One more uploaded file to mix into the training data (only file ids: never store keys or URLs)."""

    file: str = Field(min_length=1, description="An uploaded file id (purpose fine-tune) of the same tenant.")
    samples: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DATASET_SAMPLES,
        description="Use N rows: a seeded sample, or whole repeats plus a sample when N > rows; null: all.",
    )
    format: DatasetFormat = Field(default="auto", description="Row format; 'auto' detects it per row.")


class LoraFleetOptions(InternalModel):
    """Manifest overrides beyond OpenAI's knobs; the trainer validates their contents."""

    datasets: list[Annotated[DatasetRef, BeforeValidator(_dataset_short_form)]] | None = Field(
        default=None,
        max_length=MAX_EXTRA_DATASETS,
        description="More files mixed with training_file, each {file, samples?, format?} or 'file-id#N'.",
    )
    training_file_samples: int | None = Field(
        default=None, ge=1, le=MAX_DATASET_SAMPLES, description="Sample training_file to N rows (null: all)."
    )

    lora: dict[str, Any] | None = Field(default=None, description="Manifest `lora` section (rank, alpha...).")
    resources: dict[str, Any] | None = Field(
        default=None, description="Manifest `resources` section: `devices`, the GPUs the job trains on (torchrun)."
    )
    training: dict[str, Any] | None = Field(
        default=None, description="Manifest `training` keys; applied last, so they win over hyperparameters."
    )
    system_prompt: str | None = Field(default=None, description="Manifest `system_prompt`.")


class FineTuningJobCreate(OpenAIRequest):
    """POST /v1/fine_tuning/jobs body."""

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    # One name segment: no '/' (that would be a namespace) and no ':' (the fine-tuned name's separator).
    suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    lorafleet: LoraFleetOptions | None = None

    def effective_hyperparameters(self) -> Hyperparameters:
        """method.supervised.hyperparameters (OpenAI's current form) over the deprecated top-level ones."""
        merged = self.hyperparameters.model_dump(exclude_none=True) if self.hyperparameters else {}
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            merged.update(self.method.supervised.hyperparameters.model_dump(exclude_none=True))
        return Hyperparameters.model_validate(merged)
