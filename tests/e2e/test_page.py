"""The upload page in a real headless browser (Debian's chromium, driven by Playwright): pick or
drop a photo, see its tags as bars, choose the model, use an API key, click a tag to see why
(every kind of tag: a class, a vocabulary tag, a people tag, a custom tag)."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model import vocabulary
from tests.helpers import TINY_CLASSES, photo_bytes, write_tiny_checkpoint
from tests.model.test_vocabulary import TREE

CHROMIUM = os.environ.get("PHOTOTAG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# CI (.ci/run) sets PHOTOTAG_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping.
REQUIRED = os.environ.get("PHOTOTAG_REQUIRE_BROWSER") == "1"
if not Path(CHROMIUM).exists():
    why = f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    if REQUIRED:
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)
if REQUIRED:
    from playwright import sync_api
else:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')"
    )

pytestmark = pytest.mark.slow


class Server:
    """The app under uvicorn on a free loopback port, in a thread (the browser needs HTTP)."""

    def __init__(self, settings: Settings):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    write_tiny_checkpoint(folder / "default.safetensors", seed=1, name="everyday")
    write_tiny_checkpoint(folder / "pets.safetensors", seed=2, name="pets-v1")
    write_tiny_checkpoint(folder / "colours.safetensors", seed=3, vocabulary=everything())
    return folder


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def photos(tmp_path: Path) -> list[Path]:
    paths = []
    for name, color in (("sunset.jpg", (230, 120, 40)), ("forest.png", (40, 150, 60))):
        path = tmp_path / name
        path.write_bytes(
            photo_bytes((320, 240), color=color, fmt=path.suffix[1:].upper().replace("JPG", "JPEG"))
        )
        paths.append(path)
    return paths


def test_upload_a_photo_and_see_its_tags(browser, models, tmp_path):
    settings = Settings(models_dir=models, device="cpu")
    with Server(settings) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='pets']", state="attached")
        assert page.input_value("#model") == "default"
        page.select_option("#model", "pets")
        page.set_input_files("#files", [str(p) for p in photos(tmp_path)])
        page.wait_for_function("document.querySelectorAll('.result .tag').length === 6")
        cards = page.query_selector_all(".result")
        assert len(cards) == 2
        for card in cards:
            labels = [e.inner_text() for e in card.query_selector_all(".tag-label")]
            assert sorted(labels) == sorted(TINY_CLASSES)
            assert "pets" in card.query_selector(".state").inner_text()
            widths = card.eval_on_selector_all(".bar span", "els => els.map(e => e.style.width)")
            assert all(w.endswith("%") and float(w[:-1]) > 0 for w in widths)
        assert page.inner_text("#status") == "Done: 2 photos."
        page.screenshot(path=str(screenshot_path(tmp_path, "page.png")), full_page=True)


def test_a_vocabulary_tag_shows_its_parents(browser, models, tmp_path):
    with Server(Settings(models_dir=models, device="cpu")) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='colours']", state="attached")
        page.select_option("#model", "colours")
        page.set_input_files("#files", [str(photos(tmp_path)[0])])
        page.wait_for_function("document.querySelectorAll('.result .tag').length === 2")
        names = {
            e.query_selector(".tag-label").inner_text(): e.inner_text()
            for e in page.query_selector_all(".result .tag-name")
        }  # the leaves at threshold 0: warm and blue, each after its parents
        separator = "\u203a"  # the page puts this angle quote between a tag and its parent
        expected = {"warm": ["colour", "warm"], "blue": ["colour", "cool", "blue"]}
        assert names == {k: f" {separator} ".join(v) for k, v in expected.items()}


def test_dropping_a_photo_tags_it(browser, models):
    with Server(Settings(models_dir=models, device="cpu")) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='default']", state="attached")
        data = base64.b64encode(photo_bytes((200, 150), fmt="PNG")).decode()
        transfer = page.evaluate_handle(
            """(data) => {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                const t = new DataTransfer();
                t.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                return t;
            }""",
            data,
        )
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector(".result .tag")
        assert page.inner_text(".result .filename") == "dropped.png"


def test_the_page_works_with_an_api_key_kept_in_local_storage(browser, models, tmp_path):
    settings = Settings(models_dir=models, device="cpu", api_keys=["s3cret"])
    with Server(settings) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#status.error")
        assert "API key" in page.inner_text("#status")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model option[value='pets']", state="attached")
        page.reload()  # the key survives a reload
        page.wait_for_selector("#model option[value='pets']", state="attached")
        page.set_input_files("#files", str(photos(tmp_path)[0]))
        page.wait_for_selector(".result .tag")
        page.fill("#api-key", "wrong")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#status.error")


def test_clicking_a_tag_shows_its_heatmap_over_the_photo(browser, models, tmp_path):
    settings = Settings(models_dir=models, device="cpu", api_keys=["s3cret"])
    with Server(settings) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        explained: list[str] = []
        page.on(
            "request",
            lambda r: explained.append(r.url) if "/v1/explain" in r.url else None,
        )
        page.goto(server.url + "/")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model option[value='colours']", state="attached")
        page.select_option("#model", "colours")
        page.set_input_files("#files", str(photos(tmp_path)[0]))  # 320 x 240
        page.wait_for_selector(".result .tag")
        tag = page.query_selector(".result .tag")
        label = tag.query_selector(".tag-label").inner_text()
        tag.click()
        page.wait_for_selector(".thumb img.heatmap")
        img = page.query_selector(".thumb img")
        assert img.get_attribute("data-tag") == label
        assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [320, 240]
        assert img.get_attribute("src").startswith("blob:")
        assert "explained" in tag.get_attribute("class")
        assert "where the network saw" in page.inner_text(".result .why")
        assert explained and "model=colours" in explained[0] and "tag=" in explained[0]
        page.screenshot(path=str(screenshot_path(tmp_path, "explain.png")), full_page=True)
        tag.click()  # again: back to the photo
        page.wait_for_selector(".thumb img:not(.heatmap)")
        assert "explained" not in tag.get_attribute("class")


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("PHOTOTAG_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_teach_a_tag_from_the_page_and_mark_a_tag_wrong(browser, tmp_path):
    models = tmp_path / "models"
    write_tiny_checkpoint(models / "default.safetensors", seed=0)
    reds, blues = coloured_photos(tmp_path / "photos")
    with Server(Settings(models_dir=models, device="cpu", backend="torch")) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='default']", state="attached")
        teach_on_page(page, "reddish", reds, blues)
        status = page.inner_text("#teach-status")
        assert status.startswith("Taught reddish: 3 with, 3 without; estimated precision")
        assert "recall" in page.inner_text("#custom-tags li[data-name='reddish']")
        # the taught tag comes back on a red photo, under "custom"
        page.set_input_files("#files", reds[0])
        page.wait_for_selector(".result .tag")
        names = [e.inner_text() for e in page.query_selector_all(".result .tag-name")]
        assert "custom \u203a reddish" in names, names
        page.screenshot(path=str(screenshot_path(tmp_path, "teach.png")), full_page=True)
        # marked wrong: gone from the card, and the photo is a negative example now
        page.click(".result .tag:has(.tag-label:text-is('reddish')) .tag-wrong")
        page.wait_for_function(
            "!['reddish'].some(l => [...document.querySelectorAll('.result .tag-label')]"
            ".map(e => e.textContent).includes(l))"
        )
        page.wait_for_selector("#custom-tags li[data-name='reddish']:has-text('4 without')")
        assert "Marked" in page.inner_text("#status")


def astronaut(tmp_path: Path) -> Path:
    """scikit-image's astronaut (512 x 512, one face: the photo tests/model/test_people.py
    checks the face detector on), as a JPEG."""
    skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image ([dev])")
    path = tmp_path / "astronaut.jpg"
    Image.fromarray(skimage_data.astronaut()).save(path, quality=92)
    return path


def tag_paths(page) -> list[list[str]]:
    """Each tag on the (one) card, as its path: the title the page gives its name."""
    titles = page.eval_on_selector_all(".result .tag-name", "els => els.map(e => e.title)")
    return [title.split(" \u203a ") for title in titles]


def kind_of(path: list[str]) -> str:
    if path[0] in ("people", "custom"):
        return path[0]
    return "vocabulary" if len(path) > 1 else "class"


def click_tag(page, path: list[str]) -> str:
    """Click the tag at ``path`` on the card and wait for its picture or an error; assert it got
    a picture (the PNG decoded, at the photo's size) and no error; return the line under it."""
    tag = page.query_selector_all(".result .tag")[tag_paths(page).index(path)]
    tag.click()
    page.wait_for_selector(".result .why.error, .thumb img.heatmap")
    why = page.inner_text(".result .why")
    assert page.query_selector(".result .why.error") is None, why
    img = page.query_selector(".thumb img.heatmap")
    assert img.get_attribute("data-tag") == path[-1]
    assert img.get_attribute("src").startswith("blob:")
    assert img.evaluate("i => i.complete && i.naturalWidth > 0"), "the picture did not load"
    return why


def teach_on_page(page, name: str, positives: list[str], negatives: list[str]) -> None:
    page.fill("#teach-name", name)
    page.set_input_files("#teach-positive", positives)
    page.set_input_files("#teach-negative", negatives)
    page.click("#teach-button")
    page.wait_for_selector(f"#custom-tags li[data-name='{name}']")


def coloured_photos(folder: Path) -> tuple[list[str], list[str]]:
    folder.mkdir()
    reds, blues = [], []
    for i in range(3):
        for name, color, paths in (("red", (200, 30, 30), reds), ("blue", (30, 30, 200), blues)):
            path = folder / f"{name}{i}.jpg"
            path.write_bytes(photo_bytes((64, 48), color=color, seed=i))
            paths.append(str(path))
    return reds, blues


@pytest.mark.parametrize("kind", ["class", "vocabulary", "people", "custom"])
def test_clicking_any_kind_of_tag_shows_a_picture_not_an_error(browser, tmp_path, kind):
    models = tmp_path / "models"
    write_tiny_checkpoint(models / "default.safetensors", seed=0)  # its classes are its tags
    write_tiny_checkpoint(models / "colours.safetensors", seed=3, vocabulary=everything())
    reds, blues = coloured_photos(tmp_path / "photos")
    photo = {"people": str(astronaut(tmp_path)), "custom": reds[0]}.get(kind, reds[1])
    with Server(Settings(models_dir=models, device="cpu", backend="torch")) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='colours']", state="attached")
        page.select_option("#model", "colours" if kind == "vocabulary" else "default")
        if kind == "custom":
            teach_on_page(page, "reddish", reds, blues)
        page.fill("#top-k", "10")
        page.set_input_files("#files", photo)
        page.wait_for_selector(".result .tag")
        paths = [p for p in tag_paths(page) if kind_of(p) == kind]
        assert paths, tag_paths(page)
        why = click_tag(page, paths[0])
        if kind == "people":
            assert "face the detector found" in why, why
            assert page.evaluate("document.querySelector('.thumb img').naturalWidth") == 512
        else:
            assert why.startswith("where the network saw"), why


