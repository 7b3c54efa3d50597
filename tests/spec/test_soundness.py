"""Regression tests from a review of the tracer: patterns where a permutable-looking axis is not
(or is, but only jointly with something else). Each model must trace to a spec that check_spec
accepts, and the groups found are asserted where they are known."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmerge.spec import check_spec, trace_spec
from fastmerge.spec.transforms import apply_permutations


class Two(nn.Module):
    """fc1 -> f(h) -> fc2, with the middle op chosen by the test."""

    def __init__(self, middle, width=8, out_in=8):
        super().__init__()
        self.fc1, self.fc2, self.middle = nn.Linear(5, width), nn.Linear(out_in, 3), middle

    def forward(self, x):
        return self.fc2(self.middle(self, self.fc1(x)))


CASES = {
    # pooling / convolving over the feature axis treats it as positions
    "maxout": (lambda s, h: F.max_pool1d(h.unsqueeze(1), 2).squeeze(1), 8, 4, (3, 5), []),
    "conv_over_features": (lambda s, h: F.conv1d(h.unsqueeze(1), h.new_ones(1, 1, 3), padding=1).squeeze(1), 8, 8,
                           (3, 5), []),
    # indexing tokens keeps the feature axis (CLIP / last-token pooling)
    "index_tokens": (lambda s, h: h[torch.arange(h.shape[0]), torch.tensor([1, 3, 0])], 8, 8, (3, 4, 5), [8]),
    "index_select": (lambda s, h: torch.index_select(h, 1, torch.tensor([1, 3])).sum(1), 8, 8, (3, 4, 5), [8]),
    "cumsum_time": (lambda s, h: h.cumsum(1)[:, -1], 8, 8, (3, 4, 5), [8]),
    "sort_time": (lambda s, h: h.sort(dim=1).values[:, 0], 8, 8, (3, 4, 5), [8]),
    "flip_features": (lambda s, h: h + h.flip(-1), 8, 8, (3, 5), []),
    # (fc1's units are pinned by the indices; fc2's columns come in 4 identical tiles, which may swap)
    "max_with_indices": (lambda s, h: torch.stack([h.max(-1).values, h.max(-1).indices.float()], -1).repeat(1, 4),
                         8, 8, (3, 5), [4]),
    "clamp_tensor_bound": (lambda s, h: torch.clamp(h, min=s.lo), 8, 8, (3, 5), [8]),
    # argument read by name: ord is not a dim
    "vector_norm_ord": (lambda s, h: h * torch.linalg.vector_norm(h, ord=1, dim=-1, keepdim=True), 8, 8, (3, 5), [8]),
    # a matrix product that pairs different blocks needs one permutation for every block
    "blocks_gram": (lambda s, h: (h.view(-1, 2, 4) @ h.view(-1, 2, 4).transpose(1, 2)).flatten(1).repeat(1, 2),
                    8, 8, (3, 5), None),
    # copies made by repeat stop being copies after a per-unit affine
    "repeat_layernorm": (lambda s, h: s.ln(h.repeat(1, 2))[:, :8], 8, 8, (3, 5), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tracer_soundness(name):
    middle, width, out_in, shape, expected = CASES[name]
    torch.manual_seed(0)
    model = Two(middle, width, out_in)
    model.lo = nn.Parameter(torch.randn(8))
    model.ln = nn.LayerNorm(16)
    with torch.no_grad():
        model.ln.weight.normal_()
        model.ln.bias.normal_()
    model.eval()
    x = (torch.randn(*shape),)
    spec = trace_spec(model, x)
    check_spec(spec, model, x, trials=5)
    if expected is not None:
        assert sorted(g.size for g in spec.groups) == expected, spec.summary()


def test_incompatible_refinements_fix_both_sides():
    class SumSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(5, 8)
            self.fc3, self.fc4, self.fc5 = nn.Linear(3, 2), nn.Linear(5, 2), nn.Linear(8, 2)

        def forward(self, x):
            h, g = self.fc1(x), self.fc2(x)
            return self.fc3(h[:, :3]) + self.fc4(g[:, :5]) + self.fc5(h + g)

    torch.manual_seed(0)
    model = SumSum().eval()
    x = (torch.randn(3, 5),)
    spec = trace_spec(model, x)
    check_spec(spec, model, x, trials=5)
    assert not spec.groups


def test_expand_then_batchnorm_ties_the_norm_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.c = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(self.bn(x.expand(-1, 3, -1, -1))).mean((2, 3))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for t in (model.bn.weight, model.bn.bias, model.bn.running_mean):
            t.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    x = (torch.randn(2, 1, 6, 6),)
    spec = trace_spec(model, x)
    check_spec(spec, model, x, trials=5)
    assert [sorted((m.tensor, m.axis) for m in g.members) for g in spec.groups] == [
        sorted([("bn.weight", 0), ("bn.bias", 0), ("bn.running_mean", 0), ("bn.running_var", 0), ("c.weight", 1)])]


@pytest.mark.parametrize("first", ["emb", "head"])
def test_tied_parameters_under_two_names_move_together(first):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            if first == "emb":
                self.emb, self.mid, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
                self.head.weight = self.emb.weight
            else:
                self.head, self.mid, self.emb = nn.Linear(8, 10, bias=False), nn.Linear(8, 8), nn.Embedding(10, 8)
                self.emb.weight = self.head.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    model = Tied().eval()
    ids = (torch.randint(0, 10, (2, 5)),)
    spec = trace_spec(model, ids)
    check_spec(spec, model, ids)
    (stream,) = spec.groups
    assert {("emb.weight", 1), ("head.weight", 1)} <= {(m.tensor, m.axis) for m in stream.members}
    out = apply_permutations(spec, model.state_dict(), spec.random_permutations(torch.Generator().manual_seed(1)))
    assert torch.equal(out["emb.weight"], out["head.weight"])


def test_roles_through_views_and_hf_conv1d():
    class Conv1D(nn.Module):  # Hugging Face GPT-2's Conv1D: addmm with weight (in, out)
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(n_in, n_out)), nn.Parameter(torch.randn(n_out))

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(5, 8), nn.Linear(8, 3)

        def forward(self, x):
            return F.linear(F.gelu(self.a(x)), self.b.weight.view(3, 8), self.b.bias)

    torch.manual_seed(0)
    model = Net().eval()
    x = (torch.randn(2, 4, 5),)
    spec = trace_spec(model, x)
    check_spec(spec, model, x)
    (hidden,) = spec.groups
    assert {(m.tensor, m.axis, m.role) for m in hidden.members} == {
        ("a.weight", 1, "out"), ("a.bias", 0, "out"), ("b.weight", 1, "in")}


def test_submodule_modes_are_restored():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model.train()
    model[1].eval()
    trace_spec(model, (torch.randn(3, 4),))
    assert model.training and model[0].training and not model[1].training


def test_check_never_draws_identity_for_a_wrong_group():
    # a wrong 2-unit group: a random draw would be the identity half the time
    from fastmerge.spec import Group, Member, MergeSpec, SpecError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).eval()
    wrong = MergeSpec(groups=[Group("out", 2, (Member("2.weight", 0, role="out"),))])
    for seed in range(4):
        with pytest.raises(SpecError, match="'out'"):
            check_spec(wrong, model, (torch.randn(4, 3),), trials=1, seed=seed)


def test_a_buffer_cut_to_the_input_length_is_not_permuted():
    # GPT-2's causal mask (block_size x block_size) is cut to the traced length: the rows and
    # columns left out would be used by longer inputs, so no group may contain them.
    import fastmerge.zoo as zoo

    torch.manual_seed(0)
    model = zoo.gpt2(block_size=32).eval()
    ids = (torch.randint(0, 64, (2, 16)),)
    spec = trace_spec(model, ids)
    assert not [m for g in spec.groups for m in g.members if m.tensor.split(".")[-2:] == ["attn", "bias"]]
    check_spec(spec, model, ids)
    longer = (torch.randint(0, 64, (2, 32)),)
    check_spec(spec, model, longer)  # the spec traced at 16 tokens holds at 32
