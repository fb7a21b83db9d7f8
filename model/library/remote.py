"""``phototag tag --server URL``: the tagging class for a running phototag server.

Files are read and recognised here (a non-photo is never sent), then each batch is posted as one
multipart ``POST /v1/tags`` with the standard library's urllib (no extra dependency); the
server's answer (its model, each photo's tags or error) becomes the rows. A server that cannot
be reached, or answers 5xx for a whole batch after a few tries, stops the run: the journal has
what was finished, and the same command resumes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence

from model.library.tagging import FAILED, NOT_A_PHOTO, TAGGED, Item, make_row, read_photo
from model.library.walk import Candidate

RETRIES = 4


class RemoteError(RuntimeError):
    """The server could not tag a batch; the run stops here and resumes later."""


class RemoteTagger:
    def __init__(
        self,
        url: str,
        top_k: int = 5,
        threshold: float | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        query = {"top_k": top_k} | ({"threshold": threshold} if threshold is not None else {})
        self.url = url.rstrip("/") + "/v1/tags?" + urllib.parse.urlencode(query)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._bytes: dict[int, bytes] = {}  # id(item) -> its bytes, between prepare and tag

    def prepare(self, candidate: Candidate) -> Item:
        item, data = read_photo(candidate)
        if data is not None:
            self._bytes[id(item)] = data
        return item

    def tag(self, items: Sequence[Item]) -> list[dict]:
        photos = [i for i in items if id(i) in self._bytes]
        datas = [self._bytes.pop(id(i)) for i in photos]
        answer = self._post(photos, datas) if photos else {"model": None, "results": []}
        results = {id(i): r for i, r in zip(photos, answer["results"], strict=True)}
        rows = []
        for item in items:
            if not item.photo:
                rows.append(make_row(item, None, None, NOT_A_PHOTO))
            elif id(item) not in results:  # unreadable here
                rows.append(make_row(item, answer["model"], None, FAILED))
            elif results[id(item)].get("error"):
                item.error = results[id(item)]["error"]
                rows.append(make_row(item, answer["model"], None, FAILED))
            else:
                tags = [
                    {
                        "label": t["label"],
                        "probability": t["probability"],
                        "path": t.get("path") or [t["label"]],
                    }
                    for t in results[id(item)]["tags"]
                ]
                rows.append(make_row(item, answer["model"], tags, TAGGED))
        return rows

    def _post(self, items: Sequence[Item], datas: Sequence[bytes]) -> dict:
        boundary = uuid.uuid4().hex
        parts = []
        for i, data in enumerate(datas):
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{i}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            )
            parts += [data, b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = b"".join(parts)
        for attempt in range(RETRIES):
            request = urllib.request.Request(self.url, data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode(errors="replace")
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    if len(items) > 1:  # every photo refused: ask for each one's own reason
                        return self._one_by_one(items, datas)
                    return self._all_failed(items, detail, exc.code)
                reason = f"HTTP {exc.code}: {detail}"
            except (OSError, ValueError) as exc:
                reason = str(getattr(exc, "reason", exc))
            if attempt < RETRIES - 1:
                time.sleep(0.5 * 2**attempt)
        raise RemoteError(f"{self.url}: {reason}")

    def _one_by_one(self, items: Sequence[Item], datas: Sequence[bytes]) -> dict:
        answers = [self._post([i], [d]) for i, d in zip(items, datas, strict=True)]
        model = next((a["model"] for a in answers if a["model"]), None)
        return {"model": model, "results": [a["results"][0] for a in answers]}

    def model(self) -> dict:
        """The served default model (``GET /v1/model``): id, name, version."""
        url = self.url.split("/v1/tags", 1)[0] + "/v1/model"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=self.timeout_s
            ) as response:
                info = json.load(response)
        except (OSError, ValueError) as exc:
            raise RemoteError(f"{url}: {getattr(exc, 'reason', exc)}") from None
        return {"id": info["id"], "name": info["name"], "version": info["version"]}

    @staticmethod
    def _all_failed(items: Sequence[Item], detail: str, status: int) -> dict:
        """A 4xx for the whole request (every photo refused): each photo gets its error."""
        try:
            error = json.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": f"http_{status}", "message": detail}
        if status in (401, 404):
            raise RemoteError(f"the server refused the request: {error['message']}")
        return {"model": None, "results": [{"error": error, "tags": []} for _ in items]}
