"""trace_spec + check_spec on the zoo: every permutable hidden dimension found, function preserved."""

import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import fastmerge.zoo as zoo
from fastmerge.spec import SpecError, check_spec, trace_spec

# (size, count) of every group each zoo model must have at default sizes, and nothing else.
EXPECTED = {
    "mlp": [(32, 1)] * 2,
    "vgg": [(16, 1), (16, 1), (32, 1), (32, 1), (64, 1)],
    # 3 residual streams (16, 32, 64 channels) + the inner conv of each of the 9 blocks
    "resnet20": [(16, 1)] * 4 + [(32, 1)] * 4 + [(64, 1)] * 4,
    # stream; per layer: heads, q/k dims per head, v/o dims per head, MLP hidden
    "vit": [(32, 1)] + [(4, 1), (8, 4), (8, 4), (64, 1)] * 2,
    "gpt2": [(32, 1)] + [(4, 1), (8, 4), (8, 4), (128, 1)] * 2,
    # stream; per layer: K/V heads, query heads within each K/V group, v/o dims per K/V head, MLP.
    # No q/k dims group: rotary embeddings pin the order of q/k dims.
    "llama": [(32, 1)] + [(2, 1), (2, 2), (8, 2), (64, 1)] * 2,
}


def sizes(spec):
    return sorted((g.size, g.count) for g in spec.groups)


@pytest.fixture(scope="module")
def traced():
    """(model, inputs, spec) per zoo model and seed, traced once for the module."""
    cache = {}

    def get(name, seed):
        if (name, seed) not in cache:
            torch.manual_seed(seed)
            model = zoo.ZOO[name]().eval()
            inputs = zoo.example_inputs(name, generator=torch.Generator().manual_seed(seed))
            cache[name, seed] = (model, inputs, trace_spec(model, inputs))
        return cache[name, seed]

    return get


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_spec_is_complete_and_preserves_the_function(traced, name, seed):
    model, inputs, spec = traced(name, seed)
    assert sizes(spec) == sorted(EXPECTED[name]), spec.summary()
    report = check_spec(spec, model, inputs, seed=seed)
    assert report.groups == len(EXPECTED[name]) and report.max_rel_diff < 1e-9


def test_group_details(traced):
    _, _, spec = traced("mlp", 0)
    first = spec.groups[0]
    assert {(m.tensor, m.axis, m.role) for m in first.members} == {
        ("layers.0.weight", 0, "out"), ("layers.0.bias", 0, "out"), ("layers.2.weight", 1, "in")}
    assert first.tap.module == "layers.2" and first.tap.kind == "input"
    # inputs and logits are never permuted
    fixed = {(t, a) for t, a, _ in spec.fixed}
    assert ("layers.0.weight", 1) in fixed and ("layers.4.weight", 0) in fixed

    _, _, spec = traced("vgg", 0)
    flatten_consumer = [m for g in spec.groups for m in g.members if m.tensor == "classifier.0.weight" and m.axis == 1]
    # channels, then the 2 x 2 spatial positions of each channel as a block
    assert len(flatten_consumer) == 1 and flatten_consumer[0].factors == (32, 2, 2) and flatten_consumer[0].unit == 0

    _, _, spec = traced("gpt2", 0)
    heads = spec.group("h.0.attn.c_attn.blocks")
    qkv = [m for m in heads.members if m.tensor == "h.0.attn.c_attn.weight"]
    assert sorted(m.offset for m in qkv) == [0, 32, 64] and all(m.factors == (4, 8) and m.unit == 0 for m in qkv)
    tied = [m for g in spec.groups for m in g.members if m.tensor == "wte.weight"]
    assert [(m.axis) for m in tied] == [1]  # the stream, shared by the tied LM head


