"""The plots draw offline (issue #16): every plot `dvc plots show --json` lists from dvc.yaml,
whatever they are.

In a real headless Chromium with the network off, the project's page (.dvc/plots/offline.html,
set in .dvc/config) draws them all; DVC's own page, which loads Vega from a CDN, draws none: that
is the bug, and the proof that this check sees a blank page. `lorapipe plots` draws them as PNG.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dvc_render.base import Renderer
from dvc_render.html import PAGE_HTML
from dvc_render.vega import VegaRenderer
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.helpers import REPO, cli, dvc_ok

CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser"])), None)
CHROMEDRIVER = shutil.which("chromedriver")

# Runs before the page's own scripts. Whatever defines `vegaEmbed` (inlined code or a CDN), the
# page's calls go through this wrapper, which asks each plot's Vega view what it drew: the items
# of its data marks (lines, points, bars), not its axes, legends or the HTML around it.
HOOK = """
window.__plots = [];
Object.defineProperty(window, "vegaEmbed", {
  configurable: true,
  set(real) { window.__embed = real; },
  get() {
    const real = window.__embed;
    return real && ((el, spec, opts) => {
      const done = real(el, spec, opts);
      window.__plots.push(done.then(
        (result) => [el, marks(result.view.scenegraph().root)],
        (error) => [el, String(error)]));
      return done;
    });
  },
});
function marks(node) {
  const data = node.marktype && node.marktype !== "group" && node.role === "mark";
  let n = data ? node.items.length : 0;
  for (const child of node.items || []) n += marks(child);
  return n;
}
"""
DRAWN = """
const done = arguments[arguments.length - 1];
Promise.all(window.__plots).then((plots) => done({
  marks: Object.fromEntries(plots.map(([el, n]) => [el.replace(/^#/, ""), n])),
  versions: window.__embed ? {
    "vega": vega.version, "vega-lite": vegaLite.version, "vega-embed": window.__embed.version,
  } : {},
}));
"""


@pytest.fixture(scope="module")
def plots() -> set[str]:
    """The id DVC's page gives each plot `dvc plots show --json` lists (the PNG file names)."""
    listed = json.loads(dvc_ok(REPO, "plots", "show", "--json").stdout)
    assert not listed.get("errors"), listed["errors"]
    ids = {
        Renderer.remove_special_chars(name)
        for name, renderers in listed["data"].items()
        if any(r["type"] == "vega" for r in renderers)
    }
    assert ids, "dvc.yaml lists no plots"
    return ids


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver on PATH (scripts/test.sh installs Debian's)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: tests run as root in CI, where Chromium's sandbox cannot start.
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage"]:
        options.add_argument(arg)
    # Every host name fails to resolve, as on an air-gapped box.
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        # And DevTools' "offline": every request fails, name or not.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOOK})
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()


def drawn(browser: webdriver.Chrome, page: Path) -> dict[str, Any]:
    """{"marks": {plot div id: data-mark items drawn, or the error}, "versions": Vega's}."""
    browser.get(page.as_uri())
    result: dict[str, Any] = browser.execute_async_script(DRAWN)
    return result


def test_every_plot_of_dvc_yaml_draws_offline(
    browser: webdriver.Chrome, plots: set[str], tmp_path: Path
) -> None:
    # `diff` with a revision: the command the README shows, one line per revision.
    dvc_ok(REPO, "plots", "diff", "HEAD", "-o", str(tmp_path))

    page = drawn(browser, tmp_path / "index.html")

    assert page["marks"].keys() == plots
    blank = {plot: n for plot, n in page["marks"].items() if not (isinstance(n, int) and n > 0)}
    assert not blank, f"these plots drew nothing (or failed): {blank}"
    # The versions DVC's own page loads, which the specs DVC writes are made for: when
    # dvc-render moves, rebuild the page with scripts/plots_template.py.
    assert page["versions"] == dict(re.findall(r"/npm/([a-z-]+)@([\d.]+)", VegaRenderer.SCRIPTS))


def test_dvcs_own_page_draws_nothing_offline(browser: webdriver.Chrome, tmp_path: Path) -> None:
    cdn = tmp_path / "cdn.html"
    cdn.write_text(PAGE_HTML)
    dvc_ok(REPO, "plots", "show", "--html-template", str(cdn), "-o", str(tmp_path / "out"))

    assert drawn(browser, tmp_path / "out" / "index.html") == {"marks": {}, "versions": {}}


def test_lorapipe_plots_draws_every_plot_as_png(plots: set[str], tmp_path: Path) -> None:
    done = cli(REPO, "plots", "HEAD", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr

    images = {path.stem: Image.open(path) for path in tmp_path.glob("*.png")}
    assert images.keys() == plots
    for plot, image in images.items():
        assert image.width >= 600 and image.height >= 400, (plot, image.size)  # --scale 2
        # Axes, grid and text are grey; the data (lines, bars, their legend) is in colour.
        saturation = image.convert("RGB").convert("HSV").getchannel("S").histogram()
        assert sum(saturation[80:]) > 0.002 * image.width * image.height, f"{plot}: no data"
