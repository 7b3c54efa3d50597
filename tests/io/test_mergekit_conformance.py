"""The same merge config through mergekit 0.1.5 and through `fastmerge merge --config`, on small
LLaMA checkpoint folders saved by transformers: the same tensors (float32: bit-equal for TIES,
Breadcrumbs and SCE, within a few float32 ulps for the weighted sums and those from a Gram matrix;
every method bit-equal with --mergekit-compat; gradients and filters resolved per tensor as
mergekit does), the same greedy tokens after
`from_pretrained`, or a one-line refusal where fastmerge does not support what the config asks.
Skipped where mergekit is not installed (it is in the test extra)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from fastmerge.cli import main  # noqa: E402
from fastmerge.io import Checkpoint  # noqa: E402

from ..helpers import llama_family  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes (base + small noise), float32, bfloat16 and float16 copies."""
    root = tmp_path_factory.mktemp("llama")
    llama_family(root)
    return root


def _run_both(family, tmp_path, text: str, dtype: str = "float32", flags: tuple = ()):
    text = text.replace("ROOT", str(family / dtype))
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "merge.yml"
    config_path.write_text(text)
    theirs, ours = tmp_path / "mergekit", tmp_path / "fastmerge"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(theirs),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    rc = main(["merge", "--config", str(config_path), "-o", str(ours), "--quiet", *flags])
    return rc, theirs, ours


def _models(names, **per_model):
    lines = []
    for i, name in enumerate(names):
        params = {k: v[i] for k, v in per_model.items() if v[i] is not None}
        lines.append(f"  - model: ROOT/{name}" + (f"\n    parameters: {params}" if params else ""))
    return "models:\n" + "\n".join(lines) + "\n"


EXACT = 0  # ulps: TIES, Breadcrumbs, SCE run mergekit's float operations in its order
SUMS = 4  # ulps of the tensor's largest value: weighted sums whose terms are added in another order
SPAN = 16  # SLERP, Model Stock, NuSLERP, Multi-SLERP, Karcher: coefficients from a float64 Gram matrix
# (within 1 ulp of the exact value: tests/merge/test_span_methods.py), mergekit's rounded at every
# float32 operation (up to 8.5 ulps measured, Multi-SLERP of task vectors with weights summing to 4)

