"""People in photos: a face detector and the rules that turn its faces into people tags."""

from model.people.mtcnn import (
    WEIGHTS_PATH,
    Detection,
    DetectorConfig,
    Face,
    FaceDetector,
    MTCNNNets,
    PeopleTag,
    people_tags,
)

__all__ = [
    "WEIGHTS_PATH",
    "Detection",
    "DetectorConfig",
    "Face",
    "FaceDetector",
    "MTCNNNets",
    "PeopleTag",
    "people_tags",
]
