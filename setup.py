"""Builds fastmerge's compiled engine (fastmerge/_C*.so) against the torch already installed.

Install with:  pip install --no-build-isolation .      (or -e . for development)

Environment switches (read at build time):
  FASTMERGE_CUDA=auto|0|1   auto (default): build the CUDA sources when torch has CUDA and a
                            toolkit is found; 0: CPU only; 1: CUDA required (fail if impossible).
  FASTMERGE_DEBUG=1         -O0 -g instead of -O3.
  MAX_JOBS=N                parallel compile jobs (ninja), as for any torch extension.
  FASTMERGE_SKIP_EXTENSION=1  install the Python package only (the Makefile compiles the engine once,
                            in place, with `setup.py build_ext --inplace` instead of in pip's temp folder).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # the build-isolation case: a throwaway env without torch
    sys.exit(
        "fastmerge: torch is not importable in this build environment.\n"
        "fastmerge compiles against the torch you already have (torch>=2.11). Install torch first,\n"
        "then build without isolation so pip does not fetch another torch:\n"
        "    pip install torch==2.13.0   # or your CUDA build\n"
        "    pip install --no-build-isolation .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = (2, 11)


def torch_version_tuple() -> tuple:
    parts = torch.__version__.split("+")[0].split(".")
    return tuple(int(p) for p in parts[:2])


def want_cuda() -> bool:
    mode = os.environ.get("FASTMERGE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"fastmerge: FASTMERGE_CUDA must be auto, 0 or 1, got {mode!r}")
    has_cuda_torch = torch.version.cuda is not None
    has_toolkit = cpp_extension.CUDA_HOME is not None
    if mode == "1" and not cuda_sources():
        sys.exit("fastmerge: FASTMERGE_CUDA=1 but there are no CUDA sources (csrc/cuda/*.cu) in this version")
    if mode == "1" and not (has_cuda_torch and has_toolkit):
        sys.exit(
            "fastmerge: FASTMERGE_CUDA=1 but "
            + ("torch is a CPU-only build" if not has_cuda_torch else "no CUDA toolkit was found")
            + " (set CUDA_HOME to the toolkit root)."
        )
    return mode != "0" and has_cuda_torch and has_toolkit and bool(cuda_sources())


def links_libstdcxx_dynamically(cxx: str):
    """Whether `cxx` links libstdc++ into a shared library as a shared library (None: cannot tell).

    A toolchain that links it statically (seen on a GPU machine: a g++ wrapper in /opt/gcc) puts a
    second copy of the C++ runtime into the extension; its iostreams then use the locale facets of
    the copy torch loaded, and every error message the library formats crashes the process
    (SIGSEGV inside std::ostream::_M_insert) instead of raising.
    """
    tool = shutil.which("readelf")
    if sys.platform != "linux" or tool is None or shutil.which(shlex.split(cxx)[0]) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\n#include <string>\n"
                    "std::string probe(long x) { std::ostringstream s; s << x; return s.str(); }\n")
        try:
            subprocess.run([*shlex.split(cxx), "-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True,
                           timeout=120)
            dynamic = subprocess.run([tool, "-d", lib], check=True, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return "libstdc++" in dynamic


def check_compiler() -> None:
    cxx = os.environ.get("CXX", "c++")
    if links_libstdcxx_dynamically(cxx) is False:
        sys.exit(
            f"fastmerge: the C++ compiler {cxx!r} links libstdc++ statically into shared libraries.\n"
            "The extension would then carry its own C++ runtime beside torch's, and every error it raises\n"
            "would crash Python instead. Build with a compiler that links it dynamically, for example:\n"
            "    CXX=/usr/bin/g++ pip install --no-build-isolation .\n"
        )


def cuda_sources() -> list:
    return sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))


def make_extension():
    if torch_version_tuple() < MIN_TORCH:
        sys.exit(f"fastmerge needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}")
    check_compiler()
    debug = os.environ.get("FASTMERGE_DEBUG", "0") == "1"
    use_cuda = want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is left to BuildExtension: it passes the one the installed torch needs.
    # -fno-trapping-math: we never enable floating-point traps, and without it the compiler may not
    # if-convert (so not vectorise) selects around float arithmetic (the TIES kernel: 2-3x slower).
    # It changes no result: no reassociation, no change in rounding.
    cxx_flags = opt + ["-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unused-parameter"]
    macros = [("FASTMERGE_WITH_CUDA", "1" if use_cuda else "0")]
    kwargs = dict(
        name="fastmerge._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_link_args=["-fopenmp"],
        # The library is loaded with torch.ops.load_library and uses no Python C API, so it is
        # built against the stable ABI and does not link libtorch_python.
        py_limited_api=True,
    )
    if use_cuda:
        sources += cuda_sources()
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": opt + ["--expt-relaxed-constexpr"]}
        return cpp_extension.CUDAExtension(sources=sources, **kwargs)
    kwargs["extra_compile_args"] = {"cxx": cxx_flags}
    return cpp_extension.CppExtension(sources=sources, **kwargs)


setup(
    ext_modules=[] if os.environ.get("FASTMERGE_SKIP_EXTENSION") == "1" else [make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
