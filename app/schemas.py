"""Request and response models: the API's OpenAPI contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The default checkpoint as the examples show it (python -m model.pretrained builds this version).
EXAMPLE_MODEL = {"id": "default", "name": "imagenet-efficientnet-lite0", "version": "34af72e0fef7"}


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Stable, machine-readable error code.", examples=["unsupported_media_type"]
    )
    message: str = Field(description="What went wrong and what to do, for a person.")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "unsupported_media_type",
                        "message": "not a supported image; send one of JPEG, PNG, WEBP, GIF, "
                        "BMP, TIFF, HEIF",
                    }
                }
            ]
        }
    )
    error: ErrorDetail


_PATH_LABELS = (
    "The labels of the path's elements in the response's language (Content-Language), from "
    "the top category down; only in a language other than en (?lang=, Accept-Language, "
    "PHOTOTAG_LANG). Absent with ?vocabulary=classes."
)
_LABEL = (
    "In the response's language (Content-Language): the vocabulary's own (English) label "
    "without one, else its label in that language (the English one where it has none; a custom "
    "tag keeps its name)."
)


class Tag(BaseModel):
    label: str = Field(examples=["cat"], description=_LABEL)
    probability: float = Field(
        ge=0,
        le=1,
        examples=[0.86],
        description="For a vocabulary tag, its classes' probabilities rolled up (summed for a "
        "single-label model, the largest for a multi-label one).",
    )
    path: list[str] | None = Field(
        None,
        description="The tag's place in the vocabulary, from the top category down, ending "
        "with its English label: its stable id, in English whatever the language. Absent with "
        "?vocabulary=classes.",
        examples=[["animal", "cat"]],
    )
    path_labels: list[str] | None = Field(
        None, description=_PATH_LABELS, examples=[["Tier", "Katze"]]
    )


class VocabularyTag(BaseModel):
    label: str = Field(examples=["cat"], description=_LABEL)
    path: list[str] = Field(examples=[["animal", "cat"]], description="Its id, in English.")
    path_labels: list[str] | None = Field(
        None, description=_PATH_LABELS, examples=[["Tier", "Katze"]]
    )
    threshold: float = Field(
        description="The probability from which the tag is returned, as this server reads "
        "photos (with regions, or the whole photo alone: PHOTOTAG_REGIONS)."
    )
    classes: list[str] = Field(
        description="The network classes it gathers (its own and its descendants').",
        examples=[["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]],
    )


class PhotoResult(BaseModel):
    filename: str | None = Field(description="The upload's file name, when it had one.")
    tags: list[Tag] = Field(description="Top tags, most probable first.")
    probabilities: dict[str, float] | None = Field(
        None, description="Every class's probability; only with ?all=true."
    )
    error: ErrorDetail | None = Field(
        None, description="Set, with no tags, for a photo of a multi-photo request that failed."
    )
    faces: list[NamedFaceBox] | None = Field(
        None,
        description="Only where the server names people (PHOTOTAG_NAMES=on): every face found, "
        "best first, with the name of the taught person it is (people/<name> among the tags) "
        "or null.",
    )


class ModelRef(BaseModel):
    id: str = Field(
        description="The name the model is served by (its file name without .safetensors); "
        "pass it as ?model=.",
        examples=["default"],
    )
    name: str = Field(
        description="The name in the model card.", examples=["imagenet-efficientnet-lite0"]
    )
    version: str = Field(
        description="A digest of what the model computes: its weights and the card fields that "
        "change probabilities or tags (not its name, description, date or metrics).",
        examples=[EXAMPLE_MODEL["version"]],
    )


class TagResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": EXAMPLE_MODEL,
                    "results": [
                        {
                            "filename": "cat.jpg",
                            "tags": [
                                {"label": "cat", "probability": 0.99, "path": ["animal", "cat"]}
                            ],
                        },
                        {
                            "filename": "notes.pdf",
                            "tags": [],
                            "error": {
                                "code": "unsupported_media_type",
                                "message": "notes.pdf: not a supported image; send one of JPEG, "
                                "PNG, WEBP, GIF, BMP, TIFF, HEIF",
                            },
                        },
                    ],
                }
            ]
        }
    )
    model: ModelRef
    results: list[PhotoResult]


class ModelSummary(BaseModel):
    id: str = Field(description="Pass it as ?model=.", examples=["pets"])
    name: str = Field(description="The name in the model card.", examples=["pets-seed-cnn"])
    version: str = Field(examples=["c4c2edac06f5"])
    task: str = Field(examples=["single_label"])
    arch: str = Field(examples=["seed_cnn"])
    num_classes: int = Field(examples=[3])
    device: str = Field(examples=["cpu"])
    backend: str = Field(description="What runs the network: torch or openvino.")
    precision: str = Field(description="float32, bfloat16 or float16.", examples=["float32"])
    default: bool = Field(description="Whether requests without ?model= get this model.")


class LanguageInfo(BaseModel):
    code: str = Field(description="Pass it as ?lang=.", examples=["de"])
    name: str = Field(description="The language's name in itself.", examples=["Deutsch"])


class ModelList(BaseModel):
    default: str = Field(description="The id of the default model.", examples=["default"])
    models: list[ModelSummary]
    languages: list[LanguageInfo] = Field(
        description="The languages tags are labelled in (?lang=), en first."
    )
    default_language: str = Field(
        description="The language of a request that names none (PHOTOTAG_LANG, else en).",
        examples=["en"],
    )


class ModelInfo(BaseModel):
    id: str = Field(description="The name the model is served by; pass it as ?model=.")
    default: bool = Field(description="Whether requests without ?model= get this model.")
    name: str
    version: str
    task: str = Field(description="single_label (softmax) or multi_label (sigmoid per tag).")
    arch: str
    classes: list[str]
    preprocessing: dict[str, Any]
    temperature: float
    tta: str = Field(
        description="Test-time augmentation applied to every photo: none, flip (2 views) or "
        "flip_shift (6 views); the probabilities average the views' logits."
    )
    thresholds: list[float] | None
    vocabulary: list[VocabularyTag] | None = Field(
        description="The tags the model returns by default, each with the classes it gathers; "
        "null when its classes are its tags."
    )
    metrics: dict[str, Any]
    description: str
    created_at: str
    device: str
    backend: str = Field(description="What runs the network: torch or openvino.")
    precision: str = Field(description="float32, bfloat16 or float16.")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Region(BaseModel):
    """Where the grid lies on the photo, as fractions of its width and height: the part the
    network saw (its center crop)."""

    left: float = Field(ge=0, le=1, examples=[0.17])
    top: float = Field(ge=0, le=1, examples=[0.0625])
    right: float = Field(ge=0, le=1, examples=[0.827])
    bottom: float = Field(ge=0, le=1, examples=[0.9375])


class ExplainResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": EXAMPLE_MODEL,
                    "filename": "cat.jpg",
                    "tag": {"label": "cat", "probability": 0.86, "path": ["animal", "cat"]},
                    "method": "hirescam",
                    "grid": [[0.0, 0.3, 0.1], [0.2, 1.0, 0.6], [0.0, 0.4, 0.1]],
                    "region": {"left": 0.17, "top": 0.0625, "right": 0.827, "bottom": 0.9375},
                }
            ]
        }
    )
    model: ModelRef
    filename: str | None = Field(description="The upload's file name, when it had one.")
    tag: Tag = Field(description="The tag explained, with its probability for this photo.")
    method: str = Field(
        description="How the grid was computed: hirescam (a Grad-CAM family method on the "
        "network's last feature map).",
        examples=["hirescam"],
    )
    grid: list[list[float]] = Field(
        description="The heatmap: rows from top to bottom, each from left to right, one cell "
        "per position of the network's last feature map; 1 where the evidence for the tag is "
        "strongest, 0 where there is none.",
    )
    region: Region = Field(description="Where the grid lies on the photo.")
    via: Tag | None = Field(
        default=None,
        description="Only for `person` on a photo where no face was found: the classifier's "
        "category that showed a person (sport, clothing or people: what people do or wear), "
        "whose heatmap the grid is. Absent otherwise.",
    )


class FaceBox(BaseModel):
    """One face the detector found: its box in the photo's pixels (x to the right, y down, from
    the top left corner of the photo as sent, upright) and the detector's confidence."""

    left: float = Field(ge=0, examples=[170.4])
    top: float = Field(ge=0, examples=[52.1])
    right: float = Field(ge=0, examples=[281.9])
    bottom: float = Field(ge=0, examples=[188.0])
    score: float = Field(ge=0, le=1, examples=[0.998], description="The detector's confidence.")


