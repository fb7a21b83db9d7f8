"""The upload page with PHOTOTAG_NAMES=on: a photo's faces are listed; naming one teaches the
name (its box picks the face) and the photo, tagged again, shows it under people."""

from __future__ import annotations

import pytest

from app.settings import Settings
from tests.e2e.test_page import Server, astronaut, browser  # noqa: F401  (the fixture)
from tests.helpers import write_tiny_checkpoint

pytestmark = pytest.mark.slow


def test_name_a_face_on_the_page_and_see_the_name(browser, tmp_path):  # noqa: F811
    models = tmp_path / "models"
    write_tiny_checkpoint(models / "default.safetensors", seed=0)
    settings = Settings(
        models_dir=models, device="cpu", backend="torch", names="on", jpeg_reducing_gap=0
    )
    photo = astronaut(tmp_path)
    with Server(settings) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_selector("#model option[value='default']", state="attached")
        page.set_input_files("#files", str(photo))
        page.wait_for_selector(".result .faces .face-name")
        page.fill(".result .face-name", "Eileen")
        page.click(".result .faces button")
        page.wait_for_selector(".result .face:has-text('Eileen')")
        names = [e.inner_text() for e in page.query_selector_all(".result .tag-name")]
        assert "people \u203a Eileen" in names, names
        assert (models / "names" / "Eileen.safetensors").is_file()
        assert "Named Eileen" in page.inner_text("#status")
