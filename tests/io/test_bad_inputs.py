"""A corpus of broken inputs, generated here: each gives its typed error from the library, and from
the CLI exit code 2 with one line on stderr, no output file, and inputs whose checksums are
unchanged. Then the failure modes of the machine (a full disk), determinism, and the checks on
in-memory models (NaN weights, mixed devices, empty data)."""

import hashlib
import json
import os
import pickle
import resource
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import fastmerge
import fastmerge.zoo
from fastmerge.cli import main
from fastmerge.errors import CheckpointError, DataError, NonFiniteError, ShapeMismatchError, SpecError
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions
from fastmerge.cli.references import data_from, model_factory
from fastmerge.merging.with_data import merge_files_with_data
from fastmerge.spec import save_spec, trace_spec


def mlp_state(seed, hidden=8):
    torch.manual_seed(seed)
    return fastmerge.zoo.mlp(in_features=6, hidden=(hidden, hidden), out_features=3).state_dict()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # a real malicious checkpoint: unpickling would create this file
        return (open, (self.path, "w"))


def _rewrite_header(good: bytes, edit) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    text = json.dumps(edit(header)).encode()
    return struct.pack("<Q", len(text)) + text + good[8 + n :]


def _offsets_past_the_end(header):
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**6]
    return header


def build_corpus(folder):
    """name -> (input paths, extra CLI args, library call, error type, marker file that must not appear)."""
    good = folder / "good.safetensors"
    save_file(mlp_state(0), str(good))
    other = folder / "other.safetensors"
    save_file(mlp_state(1), str(other))
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]

    def write(name, data):
        (folder / name).write_bytes(data)
        return str(folder / name)

    flipped = bytearray(raw)
    flipped[8 + n // 2] ^= 0x80  # a bit flipped in the middle of the JSON header
    nan_state = mlp_state(1)
    nan_state["layers.2.weight"][3, 1] = float("nan")
    save_file(nan_state, str(folder / "nan.safetensors"))
    save_file(mlp_state(1, hidden=5), str(folder / "narrow.safetensors"))
    save_file({k: v * 1e6 for k, v in mlp_state(1).items()}, str(folder / "huge.safetensors"))
    with open(folder / "evil.pt", "wb") as f:
        pickle.dump({"w": _Payload(str(folder / "pwned"))}, f)
    wrong_spec = fastmerge.zoo.mlp(in_features=6, hidden=(7, 7), out_features=3)
    save_spec(trace_spec(wrong_spec, (torch.zeros(2, 6),)), folder / "wrong.spec.yaml")
    (folder / "empty_data.py").write_text("BATCHES = []\n")
    (folder / "arch.py").write_text("from fastmerge.zoo import mlp\n\n\ndef build():\n"
                                    "    return mlp(in_features=6, hidden=(8, 8), out_features=3)\n")

    def same_init(paths, **kwargs):
        return lambda out: merge_checkpoints(paths, out, SameInitOptions(), progress=False, **kwargs)

    corpus = {}
    for name, data in [("truncated", raw[: len(raw) - 40]), ("bit-flipped-header", bytes(flipped)),
                       ("offsets-past-end", _rewrite_header(raw, _offsets_past_the_end)),
                       ("header-length-huge", struct.pack("<Q", 2**62) + raw[8:])]:
        paths = [str(good), write(f"{name}.safetensors", data)]
        corpus[name] = (paths, [], same_init(paths), CheckpointError, None)
    paths = [str(good), str(folder / "narrow.safetensors")]
    corpus["mismatched-shapes"] = (paths, [], same_init(paths), ShapeMismatchError, None)
    paths = [str(good), str(folder / "nan.safetensors")]
    corpus["nan-weights"] = (paths, [], same_init(paths), NonFiniteError, None)
    paths = [str(good), str(folder / "huge.safetensors")]
    corpus["float16-overflow"] = (paths, ["--dtype", "float16"], same_init(paths, dtype="float16"), NonFiniteError, None)
    paths = [str(good), str(folder / "evil.pt")]
    corpus["malicious-pickle"] = (paths, [], same_init(paths), CheckpointError, folder / "pwned")
    paths = [str(good), str(other)]
    spec = str(folder / "wrong.spec.yaml")
    corpus["wrong-spec"] = (paths, ["--align", "weight_matching", "--spec", spec],
                            same_init(paths, align="weight_matching", spec_file=spec), SpecError, None)
    model_args = ["--align", "cca", "--model", f"{folder}/arch.py:build", "--data", f"{folder}/empty_data.py:BATCHES"]
    corpus["empty-data"] = (paths, model_args, lambda out: merge_files_with_data(
        paths, out, build_model=model_factory(f"{folder}/arch.py:build"),
        data=data_from(f"{folder}/empty_data.py:BATCHES"), progress=False), DataError, None)
    return corpus


CASES = ["truncated", "bit-flipped-header", "offsets-past-end", "header-length-huge", "mismatched-shapes",
         "nan-weights", "float16-overflow", "malicious-pickle", "wrong-spec", "empty-data"]


def digests(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


@pytest.mark.parametrize("case", CASES)
def test_broken_input_gives_its_typed_error_and_one_cli_line_and_no_output(tmp_path, capsys, case):
    paths, extra, call, error, marker = build_corpus(tmp_path)[case]
    before = digests(paths)
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(error):
        call(str(out))
    assert main(["merge", *paths, *extra, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastmerge merge: "), err
    assert not out.exists() and not out.parent.exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert digests(paths) == before
    if marker is not None:
        assert not marker.exists(), "the pickle's payload ran"


def test_a_full_disk_leaves_no_output_and_says_so_in_one_line(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 1 MB (EFBIG), as a full disk refuses them
    (ENOSPC): the merge stops with exit 2, one line, and removes what it had written."""
    state = {f"t{i}": torch.randn(256, 256) for i in range(16)}  # 4 MB per model
    paths = [str(tmp_path / f"m{i}.safetensors") for i in range(2)]
    for p in paths:
        save_file(state, p)
    before = digests(paths)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "fastmerge", "merge", *paths, "-o", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot write" in done.stderr, done.stderr
    assert not out.exists()
    assert digests(paths) == before


def test_two_runs_write_identical_bytes(tmp_path):
    paths = []
    for i, name in enumerate(["base", "a", "b"]):
        paths.append(str(tmp_path / f"{name}.safetensors"))
        save_file(mlp_state(i), paths[-1])
    (tmp_path / "arch.py").write_text("from fastmerge.zoo import mlp\n\n\ndef build():\n"
                                      "    return mlp(in_features=6, hidden=(8, 8), out_features=3)\n")
    (tmp_path / "data.py").write_text("import torch\n\n\ndef batches():\n    g = torch.Generator().manual_seed(0)\n"
                                      "    return [torch.randn(64, 6, generator=g) for _ in range(4)]\n")
    runs = {
        "dare": [paths[1], paths[2], "--base", paths[0], "--method", "dare", "--density", "0.3", "--seed", "7"],
        "ties": [paths[1], paths[2], "--base", paths[0], "--method", "ties"],
        "zipit": [paths[1], paths[2], "--align", "zipit", "--model", f"{tmp_path}/arch.py:build",
                  "--data", f"{tmp_path}/data.py:batches"],
    }
    for name, args in runs.items():
        outputs = [tmp_path / f"{name}{k}.safetensors" for k in range(2)]
        for out in outputs:
            assert main(["merge", *args, "-o", str(out), "--quiet"]) == 0
        assert digests(outputs)[0] == digests(outputs)[1], name


def test_models_with_nan_weights_or_on_two_devices_are_refused_before_work():
    models = [fastmerge.zoo.mlp(in_features=6, hidden=(8, 8), out_features=3) for _ in range(2)]
    data = [torch.randn(32, 6)]
    with torch.no_grad():
        models[1].layers[2].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="model 1.*layers.2.weight"):
        fastmerge.merge(models, "permute", data=data, progress=False)
    with pytest.raises(NonFiniteError, match="model 1"):
        fastmerge.np_merge(models, [(data[0], torch.zeros(32, dtype=torch.long))], steps=1, progress=False)
    models[1] = fastmerge.zoo.mlp(in_features=6, hidden=(8, 8), out_features=3).to("meta")
    with pytest.raises(ShapeMismatchError, match="different devices"):
        fastmerge.merge(models, "permute", data=data, progress=False)


def test_empty_or_too_small_data_is_a_data_error_and_few_samples_are_reported():
    models = [fastmerge.zoo.mlp(in_features=6, hidden=(8, 8), out_features=3) for _ in range(2)]
    with pytest.raises(DataError, match="no batches"):
        fastmerge.merge(models, "cca", data=[], example_inputs=(torch.zeros(2, 6),), progress=False)
    with pytest.raises(DataError, match="at least 2"):
        fastmerge.merge(models, "cca", data=[torch.randn(1, 6)], progress=False)
    with pytest.warns(UserWarning, match="fewer samples than units"):
        merged, alignment = fastmerge.merge(models, "cca", data=[torch.randn(5, 6)], progress=False,
                                            return_alignment=True)
    reported = [d["samples"] for d in alignment.diagnostics.values() if isinstance(d, dict) and "samples" in d]
    assert reported and all(n == 5 for n in reported)