def everything() -> dict:
    """TREE with every tag at threshold 0: the colours model shows its vocabulary's leaves."""
    return {**TREE, "tags": [{**tag, "threshold": 0.0} for tag in TREE["tags"]]}


def test_the_default_model_says_its_tags_and_classes_and_a_person_click_shows_the_face(
    browser, default_checkpoint, tmp_path
):
    """The issue's walk (#30): the shipped model, a photo of a person, click "person"."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(default_checkpoint, models / "default.safetensors")
    write_tiny_checkpoint(models / "pets.safetensors", seed=2, name="pets-v1")
    with Server(Settings(models_dir=models, device="cpu", backend="torch")) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='pets']", state="attached")
        options = page.eval_on_selector_all(
            "#model option", "os => Object.fromEntries(os.map(o => [o.value, o.textContent]))"
        )
        # the shipped vocabulary's tags over the network's 1000 ImageNet classes
        tags = len(vocabulary.shipped()["tags"])
        assert options["default"].endswith(f", {tags} tags (1000 classes))"), options
        assert options["pets"] == "pets (pets-v1, 3 tags)"  # no vocabulary: its classes
        page.set_input_files("#files", str(astronaut(tmp_path)))
        page.wait_for_selector(".result .tag")
        assert ["people", "person"] in tag_paths(page), tag_paths(page)
        why = click_tag(page, ["people", "person"])
        assert why.startswith("the face the detector found"), why
        page.screenshot(path=str(screenshot_path(tmp_path, "people_click.png")), full_page=True)


def test_the_page_follows_the_browsers_language_and_offers_a_switch(browser, tmp_path):
    """Issue 28: a German browser gets German tags (their parents too), clicking one still
    explains it; the switch lists the served languages, and its choice is kept."""
    from model.vocabulary import Vocabulary

    models = tmp_path / "models"
    paths = {"red": "animal/cat", "green": "animal/dog", "blue": "food/fruit/banana"}
    vocabulary = Vocabulary.from_paths(paths, TINY_CLASSES).to_dict()
    every = {**vocabulary, "tags": [{**t, "threshold": 0.0} for t in vocabulary["tags"]]}
    write_tiny_checkpoint(models / "default.safetensors", vocabulary=every)
    with Server(Settings(models_dir=models, device="cpu", people="off")) as server:
        page = browser.new_page(locale="de-AT")
        page.goto(server.url + "/")
        page.wait_for_selector("#lang option[value='ja']", state="attached")
        assert page.input_value("#lang") == "de"
        assert "Deutsch (de)" in page.inner_text("#lang")
        page.set_input_files("#files", str(photos(tmp_path)[0]))
        page.wait_for_function("document.querySelectorAll('.result .tag').length === 3")
        names = {e.inner_text() for e in page.query_selector_all(".result .tag-name")}
        assert names == {"Tier \u203a Katze", "Tier \u203a Hund", "Essen \u203a Obst \u203a Banane"}
        assert page.get_attribute(".result .tags", "lang") == "de"
        page.click(".result .tag")  # explained by its English id, whatever the label
        page.wait_for_selector(".thumb img.heatmap")
        page.select_option("#lang", "en")
        page.reload()  # the choice is kept
        page.wait_for_selector("#lang option[value='ja']", state="attached")
        assert page.input_value("#lang") == "en"
        page.set_input_files("#files", str(photos(tmp_path)[1]))
        page.wait_for_function("document.querySelectorAll('.result .tag').length === 3")
        labels = {e.inner_text() for e in page.query_selector_all(".result .tag-label")}
        assert labels == {"cat", "dog", "banana"}
