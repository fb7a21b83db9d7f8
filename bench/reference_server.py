"""The reference: a photo-tagging server as most tutorials write it.

FastAPI with ``UploadFile``, a full Pillow decode, torchvision Resize/CenterCrop/Normalize, and one
forward pass per request — with the same EfficientNet-Lite0 ImageNet weights phototag serves, so
only the serving differs. Two styles of the same endpoint:

- ``threaded`` (default): a plain ``def`` endpoint, which FastAPI runs on its worker threads, so
  requests decode and run the network in parallel (torch's own threads on top).
- ``async``: ``async def`` with ``await file.read()``, as FastAPI's ``UploadFile`` documentation
  and most tutorials write it; the decode and the network then run on the event loop, one request
  at a time.

    python bench/reference_server.py --port 8100 [--style async]
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms
from torchvision.models import ResNet18_Weights

from model.architectures import build, load_shipped_lite0

app = FastAPI()
model = build("efficientnet_lite0", 1000)
model.load_state_dict(load_shipped_lite0())
model.eval()
labels = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
preprocess = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def predict(data: bytes) -> dict:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    batch = preprocess(image).unsqueeze(0)
    with torch.no_grad():
        probabilities = torch.softmax(model(batch)[0], dim=0)
    top = torch.topk(probabilities, 5)
    return {
        "predictions": [
            {"label": labels[i], "probability": float(p)}
            for p, i in zip(top.values, top.indices, strict=True)
        ]
    }


def predict_threaded(file: UploadFile = File(...)) -> dict:
    return predict(file.file.read())


async def predict_async(file: UploadFile = File(...)) -> dict:
    return predict(await file.read())


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--style", choices=["threaded", "async"], default="threaded")
    args = parser.parse_args()
    endpoint = predict_threaded if args.style == "threaded" else predict_async
    app.post("/predict")(endpoint)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
