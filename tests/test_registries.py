"""The method registries are the single source: a method registered from one file is taken by the
API, the CLI's choices and the merges, with no other edit."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge import zoo
from fastmerge.alignment import METHODS as ALIGNMENT_METHODS
from fastmerge.alignment import AlignmentMethod
from fastmerge.cli import build_parser
from fastmerge.demo import METHOD_ROWS, row_labels
from fastmerge.errors import InvalidArgumentError
from fastmerge.merging import METHODS as SAME_INIT_METHODS
from fastmerge.merging import SameInitMethod, merge_methods
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions


@pytest.fixture
def registries(monkeypatch):
    """Registrations made in a test are undone after it (the registries are process-wide)."""
    monkeypatch.setattr(ALIGNMENT_METHODS, "_items", dict(ALIGNMENT_METHODS._items))
    monkeypatch.setattr(SAME_INIT_METHODS, "_items", dict(SAME_INIT_METHODS._items))


def _cli_choices(command: str, flag: str) -> tuple:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_registered_lists_are_what_the_api_cli_and_demo_offer():
    assert tuple(ALIGNMENT_METHODS) == ("permute", "weight_matching", "zipit", "cca")
    assert tuple(SAME_INIT_METHODS) == ("linear", "task_arithmetic", "ties", "dare", "slerp", "model_stock", "breadcrumbs",
                                        "breadcrumbs_ties", "nuslerp", "multislerp", "nearswap",
                                        "karcher", "sce", "dare_linear", "dare_ties",
                                        "della_linear", "della", "arcee_fusion", "ram", "ramplus_tl")
    assert merge_methods() == ("average", *ALIGNMENT_METHODS, "np_merge")
    assert _cli_choices("merge", "--align") == tuple(ALIGNMENT_METHODS)
    assert _cli_choices("merge", "--method") == (*SAME_INIT_METHODS, "np_merge")
    assert METHOD_ROWS[1:1 + len(ALIGNMENT_METHODS)] == tuple(ALIGNMENT_METHODS)
    assert row_labels()["cca"] == "CCA (regularisation on validation)"


def test_a_new_alignment_method_is_one_registration(registries):
    # a method that only permutes, like "permute", under another name: merge() must take it and
    # give exactly permute's merge
    fastmerge.alignment.register(AlignmentMethod(name="permute_too", label="permute too"))
    assert "permute_too" in merge_methods()
    assert "permute_too" in _cli_choices("merge", "--align")
    torch.manual_seed(0)
    models = [zoo.mlp(in_features=8, hidden=(16, 16), out_features=3) for _ in range(2)]
    data = [torch.randn(64, 8, generator=torch.Generator().manual_seed(b)) for b in range(4)]
    ours = fastmerge.merge(models, "permute_too", data=data, progress=False)
    theirs = fastmerge.merge(models, "permute", data=data, progress=False)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(InvalidArgumentError, match="already registered"):
        fastmerge.alignment.register(AlignmentMethod(name="permute_too", label="again"))


def test_an_option_the_method_does_not_have_is_refused():
    models = [zoo.mlp(in_features=4, hidden=(8,), out_features=2) for _ in range(2)]
    spec = fastmerge.trace_spec(models[0], (torch.randn(2, 4),))
    with pytest.raises(InvalidArgumentError, match="alignment method 'permute' has no option"):
        fastmerge.align(models, "permute", spec=spec, data=[torch.randn(16, 4)], reg=0.3, progress=False)
    with pytest.raises(InvalidArgumentError, match="unknown alignment method 'nope'"):
        fastmerge.align(models, "nope", spec=spec, data=[torch.randn(16, 4)], progress=False)


def test_a_new_same_init_method_is_one_registration(registries, tmp_path):
    def first(name, tensors, base, options, out_dtype, out):  # keeps the first model's tensor
        return tensors[0].to(out_dtype)

    fastmerge.merging.methods.register(SameInitMethod(name="first", merge=first, min_models=2))
    assert "first" in _cli_choices("merge", "--method")
    a = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    b = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    out = tmp_path / "out.safetensors"
    merge_checkpoints([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], str(out),
                      SameInitOptions("first"), progress=False)
    merged = load_file(str(out))
    assert all(torch.equal(merged[k], a[k]) for k in a)
    with pytest.raises(InvalidArgumentError, match="needs at least 2 models"):
        SameInitOptions("first").validate(1, has_base=False)
    with pytest.raises(InvalidArgumentError, match="unknown same-init method 'nope'"):
        SameInitOptions("nope").validate(2, has_base=False)


def test_merge_still_takes_align_for_np_merge_with_a_deprecation_warning():
    torch.manual_seed(0)
    models = [zoo.mlp(in_features=8, hidden=(16,), out_features=3) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(2)]
    options = dict(data=data, np_options={"steps": 3}, progress=False)
    new = fastmerge.merge(models, "np_merge", align_method="weight_matching", **options)
    with pytest.warns(DeprecationWarning, match="align_method"):
        old = fastmerge.merge(models, "np_merge", align="weight_matching", **options)
    for a, b in zip(new.state_dict().values(), old.state_dict().values()):
        assert torch.equal(a, b)
