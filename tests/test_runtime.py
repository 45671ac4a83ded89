"""lorapipe.runtime: which BLAS MLX's CPU backend uses, and the cached OpenBLAS copy behind it.

Every case runs in a fresh interpreter: a BLAS loaded into a process cannot be unloaded, and
the swap only works before mlx.core is imported. Each test gets its own XDG_CACHE_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe import runtime

LINUX_CPU = sys.platform == "linux" and runtime.mlx_backend()[0] == "cpu"
linux_cpu = pytest.mark.skipif(
    not LINUX_CPU, reason="the BLAS swap applies only to MLX's Linux CPU backend (mlx-cpu)"
)

# setup(), then a float32 matmul through MLX checked against numpy, then what blas_info() says.
PROBE = """
import json, sys
from lorapipe import runtime
from lorapipe.errors import LorapipeError
if "--mlx-first" in sys.argv:
    import mlx.core
try:
    runtime.setup()
    runtime.setup()  # idempotent: a second call neither rebuilds nor warns again
except LorapipeError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((192, 320), dtype=np.float32)
b = rng.standard_normal((320, 160), dtype=np.float32)
got = np.array(mx.matmul(mx.array(a), mx.array(b)))
want = a.astype(np.float64) @ b.astype(np.float64)
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
info = runtime.blas_info()
print(json.dumps({"kind": info.kind, "path": info.path, "threads": info.threads}))
"""


def _env(cache: Path, blas: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != runtime.ENV_VAR}
    env["XDG_CACHE_HOME"] = str(cache)
    if blas is not None:
        env[runtime.ENV_VAR] = blas
    return env


def _probe(cache: Path, blas: str | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=_env(cache, blas),
        cwd=cache.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _result(run: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert run.returncode == 0, run.stderr
    result: dict[str, object] = json.loads(run.stdout.splitlines()[-1])
    return result


def _copies(cache: Path) -> list[Path]:
    """Every file under the BLAS cache (temp files included)."""
    return sorted(p for p in (cache / "lorapipe" / "blas").rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def first_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A default run on an empty cache (it builds the copy), shared to keep the tests fast."""
    cache = tmp_path_factory.mktemp("first") / "cache"
    return cache, _probe(cache)


@pytest.fixture
def built(first_run: tuple[Path, subprocess.CompletedProcess[str]], cache: Path) -> Path:
    """This test's own cache, holding a copy of the first run's: returns the library's path."""
    shutil.copytree(first_run[0], cache)
    path = Path(str(_result(first_run[1])["path"]))
    return cache / path.relative_to(first_run[0])


@linux_cpu
def test_default_is_lorapipe_openblas_and_matmul_matches_numpy(
    first_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    cache, run = first_run
    result = _result(run)
    assert result["kind"] == runtime.KIND_LORAPIPE
    assert _copies(cache) == [Path(str(result["path"]))]
    assert Path(str(result["path"])).name == runtime.SONAME
    assert isinstance(result["threads"], int) and result["threads"] >= 1
    assert "warning" not in run.stderr


@linux_cpu
def test_bundled_keeps_mlx_reference_blas(cache: Path) -> None:
    run = _probe(cache, "bundled")
    result = _result(run)
    assert result["kind"] == runtime.KIND_BUNDLED
    assert "libblas" in Path(str(result["path"])).name
    assert result["threads"] == 1
    assert not (cache / "lorapipe").exists(), "bundled must not build the OpenBLAS copy"
    assert run.stderr == ""


@linux_cpu
@pytest.mark.parametrize("value", ["/nonexistent/libopenblas.so.0", "openblas", "{folder}"])
def test_invalid_value_is_a_one_line_error(cache: Path, value: str) -> None:
    value = value.format(folder=cache.parent)
    run = _probe(cache, value)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"LORAPIPE_BLAS={value}: ")
    assert "'auto'" in lines[0] and "'bundled'" in lines[0] and "path" in lines[0]


