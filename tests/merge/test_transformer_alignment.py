"""Transformers: the canonical form of a pre-norm residual stream, exact orthogonal alignment of it
(CCA), and attention heads matched from their outputs."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.alignment.activation import orthogonal_transform
from fastmerge.alignment.query_key import query_key_groups
from fastmerge.spec import trace_spec
from fastmerge.spec.residual import canonical_spec, canonical_state, ones_complement, residual_groups
from fastmerge.spec.structure import head_blocks
from fastmerge.spec.transforms import Dense, apply_transforms
from fastmerge.spec.yaml_io import spec_from_yaml, spec_to_yaml

# untied LM heads: a tied one reads the final norm's output through the embedding (see the tied test)
MODELS = {
    "llama": lambda: zoo.llama(),
    "gpt2_untied": lambda: zoo.gpt2(tie_embeddings=False),
    "vit": lambda: zoo.vit(),
}
EXAMPLE = {"llama": "llama", "gpt2_untied": "gpt2", "vit": "vit"}


def _batches(name: str, count: int = 6, batch: int = 32):
    return [zoo.example_inputs(EXAMPLE[name], batch=batch, generator=torch.Generator().manual_seed(100 + s))
            for s in range(count)]


def _model(name: str, seed: int = 0) -> nn.Module:
    """A zoo model whose norms have non-trivial scales and shifts (trained models do), so folding
    them is really exercised."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.copy_(0.5 + torch.rand_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return model


