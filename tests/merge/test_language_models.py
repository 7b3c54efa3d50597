"""Small language models on the Python standard library's source text: the data, the gated-MLP
role, and merges of two LMs trained from different seeds (quick configuration; the full numbers
are in benchmarks/RESULTS.md)."""

import warnings

import pytest
import torch

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.bench.language import run_lm_quality
from fastmerge.datasets import load_text, text_windows
from fastmerge.eval.metrics import evaluate
from fastmerge.spec import trace_spec
from fastmerge.zoo.language import LMConfig


def test_stdlib_text_is_split_by_whole_files_and_read_the_same_every_time():
    text, again = load_text(), load_text()
    assert all(torch.equal(getattr(text, k), getattr(again, k)) for k in ("fit", "val", "test"))
    assert min(text.files) >= 5 and len(text.fit) > 1_000_000 and len(text.val) > 50_000
    assert int(text.fit.max()) < 256 and b"def " in bytes(text.val[:20_000].tolist())
    windows = text_windows(text.val, 16, 4, 3)
    assert windows[0][0].shape == (4, 16) and torch.equal(windows[0][0][:, 1:], windows[0][1][:, :-1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, text_windows(text.val, 16, 4, 3)))
    seeded = [text_windows(text.fit, 16, 4, 1, seed=s)[0][0] for s in (0, 0, 1)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    with pytest.raises(fastmerge.errors.InvalidArgumentError, match="unknown text set"):
        load_text("wikipedia")


def test_a_gated_mlp_is_permuted_by_dense_methods_and_says_why():
    model = zoo.llama().eval()
    spec = trace_spec(model, zoo.example_inputs("llama"))
    mlp = spec.group("layers.0.mlp")
    assert {m.tensor for m in mlp.members if m.role == "gate"} == {"layers.0.mlp.gate_proj.weight",
                                                                   "layers.0.mlp.up_proj.weight"}
    assert not any(m.role == "gate" for g in trace_spec(zoo.gpt2().eval(), zoo.example_inputs("gpt2")).groups
                   for m in g.members)  # GELU of one projection: no product
    torch.manual_seed(1)
    other = zoo.llama().eval()
    data = [zoo.example_inputs("llama", batch=32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with pytest.warns(UserWarning, match="permuted instead of densely transformed"):
        alignment = fastmerge.align([model, other], "cca", spec=spec, data=data, progress=False)
    assert "gated MLP" in alignment.diagnostics["layers.0.mlp"]["fallback"]
    assert alignment.transforms[1]["layers.0.mlp"].dtype == torch.long  # a permutation


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merges_of_two_trained_language_models(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMERGE_CACHE", str(tmp_path))
    config = LMConfig(arch=arch, steps=300, dim=48, block=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_lm_quality(arch, (0, 1), config=config, stats_batches=8, np_steps=30)
    test = {label: row["test"] for label, row in result.rows.items()}
    parents = (test["parent 0"] + test["parent 1"]) / 2
    assert parents < test["direct average"] - 0.3  # models from different seeds do not average
    # the orthogonal residual alignment beats permuting the stream, and closes part of the barrier
    assert test["CCA, orthogonal stream"] < test["CCA, permuted stream"]
    assert test["CCA, orthogonal stream"] < test["direct average"] - 0.1
    assert test["NP Merge (after CCA, orthogonal)"] < test["CCA, orthogonal stream"]
    assert "| CCA, orthogonal stream |" in "\n".join(result.table())
    # cached: a second call trains nothing and gives the model the table measured
    files = sorted(tmp_path.glob("*.pt"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == 2
    text = load_text()
    again = fastmerge.zoo.language.trained_lm(config, text, 0)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*.pt"))] == stamps
    assert evaluate(again, text_windows(text.val, config.block, 64, 8)).loss == pytest.approx(
        result.rows["parent 0"]["val"], rel=1e-6)
