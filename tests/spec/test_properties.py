"""Hypothesis: on randomly generated MLP / CNN / residual architectures the traced spec always
preserves the function, and finds every hidden layer of a plain MLP."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastmerge.spec import check_spec, trace_spec

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Identity]


class Residual(nn.Module):
    def __init__(self, width, hidden, act, norm, branches):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.branches = nn.ModuleList(nn.Linear(width, hidden) for _ in range(branches))
        self.act = act()
        self.out = nn.Linear(hidden * branches, width)

    def forward(self, x):
        h = self.norm(x)
        h = torch.cat([self.act(b(h)) for b in self.branches], dim=-1)  # concatenated branches
        return x + self.out(h)


class ConvNet(nn.Module):
    def __init__(self, channels, norms, pools, hidden, act):
        super().__init__()
        layers, c_in, size = [], 1, 8
        for c, norm, pool in zip(channels, norms, pools):
            layers.append(nn.Conv2d(c_in, c, 3, padding=1))
            if norm == "bn":
                layers.append(nn.BatchNorm2d(c))
            elif norm == "gn" and c % 2 == 0:
                layers.append(nn.GroupNorm(2, c))
            layers.append(act())
            if pool and size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * size * size, hidden), act(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.head(self.features(x))


@st.composite
def architectures(draw):
    kind = draw(st.sampled_from(["mlp", "cnn", "residual"]))
    act = draw(st.sampled_from(ACTIVATIONS))
    if kind == "mlp":
        widths = draw(st.lists(st.integers(2, 12), min_size=1, max_size=4))
        layers, prev = [], 5
        for w in widths:
            layers += [nn.Linear(prev, w), act()]
            if draw(st.booleans()):
                layers.append(nn.LayerNorm(w))
            prev = w
        layers.append(nn.Linear(prev, 3))
        return nn.Sequential(*layers), torch.randn(4, 5), len(widths)
    if kind == "cnn":
        depth = draw(st.integers(1, 3))
        channels = draw(st.lists(st.integers(2, 6), min_size=depth, max_size=depth))
        norms = draw(st.lists(st.sampled_from(["none", "bn", "gn"]), min_size=depth, max_size=depth))
        pools = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
        return ConvNet(channels, norms, pools, draw(st.integers(2, 8)), act), torch.randn(2, 1, 8, 8), None
    width = draw(st.integers(2, 8))
    blocks = [Residual(width, draw(st.integers(2, 6)), act, draw(st.booleans()), draw(st.integers(1, 2)))
              for _ in range(draw(st.integers(1, 3)))]
    model = nn.Sequential(nn.Linear(5, width), *blocks, nn.LayerNorm(width), nn.Linear(width, 3))
    return model, torch.randn(4, 5), None


@settings(max_examples=25, deadline=None, derandomize=True)
@given(arch=architectures(), seed=st.integers(0, 1000))
def test_traced_spec_preserves_the_function(arch, seed):
    model, x, hidden_layers = arch
    torch.manual_seed(seed)
    for p in model.parameters():  # fresh non-trivial weights (BN stats too)
        nn.init.normal_(p)
    for b in model.buffers():
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    model.eval()
    spec = trace_spec(model, (x,))
    check_spec(spec, model, (x,), seed=seed)
    if hidden_layers is not None:
        assert len(spec.groups) == hidden_layers
    assert spec.groups, "every generated model has at least one permutable hidden layer"
