"""The language a request's tags are labelled in: one rule for every route that answers tags
(``/v1/tags``, ``/v1/model``, ``/v1/explain``), and the tags in that language.

The language is ``?lang=`` when the request gives it (one the server does not serve: 400
``unsupported_language``, listing those it does), else the one the ``Accept-Language`` header
prefers most among the served ones, else the server's ``PHOTOTAG_LANG``, else English. English
answers exactly as a server without languages does; another language translates each tag's
``label`` and adds ``path_labels`` beside the English ``path`` (the stable id). The labels
themselves are :mod:`model.labels`'; ``Content-Language`` says which language answered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request, Response

from app.errors import UnsupportedLanguage
from model.labels import ENGLISH, Labels

_TAG = re.compile(r"^(\*|[a-z]{1,8}(-[a-z0-9]{1,8})*)$")
MAX_RANGES = 32  # Accept-Language entries read; a browser sends a handful


def negotiate(header: str | None, languages: Sequence[str], default: str) -> str | None:
    """The served language (of ``languages``) an ``Accept-Language`` header prefers most, by its
    q-values (the first listed on a tie); None when it names none of them.

    A region or script subtag counts as its language (``de-AT`` -> ``de``, ``zh-Hans-CN`` ->
    ``zh``, ``pt-BR`` -> ``pt``); ``*`` (any language) is ``default``; q=0 (not wanted) and
    malformed entries are passed over, never an error."""
    best: tuple[float, str] | None = None
    for part in (header or "").split(",")[:MAX_RANGES]:
        tag, *params = (p.strip() for p in part.split(";"))
        tag = tag.lower()
        if not _TAG.match(tag):
            continue
        quality = _quality(params)
        code = default if tag == "*" else tag.split("-", 1)[0]
        if quality > 0 and code in languages and (best is None or quality > best[0]):
            best = (quality, code)
    return None if best is None else best[1]


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0 <= q <= 1 else 0.0
    return 1.0


@dataclass(frozen=True)
class Language:
    """The language a request is answered in, with every language's labels."""

    code: str
    labels: Labels

    def names(self, label: str, path: Sequence[str] | None) -> dict[str, Any]:
        """A tag's ``label``, ``path`` and ``path_labels`` as the API answers them in this
        language: in English exactly as without a language (no ``path_labels``); a raw class
        (no path) keeps its name and has no path either."""
        if not path:
            return {"label": label}
        if self.code == ENGLISH:
            return {"label": label, "path": list(path)}
        return {
            "label": self.labels.label(path, self.code),
            "path": list(path),
            "path_labels": self.labels.path_labels(path, self.code),
        }

    def stamp(self, response: Response) -> Response:
        """``Content-Language``: the language answered; ``Vary``: the answer depends on
        Accept-Language (for caches between the server and its clients)."""
        response.headers["Content-Language"] = self.code
        response.headers.add_vary_header("Accept-Language")
        return response


async def get_language(
    request: Request,
    lang: Annotated[
        str | None,
        Query(
            description="The language of the tags' labels: `en` (the vocabulary's own) or one "
            "the server serves (its contract lists them; `GET /v1/models` names them). `path` "
            "stays in English; another language adds `path_labels`. Default: the best match "
            "of Accept-Language, else the server's PHOTOTAG_LANG, else en. Another value: 400 "
            "unsupported_language.",
            examples=["de"],
        ),
    ] = None,
    accept_language: Annotated[
        str | None,
        Header(
            description="Used when there is no `lang`: the served language it prefers most "
            "(q-values; de-AT counts as de, zh-Hans as zh); none of them: the server's "
            "default, never an error.",
            examples=["de-AT,de;q=0.9,en;q=0.5"],
        ),
    ] = None,
) -> Language:
    labels: Labels = request.app.state.labels
    default: str = request.app.state.default_language
    if lang is not None:
        if lang not in labels:
            raise UnsupportedLanguage(lang, list(labels.languages))
        return Language(lang, labels)
    return Language(negotiate(accept_language, labels.languages, default) or default, labels)


LanguageDep = Annotated[Language, Depends(get_language)]