@pytest.mark.parametrize("kv_heads,expected", [
    (4, [(32, 1)] + [(4, 1), (8, 4), (64, 1)] * 2),   # plain multi-head attention
    (1, [(32, 1)] + [(4, 1), (8, 1), (64, 1)] * 2),   # multi-query: the 4 query heads may swap
])
def test_llama_head_layouts(kv_heads, expected):
    torch.manual_seed(0)
    model = zoo.llama(kv_heads=kv_heads).eval()
    inputs = zoo.example_inputs("llama")
    spec = trace_spec(model, inputs)
    assert sizes(spec) == sorted(expected), spec.summary()
    check_spec(spec, model, inputs)


def test_resnet_width_and_vgg_at_28(traced):
    torch.manual_seed(0)
    model = zoo.resnet20(width=2).eval()
    x = torch.randn(2, 1, 28, 28)
    spec = trace_spec(model, (x,))
    assert Counter(g.size for g in spec.groups) == {32: 4, 64: 4, 128: 4}
    check_spec(spec, model, (x,))


def test_a_wrong_spec_is_caught_and_the_group_named(traced):
    model, inputs, spec = traced("mlp", 0)
    broken = spec.group("layers.2")
    bad = type(spec)(groups=[g if g is not broken else type(g)(name=g.name, size=g.size, members=g.members[:-1])
                             for g in spec.groups])
    with pytest.raises(SpecError, match=r"permuting group 'layers.2'.*changes the model's outputs"):
        check_spec(bad, model, inputs)
    # a member that does not belong: the stream of a transformer glued to one of its MLP groups
    model, inputs, spec = traced("gpt2", 0)
    mlp = spec.group("h.0.mlp.c_fc")
    extra = [m for m in spec.group("h.1.mlp.c_fc").members if m.role == "in"]
    glued = type(spec)(groups=[type(g)(name=g.name, size=g.size, count=g.count, members=g.members + tuple(extra))
                               if g is mlp else g for g in spec.groups])
    with pytest.raises(SpecError, match="h.0.mlp.c_fc"):
        check_spec(glued, model, inputs)


def test_unsupported_op_is_named_and_its_groups_left_out():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.special.erfcx(self.fc1(x))  # an op the tracer does not know
            return self.fc3(torch.relu(self.fc2(h)))

    torch.manual_seed(0)
    model = Odd().eval()
    x = torch.randn(5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = trace_spec(model, (x,))
    assert any("unsupported op special_erfcx" in str(w.message) for w in caught)
    assert sizes(spec) == [(16, 1)]  # fc2's hidden units stay permutable, fc1's do not
    assert spec.groups[0].name == "fc2"
    check_spec(spec, model, (x,))
    assert any(t == "fc1.weight" and a == 0 and "special_erfcx" in why for t, a, why in spec.fixed)


def test_training_mode_is_restored_and_export_failure_is_explained():
    torch.manual_seed(0)
    model = zoo.mlp().train()
    trace_spec(model, zoo.example_inputs("mlp"))
    assert model.training

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(SpecError, match="torch.export could not capture DataDependent.*SpecBuilder"):
        trace_spec(DataDependent(), (torch.randn(2, 4),))


def test_conv1d_depthwise_and_grouped_convolutions():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 8, 3, padding=1)
            self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)   # depthwise: channels keep their identity
            self.gn = nn.GroupNorm(4, 8)                         # statistics per group of 2 channels
            self.grouped = nn.Conv1d(8, 6, 1, groups=2)          # two groups of 4 -> 3 channels
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.gn(self.dw(torch.relu(self.c1(x)))))
            h = torch.relu(self.grouped(h))
            return self.fc(h.mean(-1))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 10)
    spec = trace_spec(model, (x,))
    check_spec(spec, model, (x,))
    # c1's 8 channels: the grouped conv (2 x 4) and the group norm (4 x 2) nest as 2 x 2 x 2: the
    # two conv groups may swap (together with the grouped conv's output groups); the norm groups
    # inside a conv group move alike in both conv groups (the grouped conv reads both through
    # the same weight columns), and the channels of norm group v likewise, one permutation per v.
    # The grouped conv's own outputs: 3 channels per conv group, one permutation per group.
    assert sizes(spec) == sorted([(2, 1), (2, 1), (2, 2), (3, 2)]), spec.summary()
