"""Faces -> the people tags: ``person``, ``portrait`` and ``group``, under the ``people`` category;
and ``person`` where the classifier sees what only people do or wear, with no face to find.

The face rules read only the faces' boxes and scores, so any detector's faces serve."""

from __future__ import annotations

from dataclasses import dataclass

from model.people.detector import Face

PEOPLE = "people"  # the category above every people tag (its path's first element)
PEOPLE_TAGS = ("person", "portrait", "group")  # what people_tags can give, nothing else

PORTRAIT_MIN_SIDE = 0.12  # the face's side as a fraction of the photo's shorter side
RIVAL_RATIO = 0.5  # a second face at least this fraction of the largest one's side is a rival
GROUP_MIN_FACES = 3  # faces of comparable size (rivals of the largest, itself included)

# Vocabulary categories that show a person where no face does (a skier seen from behind, a
# tennis player far off, a bride from the back): what people do, what they wear, and the
# people branch itself (athlete, diver, wedding, ...). Their rolled-up probability, at least
# PERSON_EVIDENCE, is the person's (bench/people_bench.py: faces alone miss people seen from
# behind or too small; this finds a fifth of those at no cost in false alarms there).
PERSON_CATEGORIES = ("people", "sport", "clothing")
PERSON_EVIDENCE = 0.4


@dataclass(frozen=True)
class PeopleTag:
    label: str  # one of PEOPLE_TAGS
    probability: float  # 0..1


def people_tags(faces: list[Face], size: tuple[int, int]) -> list[PeopleTag]:
    """``person`` for any face; ``portrait`` for one large face with no rival; ``group`` for
    ``GROUP_MIN_FACES`` or more faces of comparable size. ``size`` is the photo's (width,
    height). Probabilities are the detector's face scores, uncalibrated."""
    if not faces:
        return []
    tags = [PeopleTag("person", max(f.score for f in faces))]
    by_size = sorted(faces, key=lambda f: f.side, reverse=True)
    largest = by_size[0]
    peers = [f for f in by_size if f.side >= RIVAL_RATIO * largest.side]
    if len(peers) == 1 and largest.side >= PORTRAIT_MIN_SIDE * min(size):
        tags.append(PeopleTag("portrait", largest.score))
    if len(peers) >= GROUP_MIN_FACES:
        # the weakest of the faces that make the group
        weakest = sorted((f.score for f in peers), reverse=True)[GROUP_MIN_FACES - 1]
        tags.append(PeopleTag("group", weakest))
    return tags


def person_from_categories(probabilities: dict[str, float]) -> PeopleTag | None:
    """``person`` from the classifier: the most probable of :data:`PERSON_CATEGORIES` (their
    rolled-up probabilities, by label; a category the vocabulary lacks is left out), when it is
    at least :data:`PERSON_EVIDENCE`."""
    best = max((probabilities.get(c, 0.0) for c in PERSON_CATEGORIES), default=0.0)
    return PeopleTag("person", best) if best >= PERSON_EVIDENCE else None