def _random_rotation(size: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix; for a LayerNorm stream one that maps the ones vector to itself."""
    if kind == "rms":
        q, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
        return q
    basis = ones_complement(size)
    inner, _ = torch.linalg.qr(torch.randn(size - 1, size - 1, dtype=torch.float64, generator=generator))
    return basis @ inner @ basis.T + torch.full((size, size), 1.0 / size, dtype=torch.float64)


def _rotated_copy(model: nn.Module, spec, seed: int = 1) -> nn.Module:
    """The model in canonical form with its residual stream rotated, each head's query/key dims
    rotated (one orthogonal map for both) and every other group permuted: the same function, other
    weights."""
    groups, _ = residual_groups(spec)
    state = canonical_state(spec, model.state_dict(), groups)
    cspec = canonical_spec(spec, groups)
    generator = torch.Generator().manual_seed(seed)
    transforms = cspec.random_permutations(generator)
    for name, residual in groups.items():
        q = _random_rotation(cspec.group(name).size, residual.kind, generator)
        transforms[name] = Dense(out=q[None], inp=q.T[None])
    for g in query_key_groups(cspec):
        q = torch.stack([_random_rotation(g.size, "rms", generator) for _ in range(g.count)])
        transforms[g.name] = Dense(out=q, inp=q.transpose(1, 2))
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_transforms(cspec, state, transforms))
    return twin


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_tracer_records_stream_norms():
    llama = trace_spec(zoo.llama().eval(), zoo.example_inputs("llama"))
    assert [n.kind for n in llama.norms] == ["rms"] * 5
    assert llama.norms[-1].readers == (("lm_head.weight", None, 1),)
    assert {r[0] for r in llama.norms[0].readers} == {f"layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    tied = trace_spec(zoo.gpt2().eval(), zoo.example_inputs("gpt2"))
    final = [n for n in tied.norms if n.weight == "ln_f.weight"]
    assert len(final) == 1 and not final[0].readers and "wte.weight" in final[0].obstacle
    vit = trace_spec(zoo.vit().eval(), zoo.example_inputs("vit"))  # through MultiheadAttention's transpose
    assert len(vit.norms) == 5 and all(n.kind == "layer" and n.bias for n in vit.norms)
    assert vit.norms[-1].readers == (("head.weight", "head.bias", 1),)  # through the class-token select
    shapes = {k: v.shape for k, v in zoo.gpt2().state_dict().items()}
    assert spec_from_yaml(spec_to_yaml(tied), shapes).norms == tied.norms


@pytest.mark.parametrize("name", sorted(MODELS))
def test_canonical_form_computes_the_same_function(name):
    model = _model(name)
    inputs = _batches(name, 1)[0]
    spec = trace_spec(model, inputs)
    groups, refused = residual_groups(spec)
    assert len(groups) == 1 and not refused
    (residual,) = groups.values()
    assert residual.kind == ("rms" if name == "llama" else "layer")
    state = canonical_state(spec, model.state_dict(), groups)
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    want = _logits(model, inputs)
    assert (_logits(twin, inputs) - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.equal(state[residual.norms[0].readers[0][0]], model.state_dict()[residual.norms[0].readers[0][0]])
    for norm in residual.norms:
        assert torch.equal(state[norm.weight], torch.ones_like(state[norm.weight]))
    if residual.kind == "layer":  # every writer of the stream writes mean-free vectors
        for m in canonical_spec(spec, groups).group(residual.name).members:
            if m.role == "out" and m.tensor not in {n.bias for n in residual.norms}:
                assert state[m.tensor].double().mean(dim=m.axis).abs().max() < 1e-5, m.tensor
    assert model.state_dict()[residual.norms[0].weight].ne(1).any()  # the input is left as it was


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rotated_stream_computes_the_same_function(name):
    model = _model(name)
    inputs = _batches(name, 1)[0]
    twin = _rotated_copy(model, trace_spec(model, inputs))
    want = _logits(model, inputs)
    assert (_logits(twin, inputs) - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cca_merges_a_rotated_and_permuted_copy_back_to_the_model(name):
    model = _model(name)
    data = _batches(name)
    spec = trace_spec(model, data[0])
    twin = _rotated_copy(model, spec)
    assert (twin.state_dict()[next(iter(twin.state_dict()))] - model.state_dict()[next(iter(model.state_dict()))]).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, alignment = fastmerge.merge([model, twin], "cca", data=data, spec=spec, return_alignment=True,
                                            progress=False)
    stream = next(iter(residual_groups(spec)[0]))
    assert alignment.diagnostics[stream]["transform"].startswith("orthogonal")
    assert isinstance(alignment.transforms[1][stream], Dense)
    rotated = query_key_groups(canonical_spec(spec, residual_groups(spec)[0]))
    assert len(rotated) == (0 if name == "llama" else 2)  # rotary dims are fixed by the tracer
    for g in rotated:
        assert alignment.diagnostics[g.name]["transform"].startswith("orthogonal (query/key")
        assert "fallback" not in alignment.diagnostics[g.name]
    for inputs in data[:2]:
        want = _logits(model, inputs)
        assert (_logits(merged, inputs) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    # a merge of the model with itself stays the model too (canonical form, identity transforms)
    same = fastmerge.merge([model, copy.deepcopy(model)], "cca", data=data, spec=spec, progress=False)
    assert (_logits(same, data[0]) - _logits(model, data[0])).abs().max() <= 1e-4


# vit: nn.MultiheadAttention, whose heads' outputs are recomputed from its call ("heads" taps)
@pytest.mark.parametrize("name", ["llama", "gpt2_untied", "vit"])
@pytest.mark.parametrize("method", ["permute", "zipit", "cca"])
def test_heads_are_matched_from_their_outputs(name, method):
    model = _model(name)
    data = _batches(name)
    spec = trace_spec(model, data[0])
    true = spec.random_permutations(torch.Generator().manual_seed(3))
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_transforms(spec, model.state_dict(), true))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alignment = fastmerge.align([model, twin], method, spec=spec, data=data, progress=False)
    blocks = head_blocks(spec)
    assert blocks
    for b in blocks:
        heads = b.heads.name
        assert alignment.diagnostics[heads]["matched_correlation"][1] > 0.999
        # the found permutation undoes the applied one: aligned head u is original head u
        found = alignment.transforms[1][heads][0]
        assert torch.equal(true[heads][0][found], torch.arange(b.heads.size))
    merged = fastmerge.merge([model, twin], method, data=data, spec=spec, alignment=alignment, progress=False)
    want = _logits(model, data[0])
    assert (_logits(merged, data[0]) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_cca_transforms_value_dims_per_head_densely():
    model = _model("gpt2_untied")
    data = _batches("gpt2_untied")
    spec = trace_spec(model, data[0])
    other = _model("gpt2_untied", seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alignment = fastmerge.align([model, other], "cca", spec=spec, data=data, progress=False)
    for b in head_blocks(spec):
        (dims, _), = b.nested
        t = alignment.transforms[1][dims.name]
        assert isinstance(t, Dense) and t.out.shape == (4, 8, 8)
        assert torch.allclose(t.out @ t.inp, torch.eye(8, dtype=t.out.dtype).expand(4, 8, 8), atol=1e-8)
    # the per-head transforms alone keep the model's function (value rows and output columns: no
    # nonlinearity between them; the MLP's CCA transforms act through GELU and do not)
    per_head = {d.name: alignment.transforms[1][d.name] for b in head_blocks(spec) for d, _ in b.nested}
    moved = copy.deepcopy(other)
    moved.load_state_dict(apply_transforms(spec, other.state_dict(), per_head))
    want = _logits(other, data[0])
    assert (_logits(moved, data[0]) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_orthogonal_transform_recovers_a_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, dtype=torch.float64, generator=g) @ torch.randn(12, 12, dtype=torch.float64, generator=g)
    for kind in ("rms", "layer"):
        xs = x - x.mean(dim=1, keepdim=True) if kind == "layer" else x
        q = _random_rotation(12, kind, g)
        y = xs @ q.T  # the other model's units: y = Q x
        s_xy = (xs - xs.mean(0)).T @ (y - y.mean(0)) / 500
        found = orthogonal_transform(s_xy, fix_ones=kind == "layer")
        assert torch.allclose(found @ found.T, torch.eye(12, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(found, q.T, atol=1e-8)  # maps y back onto x
        if kind == "layer":
            assert torch.allclose(found @ torch.ones(12, dtype=torch.float64), torch.ones(12, dtype=torch.float64))


def test_tied_head_keeps_a_permuted_stream_and_says_why():
    torch.manual_seed(0)
    a, b = zoo.gpt2().eval(), zoo.gpt2().eval()
    data = _batches("gpt2_untied", 3)
    with pytest.warns(UserWarning, match="wte.weight, which reads its output, is tied"):
        alignment = fastmerge.align([a, b], "cca", data=data, spec=trace_spec(a, data[0]), progress=False)
    assert "tied" in alignment.diagnostics["stream:wte"]["fallback"]
    assert not alignment.canonical and not isinstance(alignment.transforms[1]["stream:wte"], Dense)


def test_residual_permute_option_and_one_shot_data_keep_permutations():
    a, b = _model("llama"), _model("llama", seed=1)
    data = _batches("llama", 3)
    spec = trace_spec(a, data[0])
    with pytest.warns(UserWarning, match="stream:embed_tokens"):
        kept = fastmerge.align([a, b], "cca", data=data, spec=spec, residual="permute", progress=False)
    assert not kept.canonical and "holds" in kept.diagnostics["stream:embed_tokens"]["fallback"]
    with pytest.warns(UserWarning, match="one-shot iterator"):
        once = fastmerge.align([a, b], "cca", data=iter(data), spec=spec, progress=False)
    assert not once.canonical
    with pytest.raises(fastmerge.errors.InvalidArgumentError, match="residual must be one of"):
        fastmerge.align([a, b], "cca", data=data, spec=spec, residual="rotate", progress=False)


class _LayerScaleBlock(nn.Module):
    """x + s * mlp(LN(x)): a per-unit scale on the stream that the canonical form does not cover."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x + self.scale * self.fc2(torch.relu(self.fc1(self.norm(x))))


class _LayerScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.blocks = nn.Sequential(_LayerScaleBlock(16), _LayerScaleBlock(16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))))


