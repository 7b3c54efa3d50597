"""The CUDA kernels compile: nvcc on the header-only kernel files alone (no torch needed), so a
broken kernel cannot land on a machine without a GPU or a CUDA build of torch. Runs wherever nvcc
exists (CI has it); skipped elsewhere."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_kernel_headers_compile_with_nvcc(tmp_path):
    source = os.path.join(ROOT, "csrc", "kernels", "cuda", "compile_check.cu")
    cmd = [NVCC, "-std=c++17", "-O2", "-arch=sm_90", "-Werror", "all-warnings", "-I", os.path.join(ROOT, "csrc"),
           "-c", source, "-o", str(tmp_path / "check.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"nvcc failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "check.o").stat().st_size > 0
