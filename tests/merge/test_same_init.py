"""Same-initialisation methods on checkpoint files against direct in-memory torch computations."""


import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions

SHAPES = {"a.weight": (48, 24), "a.bias": (48,), "b.weight": (10, 48), "scale": ()}


@pytest.fixture
def family(tmp_path, gen):
    """A base and three fine-tunes of it, as safetensors files (float32 and one bfloat16 copy)."""
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    base["step"] = torch.tensor([7])
    tunes = [{k: (v + 0.05 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
              for k, v in base.items()} for _ in range(3)]
    paths = {"base": str(tmp_path / "base.safetensors")}
    save_file(base, paths["base"])
    for i, t in enumerate(tunes):
        paths[i] = str(tmp_path / f"t{i}.safetensors")
        save_file(t, paths[i])
    return tmp_path, base, tunes, paths


def run(paths, models, options, tmp_path, name="out.safetensors", **kwargs):
    out = str(tmp_path / name)
    merge_checkpoints([paths[i] for i in models], out, options, base=paths["base"] if kwargs.pop("with_base", True) else None,
                      progress=False, **kwargs)
    return load_file(out)


def close(a, b, tol=1e-6):
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def test_linear_and_task_arithmetic(family):
    tmp_path, base, tunes, paths = family
    got = run(paths, [0, 1, 2], SameInitOptions("linear", weights=(0.2, 0.3, 0.5)), tmp_path, with_base=False)
    for k in SHAPES:
        assert close(got[k], 0.2 * tunes[0][k] + 0.3 * tunes[1][k] + 0.5 * tunes[2][k]), k
    assert torch.equal(got["step"], base["step"])
    got = run(paths, [0, 1], SameInitOptions("task_arithmetic", scale=0.7), tmp_path, "ta.safetensors")
    for k in SHAPES:
        want = base[k] + 0.7 * ((tunes[0][k] - base[k]) + (tunes[1][k] - base[k]))
        assert close(got[k], want, 1e-5), k


def ties_reference(base, tunes, density, scale):
    """TIES written out the plain way: top-k by sorting (k = int(density * n), as mergekit counts),
    sign by the sum (+ where it is 0, as mergekit elects), mean over agreeing entries."""
    deltas = [t - base for t in tunes]
    trimmed = []
    for d in deltas:
        flat = d.flatten()
        k = max(1, int(density * flat.numel()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True)[:k]] = True
        trimmed.append(torch.where(keep, flat, 0.0).reshape(d.shape))
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    out = torch.zeros_like(base).flatten()
    flat_t = [t.flatten() for t in trimmed]
    for e in range(out.numel()):
        vals = [t[e] for t in flat_t if t[e] != 0 and torch.sign(t[e]) == sign.flatten()[e]]
        out[e] = sum(vals) / len(vals) if vals else 0.0
    return base + scale * out.reshape(base.shape)


def test_ties_matches_a_plain_implementation(family):
    tmp_path, base, tunes, paths = family
    got = run(paths, [0, 1, 2], SameInitOptions("ties", density=0.3, scale=1.0), tmp_path)
    for k in ("a.bias", "b.weight", "scale"):
        assert close(got[k], ties_reference(base[k], [t[k] for t in tunes], 0.3, 1.0), 1e-5), k


def test_dare_drops_and_rescales_deterministically(family):
    tmp_path, base, tunes, paths = family
    options = SameInitOptions("dare", density=0.4, seed=3)
    got = run(paths, [0], options, tmp_path, "d1.safetensors")
    again = run(paths, [0], options, tmp_path, "d2.safetensors")
    kept = 0
    total = 0
    for k in SHAPES:
        assert torch.equal(got[k], again[k])  # same seed, same bits
        delta, full = got[k] - base[k], tunes[0][k] - base[k]
        is_kept = delta != 0
        assert close(delta[is_kept], full[is_kept] / 0.4, 1e-5), k  # survivors rescaled by 1/density
        kept += int(is_kept.sum())
        total += delta.numel()
    assert abs(kept / total - 0.4) < 0.05
    everything = run(paths, [0, 1], SameInitOptions("dare", density=1.0), tmp_path, "d3.safetensors")
    plain = run(paths, [0, 1], SameInitOptions("task_arithmetic"), tmp_path, "d4.safetensors")
    assert all(close(everything[k], plain[k], 1e-5) for k in SHAPES)


def test_slerp(family):
    tmp_path, base, tunes, paths = family
    for t, want in ((0.0, tunes[0]), (1.0, tunes[1])):
        got = run(paths, [0, 1], SameInitOptions("slerp", t=t), tmp_path, f"s{t}.safetensors", with_base=False)
        assert all(close(got[k], want[k], 1e-5) for k in SHAPES)
    got = run(paths, [0, 1], SameInitOptions("slerp", t=0.3), tmp_path, "s.safetensors", with_base=False)
    a, b = tunes[0]["a.weight"].double().flatten(), tunes[1]["a.weight"].double().flatten()
    omega = torch.arccos(a @ b / (a.norm() * b.norm()))
    want = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
    assert close(got["a.weight"].flatten(), want, 1e-5)


def test_bfloat16_output_and_sharding(family):
    tmp_path, base, tunes, paths = family
    out = tmp_path / "sharded"
    merge_checkpoints([paths[0], paths[1]], str(out), SameInitOptions("linear"), dtype="bfloat16",
                      max_shard_size=2000, progress=False)
    from fastmerge.io import Checkpoint

    ckpt = Checkpoint(str(out))
    assert (out / "model.safetensors.index.json").exists()
    assert ckpt.dtype("a.weight") == torch.bfloat16 and ckpt.dtype("step") == torch.int64
    assert close(ckpt["a.weight"], ((tunes[0]["a.weight"] + tunes[1]["a.weight"]) / 2).bfloat16(), 1e-2)


def test_mismatched_inputs_and_bad_options(family, gen):
    tmp_path, base, tunes, paths = family
    other = dict(tunes[0])
    other["a.weight"] = torch.randn(40, 24, generator=gen)
    save_file(other, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ShapeMismatchError, match="a.weight"):
        merge_checkpoints([paths[0], str(tmp_path / "wide.safetensors")], str(tmp_path / "x.safetensors"), progress=False)
    del other["a.weight"]
    save_file(other, str(tmp_path / "short.safetensors"))
    with pytest.raises(ShapeMismatchError, match="missing 1"):
        merge_checkpoints([paths[0], str(tmp_path / "short.safetensors")], str(tmp_path / "x.safetensors"), progress=False)
    with pytest.raises(InvalidArgumentError, match="base"):
        merge_checkpoints([paths[0], paths[1]], str(tmp_path / "x.safetensors"), SameInitOptions("ties"), progress=False)
    with pytest.raises(InvalidArgumentError, match="exactly two"):
        merge_checkpoints([paths[0], paths[1], paths[2]], str(tmp_path / "x.safetensors"), SameInitOptions("slerp"),
                          progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_ties_refuses_a_nan_naming_the_file_and_tensor(family):
    """TIES checks its inputs in the pass that selects its thresholds (no separate check): a NaN
    in the base still names the base file and the tensor, and nothing is written."""
    tmp_path, base, tunes, paths = family
    broken = {k: v.clone() for k, v in base.items()}
    broken["a.weight"][2, 3] = float("nan")
    save_file(broken, str(tmp_path / "nan_base.safetensors"))
    out = tmp_path / "x.safetensors"
    with pytest.raises(NonFiniteError, match=r"nan_base\.safetensors: tensor 'a\.weight' holds 1 NaN"):
        merge_checkpoints([paths[0], paths[1]], str(out), SameInitOptions("ties", density=0.5),
                          base=str(tmp_path / "nan_base.safetensors"), progress=False)
    assert not out.exists()
