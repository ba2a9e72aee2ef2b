"""`mimkit explore` in a real browser: headless Chromium (Debian's package) driven by Playwright for Python.

On a checkpoint of a few steps made here, the test loads the page, moves the mask ratio slider, uploads a file and
checks that the pictures change and that the loss the page shows equals `mimkit reconstruct`'s on that file. Any
request the page makes to an address other than the loopback fails the test. Where no browser can be had the test
fails (it does not skip): `make install` installs it (apt-get as root), or see the message.

MIMKIT_EXPLORE_SCREENSHOT=PATH also saves a screenshot of the page there (the README's is made so, on a demo-like
checkpoint: MIMKIT_EXPLORE_CHECKPOINT=RUN).
"""
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_explore import cli_loss, make_folder, make_run

CHROMIUM = os.environ.get("MIMKIT_CHROMIUM", "/usr/bin/chromium")
HOW = "install it with `apt-get install -y chromium` and `pip install playwright` (or `make install` as root)"
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if url.startswith(("data:", "blob:", "about:")):
        return True
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def server(tmp_path):
    torch.set_num_threads(1)
    run = Path(os.environ.get("MIMKIT_EXPLORE_CHECKPOINT") or make_run(tmp_path / "run"))
    data = make_folder(tmp_path / "data", per_class=40 if os.environ.get("MIMKIT_EXPLORE_SCREENSHOT") else 8)
    proc = subprocess.Popen([sys.executable, "-m", "mimkit.cli", "explore", "--checkpoint", str(run), "--data",
                             str(data), "--port", "0", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = []
        for line in proc.stdout:  # the address is printed once it listens
            lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:\d+/", line)
            if found:
                break
        else:
            pytest.fail("mimkit explore did not start:\n" + "".join(lines))
        yield found.group(0), run, data
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_page_in_chromium(server, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright for Python is not installed: {HOW}")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: {HOW}")
    url, run, data = server
    outside = []  # every request to anything but the loopback; each is also blocked
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(photo)
    bad = tmp_path / "broken.png"
    bad.write_bytes(photo.read_bytes()[:200])

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's policy forbids (that the
        # page loads nothing from elsewhere is checked here by watching every request instead)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)

        def guard(route):
            if loopback(route.request.url):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()
        page.route("**/*", guard)
        page.on("request", lambda r: None if loopback(r.url) else outside.append(r.url))
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(url)
        loss = page.locator("#loss-0")
        page.wait_for_function("document.querySelector('#loss-0')?.dataset.loss !== undefined", timeout=20_000)
        page.wait_for_function("document.querySelectorAll('#nn-0 img').length === 8", timeout=20_000)
        page.wait_for_function("document.querySelector('#pca-0')?.src?.startsWith('data:')", timeout=20_000)
        page.wait_for_function("document.querySelector('#attn-0')?.src?.startsWith('data:')", timeout=20_000)
        name = page.locator("#current").inner_text()
        before = {k: page.locator(f"#{k}-0").get_attribute("src") for k in ("masked", "rec", "paste")}
        first = float(loss.get_attribute("data-loss"))
        assert first == cli_loss(run, data / name, tmp_path / "first", 0.75)

        # the slider, moved by the keyboard as a user would: 0.75 -> 0.35 in eight steps of 0.05
        page.locator("#ratio").focus()
        for _ in range(8):
            page.keyboard.press("ArrowLeft")
        page.wait_for_function("document.querySelector('#loss-0')?.dataset.ratio === '0.35'", timeout=20_000)
        after = {k: page.locator(f"#{k}-0").get_attribute("src") for k in before}
        assert all(after[k] != before[k] for k in before)  # fewer patches hidden: every masked panel changes
        moved = float(loss.get_attribute("data-loss"))
        assert moved != first and moved == cli_loss(run, data / name, tmp_path / "moved", 0.35)

        original = page.locator("#orig-0").get_attribute("src")
        # a file that cannot be read: a message on the page, and the page keeps working
        page.set_input_files("#upload", str(bad))
        page.wait_for_function("document.querySelector('#message')?.textContent?.includes('broken.png')",
                               timeout=20_000)
        page.set_input_files("#upload", str(photo))
        page.wait_for_function("document.querySelector('#current')?.textContent?.includes('photo.png')", timeout=20_000)
        page.wait_for_function("document.querySelector('#loss-0')?.dataset.key === 'photo.png'", timeout=20_000)
        assert page.locator("#message").inner_text() == ""
        uploaded = float(loss.get_attribute("data-loss"))
        assert uploaded == cli_loss(run, photo, tmp_path / "photo", 0.35)
        assert page.locator("#orig-0").get_attribute("src") != original
        shot = os.environ.get("MIMKIT_EXPLORE_SCREENSHOT")
        if shot:
            page.locator("#search").fill("ship/")
            page.wait_for_function("document.querySelector('#count')?.textContent?.startsWith('40 ')", timeout=20_000)
            page.locator("#list figure").nth(5).click()
            page.wait_for_function("document.querySelectorAll('#nn-0 img').length === 8", timeout=20_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=shot)
        browser.close()
    assert not errors, errors
    assert not outside, f"the page asked for addresses other than the loopback: {outside}"
