"""Request and response models: the API's OpenAPI contract."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Stable, machine-readable error code.", examples=["unsupported_media_type"]
    )
    message: str = Field(description="What went wrong and what to do, for a person.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Tag(BaseModel):
    label: str = Field(examples=["Egyptian cat"])
    probability: float = Field(ge=0, le=1, examples=[0.41])


class PhotoResult(BaseModel):
    filename: str | None = Field(description="The upload's file name, when it had one.")
    tags: list[Tag] = Field(description="Top tags, most probable first.")
    probabilities: dict[str, float] | None = Field(
        None, description="Every class's probability; only with ?all=true."
    )
    error: ErrorDetail | None = Field(
        None, description="Set, with no tags, for a photo of a multi-photo request that failed."
    )


class ModelRef(BaseModel):
    name: str = Field(examples=["imagenet-efficientnet-lite0"])
    version: str = Field(
        description="Derived from the checkpoint file's bytes.", examples=["c4c2edac06f5"]
    )


class TagResponse(BaseModel):
    model: ModelRef
    results: list[PhotoResult]


class ModelInfo(BaseModel):
    name: str
    version: str
    task: str = Field(description="single_label (softmax) or multi_label (sigmoid per tag).")
    arch: str
    classes: list[str]
    preprocessing: dict[str, Any]
    temperature: float
    thresholds: list[float] | None
    metrics: dict[str, Any]
    description: str
    created_at: str
    device: str


class Health(BaseModel):
    status: str = Field(examples=["ok"])
