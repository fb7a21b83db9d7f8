"""People in photos: the face detector (YuNet, ``detector.py`` over ``yunet.py``, which drops
animals' faces with ``animals.py``) and the rules that turn its faces into people tags
(``tags.py``)."""

from model.people.detector import Detection, DetectorConfig, Face, FaceDetector
from model.people.tags import (
    PEOPLE,
    PEOPLE_TAGS,
    PERSON_CATEGORIES,
    PeopleTag,
    people_tags,
    person_from_categories,
)

__all__ = [
    "PEOPLE",
    "PEOPLE_TAGS",
    "PERSON_CATEGORIES",
    "Detection",
    "DetectorConfig",
    "Face",
    "FaceDetector",
    "PeopleTag",
    "people_tags",
    "person_from_categories",
]
