"""A model merged with a randomly permuted copy of itself: every method must recover the
permutation and give back the original model, on every zoo model."""

import pytest
import torch
from torch import nn

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.spec import trace_spec
from fastmerge.spec.transforms import Dense, apply_permutations

METHODS = ["permute", "weight_matching", "cca", "zipit"]


def alive(model: nn.Module, inputs: tuple) -> nn.Module:
    """Every unit carries signal on the test inputs: biases are set layer by layer so that each
    unit's pre-activation is positive for half the samples (a data-dependent init). A unit that
    never fires is invisible to activation statistics and no method could tell where it went;
    trained models do not have many of those."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None]
    with torch.no_grad():
        for layer in layers:
            captured = []  # cloned: an in-place ReLU would overwrite the output
            handle = layer.register_forward_hook(lambda mod, a, out: captured.append(out.clone()))
            model(*inputs)
            handle.remove()
            if not captured:  # weights used without calling the module (inside MultiheadAttention)
                continue
            out = captured[0].movedim(1 if isinstance(layer, nn.Conv2d) else -1, -1).reshape(-1, layer.bias.shape[0])
            layer.bias -= out.median(dim=0).values
    return model


@pytest.fixture(scope="module")
def setups():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            data = [zoo.example_inputs(name, batch=64, generator=torch.Generator().manual_seed(s)) for s in range(4)]
            everything = (torch.cat([d[0] for d in data]),)
            model = alive(zoo.ZOO[name]().eval(), everything)
            inputs = zoo.example_inputs(name, batch=32)
            spec = trace_spec(model, inputs)
            true = spec.random_permutations(torch.Generator().manual_seed(1))
            copy = zoo.ZOO[name]().eval()
            copy.load_state_dict(apply_permutations(spec, model.state_dict(), true))
            cache[name] = (model, copy, spec, inputs, data)
        return cache[name]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_merge_with_permuted_copy_gives_the_original(setups, name, method):
    model, copy, spec, inputs, data = setups(name)
    merged, alignment = fastmerge.merge([model, copy], method, data=data, spec=spec, repair_mode="none",
                                        return_alignment=True, progress=False)
    # the aligned copy is the original, tensor by tensor (exact for permutations); BatchNorm
    # networks align folded (the reference's transform is the identity: its folded state)
    aligned = alignment.apply(1, copy.state_dict())
    assert alignment.folded == (name == "resnet20")
    dense = any(isinstance(t, Dense) for t in alignment.transforms[1].values())
    for key, value in alignment.apply(0, model.state_dict()).items():
        if dense:
            assert torch.allclose(aligned[key], value, atol=1e-4), key
        else:
            assert torch.equal(aligned[key], value), key
    # and the merge is the original model
    with torch.no_grad():
        assert torch.allclose(merged(*inputs), model(*inputs), atol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_cca_finds_the_permutation(setups, name):
    model, copy, spec, _, data = setups(name)
    alignment = fastmerge.align([model, copy], "cca", spec=spec, data=data, progress=False)
    dense = [t for t in alignment.transforms[1].values() if isinstance(t, Dense)]
    assert dense, "the plain groups of these models get dense CCA transforms"
    for t in dense:
        m = t.out[0]
        # a permutation matrix: one 1 per row and column, zeros elsewhere
        assert torch.allclose(m.abs().max(dim=1).values, torch.ones(m.shape[0], dtype=m.dtype), atol=1e-6)
        assert torch.allclose(m.abs().sum(dim=1), torch.ones(m.shape[0], dtype=m.dtype), atol=1e-6)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_permutation_aligned_models_compute_the_same_function(setups, name):
    # a different model (other seed): after alignment it must compute exactly what it did before
    model, _, spec, inputs, data = setups(name)
    torch.manual_seed(5)
    other = alive(zoo.ZOO[name]().eval(), (torch.cat([d[0] for d in data]),))
    for method in ("permute", "weight_matching"):
        alignment = fastmerge.align([model, other], method, spec=spec, data=data, progress=False)
        moved = zoo.ZOO[name]().eval()
        moved.load_state_dict(alignment.apply(1, other.state_dict()))
        with torch.no_grad():
            assert torch.allclose(moved(*inputs), other(*inputs), atol=1e-5)
