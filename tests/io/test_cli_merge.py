"""`fastmerge merge` end to end in a subprocess: results, config files, errors, inputs untouched,
and an interrupted run that leaves nothing behind."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions
from fastmerge.spec.transforms import apply_permutations


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "fastmerge", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def models(tmp_path, gen):
    base = {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(64, generator=gen)}
    paths = []
    for name in ("base", "a", "b"):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} if name != "base" else base
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(state, paths[-1])
    return tmp_path, paths


def test_flags_and_yaml_config_agree_with_the_api_and_inputs_stay_intact(models):
    tmp_path, (base, a, b) = models
    before = [digest(p) for p in (base, a, b)]
    done = cli("merge", a, b, "--base", base, "--method", "ties", "--density", "0.5", "--scale", "0.8",
               "-o", str(tmp_path / "flags"), "--quiet")
    assert done.returncode == 0, done.stderr
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                      f"parameters: {{density: 0.5, lambda: 0.8}}\nout_path: {tmp_path / 'yaml'}\n")
    done = cli("merge", "--config", str(config), "--quiet")
    assert done.returncode == 0, done.stderr
    merge_checkpoints([a, b], str(tmp_path / "api.safetensors"), SameInitOptions("ties", density=0.5, scale=0.8),
                      base=base, progress=False)
    want = load_file(str(tmp_path / "api.safetensors"))
    for folder in ("flags", "yaml"):
        got = load_file(str(tmp_path / folder / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert [digest(p) for p in (base, a, b)] == before


def test_errors_are_one_line_with_exit_code_2_and_write_nothing(models, gen):
    tmp_path, (base, a, b) = models
    save_file({"w": torch.randn(8, 8, generator=gen), "b": torch.randn(64, generator=gen)}, str(tmp_path / "odd.safetensors"))
    cases = [
        ("merge", a, str(tmp_path / "odd.safetensors"), "-o", str(tmp_path / "out.safetensors")),  # shapes differ
        ("merge", a, b, "--method", "ties", "-o", str(tmp_path / "out.safetensors")),               # no base
        ("merge", a, str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "out.safetensors")),  # missing input
        ("merge", a, b, "-o", a),                                                                   # over an input
    ]
    for args in cases:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("fastmerge merge:"), done.stderr
        assert not (tmp_path / "out.safetensors").exists()
    done = cli("merge", a, b, "-o", str(tmp_path / "out.safetensors"), "--dry-run")
    assert done.returncode == 0 and "writes:" in done.stdout and not (tmp_path / "out.safetensors").exists()
    assert cli("merge", a, b, "-o", str(tmp_path / "out.safetensors"), "--quiet").returncode == 0
    again = cli("merge", a, b, "-o", str(tmp_path / "out.safetensors"), "--quiet")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert cli("merge", a, b, "-o", str(tmp_path / "out.safetensors"), "--quiet", "--overwrite").returncode == 0


def test_sigterm_mid_write_leaves_no_output_and_a_rerun_succeeds(tmp_path, gen):
    big = {f"t{i}": torch.randn(1024, 1024, generator=gen) for i in range(48)}  # 200 MB per model
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(2)]
    for p in paths:
        save_file(big, p)
    before = [digest(p) for p in paths]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastmerge", "merge", *paths, "-o", str(out), "--quiet",
                             "--max-shard-size", "50MB"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(".tmp-" in n for n in os.listdir(out))):
        time.sleep(0.005)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    assert not out.exists(), "no shard, index, temporary file or folder may remain"
    assert [digest(p) for p in paths] == before
    assert cli("merge", *paths, "-o", str(out), "--quiet", "--max-shard-size", "50MB").returncode == 0
    merged = load_file(str(out / "model-00001-of-00005.safetensors"))
    assert torch.allclose(merged["t0"], big["t0"])


def _save_state(path, state):
    from fastmerge.io import ShardedWriter

    plan = [(k, v.shape, v.dtype) for k, v in state.items()]  # tied tensors become two copies
    with ShardedWriter(str(path), plan) as w:
        for k, v in state.items():
            w.write(k, v.detach().contiguous())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weight_matching_of_files_recovers_a_permuted_copy(tmp_path, arch):
    """Aligned merge from files and a YAML spec alone: a permuted copy of a model is matched back
    exactly (GPT-2 with tied embeddings, LLaMA with grouped-query attention), so averaging the
    pair gives the model itself."""
    from fastmerge import zoo
    from fastmerge.spec import save_spec, trace_spec

    torch.manual_seed(0)
    model = zoo.gpt2() if arch == "gpt2" else zoo.llama()
    spec = trace_spec(model, (torch.randint(0, 64, (1, 8)),))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    permuted = apply_permutations(spec, state, spec.random_permutations(torch.Generator().manual_seed(5)))
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    _save_state(tmp_path / "a.safetensors", state)
    _save_state(tmp_path / "b.safetensors", permuted)
    save_spec(spec, tmp_path / "spec.yaml")
    done = cli("merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--align", "weight_matching",
               "--spec", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out.safetensors"), "--quiet")
    assert done.returncode == 0, done.stderr
    merged = load_file(str(tmp_path / "out.safetensors"))
    for k, v in state.items():
        assert torch.equal(merged[k], v), k
    no_spec = cli("merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--align",
                  "weight_matching", "-o", str(tmp_path / "x.safetensors"))
    assert no_spec.returncode == 2 and "--spec" in no_spec.stderr