@linux_cpu
def test_non_blas_library_is_refused(cache: Path) -> None:
    # scipy-openblas32's own library exports only prefixed names: loading it would not help.
    import scipy_openblas32

    prefixed = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
    run = _probe(cache, str(prefixed))
    assert run.returncode == 2
    assert f"LORAPIPE_BLAS={prefixed}: does not export cblas_sgemm" in run.stderr


@linux_cpu
def test_user_library_path_is_loaded_as_is(built: Path, tmp_path: Path) -> None:
    # The built copy stands in for any library exporting the standard names (libopenblas.so.0).
    result = _result(_probe(tmp_path / "other-cache", str(built)))
    assert result["kind"] == f"user: {built}"
    assert result["path"] == str(built)
    assert not (tmp_path / "other-cache").exists(), "a user library needs no cached copy"


@linux_cpu
def test_cached_copy_is_reused_not_rewritten(built: Path, cache: Path) -> None:
    before = built.stat()
    assert Path(str(_result(_probe(cache))["path"])) == built
    after = built.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert _copies(cache) == [built], "no temp files left behind"


@linux_cpu
@pytest.mark.parametrize("damage", ["half", "empty", "garbage"])
def test_damaged_cache_entry_is_rebuilt(built: Path, cache: Path, damage: str) -> None:
    copy = built
    good = copy.read_bytes()
    if damage == "half":  # a copy cut short: mapping it would crash on first use
        copy.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        copy.write_bytes(b"")
    else:
        copy.write_bytes(os.urandom(4096) + good[4096:])
    # A temp file of a run killed mid-build lies beside it.
    (copy.parent / f".{runtime.SONAME}.killed.tmp").write_bytes(good[:1000])

    run = _probe(cache)
    assert _result(run)["kind"] == runtime.KIND_LORAPIPE
    assert copy.read_bytes() == good
    assert "warning" not in run.stderr


@linux_cpu
def test_unwritable_cache_falls_back_with_one_warning(cache: Path) -> None:
    cache.write_text("a file where the cache folder should be")
    run = _probe(cache)
    assert _result(run)["kind"] == runtime.KIND_BUNDLED  # the stage still runs, just slower
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("lorapipe: warning: ")
    assert str(cache) in lines[0] and "XDG_CACHE_HOME" in lines[0]


@linux_cpu
def test_mlx_imported_first_warns_once(cache: Path) -> None:
    run = _probe(cache, None, "--mlx-first")
    assert _result(run)["kind"] == runtime.KIND_BUNDLED
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "imported before lorapipe.runtime.setup()" in lines[0]


@linux_cpu
def test_concurrent_first_runs_share_one_complete_copy(cache: Path) -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE],
            env=_env(cache, None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for process in runs:
        stdout, stderr = process.communicate(timeout=120)
        results.append(_result(subprocess.CompletedProcess([], process.returncode, stdout, stderr)))
    assert {r["kind"] for r in results} == {runtime.KIND_LORAPIPE}
    assert len({r["path"] for r in results}) == 1
    assert _copies(cache) == [Path(str(results[0]["path"]))]


def test_describe_reports_backend_device_blas_and_versions(cache: Path) -> None:
    code = "import json; from lorapipe import runtime; print(json.dumps(runtime.describe()))"
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(cache, None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    for key in ("platform", "python", "mlx", "mlx backend", "default device", "blas"):
        assert info[key], key
    for package in ("mlx-lm", "dvc", "dvclive", "transformers", "numpy", "lorapipe"):
        assert info[package][0].isdigit(), (package, info[package])
    if LINUX_CPU:
        assert info["mlx backend"].startswith("cpu (mlx-cpu ")
        assert info["default device"] == "Device(cpu, 0)"
        assert info["blas"].startswith(runtime.KIND_LORAPIPE)


def test_cuda_kernels_are_cached_per_user_and_mlx_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLX's CUDA backend compiles its kernels on first use (a minute of the default pipeline on
    an H100) into /tmp, which a reboot empties; lorapipe keeps them in the user's cache."""
    from importlib.metadata import version

    from lorapipe.runtime import ptx_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ptx_cache_dir() == tmp_path / "lorapipe" / f"mlx-{version('mlx')}-ptx"