CASES = {
    "linear": ("merge_method: linear\n" + _models("ab", weight=[1.0, 2.0]), SUMS),
    "linear-normalize-false": ("merge_method: linear\n" + _models("ab", weight=[0.3, 0.3])
                               + "parameters: {normalize: false}\n", SUMS),
    "linear-one-model": ("merge_method: linear\n" + _models("a", weight=[2.0]) + "parameters: {normalize: false}\n",
                         SUMS),
    # linear and karcher hold no base apart: mergekit merges their base_model as one more model
    "linear-base-is-a-model": ("merge_method: linear\nbase_model: ROOT/base\n" + _models("ab")
                               + "parameters: {weight: 1.0}\n", SUMS),
    "karcher-base-is-a-model": ("merge_method: karcher\nbase_model: ROOT/base\n" + _models("ab"), SPAN),
    # nuslerp and multislerp hold it apart: listed under models (without a weight), it is still the base
    "nuslerp-base-listed": ("merge_method: nuslerp\nbase_model: ROOT/base\n" + _models(["base", "a", "b"],
                                                                                      weight=[None, 1.0, 2.0]), SPAN),
    # quoted numbers and booleans, which mergekit's pydantic models read as such
    "linear-quoted": ("merge_method: linear\nmodels:\n  - model: ROOT/a\n    parameters: {weight: '0.5'}\n"
                      "  - model: ROOT/b\n    parameters: {weight: '2e0'}\nparameters: {normalize: 'false'}\n", SUMS),
    "linear-shared-weight": ("merge_method: linear\n" + _models("abc") + "parameters: {weight: 1.0}\n", SUMS),
    "task-arithmetic": ("merge_method: task_arithmetic\nbase_model: ROOT/base\n" + _models("ab", weight=[0.7, 0.5])
                        + "parameters: {lambda: 0.8}\n", SUMS),
    "task-arithmetic-normalize": ("merge_method: task_arithmetic\nbase_model: ROOT/base\n"
                                  + _models("abc", weight=[0.7, 0.5, 0.2]) + "parameters: {normalize: true}\n", SUMS),
    "ties": ("merge_method: ties\nbase_model: ROOT/base\n" + _models("abc", weight=[1.0] * 3, density=[0.5] * 3), EXACT),
    "ties-per-model": ("merge_method: ties\nbase_model: ROOT/base\n"
                       + _models("abc", weight=[0.3, 0.9, 0.5], density=[0.7, 0.3, 0.5])
                       + "parameters: {lambda: 1.3}\n", EXACT),
    "ties-default-density": ("merge_method: ties\nbase_model: ROOT/base\n" + _models("ab", weight=[1.0, 0.5]), EXACT),
    "ties-shared": ("merge_method: ties\nbase_model: ROOT/base\n" + _models("abc")
                    + "parameters: {weight: 1.0, density: 0.4, int8_mask: true}\n", EXACT),
    "ties-anchors": ("merge_method: ties\nbase_model: ROOT/base\nmodels:\n  - model: ROOT/a\n"
                     "    parameters: &shared {weight: 1.0, density: 0.6}\n  - model: ROOT/b\n    parameters: *shared\n"
                     "  - model: ROOT/c\n    parameters: {<<: *shared, weight: 0.4}\n", EXACT),
    "ties-rescale": ("merge_method: ties\nbase_model: ROOT/base\n" + _models("abc", weight=[1.0, 0.6, 0.3],
                                                                               density=[0.4, 0.7, 0.5])
                     + "parameters: {rescale: true}\n", EXACT),
    "ties-normalize-false": ("merge_method: ties\nbase_model: ROOT/base\n" + _models("ab", weight=[0.6, 0.6],
                                                                                     density=[0.5, 0.5])
                             + "parameters: {normalize: false}\n", EXACT),
    "slerp": ("merge_method: slerp\nbase_model: ROOT/a\n" + _models("ab") + "parameters: {t: 0.3}\n", SPAN),
    "slerp-base-listed-second": ("merge_method: slerp\nbase_model: ROOT/b\n" + _models("ab")
                                 + "parameters: {t: 0.3}\n", SPAN),
    "slerp-gradients-and-filters": ("merge_method: slerp\nbase_model: ROOT/a\n" + _models("ab")
                                    + "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                                      "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n", SPAN),
    "ties-gradients": ("merge_method: ties\nbase_model: ROOT/base\nmodels:\n  - model: ROOT/a\n    parameters:\n"
                       "      weight: [1.0, 0.2]\n      density: [{filter: mlp, value: [0.9, 0.3]}, {value: 0.6}]\n"
                       "  - model: ROOT/b\n    parameters: {weight: 0.5, density: 0.5}\n", EXACT),
    "ties-filter-falls-back-to-shared": ("merge_method: ties\nbase_model: ROOT/base\nmodels:\n  - model: ROOT/a\n"
                                         "    parameters: {weight: 1.0, density: [{filter: mlp, value: 0.5}]}\n"
                                         "  - model: ROOT/b\n    parameters: {weight: 1.0, density: 0.7}\n"
                                         "parameters: {density: 0.3}\n", EXACT),
    "linear-filters-and-gradients": ("merge_method: linear\nmodels:\n  - model: ROOT/a\n    parameters:\n"
                                     "      weight: [{filter: q_proj, value: 3}, {value: 1}]\n  - model: ROOT/b\n"
                                     "    parameters: {weight: [1, 2, 0.5]}\n", SUMS),
    "task-arithmetic-lambda-gradient": ("merge_method: task_arithmetic\nbase_model: ROOT/base\n"
                                        + _models("ab", weight=[1.0, 0.5]) + "parameters: {lambda: [0.5, 1.5]}\n", SUMS),
    "model-stock": ("merge_method: model_stock\nbase_model: ROOT/base\n" + _models("abc"), SPAN),
    "model-stock-filter-wise": ("merge_method: model_stock\nbase_model: ROOT/base\n" + _models("ab")
                                + "parameters: {filter_wise: true}\n", EXACT),
    "breadcrumbs": ("merge_method: breadcrumbs\nbase_model: ROOT/base\n"
                    + _models("abc", weight=[1.0, 0.7, 0.4], density=[0.8, 0.6, 0.9]) + "parameters: {lambda: 0.9}\n",
                    EXACT),
    "breadcrumbs-ties-gamma-rescale": ("merge_method: breadcrumbs_ties\nbase_model: ROOT/base\n"
                                       + _models("ab", weight=[1.0, 0.5], density=[0.7, 0.7], gamma=[0.05, 0.02])
                                       + "parameters: {rescale: true, normalize: true}\n", EXACT),
    "nuslerp": ("merge_method: nuslerp\n" + _models("ab", weight=[0.3, 0.7]), SPAN),
    "nuslerp-base-row-wise": ("merge_method: nuslerp\nbase_model: ROOT/base\n" + _models("ab", weight=[1.0, 2.0])
                              + "parameters: {nuslerp_row_wise: true, nuslerp_flatten: false}\n", EXACT),
    "nuslerp-last-dim": ("merge_method: nuslerp\n" + _models("ab", weight=[1.0, 1.0])
                         + "parameters: {nuslerp_flatten: false}\n", EXACT),
    "multislerp": ("merge_method: multislerp\n" + _models("abc", weight=[0.5, 0.3, 0.2]), SPAN),
    "multislerp-base": ("merge_method: multislerp\nbase_model: ROOT/base\n" + _models("abc", weight=[1.0, 2.0, 1.0])
                        + "parameters: {normalize_weights: false}\n", SPAN),
    "multislerp-eps": ("merge_method: multislerp\n" + _models("ab", weight=[1.0, 3.0]) + "parameters: {eps: 0.5}\n",
                       SPAN),
    "nearswap": ("merge_method: nearswap\nbase_model: ROOT/a\n" + _models("ab") + "parameters: {t: 0.01}\n", EXACT),
    "nearswap-base-not-listed": ("merge_method: nearswap\nbase_model: ROOT/base\n" + _models("c")
                                 + "parameters: {t: [0.001, 0.05]}\n", EXACT),
    "karcher": ("merge_method: karcher\n" + _models("abc"), SPAN),
    "karcher-options": ("merge_method: karcher\n" + _models("ab") + "parameters: {max_iter: 3, tol: 1.0e-3}\n", SPAN),
    "sce": ("merge_method: sce\nbase_model: ROOT/base\n" + _models("abc"), EXACT),
    "sce-select": ("merge_method: sce\nbase_model: ROOT/base\n" + _models("abc") + "parameters: {select_topk: 0.3}\n",
                   EXACT),
    "ram": ("merge_method: ram\nbase_model: ROOT/base\n" + _models("abc") + "parameters: {epsilon: 0.02}\n", EXACT),
    "ramplus-tl": ("merge_method: ramplus_tl\nbase_model: ROOT/base\n" + _models("abc")
                   + "parameters: {epsilon: 0.015, r: 0.3, alpha: 0.5}\n", EXACT),
    "out-dtype": ("merge_method: linear\n" + _models("ab", weight=[1.0, 2.0]) + "out_dtype: bfloat16\n", SUMS),
    "torch-dtype-names": ("merge_method: linear\n" + _models("ab", weight=[1.0, 2.0])
                          + "dtype: torch.float32\nout_dtype: torch.bfloat16\n", SUMS),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_model_as_mergekit(family, tmp_path, name):
    text, ulps = CASES[name]
    rc, theirs, ours = _run_both(family, tmp_path, text)
    assert rc == 0
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        eps = torch.finfo(x.dtype).eps
        bound = ulps * eps * float(x.double().abs().max())
        assert float((x.double() - y.double()).abs().max()) <= bound, (key, float((x.double() - y.double()).abs().max()))


@pytest.mark.parametrize("case, dtype, flags", [
    ("ties", "float32", ()), ("sce-select", "bfloat16", ()),
    # fastmerge's own choices (ties at the band's edge; rounding of the Gram-matrix methods)
    ("breadcrumbs", "bfloat16", ()), ("slerp", "bfloat16", ()), ("multislerp", "bfloat16", ()),
    ("karcher", "bfloat16", ()),
    # Model Stock's rounding differences flip the 9th greedy token of these random models (their
    # logits nearly tie); with --mergekit-compat the tensors, so the tokens, are mergekit's
    ("model-stock", "bfloat16", ("--mergekit-compat",)),
])
def test_the_outputs_load_and_generate_the_same_tokens(family, tmp_path, case, dtype, flags):
    text = CASES[case][0] if case != "ties" else ("merge_method: ties\nbase_model: ROOT/base\n"
                                                  + _models("abc", weight=[1.0, 0.8, 0.6], density=[0.6] * 3))
    rc, theirs, ours = _run_both(family, tmp_path, text, dtype=dtype, flags=flags)
    assert rc == 0
    prompt = torch.tensor([[1, 5, 17, 42, 8]])
    tokens = []
    for folder in (theirs, ours):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            tokens.append(model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0))
    assert torch.equal(tokens[0], tokens[1])


def test_bfloat16_merges_match_mergekit(family, tmp_path):
    """bfloat16 checkpoints: linear within one bfloat16 rounding (mergekit and fastmerge both sum in
    float32, in another order), SLERP, Model Stock, Multi-SLERP and Karcher within one or two
    (fastmerge from a float64 Gram matrix, mergekit rounding every intermediate to bfloat16),
    row-wise NuSLERP and SCE to the bit."""
    for k, (text, ulps) in enumerate(((CASES["linear"][0], 1), (CASES["slerp"][0], 1), (CASES["model-stock"][0], 1),
                                      (CASES["multislerp"][0], 2), (CASES["karcher"][0], 2),
                                      (CASES["nuslerp-base-row-wise"][0], 0), (CASES["sce-select"][0], 0))):
        rc, theirs, ours = _run_both(family, tmp_path / str(k), text, dtype="bfloat16")
        assert rc == 0
        a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
        for key in a.keys():
            x, y = a[key].double(), b[key].double()
            assert float((x - y).abs().max()) <= ulps * 2**-7 * float(x.abs().max()) + 1e-30, key


LOADED = {  # (case, the inputs' stored dtype, the config's dtype and out_dtype lines)
    "linear": ("linear", "bfloat16", "dtype: float32\n"),  # widened: computed in float32, not rounded first
    "ties": ("ties-per-model", "bfloat16", "dtype: float32\n"),  # float32 task vectors of bfloat16 values: ties
    "sce": ("sce-select", "float16", "dtype: bfloat16\n"),  # rounded to bfloat16 as read: another selection
    "breadcrumbs": ("breadcrumbs", "bfloat16", "dtype: float16\n"),
    "task arithmetic, out_dtype": ("task-arithmetic", "bfloat16", "dtype: bfloat16\nout_dtype: float16\n"),
    "passthrough, scaled": ("passthrough", "bfloat16", "dtype: float32\n"),
}


@pytest.mark.parametrize("name", sorted(LOADED))
def test_inputs_are_loaded_in_the_configs_dtype_as_mergekit_loads_them(family, tmp_path, name):
    """mergekit reads every input in the config's `dtype` (rounding or widening it) before any
    arithmetic: with --mergekit-compat the same tensors, whichever way the dtype goes (to the bit;
    the weighted sums within their ulps of the dtype they are computed in). A merge of bfloat16
    models into float32 was rounded to bfloat16 before (a silent difference of up to 1/256 of each
    value), and TIES, SCE and Breadcrumbs selected from the stored values, not the loaded ones."""
    case, stored, dtypes = LOADED[name]
    text, ulps = CASES[case] if case != "passthrough" else (
        "merge_method: passthrough\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 1], "
        "parameters: {scale: 0.7}}]\n  - sources: [{model: ROOT/b, layer_range: [0, 2]}]\n", EXACT)
    rc, theirs, ours = _run_both(family, tmp_path, text + dtypes, dtype=stored, flags=("--mergekit-compat",))
    assert rc == 0
    loaded = getattr(torch, dtypes.split("\n")[0].removeprefix("dtype: "))
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a[key].dtype == b[key].dtype, key
        bound = ulps * torch.finfo(loaded).eps * float(a[key].double().abs().max())
        assert float((a[key].double() - b[key].double()).abs().max()) <= bound, key
    if name == "linear":  # the float32 merge is not a bfloat16 one widened
        merged = b["model.layers.0.mlp.up_proj.weight"]
        assert not torch.equal(merged, merged.bfloat16().float())


def _tied_at_band_edges(delta: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Where |delta| equals a magnitude at an edge of Breadcrumbs' band (the entries whose keeping
    depends on how ties are broken)."""
    n = delta.numel()
    target, bottom = int(density * n), max(0, n - int(density * n) - int(gamma * n))
    magnitudes = delta.abs().reshape(-1).float()
    ordered = magnitudes.sort().values
    edges = torch.stack([ordered[bottom], ordered[bottom + target - 1]])
    return torch.isin(magnitudes, edges).reshape(delta.shape)


def test_bfloat16_breadcrumbs_differs_from_mergekit_only_where_magnitudes_tie(family, tmp_path):
    """fastmerge keeps the entries tied at a band edge by position (no sort); mergekit keeps those
    its sort puts first. On bfloat16 task vectors such ties are common: the merges differ there and
    nowhere else."""
    rc, theirs, ours = _run_both(family, tmp_path, CASES["breadcrumbs"][0], dtype="bfloat16")
    assert rc == 0
    inputs = {name: Checkpoint(str(family / "bfloat16" / name)) for name in ("base", "a", "b", "c")}
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    differing = 0
    for key in a.keys():
        tied = torch.zeros(a[key].shape, dtype=torch.bool)
        for name, density in zip("abc", (0.8, 0.6, 0.9)):  # the case's per-model densities
            tied |= _tied_at_band_edges(inputs[name][key] - inputs["base"][key], density)
        differ = a[key] != b[key]
        assert not (differ & ~tied).any(), key
        differing += int(differ.sum())
    assert differing > 0  # the ties are real: without --mergekit-compat the tools differ


@pytest.mark.parametrize("case", ["ties-per-model", "breadcrumbs", "breadcrumbs-ties-gamma-rescale",
                                  "slerp", "model-stock", "nuslerp", "multislerp", "karcher"])
def test_bfloat16_matches_mergekit_to_the_bit_with_mergekit_compat(family, tmp_path, case):
    """TIES (fastmerge's: float32 task vectors, ties at the threshold kept), Breadcrumbs (ties at
    the band's edges by position), SLERP, Model Stock, NuSLERP, Multi-SLERP and Karcher
    (from a float64 Gram matrix) differ from mergekit on bfloat16 checkpoints; --mergekit-compat computes
    them mergekit's way, to the bit."""
    text = CASES[case][0].replace("ROOT", str(family / "bfloat16"))
    (tmp_path / "merge.yml").write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mergekit"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    theirs = Checkpoint(str(tmp_path / "mergekit"))
    gaps = {}
    for flag in ((), ("--mergekit-compat",)):
        out = tmp_path / f"fastmerge{len(flag)}"
        assert main(["merge", "--config", str(tmp_path / "merge.yml"), "-o", str(out), "--quiet", *flag]) == 0
        ours = Checkpoint(str(out))
        gaps[flag] = max(float((theirs[k].double() - ours[k].double()).abs().max()) for k in theirs.keys())
    assert gaps[("--mergekit-compat",)] == 0.0
    assert gaps[()] > 0.0  # the documented difference is real (else the switch would be needless)


@pytest.mark.parametrize("text, message", [
    ("merge_method: dare_ties\nbase_model: ROOT/base\n" + _models("ab", weight=[1, 1], density=[0.5, 0.5]),
     "pass --own-masks"),
    ("merge_method: della\nbase_model: ROOT/base\n" + _models("abc", weight=[1, 1, 1]), "della"),
    ("merge_method: linear\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 1]}, "
     "{model: ROOT/b, layer_range: [0, 2]}]\n", "differ in length"),
    ("merge_method: linear\nmodules:\n  vision_tower: {models: [{model: ROOT/a}]}\n", "multi-module"),
    ("merge_method: linear\nparameters: {weight: 1}\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 9]}, "
     "{model: ROOT/b, layer_range: [0, 9]}]\n", "within its 2 layers"),
    ("merge_method: linear\nparameters: {weight: 1}\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 1]}, "
     "{model: ROOT/a, layer_range: [1, 2]}]\n", "appears twice"),
    ("merge_method: ties\nbase_model: ROOT/base\nparameters: {weight: 1}\nslices:\n  - sources: [{model: ROOT/a, "
     "layer_range: [0, 2]}, {model: ROOT/b, layer_range: [0, 2]}]\n", "not among the slice's sources"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 9]}]\n", "within its 2 layers"),
    # these folders have no tokenizer files
    ("merge_method: linear\n" + _models("ab", weight=[1, 1]) + "tokenizer_source: base\n", "cannot load its tokenizer"),
    ("merge_method: slerp\nbase_model: ROOT/base\n" + _models("ab") + "parameters: {t: 0.5}\n", "one of its two models"),
    ("merge_method: linear\n" + _models("ab", weight=[1, None]), "models[1] has no weight"),
    ("merge_method: linear\nbase_model: ROOT/base\n" + _models("ab", weight=[1, 1]), "one more model of a linear"),
    (_models("ab", weight=[1, 1]), "merge_method is required"),
])
def test_what_fastmerge_does_not_support_is_one_line(family, tmp_path, capsys, text, message):
    path = tmp_path / "merge.yml"
    path.write_text(text.replace("ROOT", str(family / "float32")))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("text, layers", [
    ("merge_method: passthrough\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 2]}]\n"
     "  - sources: [{model: ROOT/b, layer_range: [0, 2]}]\n  - sources: [{model: ROOT/c, layer_range: [1, 2]}]\n", 5),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 1]}]\n  - sources:\n"
     "      - model: ROOT/b\n        layer_range: [0, 2]\n        parameters:\n"
     "          scale: [{filter: o_proj, value: [0.5, 1.5]}, {value: 1.0}]\n", 3),
    ("merge_method: passthrough\nmodels:\n  - model: ROOT/a\n    parameters: {scale: [{filter: up_proj, value: 0.5}, "
     "{value: 1.0}]}\n", 2),
])
def test_passthrough_slices_build_the_same_model_as_mergekit(family, tmp_path, text, layers):
    """Frankenmerges: layer ranges stacked (the layer count changes), tensors copied (scaled) to the bit;
    both folders load and generate the same tokens."""
    _assert_same_layered_model(family, tmp_path, text, EXACT, layers)


