"""The live page at `/` in a real headless browser (Debian's chromium, driven by Playwright): it loads, an image
chosen or dropped is sent, and the streamed answer appears token by token, each coloured by the layer it left at
with the demo report's colours, its text and layers those of the API's own answer. The server runs in this process
(uvicorn in a thread) on the tiny BLIP-2 of test_server.py."""

import base64
import shutil
import threading
import time

import httpx
import pytest
import uvicorn
from test_server import MAX_TOKENS, PROMPTS, THRESHOLDS, data_url, files, free_port, messages  # noqa: F401

from freevlm.colours import FINAL_COLOUR, layer_colours
from freevlm.loading import load_exits, load_vlm
from freevlm.server.app import ServedModel, create_app
from freevlm.server.config import ServerConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (Debian package `chromium`; scripts/setup.sh installs it as root)"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright is not installed")


@pytest.fixture(scope="module")
def url(files):  # noqa: F811
    """The server, in a thread of this process: uvicorn on loopback over the tiny model."""
    bundle = load_vlm(files["backbone"])
    served = ServedModel(bundle, load_exits(bundle.model, files["exits"]), "tiny")
    app = create_app(served, ServerConfig(max_tokens=MAX_TOKENS))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def api_answer(url: str, image, prompt: str, threshold: float) -> tuple[str, list[int]]:
    body = {"model": "tiny", "messages": messages(data_url(image), prompt), "threshold": threshold}
    out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    return out["choices"][0]["message"]["content"], out["freevlm"]["exit_layers"]


def rgb(hex_colour: str) -> str:
    """How the browser reports a colour given as #rrggbb."""
    return "rgb({}, {}, {})".format(*(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)))


def shown(page) -> tuple[str, list[int], list[str]]:
    """The answer as the page shows it: its text, and each coloured token's layer and background colour."""
    spans = page.locator("#answer .tok")
    layers = [int(layer) for layer in spans.evaluate_all("(els) => els.map((e) => e.dataset.layer)")]
    colours = spans.evaluate_all("(els) => els.map((e) => getComputedStyle(e).backgroundColor)")
    return page.locator("#answer").inner_text(), layers, colours


def test_page_streams_an_answer_coloured_by_exit_layer(url, files, browser, tmp_path):  # noqa: F811
    # a (image, prompt, threshold) whose answer leaves at more than one layer, as the API gives it
    cases = [(files["images"][0], prompt, t) for prompt in PROMPTS for t in THRESHOLDS]
    image, prompt, threshold = next(c for c in cases if len(set(api_answer(url, *c)[1])) > 1)
    text, layers = api_answer(url, image, prompt, threshold)
    settings = httpx.get(f"{url}/page/settings").json()
    colours = layer_colours([1, 3, 4], 6)
    assert settings["colours"] == {str(k): v for k, v in colours.items()} and settings["max_tokens"] == MAX_TOKENS

    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    assert page.title().startswith("freevlm")
    page.locator("#legend .tok").nth(3).wait_for()  # settings read: three exits and the final layer
    assert page.locator("#legend").inner_text().split("\n")[-1] == "layer 6 (final)"
    page.locator("#prompt").fill(prompt)
    page.locator("#threshold").fill(str(threshold))
    page.locator("#file").set_input_files(str(image))  # choosing an image asks at once
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)

    shown_text, shown_layers, shown_colours = shown(page)
    assert shown_text.strip() == text.strip() and shown_layers == layers  # tokens here are whole words
    assert shown_colours == [rgb(colours[layer]) for layer in layers]
    assert colours[6] == FINAL_COLOUR
    assert page.locator("#tokens").inner_text() == str(len(layers))
    assert page.locator("#mean-layers").inner_text() == f"{sum(layers) / len(layers):.2f} / 6"
    assert float(page.locator("#rate").inner_text()) > 0
    page.screenshot(path=tmp_path / "page.png")

    # dropping another image asks again with the same prompt and threshold
    other = files["images"][2]
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            const drop = document.getElementById("drop");
            document.getElementById("status").textContent = "";
            drop.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(other.read_bytes()).decode(),
    )
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    other_text, other_layers = api_answer(url, other, prompt, threshold)
    other_shown, other_shown_layers, _ = shown(page)
    assert (other_shown.strip(), other_shown_layers) == (other_text.strip(), other_layers)
    assert errors == []