class NamedFaceBox(FaceBox):
    """A face and who it is: a taught person's name (PHOTOTAG_NAMES=on), or null for a face
    nobody taught or nobody close enough. Face descriptors are never returned."""

    name: str | None = Field(examples=["Alice"], description="The taught person, or null.")
    probability: float | None = Field(
        ge=0,
        le=1,
        examples=[0.93],
        description="How sure the name is (from the face's distance to the person's nearest "
        "example: 0.5 at dlib's same-person line 0.6); null without a name.",
    )


class PeopleExplainResponse(BaseModel):
    """Why a people tag: it comes from the face detector, not from the network, so there is no
    heatmap; the faces are the answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": EXAMPLE_MODEL,
                    "filename": "skier.jpg",
                    "tag": {"label": "person", "probability": 1.0, "path": ["people", "person"]},
                    "method": "faces",
                    "width": 512,
                    "height": 512,
                    "faces": [
                        {"left": 170.4, "top": 52.1, "right": 281.9, "bottom": 188.0, "score": 1.0}
                    ],
                }
            ]
        }
    )
    model: ModelRef
    filename: str | None = Field(description="The upload's file name, when it had one.")
    tag: Tag = Field(
        description='The people tag explained (path ["people", label]) with its probability '
        "for this photo, as /v1/tags gives it; 0 when the photo does not have the tag."
    )
    method: Literal["faces"] = Field(
        description="faces: the tag comes from the face detector (PHOTOTAG_PEOPLE), not the "
        "network; `faces` are what it found."
    )
    width: int = Field(ge=1, description="The photo's width in pixels: the boxes' frame.")
    height: int = Field(ge=1, description="The photo's height in pixels.")
    faces: list[FaceBox] = Field(
        description="Every face the detector found, best first, whichever people tag was "
        "asked (person, portrait and group are all read from these faces). Empty when it found "
        "none: then the photo has no people tag."
    )