def _assert_same_layered_model(family, tmp_path, text: str, ulps: int, layers: int) -> None:
    """Both tools' outputs of `text`: the same tensors (within `ulps` of each tensor's largest
    value), layer count and greedy tokens."""
    rc, theirs, ours = _run_both(family, tmp_path, text)
    assert rc == 0
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert (a[k] - b[k]).abs().max() <= ulps * torch.finfo(torch.float32).eps * float(a[k].abs().max()), k
    tokens = []
    for folder in (theirs, ours):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            tokens.append(model.generate(torch.tensor([[3, 9, 27]]), max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert torch.equal(tokens[0], tokens[1])
    assert model.config.num_hidden_layers == layers


MERGED_SLICES = {
    # mergekit's gradient SLERP: t a gradient over the slice's layers, per-filter values
    "slerp, gradient t": ("merge_method: slerp\nbase_model: ROOT/a\nslices:\n  - sources:\n"
                          "      - {model: ROOT/a, layer_range: [0, 2]}\n      - {model: ROOT/b, layer_range: [0, 2]}\n"
                          "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n"
                          "    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - {value: 0.5}\n", SPAN, 2),
    # a slice's filters that give a tensor no value fall through to the shared parameters
    "slerp, slice filters fall through": ("merge_method: slerp\nbase_model: ROOT/a\nslices:\n  - sources:\n"
                                          "      - {model: ROOT/a, layer_range: [0, 2]}\n"
                                          "      - {model: ROOT/b, layer_range: [0, 2]}\n"
                                          "    parameters: {t: [{filter: mlp, value: [0.9, 0.2]}]}\n"
                                          "parameters:\n  t: [{filter: self_attn, value: 0.3}, {value: 0.6}]\n",
                                          SPAN, 2),
    # TIES with the base among the sources (its own layer range), per-source parameters
    "ties, base among sources": ("merge_method: ties\nbase_model: ROOT/base\nslices:\n  - sources:\n"
                                 "      - {model: ROOT/base, layer_range: [0, 2]}\n"
                                 "      - {model: ROOT/a, layer_range: [0, 2], parameters: {weight: 1, density: 0.6}}\n"
                                 "      - {model: ROOT/b, layer_range: [0, 2], parameters: {weight: [0.5, 1], "
                                 "density: 0.6}}\n", EXACT, 2),
    # two slices (3 layers out): the slice's own parameters over the shared ones, shifted ranges
    "linear, two slices": ("merge_method: linear\nparameters: {weight: 1.0}\nslices:\n  - sources:\n"
                           "      - {model: ROOT/a, layer_range: [0, 2]}\n      - {model: ROOT/c, layer_range: [0, 2]}\n"
                           "  - sources:\n      - {model: ROOT/b, layer_range: [1, 2], parameters: {weight: 3}}\n"
                           "      - {model: ROOT/c, layer_range: [0, 1]}\n    parameters: {weight: 0.5}\n", SUMS, 3),
}


@pytest.mark.parametrize("name", sorted(MERGED_SLICES))
def test_merged_slices_build_the_same_model_as_mergekit(family, tmp_path, name):
    """slices merged by a method, layer by layer (mergekit's most common SLERP form): the same
    tensors, layer count and greedy tokens."""
    _assert_same_layered_model(family, tmp_path, *MERGED_SLICES[name])


def test_modules_default_is_read_as_the_top_level(family, tmp_path):
    """mergekit's `modules: {default: ...}` (the one module of a decoder LLM), parameters of the
    module over the shared ones."""
    text = ("merge_method: ties\nbase_model: ROOT/base\nparameters: {density: 0.4}\nmodules:\n  default:\n"
            "    parameters: {density: 0.6}\n    models:\n"
            "      - model: ROOT/a\n        parameters: {weight: 1}\n"
            "      - model: ROOT/b\n        parameters: {weight: 0.5}\n")
    _assert_same_layered_model(family, tmp_path, text, EXACT, 2)


def test_dry_run_of_a_slices_config_names_its_slices_and_writes_nothing(family, tmp_path, capsys):
    path = tmp_path / "merge.yml"
    path.write_text(MERGED_SLICES["linear, two slices"][0].replace("ROOT", str(family / "float32")))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "slice 1:" in out and "layers: 3" in out
    assert not os.path.exists(tmp_path / "out")


def test_dry_run_of_a_passthrough_config_plans_what_the_merge_writes(family, tmp_path, capsys):
    """--dry-run of a frankenmerge: its slices, the new layer count and the tensors that the merge
    then writes (the same count), and nothing on disk; a bad layer range is the same one-line error."""
    text = ("merge_method: passthrough\nslices:\n  - sources: [{model: ROOT/a, layer_range: [0, 2]}]\n"
            "  - sources: [{model: ROOT/b, layer_range: [1, 2]}]\n").replace("ROOT", str(family / "float32"))
    path = tmp_path / "merge.yml"
    path.write_text(text)
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: passthrough" in out and "slice 1:" in out and "[1, 2)" in out and "layers: 3" in out
    assert not os.path.exists(tmp_path / "out")
    planned = int(out.split("tensors: ")[1].split(";")[0])
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert len(Checkpoint(str(tmp_path / "out")).keys()) == planned
    path.write_text(text.replace("[1, 2]", "[1, 5]"))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out2"), "--dry-run"]) == 2
    assert "within its 2 layers" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out2")


def test_a_base_listed_among_the_models_is_not_merged_as_a_model(family, tmp_path):
    """mergekit's TIES (every method with a base apart) drops a base listed under models:."""
    text = ("merge_method: ties\nbase_model: ROOT/base\nmodels:\n  - model: ROOT/base\n"
            "  - model: ROOT/a\n    parameters: {weight: 1, density: 0.5}\n"
            "  - model: ROOT/b\n    parameters: {weight: 0.7, density: 0.5}\n")
    rc, theirs, ours = _run_both(family, tmp_path, text)
    assert rc == 0
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    assert all(torch.equal(a[k], b[k]) for k in a.keys())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear", "arcee_fusion"])
def test_dare_variants_match_mergekit_where_nothing_is_drawn(family, tmp_path, capsys, method):
    """mergekit's DARE/DELLA variants and arcee_fusion run with --own-masks only (fastmerge's draws
    are not torch's); where nothing is drawn (density 1; arcee_fusion on tensors of at most 10^6
    entries) the merges agree to the bit (weights, consensus, lambda, the fusion threshold)."""
    text = (f"merge_method: {method}\nbase_model: ROOT/base\n" + _models("abc", weight=[1.0, 0.6, 0.3])
            + "parameters: {lambda: 0.9}\n" if method != "arcee_fusion" else  # (every tensor under 10^6 entries)
            "merge_method: arcee_fusion\nbase_model: ROOT/base\n" + _models("a"))
    path = tmp_path / "refused.yml"
    path.write_text(text.replace("ROOT", str(family / "float32")))
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "no"), "--quiet"]) == 2
    assert "--own-masks" in capsys.readouterr().err
    rc, theirs, ours = _run_both(family, tmp_path / "run", text, flags=("--own-masks",))
    assert rc == 0
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    assert all(torch.equal(a[k], b[k]) for k in a.keys())


