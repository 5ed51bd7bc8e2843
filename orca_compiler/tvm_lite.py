"""Run saved TVM programs without importing the `tvm` Python package (a cache hit's fast path).

`import tvm` takes 1.2-2 s on the 2-core dev machine, and almost none of it is the libraries:
`python -X importtime` and cProfile put it in tvm_ffi registering ~400 Python object classes
(0.67 s, `tvm_ffi.registry._register`), 52 `init_ffi_api` scans of the global function table
(0.27 s) and tables such as `tvm.backend.cuda.ptx.table` (0.12 s). Loading a saved program needs
none of them: the shared libraries (`libtvm_runtime.so`, dlopen in ~1 ms; `libtvm_compiler.so`,
~36 ms, only to ask LLVM for the host CPU) and `tvm_ffi` (~25 ms, in the process with torch) are
enough to load an exported library, create its Relax VM and call it with torch tensors.

Everything here works the same whether or not `tvm` was imported before (the libraries are the
same ones: dlopen of a path already loaded returns the loaded library).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import sys
from pathlib import Path

POOLED_ALLOCATOR = 2  # tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
CPU, CUDA = 1, 2  # DLPack device types


@functools.lru_cache(maxsize=1)
def package_dir() -> Path:
    """The installed `tvm` package's folder (found, not imported)."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tvm package is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def version() -> str:
    """`tvm.__version__`, read from the file it comes from (tvm/libinfo.py: `_version.py`,
    written at build time, else "0.27.0") without importing tvm."""
    if "tvm" in sys.modules and hasattr(sys.modules["tvm"], "__version__"):
        return sys.modules["tvm"].__version__
    try:
        text = (package_dir() / "_version.py").read_text()
    except OSError:
        import tvm  # a source tree laid out otherwise: ask it

        return tvm.__version__
    found = re.search(r"""^(?:__version__\s*=\s*)?version\s*=\s*['"]([^'"]+)['"]""", text, re.M)
    return found.group(1) if found else "0.27.0"


def _library(name: str) -> Path:
    for folder in ("lib", "lib64", "."):
        path = package_dir() / folder / f"lib{name}.so"
        if path.is_file():
            return path
    raise ImportError(f"lib{name}.so is not in {package_dir()}")


@functools.lru_cache(maxsize=1)
def load_runtime() -> None:
    """dlopen libtvm_runtime.so as tvm/base.py does (RTLD_GLOBAL: exported libraries link to it)."""
    import tvm_ffi  # noqa: F401  (libtvm_ffi first: the runtime links to it)

    ctypes.CDLL(str(_library("tvm_runtime")), ctypes.RTLD_GLOBAL)


@functools.lru_cache(maxsize=1)
def host_cpu() -> tuple[str, str]:
    """LLVM's (host CPU name, host triple), what `resolve_target("llvm")` puts in the target."""
    import tvm_ffi

    load_runtime()
    if tvm_ffi.get_global_func("target.llvm_get_system_cpu", allow_missing=True) is None:
        ctypes.CDLL(str(_library("tvm_compiler")), ctypes.RTLD_LOCAL)  # as tvm/base.py loads it
    return (str(tvm_ffi.get_global_func("target.llvm_get_system_cpu")()),
            str(tvm_ffi.get_global_func("target.llvm_get_system_triple")()))


def load_library(path: str | os.PathLike):
    """An exported library (`executable.export_library`) as a tvm_ffi Module."""
    import tvm_ffi

    load_runtime()
    return tvm_ffi.load_module(str(path))


def virtual_machine(library, device_type: int = CPU, device_id: int = 0):
    """The Relax VM of a loaded library, as `tvm.runtime.vm.VirtualMachine(library, device)`
    creates it (pooled allocator; a CPU device added for shape functions): `vm["main"](...)`."""
    vm = library["vm_load_executable"]()
    devices = [(device_type, device_id)] + ([(CPU, 0)] if device_type != CPU else [])
    vm["vm_initialization"](*[v for dev in devices for v in (*dev, POOLED_ALLOCATOR)])
    return vm
