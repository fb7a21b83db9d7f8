"""One preprocessing for every path: the pixels the server feeds the network are, exactly, the
pixels validation (training's cached photos) and the evaluate CLI (photos from disk) used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import data
from model.preprocess import INTERPOLATIONS, Preprocess, normalize
from model.tagger import Tagger
from tests.helpers import photo_bytes, write_tiny_checkpoint

PHOTOS = {
    "wide.png": photo_bytes((90, 60), fmt="PNG", seed=1),
    "tall.jpg": photo_bytes((50, 77), seed=2),
    "strip.png": photo_bytes((400, 30), fmt="PNG", seed=3),  # past the 4:1 aspect limit
    "square.webp": photo_bytes((36, 36), fmt="WEBP", seed=4),  # already at the working size
    "phone.jpg": photo_bytes((1200, 900), seed=5),  # large enough for a draft decode
}


def served_pixels(client_for, checkpoint: Path, monkeypatch, **settings) -> list[torch.Tensor]:
    """Each photo's uint8 (3, crop, crop) on its way into the network, one request per photo."""
    fed: list[torch.Tensor] = []
    original = Tagger.outputs  # the one forward pass per batch
    monkeypatch.setattr(
        Tagger, "outputs", lambda self, batch: fed.append(batch) or original(self, batch)
    )
    client = client_for(checkpoint, max_batch_size=1, **settings)
    fed.clear()  # the warm-up's blank batches
    for name, photo in PHOTOS.items():
        r = client.post("/v1/tags", files={"file": (name, photo)})
        assert r.status_code == 200, r.text
    # the whole photo: with regions (the default) it is the first of each photo's views
    return [batch[0, 0] if batch.dim() == 5 else batch[0] for batch in fed]


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_served_pixels_equal_validation_and_evaluation_pixels(
    tmp_path, client_for, monkeypatch, interpolation
):
    pre = Preprocess(resize=36, crop=32, interpolation=interpolation)
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors", preprocess=pre)
    folder = tmp_path / "photos" / "red"
    folder.mkdir(parents=True)
    samples = []
    for name, photo in PHOTOS.items():
        (folder / name).write_bytes(photo)
        samples.append(data.Sample(folder / name, 0))

    cache = data.ImageCache(pre)  # what training's validation and temperature fit read
    cache.add([s.path for s in samples])
    validation = next(iter(data.make_eval_loader(samples, 3, "single_label", pre, 8, 0, cache)))
    evaluation = next(iter(data.make_eval_loader(samples, 3, "single_label", pre, 8, 0)))
    # a JPEG decoded at a reduced scale (the serving default) is an approximation the README
    # documents; PHOTOTAG_JPEG_REDUCING_GAP=0 decodes in full
    served = served_pixels(client_for, checkpoint, monkeypatch, jpeg_reducing_gap=0)

    assert torch.equal(validation[0], evaluation[0])
    for i, name in enumerate(PHOTOS):
        assert torch.equal(normalize(served[i], pre), validation[0][i]), f"{name} ({interpolation})"
