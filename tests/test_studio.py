"""The layer studio in a real browser: Debian's chromium, headless, driven by Playwright against the server.

The model is the demo's step-0 model (LayerDiff initialised from the shipped toy base, the model a user has
before fine-tuning: it draws the objects the global prompt names), sampled with 4 DDIM steps to keep the test
short. The browser is the chromium on PATH, or the one LAYERDIFF_CHROMIUM names; without one the tests fail
(the README's test command installs Debian's). LAYERDIFF_STUDIO_SCREENSHOT=PATH saves the page after an edit
(docs/images/studio.png, in docs/sampling.md).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from configs import demo
from layerdiff_jax.data.layers import read_sample_folder
from layerdiff_jax.demo import export_step0, finetune_config
from layerdiff_jax.data.synthetic import generate_sample
from layerdiff_jax.sampling.layered_files import export_bytes, read_layered_bytes
from layerdiff_jax.sampling.sampler import LayerDiffPipeline
from layerdiff_jax.studio.server import Studio, make_server, serve_in_thread
from layerdiff_jax.toy import TOY_BASE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

STEPS = "4"
TIMEOUT_MS = 240_000  # a job that compiles a program for new shapes on a loaded 2-core machine
expect.set_options(timeout=TIMEOUT_MS)


def _chromium() -> str:
    path = os.environ.get("LAYERDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium: install Debian's (apt-get install -y chromium) or set LAYERDIFF_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_step0(TOY_BASE, finetune_config(demo.get_config()), tmp_path_factory.mktemp("step0") / "model")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    session = tmp_path_factory.mktemp("studio") / "session"
    studio = Studio(LayerDiffPipeline.load(model), session)
    http = make_server(studio)
    serve_in_thread(http)
    yield f"http://127.0.0.1:{http.server_address[1]}", studio
    http.shutdown()
    http.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        yield browser
        browser.close()


def _open(browser, url):
    page = browser.new_page(accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.fill("#steps", STEPS)
    return page


def _generate(page, prompt):
    page.fill("#global-prompt", prompt)
    page.click("#generate-button")
    expect(page.locator("#status")).to_contain_text("candidate(s)")


def _pixels(page, src: str) -> np.ndarray:
    """A layer image as the page gets it (the same bytes the browser shows)."""
    import PIL.Image

    data = page.request.get(src).body()
    return np.asarray(PIL.Image.open(io.BytesIO(data)))


def _layer_sources(page) -> list[str]:
    return page.locator("#layers .layer-image").evaluate_all("images => images.map(i => i.src)")


def test_generate_from_a_global_prompt_alone_then_edit_one_layer(server, browser, tmp_path):
    url, studio = server
    page = _open(browser, url)
    _generate(page, "a red circle and a blue square on a green background")
    # The split, shown as rows, and that many layers.
    assert page.input_value("#background-prompt") == "a green background"
    assert page.locator("#layer-rows .layer-prompt").evaluate_all("inputs => inputs.map(i => i.value)") == ["a red circle", "a blue square"]
    expect(page.locator("#layers .layer-card")).to_have_count(3)
    before = [_pixels(page, src) for src in _layer_sources(page)]

    # Regenerate layer 1 with a new prompt: it changes, every other layer is bit-identical.
    card = page.locator("#layers .layer-card").nth(1)
    card.locator(".new-prompt").fill("a yellow triangle")
    card.locator(".regenerate").click()
    expect(page.locator("#status")).to_contain_text("regenerated layer 1 in ")
    after = [_pixels(page, src) for src in _layer_sources(page)]
    assert not np.array_equal(after[1], before[1])
    for i in (0, 2):
        np.testing.assert_array_equal(after[i], before[i])
    expect(page.locator("#layers .layer-card h3").nth(1)).to_contain_text("a yellow triangle")
    if os.environ.get("LAYERDIFF_STUDIO_SCREENSHOT"):
        page.screenshot(path=os.environ["LAYERDIFF_STUDIO_SCREENSHOT"], full_page=True)

    # Restyle the background; undo gives back the version before, redo the restyled one.
    card = page.locator("#layers .layer-card").nth(0)
    card.locator(".style").fill("striped")
    card.locator(".restyle").click()
    expect(page.locator("#status")).to_contain_text("restyled layer 0 in ")
    restyled = _pixels(page, _layer_sources(page)[0])
    assert not np.array_equal(restyled, after[0])
    page.click("#undo")
    expect(page.locator("#version")).to_have_text("version 2 of 3")
    np.testing.assert_array_equal(_pixels(page, _layer_sources(page)[0]), after[0])
    page.click("#redo")
    expect(page.locator("#version")).to_have_text("version 3 of 3")

    # Hiding a layer hides it in the composite view.
    page.locator("#layers .layer-card").nth(2).locator(".visible").uncheck()
    expect(page.locator("#composite-stack img").nth(2)).to_be_hidden()

    # Export ORA and read it back: the current version, layer for layer.
    with page.expect_download() as download:
        page.click("#export-ora")
    exported = read_layered_bytes(Path(download.value.path()).read_bytes(), "layers.ora")
    doc_id = page.locator("#candidates-list .candidate").first.get_attribute("data-id")
    current = studio.documents.get(doc_id).sample
    assert exported.layer_prompts == current.layer_prompts
    np.testing.assert_array_equal(exported.background, current.background)
    np.testing.assert_array_equal(exported.masks, current.masks)
    # Every version was written to the session folder as it was made.
    assert read_sample_folder(studio.documents.folder / doc_id / "v002").layer_prompts == current.layer_prompts
    page.close()


def test_open_a_psd_and_a_bad_request_then_the_next_works(server, browser, tmp_path):
    url, _ = server
    page = _open(browser, url)
    sample = generate_sample(0, 1, 64)
    data, name, _ = export_bytes(sample, "psd")
    path = tmp_path / name
    path.write_bytes(data)
    page.set_input_files("#open-file", str(path))
    expect(page.locator("#status")).to_have_text(f"opened {name}")
    expect(page.locator("#layers .layer-card")).to_have_count(sample.num_layers)
    np.testing.assert_array_equal(_pixels(page, _layer_sources(page)[0])[..., :3], sample.background)

    # A broken upload, then a prompt the model cannot serve: one line each in the page, and the page goes on.
    broken = tmp_path / "broken.ora"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    page.set_input_files("#open-file", str(broken))
    expect(page.locator("#error")).to_contain_text("broken.ora")
    page.fill("#global-prompt", "a red circle, a blue square, a green triangle and a white circle on a black background")
    page.click("#generate-button")
    expect(page.locator("#error")).to_contain_text("at most 4 layers")
    page.fill("#global-prompt", "a red circle on a blue background")
    page.click("#generate-button")
    expect(page.locator("#status")).to_contain_text("1 candidate(s)")
    expect(page.locator("#error")).to_have_text("")
    expect(page.locator("#layers .layer-card")).to_have_count(2)
    page.close()


def test_two_tabs_generating_at_once_both_get_their_results(server, browser):
    url, _ = server
    first, second = _open(browser, url), _open(browser, url)
    for page, prompt in ((first, "a purple circle and an orange square on a white background"),
                         (second, "a black triangle and a red square on a blue striped background")):
        page.fill("#global-prompt", prompt)
        page.fill("#candidates", "2")
    first.click("#generate-button")
    second.click("#generate-button")
    for page in (first, second):
        expect(page.locator("#status")).to_contain_text("2 candidate(s)")
        expect(page.locator("#candidates-list .candidate")).to_have_count(2)
    assert first.locator("#document-prompt").text_content() != second.locator("#document-prompt").text_content()
    first.close()
    second.close()


def test_export_zip_holds_pngs_and_the_exchange_folder(server):
    _, studio = server
    document = studio.documents.create(generate_sample(0, 2, 64), "test")
    data, _, _ = export_bytes(document.sample, "zip")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
    assert any(n.endswith("sample.json") for n in names) and sum(n.endswith(".png") for n in names) > document.sample.num_layers


def test_the_command_serves_on_a_free_local_port_and_stops_on_ctrl_c(model, tmp_path):
    """scripts/studio.py itself: it prints its address (127.0.0.1, a free port), serves the model, ends on Ctrl-C
    with one line; a missing model folder is one line and exit 2."""
    command = [sys.executable, str(ROOT / "scripts" / "studio.py"), "--checkpoint", str(model), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[1]).group()
        with urllib.request.urlopen(url + "api/info", timeout=60) as reply:
            assert json.load(reply)["max_layers"] == 4
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and out.strip().startswith("stopped; every version made is in") and "Traceback" not in err
    missing = subprocess.run([*command[:2], "--checkpoint", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "is not a LayerDiff model folder" in missing.stderr.splitlines()[-1]
