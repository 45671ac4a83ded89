"""Unsloth's wheels for `bench/train.py --torch-modes unsloth` on an offline GPU box, small
enough to carry (10.2 MiB instead of 77 MB).

The box has Python 3.12, torch 2.11.0+cu130 (triton 3.6.0), transformers 5.17.0, peft 0.21.0
and their usual dependencies, and no network. This script takes the wheels PyPI gives

    python3.12 -m pip download --no-deps -d wheels unsloth==2026.10.9 unsloth_zoo==2026.10.9 \\
        trl==1.15.0 bitsandbytes==0.50.2 torchao==0.18.0 cut_cross_entropy==25.1.1
    python3.12 -m pip download --no-deps -d wheels ruamel.yaml==0.19.1   # params.yaml's loader

and writes, into OUT (default: this folder), smaller copies (each file dropped is named below;
RECORD lists exactly the files kept, with their original hashes) plus one wheel it builds:
datasets-4.7.0+stub, the import-time stand-ins for datasets, pyarrow and pandas (STUBS below).

    python3 bench/unsloth_wheels.py wheels OUT

On the box (Unsloth, trl and the stub shadow nothing the box needs for PyTorch + PEFT):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site OUT/*.whl
    PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 python3 bench/train.py --device gpu \\
        --frameworks torch --torch-modes unsloth,torch-compile --shapes 1.7b --cases trainers
"""

# ruff: noqa: E501  (the stub files it writes are kept verbatim as text)
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

DROPS = {
    # studio/ is Unsloth Studio, a web UI (82 MB unpacked); unsloth_cli its command line.
    "unsloth-": lambda f: f.startswith(("studio/", "unsloth_cli/")),
    # Only the CUDA 13.0 library (torch 2.11.0+cu130 picks it) and the CPU one.
    "bitsandbytes-": lambda f: (
        f.startswith("bitsandbytes/libbitsandbytes_") and not f.endswith(("_cuda130.so", "_cpu.so"))
    ),
    # The C++/CUTLASS extensions (fp8 and mx kernels; torchao loads them in a try) and its tests
    # (a top-level `test` package).
    "torchao-": lambda f: (f.startswith("torchao/") and f.endswith(".so")) or f.startswith("test/"),
}
KEEP_WHOLE = ("unsloth_zoo-", "trl-", "cut_cross_entropy-", "ruamel_yaml-")

STUB_VERSION = "4.7.0+stub"
STUBS: dict[str, str] = {
    "_bench_stubs.py": '''"""Import-time stand-ins for `datasets`, `pyarrow` and `pandas` (lorapipe bench, GPU box).

unsloth 2026.10.9, unsloth_zoo and trl 1.15 import these three when they are imported (for
`isinstance` checks, type hints and their dataset-preparation, packing and logging helpers);
pyarrow alone is ~42 MB, too big to carry to the box. lorapipe's bench feeds token tensors to
the model itself and calls none of those helpers. So each stubbed package, and any submodule of
it, is a module whose every public name is a placeholder class: nothing is an instance of one,
and building or calling one raises NotImplementedError naming it. The model, its loss, its
gradients and the optimizer never touch these modules: they cannot change the training maths,
only make a code path that needs the real package fail loudly. The distribution is named
`datasets`, version 4.7.0+stub (what trl 1.15 and unsloth both accept), because unsloth reads the
installed datasets version when it is imported (it refuses 4.4.x); transformers then reports
datasets available, and only imports it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

STUBBED = ("datasets", "pyarrow", "pandas")
_classes: dict[str, type] = {}


class Placeholder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{type(self).__module__}.{type(self).__name__}: a stub (lorapipe bench, _bench_stubs)"
        )


def placeholder(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _classes:
        _classes[key] = type(name, (Placeholder,), {"__module__": module})
    return _classes[key]


def module_getattr(module: str) -> Any:
    """A module-level __getattr__: an unknown public name becomes a placeholder class."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return placeholder(module, name)

    return __getattr__


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `datasets.fingerprint`, `pyarrow.compute`, ... as placeholder modules."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if "." in name and name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = types.ModuleType(spec.name, "stub (lorapipe bench, _bench_stubs)")
        module.__path__ = []
        module.__getattr__ = module_getattr(spec.name)  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


if not any(isinstance(f, _Submodules) for f in sys.meta_path):
    sys.meta_path.append(_Submodules())
''',
    "datasets/__init__.py": f'''"""Stand-in for `datasets`, import-time names only: see _bench_stubs.py."""

from _bench_stubs import module_getattr

__version__ = "{STUB_VERSION}"
__getattr__ = module_getattr(__name__)
''',
    "pyarrow/__init__.py": '''"""Stand-in for `pyarrow`, import-time names only: see _bench_stubs.py."""

from _bench_stubs import module_getattr

__version__ = "0.0.0+stub"
__getattr__ = module_getattr(__name__)
''',
    "pandas/__init__.py": '''"""Stand-in for `pandas`, import-time names only: see _bench_stubs.py."""

from _bench_stubs import module_getattr

__version__ = "0.0.0+stub"
__getattr__ = module_getattr(__name__)
''',
}


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write(path: Path, files: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for info, data in files:
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, data, compresslevel=9)
    print(f"{path.name}: {path.stat().st_size / 2**20:.2f} MiB")


def repack(src: Path, out_dir: Path) -> None:
    drop = next((d for p, d in DROPS.items() if src.name.startswith(p)), None)
    with zipfile.ZipFile(src) as zin:
        infos = [i for i in zin.infolist() if drop is None or not drop(i.filename)]
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        kept = {i.filename for i in infos}
        lines = [
            line
            for line in zin.read(record).decode().splitlines()
            if line.rsplit(",", 2)[0] in kept
        ]
        files = []
        for info in infos:
            data = ("\n".join(lines) + "\n").encode() if info.filename == record else zin.read(info)
            new = zipfile.ZipInfo(info.filename, info.date_time)
            new.external_attr = info.external_attr
            files.append((new, data))
        print(f"{src.name}: dropped {len(zin.infolist()) - len(infos)} files")
    write(out_dir / src.name, files)


def stub_wheel(out_dir: Path) -> None:
    dist = f"datasets-{STUB_VERSION}.dist-info"
    meta = {
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: datasets\nVersion: {STUB_VERSION}\n"
            "Summary: NOT Hugging Face datasets: import-time stand-ins for datasets, pyarrow "
            "and pandas (lorapipe bench; see _bench_stubs.py)\n"
        ),
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: lorapipe bench/unsloth_wheels.py\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
        f"{dist}/top_level.txt": "_bench_stubs\ndatasets\npandas\npyarrow\n",
    }
    contents = {name: text.encode() for name, text in {**STUBS, **meta}.items()}
    record = [record_line(name, data) for name, data in contents.items()]
    contents[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    files = []
    for name, data in contents.items():
        info = zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        files.append((info, data))
    write(out_dir / f"datasets-{STUB_VERSION}-py3-none-any.whl", files)


def main() -> None:
    source = Path(sys.argv[1])
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(source.glob("*.whl")):
        if wheel.name.startswith((*DROPS, *KEEP_WHOLE)):
            repack(wheel, out_dir)
    stub_wheel(out_dir)


if __name__ == "__main__":
    main()