def test_own_dare_masks_drop_the_density_and_keep_the_l1_norm(family, tmp_path):
    """dare_linear at density 0.4 on one model: about 60 % of each task vector dropped, what is left
    rescaled to the task vector's L1 norm (mergekit's rescale), reproducibly."""
    text = ("merge_method: dare_linear\nbase_model: ROOT/base\n" + _models("a", weight=[1.0], density=[0.4]))
    rc, _, ours = _run_both(family, tmp_path, text, flags=("--own-masks",))
    assert rc == 0
    base, tuned, merged = (Checkpoint(str(p)) for p in (family / "float32" / "base", family / "float32" / "a", ours))
    name = "model.layers.0.mlp.up_proj.weight"
    delta, kept = tuned[name] - base[name], merged[name] - base[name]
    assert 0.55 < float((kept == 0).float().mean()) < 0.65
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
    again = tmp_path / "again"
    assert main(["merge", "--config", str(tmp_path / "merge.yml"), "-o", str(again), "--quiet", "--own-masks"]) == 0
    assert torch.equal(Checkpoint(str(again))[name], merged[name])


def test_own_della_masks_keep_more_of_the_large_entries(family, tmp_path):
    """della_linear at density 0.5, epsilon 0.3: about half of each row kept, the largest magnitudes
    of a row kept about 0.8 of the time and the smallest about 0.2 (the rank-based probabilities)."""
    text = ("merge_method: della_linear\nbase_model: ROOT/base\n" + _models("a", weight=[1.0], density=[0.5])
            + "parameters: {epsilon: 0.3}\n")
    rc, _, ours = _run_both(family, tmp_path, text, flags=("--own-masks",))
    assert rc == 0
    base, tuned, merged = (Checkpoint(str(p)) for p in (family / "float32" / "base", family / "float32" / "a", ours))
    name = "model.layers.1.mlp.down_proj.weight"
    delta, kept = (tuned[name] - base[name]), (merged[name] - base[name]) != 0
    assert 0.45 < float(kept.float().mean()) < 0.55
    order = delta.abs().argsort(dim=1)
    quarter = delta.shape[1] // 4
    small, large = kept.gather(1, order[:, :quarter]), kept.gather(1, order[:, -quarter:])
    assert 0.2 < float(small.float().mean()) < 0.35 and 0.65 < float(large.float().mean()) < 0.8


