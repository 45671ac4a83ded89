"""`lorapipe plots`: the plots of dvc.yaml as PNG files, for reports, with no browser.

DVC fills its Vega-Lite templates with each revision's data (`dvc plots show/diff --json`, the
same specs its HTML page draws); vl-convert draws them with the Vega engine it embeds, offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_write_bytes


def dvc_specs(revs: list[str]) -> dict[str, dict[str, Any]]:
    """{plot name: Vega-Lite spec with its data}: `dvc plots show`, or `dvc plots diff REVS`."""
    command = ["plots", *(["diff", *revs] if revs else ["show"]), "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *command], capture_output=True, text=True, check=False
    )
    # DVC reports some errors (an unknown revision) on stderr with exit status 0 and no JSON.
    if done.returncode or not done.stdout.strip():
        raise LorapipeError(f"`dvc {' '.join(command)}` failed: {done.stderr.strip()}")
    return vega_specs(json.loads(done.stdout))


def vega_specs(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Vega-Lite specs in `dvc plots ... --json` output; its errors (bad plot files) raised."""
    if listing.get("errors"):
        raise LorapipeError(f"dvc could not read some plots: {json.dumps(listing['errors'])}")
    return {
        name: renderer["content"]
        for name, renderers in listing.get("data", {}).items()
        for renderer in renderers
        if renderer["type"] == "vega"
    }


def file_name(plot: str) -> str:
    """`Peak memory (GB)` -> `Peak_memory__GB_.png`: the id DVC's HTML page gives the plot."""
    from dvc_render.base import Renderer

    return Renderer.remove_special_chars(plot) + ".png"


def to_png(spec: dict[str, Any], scale: float) -> bytes:
    try:
        import vl_convert
    except ImportError:
        raise LorapipeError(
            "PNG plots need the png extra: `uv sync --extra png` (pip: 'lorapipe[png]')"
        ) from None
    # The oldest Vega-Lite 5 it has: the nearest to the 5.2 that DVC writes its specs for.
    v5 = [v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")]
    version = min(v5, key=lambda v: tuple(map(int, v.split("."))))
    png: bytes = vl_convert.vegalite_to_png(spec, vl_version=version, scale=scale)
    return png


def main(revs: list[str], out: Path, scale: float) -> list[Path]:
    specs = dvc_specs(revs)
    if not specs:
        raise LorapipeError("dvc lists no plots: declare them under `plots:` in dvc.yaml")
    written = []
    for plot, spec in specs.items():
        path = out / file_name(plot)
        atomic_write_bytes(path, to_png(spec, scale))
        print(f"{path}  {plot}")
        written.append(path)
    return written
