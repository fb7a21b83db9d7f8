"""Hot reload: replaced checkpoints are swapped in whole, bad ones refused, in-flight requests
finish on the model they started on, and traffic never sees an error meanwhile."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from model.checkpoint import atomic_write_bytes, load
from tests.helpers import photo_bytes, queue_depth, wait_until, write_tiny_checkpoint

FAST = {"reload_interval_s": 0.05}


def served_version(client, model: str | None = None) -> str:
    return client.get("/v1/model" + (f"?model={model}" if model else "")).json()["version"]


def tag(client, model: str | None = None):
    url = "/v1/tags" + (f"?model={model}" if model else "")
    return client.post(url, files={"file": ("a.jpg", photo_bytes())})


def test_a_replaced_checkpoint_is_served_with_its_new_version(client_for, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=1)
    client = client_for(path, **FAST)
    old = served_version(client)
    new = load(write_tiny_checkpoint(path, seed=2)).version
    wait_until(lambda: served_version(client) == new)
    assert old != new
    assert tag(client).json()["model"]["version"] == new
    metrics = client.get("/metrics").text
    assert 'phototag_model_loads_total{model="tiny",result="ok"} 2.0' in metrics
    assert f'version="{new}"' in metrics and f'version="{old}"' not in metrics


def test_a_bad_new_file_is_refused_and_the_old_model_keeps_serving(client_for, tmp_path, caplog):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=1)
    client = client_for(path, **FAST)
    old = served_version(client)
    caplog.set_level(logging.WARNING, logger="phototag.registry")
    atomic_write_bytes(path, b"this is not a checkpoint at all")
    wait_until(lambda: "refused checkpoint tiny" in caplog.text)
    assert "still serving version " + old in caplog.text
    assert tag(client).status_code == 200 and served_version(client) == old
    assert (
        'phototag_model_loads_total{model="tiny",result="failed"} 1.0'
        in client.get("/metrics").text
    )
    fixed = load(write_tiny_checkpoint(path, seed=3)).version  # the next good file is taken
    wait_until(lambda: served_version(client) == fixed)


def test_models_appear_and_disappear_with_their_files(client_for, tmp_path, caplog):
    folder = tmp_path / "models"
    write_tiny_checkpoint(folder / "default.safetensors", seed=1)
    write_tiny_checkpoint(folder / "pets.safetensors", seed=2)
    client = client_for(folder / "x.safetensors", models_dir=folder, **FAST)

    caplog.set_level(logging.WARNING, logger="phototag.registry")

    def ids():
        return [m["id"] for m in client.get("/v1/models").json()["models"]]

    write_tiny_checkpoint(folder / "birds.safetensors", seed=3)
    wait_until(lambda: "birds" in ids())
    assert tag(client, "birds").status_code == 200
    (folder / "pets.safetensors").unlink()
    wait_until(lambda: "pets" not in ids())
    assert tag(client, "pets").status_code == 404
    (folder / "default.safetensors").unlink()  # the default keeps serving from memory
    wait_until(lambda: "the checkpoint of default is gone; still serving" in caplog.text)
    assert ids() == ["birds", "default"] and tag(client).status_code == 200


def test_an_in_flight_request_finishes_on_the_model_it_started_on(client_for, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=1)
    client = client_for(path, max_batch_wait_ms=3000, max_batch_size=8, **FAST)
    old = served_version(client)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(tag, client)  # sits in the batcher for 3 s
        wait_until(lambda: queue_depth(client.get("/metrics").text) == 1, what="a queued photo")
        new = load(write_tiny_checkpoint(path, seed=2)).version
        wait_until(lambda: served_version(client) == new)
        assert not pending.done()
        response = pending.result(timeout=10)
    assert response.status_code == 200
    assert response.json()["model"]["version"] == old


@pytest.mark.slow
def test_reload_under_traffic_loses_no_request(client_for, tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=1)
    client = client_for(path, **FAST)
    versions = [served_version(client)]
    stop = threading.Event()

    def hammer() -> list[tuple[int, str]]:
        seen = []
        while not stop.is_set():
            r = tag(client)
            seen.append((r.status_code, r.json()["model"]["version"] if r.is_success else r.text))
        return seen

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer) for _ in range(4)]
        for seed in (2, 3):
            time.sleep(0.3)
            versions.append(load(write_tiny_checkpoint(path, seed=seed)).version)
            wait_until(lambda v=versions[-1]: served_version(client) == v)
        time.sleep(0.2)
        stop.set()
        results = [w.result() for w in workers]
    for seen in results:
        assert all(status == 200 for status, _ in seen), seen
        order = [versions.index(v) for _, v in seen]
        assert order == sorted(order)  # a client never goes back to an older model
    assert {v for seen in results for _, v in seen} == set(versions)


def test_a_new_card_with_the_same_outputs_is_swapped_in_and_logged(client_for, tmp_path, caplog):
    """Only provenance changed (a rewritten description): the version stays, the file is still
    reloaded, logged, and what is served is what the file now says."""
    caplog.set_level(logging.INFO, logger="phototag.registry")
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=1, description="first")
    client = client_for(path, **FAST)
    version = served_version(client)
    write_tiny_checkpoint(path, seed=1, description="second")
    wait_until(lambda: client.get("/v1/model").json()["description"] == "second")
    assert served_version(client) == version
    assert f"reloaded tiny: version {version} unchanged (a new card)" in caplog.text
    metrics = client.get("/metrics").text
    assert metrics.count(f'version="{version}"') == 1  # the gauge kept its one series
