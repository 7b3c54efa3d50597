"""Taps that no module call shows: nn.MultiheadAttention's per-head outputs ("heads" taps,
recomputed from the module's call) and module outputs ("output" taps)."""

import pytest
import torch
from torch import nn

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.errors import InvalidArgumentError, SpecError
from fastmerge.spec import trace_spec
from fastmerge.spec.structure import head_blocks, statistics_groups
from fastmerge.spec.types import Group, MergeSpec, Member, TapPoint
from fastmerge.spec.yaml_io import spec_from_yaml, spec_to_yaml
from fastmerge.stats.attention import multihead_attention_heads

CASES = {
    "batch_first": dict(kwargs=dict(batch_first=True), shape=(3, 5, 12)),
    "sequence_first": dict(kwargs=dict(), shape=(5, 3, 12)),
    "unbatched": dict(kwargs=dict(batch_first=True), shape=(5, 12)),
    "kdim_vdim_bias_kv": dict(kwargs=dict(batch_first=True, kdim=7, vdim=9, add_bias_kv=True), shape=(3, 5, 12)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_heads_output_is_what_the_output_projection_reads(case):
    """out_proj(heads) == the module's output, in float64, with masks and unusual configurations."""
    torch.manual_seed(0)
    spec = CASES[case]
    mha = nn.MultiheadAttention(12, 3, **spec["kwargs"]).double().eval()
    query = torch.randn(*spec["shape"], dtype=torch.float64)
    key = torch.randn(*spec["shape"][:-1], mha.kdim, dtype=torch.float64)
    value = torch.randn(*spec["shape"][:-1], mha.vdim, dtype=torch.float64)
    kwargs = {}
    if query.dim() == 3:
        batch = query.shape[0] if mha.batch_first else query.shape[1]
        padding = torch.zeros(batch, 5, dtype=torch.bool)
        padding[0, -2:] = True
        kwargs["key_padding_mask"] = padding
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    want, _ = mha(query, key, value, need_weights=False, attn_mask=causal, **kwargs)
    heads = multihead_attention_heads(mha, (query, key, value), dict(need_weights=False, attn_mask=causal, **kwargs))
    assert heads.shape == want.shape
    got = nn.functional.linear(heads, mha.out_proj.weight, mha.out_proj.bias)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    # per head: head h's block of features is softmax(q_h k_h^T / sqrt(d)) v_h for the unmasked case
    if case == "batch_first" and "key_padding_mask" in kwargs:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q, k, v = query[1] @ w_q.T + b_q, key[1] @ w_k.T + b_k, value[1] @ w_v.T + b_v
        for h in range(3):
            s = slice(4 * h, 4 * h + 4)
            scores = (q[:, s] @ k[:, s].T / 2.0).masked_fill(causal, float("-inf"))
            assert torch.allclose(heads[1][:, s], scores.softmax(-1) @ v[:, s], atol=1e-12)


def test_heads_tap_needs_multihead_attention():
    with pytest.raises(InvalidArgumentError, match="MultiheadAttention"):
        multihead_attention_heads(nn.Linear(3, 3), (torch.randn(2, 3),) * 3, {})


def test_vit_heads_have_taps_and_statistics():
    model = zoo.vit().eval()
    inputs = zoo.example_inputs("vit", batch=16)
    spec = trace_spec(model, inputs)
    blocks = head_blocks(spec)
    assert len(blocks) == 2  # one per MultiheadAttention
    for b in blocks:
        assert b.heads.tap.kind == "heads" and b.heads.tap.factors == (4, 8)
        assert [d.tap.unit for d, _ in b.nested] == [1]  # the value dims of each head
    stats = fastmerge.collect_stats([model, model], [inputs] * 3, spec, groups=statistics_groups(spec), progress=False)
    for b in blocks:
        corr = stats.correlation(b.flat.name, 0, 1)
        assert corr.shape == (32, 32)
        # the same model twice: its features correlate perfectly with themselves
        assert torch.allclose(corr.diagonal(), torch.ones(32, dtype=corr.dtype), atol=1e-6)
    # the YAML round trip keeps the kind
    again = spec_from_yaml(spec_to_yaml(spec))
    assert [g.tap.kind for g in again.groups if g.tap] == [g.tap.kind for g in spec.groups if g.tap]


def test_output_taps_read_the_module_output():
    """kind "output" observes what a module returns: a group tapped at fc1's output sees the
    same features as one tapped at the input of the layer after it (no activation between)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)).eval()
    members = (Member("0.weight", 0), Member("0.bias", 0), Member("1.weight", 1))
    at_output = Group("out", 6, members, tap=TapPoint("0", kind="output"))
    at_input = Group("in", 6, members, tap=TapPoint("1", kind="input"))
    data = [torch.randn(20, 5) for _ in range(3)]
    a = fastmerge.collect_stats([model], data, MergeSpec(groups=[at_output]), progress=False)
    b = fastmerge.collect_stats([model], data, MergeSpec(groups=[at_input]), progress=False)
    assert torch.allclose(a.covariance("out", 0, 0), b.covariance("in", 0, 0), atol=1e-10)


def test_unknown_tap_kind_is_refused():
    text = ("format: fastmerge-spec/1\ngroups:\n- name: h\n  size: 2\n  tap: {module: m, kind: middle}\n"
            "  members:\n  - {tensor: w, axis: 0}\n")
    with pytest.raises(SpecError, match="tap.kind"):
        spec_from_yaml(text)


def test_a_residual_stream_is_observed_at_every_norm():
    """The stream's statistics pool its tap and the output of every norm reading it (each layer,
    every position), in the spec and in its canonical form (where the norms' vectors are constants)."""
    from fastmerge.spec.residual import canonical_spec, residual_groups
    from fastmerge.spec.structure import stream_taps

    model = zoo.llama().eval()
    inputs = zoo.example_inputs("llama", batch=4)
    spec = trace_spec(model, inputs)
    stream = next(g for g in spec.groups if g.name.startswith("stream"))
    norm_modules = sorted(name for name, m in model.named_modules() if isinstance(m, nn.RMSNorm))
    taps = stream_taps(spec)
    assert sorted(t.module for t in taps[stream.name]) == norm_modules
    groups, _ = residual_groups(spec)
    assert stream_taps(canonical_spec(spec, groups)) == taps
    pooled = fastmerge.collect_stats([model], [inputs], spec, groups=[stream], progress=False)
    alone = fastmerge.collect_stats([model], [inputs], spec, groups=[stream], progress=False, pool_stream=False)
    tokens = inputs[0].numel()
    assert alone.states[stream.name].num_samples == tokens  # the LM head reads every position
    assert pooled.states[stream.name].num_samples == tokens * (1 + len(norm_modules))
    # every pooled row is a normalised token (unit RMS) or the final norm's output the head reads
    second = pooled.second_moment(stream.name, 0, 0)
    assert 0.5 < float(second.trace()) / stream.size < 2.0
