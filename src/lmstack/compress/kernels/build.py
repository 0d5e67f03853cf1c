"""Compile the C kernels on first use and load them with ctypes.

The source ships with the package; it is compiled once per machine with the system C compiler
(`$CC`, else `cc`) at `-O3 -march=native -fopenmp` into a cache folder (`$LMSTACK_CACHE/kernels`,
default `~/.cache/lmstack/kernels`), under a name that hashes the source, the flags, the compiler's
version and the CPU's feature flags — a changed source, compiler or machine builds afresh. The build
writes a temporary file and renames it, so concurrent first uses cannot load a half-written library.

The library links the `libgomp.so.1` that PyTorch already loaded (same soname, so the dynamic linker
reuses it): our parallel regions run on PyTorch's OpenMP threads rather than on a second pool that
would compete with them for the cores.

`load()` returns None, and the quantized linears keep PyTorch's kernels, when there is no compiler,
the CPU is not x86-64 with AVX-512 (BW and VNNI), the build fails, or `LMSTACK_KERNELS=0` is set.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("qgemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)  # after the source, where linkers look for what it needs
ABI = 6  # lm_kernel_abi() of the source this module's signatures describe
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
SIGNATURES = {
    "lm_int8q8_gemm": [_P, _L, _L, _P, _P, _P, _P, _L, _I],
    "lm_bf16_gemm": [_P, _L, _L, _P, _P, _P, _L, _I],
    "lm_int4q8_gemm": [_P, _L, _L, _L, _P, _P, _P, _P, _P, _L, _I],
}


def cache_dir() -> Path:
    root = os.environ.get("LMSTACK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lmstack"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def supported_cpu() -> bool:
    """x86-64 with the AVX-512 subsets the kernels use (BW for bytes, VNNI for int8 dot products)."""
    machine = platform.machine().lower() in ("x86_64", "amd64")
    return machine and {"avx512f", "avx512bw", "avx512_vnni"} <= set(_cpu_flags().split())


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def library_path(compiler: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (source.read_text(), " ".join(flags + LIBS), version, _cpu_flags()))
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{source.stem}-{key}.so"


def _build(compiler: str, target: Path, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(source), *LIBS], capture_output=True, text=True, timeout=300
        )
        if result.returncode:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then callers use PyTorch's). Built once, then cached."""
    if os.environ.get("LMSTACK_KERNELS", "1") == "0":
        return None
    if not supported_cpu():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        import torch  # noqa: F401  (loads PyTorch's libgomp first, for the library to share)

        target = library_path(compiler)
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        if lib.lm_kernel_abi() != ABI or lib.lm_kernel_simd() != 512:
            return None
        for name, argtypes in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
        return lib
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        warnings.warn(
            f"lmstack: building the quantized CPU kernels failed ({exc}); using PyTorch's kernels instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@functools.cache
def load_source(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Another C source built and loaded the same way (`FLAGS` + `extra_flags`; portable C, so any
    CPU), or None when `LMSTACK_KERNELS=0`, there is no compiler or the build fails. The caller sets
    the signatures."""
    compiler = _compiler()
    if os.environ.get("LMSTACK_KERNELS", "1") == "0" or compiler is None:
        return None
    try:
        import torch  # noqa: F401  (PyTorch's libgomp first, as in `load`)

        target = library_path(compiler, source, FLAGS + extra_flags)
        if not target.exists():
            _build(compiler, target, source, FLAGS + extra_flags)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"lmstack: building {source.name} failed ({exc}); using PyTorch instead", RuntimeWarning, 2
        )
        return None
