"""mergekit-yaml's command-line habits work on `fastmerge merge`: the positional output, its flags
(--out-shard-size in mergekit's units, --no-copy-tokenizer, --no-write-model-card, --random-seed,
and the accepted no-ops)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.cli import main
from fastmerge.io import Checkpoint


@pytest.fixture
def config(tmp_path):
    for k, name in enumerate("ab"):
        folder = tmp_path / name
        folder.mkdir()
        torch.manual_seed(k)
        save_file({f"w{i}": torch.randn(64, 64) for i in range(4)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "tokenizer.json").write_text("{}")
    path = tmp_path / "merge.yml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1}}\n"
                    f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 3}}\n")
    return path


def test_config_and_output_as_mergekit_yaml_takes_them(config, tmp_path):
    out = tmp_path / "merged"
    threads = torch.get_num_threads()
    assert main(["merge", str(config), str(out), "--quiet", "--cuda", "--allow-crimes", "--lazy-unpickle", "--gpu-rich",
                 "--read-to-gpu", "--no-multi-gpu", "--async-write", "--write-threads", "4", "--clone-tensors",
                 "--safe-serialization", "--lora-merge-cache", str(tmp_path / "cache"), "-j", "1"]) == 0
    assert torch.get_num_threads() == threads  # -j applies to the merge, not to the caller afterwards
    merged, a, b = (Checkpoint(str(p)) for p in (out, tmp_path / "a", tmp_path / "b"))
    torch.testing.assert_close(merged["w0"], 0.25 * a["w0"] + 0.75 * b["w0"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    again = tmp_path / "again"
    assert main(["merge", "--config", str(config), str(again), "--quiet", "--no-copy-tokenizer",
                 "--no-write-model-card"]) == 0
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors"]


def test_out_shard_size_counts_as_mergekit_does(config, tmp_path):
    out = tmp_path / "sharded"
    # 4 tensors of 16 KiB: 20K (20,000 bytes, mergekit's K) holds one each
    assert main(["merge", str(config), str(out), "--quiet", "--out-shard-size", "20K"]) == 0
    assert len(list(out.glob("model-*-of-00004.safetensors"))) == 4


@pytest.mark.parametrize("args, message", [
    (["--out-shard-size", "5X"], "K, M or B"),
    (["extra-model"], "give the output as one argument"),
    (["--no-safe-serialization"], "writes safetensors only"),
    (["--unsafe-truncate-embeddings"], "tokenizer_source"),
    (["--lora-merge-dtype", "bfloat16"], "merge_and_unload"),
    (["--num-threads", "0"], "at least 1"),
])
def test_mistakes_are_one_line(config, tmp_path, capsys, args, message):
    assert main(["merge", "--config", str(config), str(tmp_path / "o"), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_allow_unknown_ignores_keys_no_method_reads_with_a_warning(config, tmp_path, capsys):
    text = config.read_text().replace("{weight: 3}", "{weight: 3, density: 0.5}") + "name: my-merge\n"
    config.write_text(text)
    assert main(["merge", str(config), str(tmp_path / "refused"), "--quiet"]) == 2
    assert "allow-unknown" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--quiet", "--allow-unknown"]) == 0
    err = capsys.readouterr().err
    assert "ignoring" in err and "density" in err and "name" in err
    merged, a, b = (Checkpoint(str(p)) for p in (out, tmp_path / "a", tmp_path / "b"))
    torch.testing.assert_close(merged["w0"], 0.25 * a["w0"] + 0.75 * b["w0"])


def _layer_stack(tmp_path, bad=None):
    folder = tmp_path / "stack"
    folder.mkdir()
    state = {f"model.layers.{i}.w": torch.full((4, 4), float(i + 1)) for i in range(3)}
    state["model.embed_tokens.weight"] = torch.ones(8, 4)
    if bad is not None:
        state["model.layers.1.w"][0, 0] = bad
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("bad, scale, dtype, message", [(float("nan"), 1.0, None, "NaN"), (None, 1e39, None, "NaN/Inf"),
                                                       (1e10, None, "float16", "float16's range")])
def test_passthrough_refuses_non_finite_values_unless_allowed(tmp_path, capsys, bad, scale, dtype, message):
    """A passthrough copies tensors (times a scale, in a dtype): NaN/Inf in an input, a scale past
    float32's range, or a value past the output dtype's, is refused before anything is written, as
    in every merge; --allow-nonfinite writes it."""
    folder = _layer_stack(tmp_path, bad)
    config = tmp_path / "p.yml"
    parameters = f"        parameters: {{scale: {scale!r}}}\n" if scale is not None else ""
    config.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {folder}\n"
                      f"        layer_range: [0, 3]\n{parameters}" + (f"dtype: {dtype}\n" if dtype else ""))
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(config), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()
    assert main(["merge", str(config), str(out), "--quiet", "--allow-nonfinite"]) == 0
    assert not torch.isfinite(Checkpoint(str(out))["model.layers.1.w"]).all()


def test_mergekit_compat_refuses_fastmerges_own_dare(config, tmp_path, capsys):
    base = str(tmp_path / "a")
    assert main(["merge", base, str(tmp_path / "b"), "--base", base, "--method", "dare", "-o", str(tmp_path / "o"),
                 "--mergekit-compat", "--quiet"]) == 2
    assert "dare_linear" in capsys.readouterr().err


def test_an_output_folder_with_a_tokenizer_is_free_when_no_tokenizer_is_copied(config, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # another tool's: kept, and no reason to refuse
    assert main(["merge", str(config), str(out), "--quiet"]) == 2  # it would be replaced
    assert main(["merge", str(config), str(out), "--quiet", "--no-copy-tokenizer"]) == 0
    assert (out / "tokenizer.json").read_text() == "{}"


def test_a_plan_with_gradients_says_its_options_vary_by_tensor(tmp_path, capsys):
    folder = _layer_stack(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    save_file({k: v * 2 for k, v in Checkpoint(str(folder)).items()}, str(other / "model.safetensors"))
    config = tmp_path / "g.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {folder}\n    parameters: {{weight: [1, 3]}}\n"
                      f"  - model: {other}\n    parameters: {{weight: 1}}\n")
    assert main(["merge", str(config), str(tmp_path / "o.safetensors"), "--dry-run"]) == 0
    assert "options vary by tensor (gradients or filters): 3 sets" in capsys.readouterr().out


def test_a_frankenmerge_keeps_each_layers_kind_in_the_config(tmp_path):
    """A passthrough's config lists each output layer's kind (`layer_types`: full or sliding
    attention) in the order the layers were stacked; transformers refuses a config whose list does
    not match the layer count (mergekit 0.1.5 writes such a config, and its merge fails)."""
    transformers = pytest.importorskip("transformers")
    kinds = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, layer_types=kinds, use_sliding_window=True,
                                      sliding_window=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**saved, "mlp_only_layers": [3]}))  # indices, not kinds
    path = tmp_path / "p.yml"
    path.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {tmp_path / 'm'}, layer_range: [0, 2]}}]\n"
                    f"  - sources: [{{model: {tmp_path / 'm'}, layer_range: [1, 4]}}]\n")
    with pytest.warns(UserWarning, match="mlp_only_layers name layers by index"):
        assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 5 and written["layer_types"] == [kinds[i] for i in (0, 1, 1, 2, 3)]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == written["layer_types"]


def test_a_wider_output_dtype_is_computed_at_its_precision(tmp_path):
    """`--dtype float32` on bfloat16 checkpoints: the float32 average, not a bfloat16 one widened."""
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append({"w": torch.randn(64, 64).bfloat16()})
        save_file(models[-1], str(tmp_path / f"m{k}.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors"), "-o", str(out),
                 "--dtype", "float32", "--quiet"]) == 0
    merged = Checkpoint(str(out))["w"]
    assert merged.dtype == torch.float32
    assert torch.equal(merged, (models[0]["w"].float() + models[1]["w"].float()) / 2)


def test_a_value_past_the_configs_dtype_is_refused_naming_the_file(config, tmp_path, capsys):
    """mergekit reads the inputs in the config's dtype: a float32 value past float16's range
    would become Inf there. Refused in one line naming the input (not blamed on the weights);
    --allow-nonfinite merges it as mergekit would."""
    (tmp_path / "a" / "model.safetensors").unlink()
    save_file({f"w{i}": torch.full((64, 64), 1e6 if i == 2 else 1.0) for i in range(4)},
              str(tmp_path / "a" / "model.safetensors"))
    config.write_text(config.read_text() + "dtype: float16\nout_dtype: float32\n")
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "a") in err[0] and "'w2'" in err[0] and "float16's range" in err[0]
    assert not out.exists()
    assert main(["merge", str(config), str(out), "--quiet", "--allow-nonfinite"]) == 0
    merged = Checkpoint(str(out))
    assert merged["w2"].dtype == torch.float32 and torch.isinf(merged["w2"]).all()


def test_a_nan_input_read_in_a_narrower_dtype_is_named_as_broken(config, tmp_path, capsys):
    """TIES counts its inputs' NaN/Inf in its own pass; converted first to the config's dtype, a NaN
    input is still named as a broken checkpoint, not as a value past the dtype's range."""
    (tmp_path / "a" / "model.safetensors").unlink()
    save_file({f"w{i}": torch.full((64, 64), float("nan") if i == 1 else 1.0) for i in range(4)},
              str(tmp_path / "a" / "model.safetensors"))
    config.write_text(f"merge_method: ties\nbase_model: {tmp_path / 'b'}\nmodels:\n  - model: {tmp_path / 'a'}\n"
                      "    parameters: {weight: 1, density: 0.5}\ndtype: float16\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN/Inf entries" in err[0] and "range" not in err[0], err