def test_a_stream_the_canonical_form_misses_falls_back_with_the_measured_error():
    torch.manual_seed(0)
    a, b = _LayerScaleNet().eval(), _LayerScaleNet().eval()
    data = [(torch.randn(64, 6, generator=torch.Generator().manual_seed(s)),) for s in range(3)]
    with pytest.warns(UserWarning, match="canonical form changed model 0's outputs"):
        alignment = fastmerge.align([a, b], "cca", data=data, spec=trace_spec(a, data[0]), progress=False)
    assert not alignment.canonical


def test_query_key_rotation_is_checked_and_falls_back_with_the_reason():
    """The query/key rotation is applied only after a random rotation of those dims is seen to keep
    the outputs; with a one-shot iterator there is nothing to check it on: weight matching, said."""
    model = _model("gpt2_untied")
    data = _batches("gpt2_untied")
    spec = trace_spec(model, data[0])
    other = _model("gpt2_untied", seed=5)
    groups = query_key_groups(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = fastmerge.align([model, other], "zipit", spec=spec, data=data, progress=False)
        one_shot = fastmerge.align([model, other], "zipit", spec=spec, data=iter(data), progress=False)
    for g in groups:
        assert isinstance(checked.transforms[1][g.name], Dense)
        assert "fallback" not in checked.diagnostics[g.name]
        assert not isinstance(one_shot.transforms[1][g.name], Dense)
        assert "no re-iterable data" in one_shot.diagnostics[g.name]["fallback"]
