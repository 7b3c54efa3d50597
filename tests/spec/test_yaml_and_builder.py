"""Spec YAML round trip, validation on load, and hand-written specs."""

import pytest
import torch

import fastmerge.zoo as zoo
from fastmerge.spec import (Member, SpecBuilder, SpecError, TapPoint, check_spec, load_spec, save_spec,
                            spec_from_yaml, spec_to_yaml, trace_spec)


def shapes_of(model):
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_round_trip_through_yaml(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.ZOO[name]().eval()
    spec = trace_spec(model, zoo.example_inputs(name))
    text = spec_to_yaml(spec)
    again = spec_from_yaml(text, shapes_of(model))
    assert again == spec
    path = tmp_path / "spec.yaml"
    save_spec(spec, path)
    assert load_spec(path, model) == spec
    assert [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]  # no temporary file left behind


MLP_YAML = """
format: fastmerge-spec/1
groups:
- name: hidden
  size: 32
  tap: {module: layers.2}
  members:
  - {tensor: layers.0.weight, axis: 0, role: out}
  - {tensor: layers.0.bias, axis: 0, role: out}
  - {tensor: layers.2.weight, axis: 1, role: in}
"""


def test_hand_written_yaml_is_checked_against_the_model():
    torch.manual_seed(0)
    model = zoo.mlp().eval()
    spec = spec_from_yaml(MLP_YAML, shapes_of(model))
    assert spec.groups[0].tap == TapPoint("layers.2")
    check_spec(spec, model, zoo.example_inputs("mlp"))


@pytest.mark.parametrize("edit,message", [
    (("layers.2.weight, axis: 1", "layers.9.weight, axis: 1"), "no tensor 'layers.9.weight'"),
    (("size: 32", "size: 31"), "unit level 0 of grid \\(32,\\) must have the group size 31"),
    (("axis: 1, role: in", "axis: 2, role: in"), "axis 2 is outside the tensor's 2 dims"),
    (("role: in", "role: input"), "members\\[2\\].role: must be one of"),
    (("  size: 32", "  size: 32\n  colour: red"), "unknown keys \\['colour'\\]"),
    (("{tensor: layers.0.bias, axis: 0, role: out}", "{tensor: layers.0.bias, axis: 0, role: out, factors: [4, 8], unit: 2}"),
     "unit level 2 of grid \\(4, 8\\)"),
    (("{tensor: layers.0.bias, axis: 0, role: out}", "{tensor: layers.0.bias, axis: 0, factors: [4, 8], select: {1: [9]}}"),
     "unit level 0 of grid \\(4, 8\\) must have the group size 32"),
    (("format: fastmerge-spec/1", "format: other/2"), "unsupported format"),
    (("axis: 0, role: out}", "axis: zero, role: out}"), "expected an integer"),
    (("- name: hidden", "- name: [hidden"), "not valid YAML"),
    (("format: fastmerge-spec/1", "format: fastmerge-spec/1\nfixed: true"), "'fixed' must be a list"),  # found by the fuzz test
])
def test_bad_yaml_gives_a_clear_error(edit, message):
    torch.manual_seed(0)
    model = zoo.mlp()
    text = MLP_YAML.replace(*edit, 1)
    assert text != MLP_YAML
    with pytest.raises(SpecError, match=message):
        spec_from_yaml(text, shapes_of(model))


def test_builder_for_models_export_cannot_capture():
    torch.manual_seed(0)
    model = zoo.mlp().eval()
    spec = (SpecBuilder(model)
            .add("h1", [("layers.0.weight", 0, "out"), ("layers.0.bias", 0, "out"), ("layers.2.weight", 1, "in")],
                 tap=TapPoint("layers.2"))
            .add("h2", [Member("layers.2.weight", 0, role="out"), ("layers.2.bias", 0, "out"), ("layers.4.weight", 1, "in")])
            .build())
    assert [g.size for g in spec.groups] == [32, 32]
    check_spec(spec, model, zoo.example_inputs("mlp"))
    with pytest.raises(SpecError, match="no tensor 'nope.weight'"):
        SpecBuilder(model).add("x", [("nope.weight", 0)])
    with pytest.raises(SpecError, match="two groups are named 'h'"):
        SpecBuilder(model).add("h", [("layers.0.weight", 0)]).add("h", [("layers.2.weight", 0)]).build()


def test_instanced_member_layout_applies_per_instance():
    # 3 heads x 4 dims on one axis: instance i permutes the dims of head i only
    m = Member("w", 0, factors=(3, 4), unit=1, instance=(0,))
    perms = torch.tensor([[1, 0, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]])
    assert m.gather_index(12, perms).tolist() == [1, 0, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    heads = Member("w", 0, factors=(3, 4), unit=0)
    assert heads.gather_index(12, torch.tensor([[2, 0, 1]])).tolist() == [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]
    # select: only the first two thirds of a fused projection take part
    qk = Member("w", 0, factors=(3, 2, 2), unit=2, instance=(1,), select=((0, (0, 1)),))
    assert qk.gather_index(12, torch.tensor([[1, 0], [0, 1]])).tolist() == [1, 0, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]
    with_offset = Member("w", 0, offset=2, factors=(3,), unit=0)
    assert with_offset.gather_index(6, torch.tensor([[2, 1, 0]])).tolist() == [0, 1, 4, 3, 2, 5]