@pytest.mark.parametrize("case, dtype, noted", [
    ("breadcrumbs", "bfloat16", True), ("ties-per-model", "bfloat16", True), ("ties-per-model", "float32", False),
    ("slerp", "float32", True), ("model-stock-filter-wise", "float32", False), ("sce-select", "bfloat16", False),
])
def test_a_config_that_fastmerge_computes_otherwise_says_so(family, tmp_path, capsys, case, dtype, noted):
    """Never a silent difference from mergekit: a config whose method fastmerge computes otherwise by
    default gets one line naming how (and none with --mergekit-compat, or where it is mergekit's)."""
    path = tmp_path / "merge.yml"
    path.write_text(CASES[case][0].replace("ROOT", str(family / dtype)))
    for flags in ((), ("--mergekit-compat",)):
        out = tmp_path / f"out{len(flags)}"
        assert main(["merge", str(path), str(out), "--quiet", *flags]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
        expected = noted and not flags
        assert len(notes) == (1 if expected else 0), notes
        if expected:
            assert CASES[case][0].split()[1] in notes[0] and "--mergekit-compat" in notes[0]


def test_merged_slices_say_so_too(family, tmp_path, capsys):
    path = tmp_path / "merge.yml"
    path.write_text(MERGED_SLICES["slerp, gradient t"][0].replace("ROOT", str(family / "float32")))
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "note: slerp: angles from a float64 Gram matrix" in err
