"""The model zoo: shapes, determinism, torch.export, and the architecture details the spec
tracer relies on (tied head, non-persistent RoPE tables, GQA grouping, causality)."""

import pytest
import torch

from fastmerge.errors import InvalidArgumentError
from fastmerge.zoo import ZOO, example_inputs, gpt2, llama, resnet20, vgg, vit
from fastmerge.zoo.models import apply_rotary_pos_emb, repeat_kv

B = 3
OUTPUT_SHAPES = {
    "mlp": (B, 10),
    "vgg": (B, 10),
    "resnet20": (B, 10),
    "vit": (B, 10),
    "gpt2": (B, 16, 64),
    "llama": (B, 16, 64),
}
NAMES = sorted(OUTPUT_SHAPES)


def build(name, seed=0, **sizes):
    torch.manual_seed(seed)
    return ZOO[name](**sizes).eval()


def inputs(name, batch=B, seed=1):
    return example_inputs(name, batch, generator=torch.Generator().manual_seed(seed))


def test_zoo_names():
    assert sorted(ZOO) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs(name):
    (x,) = inputs(name)
    if name in ("gpt2", "llama"):
        assert x.dtype == torch.int64 and x.shape == (B, 16)
        assert 0 <= x.min() and x.max() < 64
    else:
        assert x.dtype == torch.float32 and x.shape[0] == B
    torch.testing.assert_close(inputs(name)[0], x, rtol=0, atol=0)
    assert example_inputs(name)[0].shape[0] == 2


def test_example_inputs_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="unknown zoo model"):
        example_inputs("resnet50")
    with pytest.raises(InvalidArgumentError, match="batch"):
        example_inputs("mlp", 0)


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_determinism(name):
    args = inputs(name)
    a, b, other = build(name, 0), build(name, 0), build(name, 1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        ya, yb, yo = a(*args), b(*args), other(*args)
    assert ya.shape == OUTPUT_SHAPES[name]
    assert ya.dtype == torch.float32 and torch.isfinite(ya).all()
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    assert not torch.allclose(ya, yo), "a different seed must give a different model"


@pytest.mark.parametrize("name", NAMES)
def test_export_matches_eager(name):
    model, args = build(name), inputs(name)
    ep = torch.export.export(model.eval(), args, strict=False)
    with torch.no_grad():
        expected = model(*args)
        actual = ep.module()(*args)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("image_size", "width"), [(8, 1), (28, 1), (8, 2)])
def test_resnet20_sizes(image_size, width):
    torch.manual_seed(0)
    model = resnet20(width=width).eval()
    assert model.fc.in_features == 64 * width
    assert model.layer2[0].downsample is not None and model.layer3[0].downsample is not None
    assert model.layer1[0].downsample is None and model.layer2[1].downsample is None
    x = torch.randn(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_resnet20_depth():
    model = resnet20()
    convs = [m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and "downsample" not in n]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 20


def test_vgg_28():
    torch.manual_seed(0)
    model = vgg(image_size=28).eval()
    assert model.classifier[0].in_features == 32 * 7 * 7
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("factory", "sizes"),
    [
        (vgg, {"image_size": 10}),
        (vit, {"dim": 30}),
        (vit, {"image_size": 9}),
        (gpt2, {"heads": 5}),
        (llama, {"kv_heads": 3}),
        (llama, {"dim": 24, "heads": 8}),  # odd head_dim, no RoPE
        (resnet20, {"width": 0}),
    ],
)
def test_bad_sizes_raise(factory, sizes):
    with pytest.raises(InvalidArgumentError):
        factory(**sizes)


def test_gpt2_head_is_tied_to_wte():
    model = build("gpt2")
    # One (vocab, dim) matrix in the whole model: the token embedding.
    assert [n for n, p in model.named_parameters() if p.shape == (64, 32)] == ["wte.weight"]
    assert not any("lm_head" in k for k in model.state_dict())
    idx = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.wte.weight[62].zero_()  # token 62 is not in the input: only the head sees it
        logits = model(idx)
    assert (logits[..., 62] == 0).all() and (logits[..., 61] != 0).all()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoders_are_causal_and_accept_short_sequences(name):
    model = build(name)
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 64
    with torch.no_grad():
        y, y2 = model(idx), model(changed)
    assert y.shape == (2, 7, 64)
    torch.testing.assert_close(y[:, :4], y2[:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoders_reject_long_sequences(name):
    with pytest.raises(InvalidArgumentError, match="sequence length 17"):
        build(name)(torch.zeros(1, 17, dtype=torch.long))


def test_llama_rope_tables_are_not_in_state_dict():
    model = build("llama")
    buffers = dict(model.named_buffers())
    assert buffers["rotary.cos"].shape == buffers["rotary.sin"].shape == (16, 8)
    state = model.state_dict()
    assert not any("cos" in k or "sin" in k for k in state)
    assert all(k in dict(model.named_parameters()) for k in state)  # no other buffers either
    fresh = llama()
    fresh.load_state_dict(state, strict=True)
    args = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*args), model(*args), rtol=0, atol=0)


def test_llama_has_no_biases_and_untied_head():
    model = build("llama")
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_llama_gqa_matches_mha_with_repeated_kv_weights(kv_heads):
    """kv_heads in (4: MHA, 2: GQA, 1: MQA); query head h reads KV head h // (heads/kv_heads),
    so copying each KV head's rows n_rep times gives an equivalent plain multi-head model."""
    gqa = build("llama", kv_heads=kv_heads)
    attn = gqa.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads * 8
    mha = llama(kv_heads=4).eval()
    state = gqa.state_dict()
    n_rep = 4 // kv_heads
    for k, w in state.items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            state[k] = w.view(kv_heads, 8, 32).repeat_interleave(n_rep, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    args = inputs("llama")
    with torch.no_grad():
        y = gqa(*args)
        torch.testing.assert_close(mha(*args), y, rtol=1e-5, atol=1e-6)
    assert y.shape == (B, 16, 64)


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(x, 2), x.repeat_interleave(2, dim=1), rtol=0, atol=0)
    assert repeat_kv(x, 1) is x


def test_rope_is_a_rotation_with_relative_scores():
    rotary = build("llama").rotary
    cos, sin = rotary(16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    qs, ks = apply_rotary_pos_emb(q.expand(1, 1, 16, 8), k.expand(1, 1, 16, 8), cos, sin)
    torch.testing.assert_close(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 16))
    scores = (qs[0, 0] @ ks[0, 0].T)  # (16, 16): depends only on i - j
    torch.testing.assert_close(scores[5, 2], scores[10, 7])
    torch.testing.assert_close(scores[3, 3], scores[12, 12])


def test_vit_tokens():
    model = build("vit")
    assert model.cls_token.shape == (1, 1, 32)
    assert model.pos_embed.shape == (1, 16 + 1, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_layers():
    model = build("mlp", hidden=(16, 8, 4))
    kinds = [type(m).__name__ for m in model.layers]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert build("mlp", hidden=())(torch.randn(2, 64)).shape == (2, 10)
