"""Rebuild .dvc/plots/offline.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own page loads these three from a CDN, so opened offline (an air-gapped box, a GPU server
without internet, a train) it is blank. `.dvc/config` sets `plots.html_template` to this page, so
plain `dvc plots show` and `dvc plots diff` write pages that draw with no network.

The versions are the ones dvc-render's own page loads: the Vega-Lite specs DVC writes are made
for them. They come from the npm registry (`npm install`) and must match the sha512 pinned below.
Licences: each build's own (BSD-3-Clause) and those of the packages it bundles (named by its
source map: d3 modules, semver, ...), written beside the page in .dvc/plots/licenses/ and as a
comment heading each inlined build, so every page DVC writes carries the notices they ask for.

Run it when dvc-render moves to other versions (tests/test_plots.py fails until then), after
setting PINS to them (`npm view vega@X dist.integrity` gives the hash):

    .venv/bin/python scripts/plots_template.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from dvc_render.vega import VegaRenderer

from lorapipe.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ROOT / ".dvc" / "plots"
TEMPLATE = PLOTS / "offline.html"

# In load order: vega-lite needs vega, vega-embed needs both. File: the build jsdelivr serves for
# the bare package URL that dvc-render's page uses (`jsdelivr` in each package.json).
PINS = {
    "vega": (
        "5.20.2",
        "build/vega.min.js",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    "vega-lite": (
        "5.2.0",
        "build/vega-lite.min.js",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    "vega-embed": (
        "6.18.2",
        "build/vega-embed.min.js",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
}

# Bundled by a build (its source map says so) but no longer installed with today's versions of
# what depends on it: semver 7.3, which vega-embed 6.18 bundles, used lru-cache 6 and yallist 4.
EXTRA = {"lru-cache": "6.0.0", "yallist": "4.0.0"}

# DVC fills these by plain text replacement (dvc_render.html.HTML.embed); `{scripts}` is left out
# on purpose, since DVC fills it with the CDN <script> tags.
DVC_PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

# DVC's own page (dvc_render.html.PAGE_HTML), with a charset (file:// pages default to
# windows-1252, which garbles the libraries' non-ASCII strings) and the libraries inline.
HEAD = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Made by scripts/plots_template.py (edit that, not this file):
         NAMES inlined, so this page draws offline. -->
"""
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def dvc_render_versions() -> dict[str, str]:
    """The versions dvc-render's own page loads, e.g. {"vega": "5.20.2", ...}."""
    return dict(re.findall(r"/npm/([a-z-]+)@([\d.]+)", VegaRenderer.SCRIPTS))


def npm_install(into: Path) -> dict[str, dict[str, str]]:
    """Install PINS (and EXTRA) under `into`; npm's lockfile entries, by package folder."""
    specs = [f"{name}@{version}" for name, (version, _, _) in PINS.items()]
    specs += [f"{name}@{version}" for name, version in EXTRA.items()]
    # --legacy-peer-deps: vega-embed 6.18's peer range for vega is not met by 5.20.2, which is
    # what DVC's page loads it with; the builds carry their own copies of what they need.
    flags = ["--ignore-scripts", "--no-audit", "--no-fund", "--omit=dev", "--legacy-peer-deps"]
    subprocess.run(["npm", "install", "--prefix", str(into), *flags, *specs], check=True)
    packages: dict[str, dict[str, str]] = json.loads((into / "package-lock.json").read_text())[
        "packages"
    ]
    for name, (version, _, integrity) in PINS.items():
        got = packages[f"node_modules/{name}"]
        if (got["version"], got["integrity"]) != (version, integrity):
            sys.exit(f"npm gave {name}@{got['version']} {got['integrity']}; PINS say {integrity}")
    return packages


def bundled(build: Path) -> list[str]:
    """The npm packages a build bundles, from the sources its source map names."""
    sources = json.loads(build.with_name(build.name + ".map").read_text())["sources"]
    found = (re.search(r"node_modules/((?:@[^/]+/)?[^/]+)/", source) for source in sources)
    return sorted({m[1] for m in found if m})


def licence(modules: Path, name: str, lock: dict[str, dict[str, str]]) -> str:
    """`name@version (SPDX id)` and its licence file, as installed at the top of node_modules."""
    folder = modules / name
    if not folder.is_dir():
        sys.exit(f"{name} is bundled but npm did not install it: add it to EXTRA in {__file__}")
    files = [f for f in sorted(folder.iterdir()) if re.match(r"licen[cs]e", f.name, re.I)]
    if not files:
        sys.exit(f"{name}: no licence file in its package; add its text by hand")
    entry = lock[f"node_modules/{name}"]
    return f"{name}@{entry['version']} ({entry.get('license')})\n{files[0].read_text().strip()}\n"


def script_tag(name: str, code: str, notices: str) -> str:
    """`code` inline, its notices first; refuses text that would break the page or DVC's fill."""
    # The source map is not shipped: a relative URL that would only 404 in the dev tools.
    code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", code)
    inner = f"/*!\n{notices}*/\n{code}"
    for bad in ("</script", "<!--", *DVC_PLACEHOLDERS):
        if bad in inner.lower():
            sys.exit(f"{name}: its code or licences hold {bad!r}, which would break the page")
    if "*/" in notices:
        sys.exit(f"{name}: its licences hold '*/', which would end their comment early")
    return f"<script>{inner}</script>\n"


def main() -> None:
    wanted = dvc_render_versions()
    pinned = {name: version for name, (version, _, _) in PINS.items()}
    if wanted != pinned:
        sys.exit(f"dvc-render's page loads {wanted}; set PINS in {__file__} to those (and hashes)")
    tags = []
    with tempfile.TemporaryDirectory() as tmp:
        lock = npm_install(Path(tmp))
        modules = Path(tmp) / "node_modules"
        for name, (_, path, _) in PINS.items():
            build = modules / name / path
            # Versions as npm resolves the same ranges today: the build may hold older releases.
            notices = licence(modules, name, lock) + f"\nBundled in {path}:\n\n"
            notices += "\n".join(licence(modules, dep, lock) for dep in bundled(build))
            atomic_write_text(PLOTS / "licenses" / f"{name}.txt", notices)
            tags.append(script_tag(name, build.read_text(encoding="utf-8"), notices))
    names = ", ".join(f"{name} {version}" for name, version in pinned.items())
    atomic_write_text(TEMPLATE, HEAD.replace("NAMES", names) + "".join(tags) + TAIL)
    print(f"wrote {TEMPLATE.relative_to(ROOT)} ({TEMPLATE.stat().st_size // 1024} KiB): {names}")


if __name__ == "__main__":
    main()
