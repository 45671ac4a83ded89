"""Rebuild .dvc/plots/offline.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own page loads these three from a CDN, so opened offline (an air-gapped box, a GPU server
without internet, a train) it is blank. `.dvc/config` sets `plots.html_template` to this page, so
plain `dvc plots show` and `dvc plots diff` write pages that draw with no network.

The versions are the ones dvc-render's own page loads: the Vega-Lite specs DVC writes are made
for them. The tarballs come from the npm registry (`npm pack`) and must match the sha512 pinned
below. Each library's licence (BSD-3-Clause) is kept twice: beside the page in
.dvc/plots/licenses/, and as a comment heading its inlined code, so every page DVC writes from
this template carries the notices its redistribution needs.

Run it when dvc-render moves to other versions (tests/test_plots.py fails until then), after
setting PINS to them (`npm view vega@X dist.integrity` gives the hash):

    .venv/bin/python scripts/plots_template.py
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tarfile
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


def npm_pack(name: str, version: str, integrity: str, into: Path) -> Path:
    """The package's tarball from the npm registry, checked against its pinned sha512."""
    out = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--pack-destination", str(into)],
        capture_output=True,
        text=True,
        check=True,
    )
    tarball = into / out.stdout.strip().splitlines()[-1]
    digest = hashlib.sha512(tarball.read_bytes()).digest()
    got = "sha512-" + base64.b64encode(digest).decode()
    if got != integrity:
        raise SystemExit(f"{name}@{version}: tarball is {got}, PINS in {__file__} say {integrity}")
    return tarball


def member(tarball: Path, path: str) -> str:
    with tarfile.open(tarball) as tar:
        f = tar.extractfile(f"package/{path}")
        assert f is not None, f"{tarball.name}: package/{path} is not a file"
        return f.read().decode("utf-8")


def script_tag(name: str, version: str, code: str, licence: str) -> str:
    """`code` inline, under its licence; refuses code that would break the page or DVC's fill."""
    # The source map is not shipped: a relative URL that would only 404 in the dev tools.
    code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", code)
    for bad in ("</script", "<!--", *DVC_PLACEHOLDERS):
        if bad.lower() in code.lower():
            raise SystemExit(f"{name}@{version}: its code holds {bad!r}, which cannot be inlined")
    if "*/" in licence:
        raise SystemExit(f"{name}@{version}: its licence holds '*/', which ends the comment")
    return f"<script>/*! {name}@{version}\n{licence}*/\n{code}</script>\n"


def main() -> None:
    wanted = dvc_render_versions()
    pinned = {name: version for name, (version, _, _) in PINS.items()}
    if wanted != pinned:
        sys.exit(f"dvc-render's page loads {wanted}; set PINS in {__file__} to those (and hashes)")
    tags = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, path, integrity) in PINS.items():
            tarball = npm_pack(name, version, integrity, Path(tmp))
            licence = member(tarball, "LICENSE")
            atomic_write_text(PLOTS / "licenses" / f"{name}.LICENSE", licence)
            tags.append(script_tag(name, version, member(tarball, path), licence))
    names = ", ".join(f"{name} {version}" for name, version in pinned.items())
    atomic_write_text(TEMPLATE, HEAD.replace("NAMES", names) + "".join(tags) + TAIL)
    print(f"wrote {TEMPLATE.relative_to(ROOT)} ({TEMPLATE.stat().st_size // 1024} KiB): {names}")


if __name__ == "__main__":
    main()
