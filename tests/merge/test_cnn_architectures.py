"""CNN building blocks beyond VGG and ResNet-20 that users merge: channel concatenation (DenseNet),
depthwise convolutions with ReLU6 (MobileNet), squeeze-excitation gates, InstanceNorm, PReLU and
a decoder's upsampling by a transposed convolution. Every
method recovers a permuted copy; a dense method permutes the groups whose layers a dense transform
would not move exactly (a depthwise conv, a channel gate, per-sample statistics) and says so in
one warning: before, CCA and ZipIt transformed those densely, silently changing the function."""

import warnings

import pytest
import torch
from torch import nn

import fastmerge
from fastmerge.spec import trace_spec
from fastmerge.spec.transforms import Dense, apply_permutations

from .test_batch_norm import randomised_norms


class DenseCat(nn.Module):
    """A DenseNet-style block: a BatchNorm over the concatenation of two convolutions' channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.fc = nn.Conv2d(16, 12, 3, padding=1), nn.Linear(12, 10)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(torch.cat([a, self.c2(a)], 1)))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


class Depthwise(nn.Module):
    """MobileNet's separable convolution: depthwise 3x3 and pointwise 1x1, BatchNorm, ReLU6, SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.b3 = nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = nn.functional.relu6(self.b1(self.c1(x)))
        x = nn.functional.relu6(self.b2(self.dw(x)))
        return self.fc(nn.functional.silu(self.b3(self.pw(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A squeeze-excitation gate: the channels scaled by a sigmoid of their pooled values."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.c2, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        gate = torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3))))))
        return self.fc(torch.relu(self.c2(x * gate[:, :, None, None])).mean((2, 3)))


class InstanceNormed(nn.Module):
    """An InstanceNorm without affine parameters: nothing in the state shows the normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.norm = nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.norm(self.c1(x))))).mean((2, 3)))


class Decoder(nn.Module):
    """Upsampling as a decoder does: nearest-neighbour interpolation, a transposed convolution, and
    a PReLU with one slope per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.PReLU(8)
        self.up, self.c2, self.fc = nn.ConvTranspose2d(8, 8, 2, 2), nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        x = nn.functional.interpolate(self.act(self.c1(x)), scale_factor=2.0, mode="nearest")
        return self.fc(torch.relu(self.c2(torch.relu(self.up(x)))).mean((2, 3)))


ARCHITECTURES = {"densenet concat": DenseCat, "depthwise": Depthwise, "squeeze-excite": SqueezeExcite,
                 "instance norm": InstanceNormed, "decoder": Decoder}
# the groups a dense transform must not touch, and the words of the warning that says why
HELD = {"densenet concat": ({"c1", "c2"}, "b2.weight"), "depthwise": ({"c1"}, "dw.weight"),
        "squeeze-excite": ({"stream:c1"}, "multiplied elementwise"), "instance norm": ({"c1"}, "per-sample"),
        "decoder": ({"c1"}, "act.weight")}  # the transposed convolution's groups are dense


def _inputs(seed: int, n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _model_and_copy(name: str):
    torch.manual_seed(0)
    model = randomised_norms(ARCHITECTURES[name](), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op is known to the trace (ReLU6 was not)
        spec = trace_spec(model, (_inputs(0, 2),))
    copy = ARCHITECTURES[name]()
    copy.load_state_dict(apply_permutations(spec, model.state_dict(),
                                            spec.random_permutations(torch.Generator().manual_seed(1))))
    return model, copy.eval(), spec


@pytest.mark.parametrize("method", ["permute", "weight_matching", "cca", "zipit"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_permuted_copy_merges_back_to_the_model(name, method):
    model, copy, spec = _model_and_copy(name)
    x = _inputs(99)
    data = [_inputs(s) for s in range(1, 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged, alignment = fastmerge.merge([model, copy], method, data=data, spec=spec, repair_mode="none",
                                            return_alignment=True, progress=False)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(merged(x), expected, atol=1e-4 * float(expected.abs().max()))
    if method in ("cca", "zipit"):
        held, why = HELD[name]
        assert {g for g, t in alignment.transforms[1].items() if not isinstance(t, Dense)} == held
        fallbacks = [str(w.message) for w in caught if "permuted instead of densely transformed" in str(w.message)]
        assert len(fallbacks) == 1 and why in fallbacks[0]
