"""The package around the compiled engine: build info, CLI, fallback without the library, build guard."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import fastmerge
from fastmerge import _ext
from fastmerge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_build_info_reports_compiled_backends():
    info = _ext.build_info()
    assert info["cuda"] in ("0", "1")
    assert info["torch_compiled"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert int(info["openmp"]) > 0  # the CPU kernels are built with OpenMP


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastmerge {fastmerge.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "backends: CPU yes" in out
    assert f"threads: {torch.get_num_threads()}" in out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastmerge", "info"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compiled library:" in result.stdout


def test_fallback_without_library_warns_once_and_matches_reference():
    # With the library disabled every op still works through its pure-torch reference, after exactly
    # one warning, and gives the compiled op's results.
    result = run_python(
        """
        import warnings, torch, fastmerge
        from fastmerge import _ext
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(50, 6, generator=g)
            st = fastmerge.CovarianceState([6, 6]); st.update(x, 2 * x + 1)
            r, c = fastmerge.linear_assignment(torch.rand(7, 7, generator=g))
            out = fastmerge.combine([[x], [2 * x]], weights=[0.5, 0.5])
            t = fastmerge.transform_axes([x], [(0, 1, torch.randperm(6, generator=g))])
        assert not _ext.available()
        msgs = [str(w.message) for w in caught if "compiled engine is unavailable" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "FASTMERGE_DISABLE_EXT" in msgs[0]
        assert torch.allclose(out[0], 1.5 * x, atol=1e-6)
        assert torch.allclose(st.correlation(0, 1), torch.corrcoef(x.double().T), atol=1e-9)
        print("ok")
        """,
        FASTMERGE_DISABLE_EXT="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_info_explains_why_library_is_unavailable():
    result = subprocess.run([sys.executable, "-m", "fastmerge", "info"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "FASTMERGE_DISABLE_EXT": "1"}, timeout=120)
    assert result.returncode == 0
    assert "compiled library: unavailable (disabled by FASTMERGE_DISABLE_EXT=1)" in result.stdout
    assert "pure-torch reference" in result.stdout


def test_broken_library_file_falls_back_with_reason(tmp_path):
    # A library that cannot load (here: not an ELF file) must not break `import fastmerge`.
    pkg = tmp_path / "fastmerge"
    pkg.mkdir()
    for path in (ROOT / "fastmerge").rglob("*.py"):
        target = pkg / path.relative_to(ROOT / "fastmerge")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (pkg / "_C.abi3.so").write_bytes(b"not a shared library")
    result = subprocess.run([sys.executable, "-m", "fastmerge", "info"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compiled library: unavailable (_C.abi3.so failed to load" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout


def test_setup_stops_with_a_message_when_torch_is_missing():
    # What a build-isolated `pip install .` meets: an environment without torch. setup.py must stop
    # at once with instructions instead of letting pip fetch another torch.
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
        sys.argv = ["setup.py", "--version"]
        exec(compile(open("setup.py").read(), "setup.py", "exec"))
        """
    )
    assert result.returncode != 0
    assert "pip install --no-build-isolation" in result.stderr
    assert "torch is not importable" in result.stderr


def test_build_isolated_pip_install_fails_fast(tmp_path):
    # The real thing: pip's isolated build env has no torch, and the install must stop with the
    # instructions (in seconds) rather than download a multi-GB torch into a throwaway env.
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "fastmerge").mkdir()
    (tmp_path / "fastmerge" / "_version.py").write_text((ROOT / "fastmerge" / "_version.py").read_text())
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "pip install --no-build-isolation" in result.stdout + result.stderr
    assert "Successfully installed" not in result.stdout
