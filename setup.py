"""Builds fastmerge's compiled engine (fastmerge/_C*.so) against the torch already installed.

Install with:  pip install --no-build-isolation .      (or -e . for development)

Environment switches (read at build time):
  FASTMERGE_CUDA=auto|0|1   auto (default): build the CUDA sources when torch has CUDA and a
                            toolkit is found; 0: CPU only; 1: CUDA required (fail if impossible).
  FASTMERGE_DEBUG=1         -O0 -g instead of -O3.
  MAX_JOBS=N                parallel compile jobs (ninja), as for any torch extension.
"""

import glob
import os
import sys

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


def cuda_sources() -> list:
    return sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))


def make_extension():
    if torch_version_tuple() < MIN_TORCH:
        sys.exit(f"fastmerge needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}")
    debug = os.environ.get("FASTMERGE_DEBUG", "0") == "1"
    use_cuda = want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is left to BuildExtension: it passes the one the installed torch needs.
    cxx_flags = opt + ["-fopenmp", "-Wall", "-Wno-unused-parameter"]
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
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
