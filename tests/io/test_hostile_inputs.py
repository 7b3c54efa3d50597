"""Careless and hostile inputs (issue 21): non-regular files, unsafe advice in refusals, non-finite
options, finite inputs that merge into NaN/Inf. Each ends in a typed error and leaves nothing."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import fastmerge
from fastmerge import zoo
from fastmerge.cli import main
from fastmerge.errors import CheckpointError, DataError, InvalidArgumentError, NonFiniteError
from fastmerge.io import Checkpoint, parse_size
from fastmerge.io import writer as writer_module
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions


class _Payload:
    def __reduce__(self):  # unpickling this would run a command
        return (os.system, ("touch pwned-by-test",))


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    # in a child with a time limit: a regression would block on open() forever
    code = ("import sys\nfrom fastmerge.io import Checkpoint\nfrom fastmerge.errors import CheckpointError\n"
            f"try:\n    Checkpoint({str(fifo)!r})\nexcept CheckpointError as e:\n    print(e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "not a regular file" in done.stdout


def test_a_shard_that_is_not_a_regular_file_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "shard.safetensors"}}')
    os.mkfifo(tmp_path / "shard.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(str(tmp_path))


def test_the_refusal_of_a_pickle_gives_no_unsafe_advice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2), "x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as caught:
        Checkpoint(str(tmp_path / "evil.pt"))
    message = str(caught.value)
    assert "refused" in message and "unsupported GLOBAL posix.system" in message
    for advice in ("weights_only=False", "weights_only` set to `False", "add_safe_globals", "allowlist"):
        assert advice not in message
    assert not (tmp_path / "pwned-by-test").exists()


@pytest.mark.parametrize("options", [dict(weights=(float("nan"), 1.0)), dict(weights=(1.0, float("inf"))),
                                     dict(scale=float("inf"), method="task_arithmetic"),
                                     dict(scale=float("nan"), method="ties")])
def test_non_finite_weights_and_scale_are_refused(options):
    with pytest.raises(InvalidArgumentError, match="finite"):
        SameInitOptions(**options).validate(2, has_base=True)


def test_finite_inputs_whose_merge_overflows_write_nothing(tmp_path, capsys):
    big = torch.full((4, 4), 3.0e38)
    save_file({"w": big, "b": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": big, "b": torch.ones(4)}, str(tmp_path / "b.safetensors"))
    inputs = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    out = tmp_path / "out.safetensors"
    with pytest.raises(NonFiniteError, match="'w'.*NaN/Inf"):
        merge_checkpoints(inputs, str(out), SameInitOptions("linear", weights=(1.0, 1.0)), progress=False)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]
    assert main(["merge", *inputs, "-o", str(out), "--weights", "nan", "1"]) == 2
    assert "finite" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("text,message", [
    ("merge_method: linear\nmodels: 5\n", "models must be a list"),
    ("merge_method: linear\nmodels: [{model: 7}]\n", "models\\[0\\].model must be a path"),
    ("merge_method: ties\nmodels: [a.safetensors, b.safetensors]\nparameters: {density: half}\n",
     "parameters.density must be a number"),
    ("merge_method: linear\nmodels: [a.safetensors, b.safetensors]\nparameters: [1, 2]\n", "parameters must be a mapping"),
    ("merge_method: linear\nmodels: [{model: a.safetensors, parameters: {weight: [[1, 2]]}}]\n", "must be a number"),
    ("merge_method: dare\nmodels: [a.safetensors, b.safetensors]\nparameters: {seed: 1.5}\n", "seed must be an integer"),
    ("merge_method: [ties]\nmodels: [a.safetensors]\n", "merge_method must be a text"),
    ("merge_method: linear\nmodels: [a.safetensors]\nmerge_method: ties\n", "'merge_method' appears more than once"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                                                    for p, c in zip("abcdefgh", "bcdefghi"))
     + "merge_method: linear\nmodels: [*i]\n", "aliases .* expand it to more than"),
])
def test_config_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, text, message):
    config = tmp_path / "merge.yml"
    config.write_text(text)
    assert main(["merge", "--config", str(config), "-o", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("header,message", [
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1e999]}}', "offset must be an integer"),
    (b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 16]}}', "Infinity is not a number"),
    (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', "NaN is not a number"),
    (b'{"w": {"dtype": "F32", "shape": [18446744073709551616], "data_offsets": [0, 16]}}', "dimension must be"),
    (b'{"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}', "dimension must be"),
    (b'{"w": {"dtype": "F32", "shape": [true, 4], "data_offsets": [0, 16]}}', "dimension must be"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}', "malformed"),
    (b"[" * 50000 + b"]" * 50000, "RecursionError"),
    # an empty tensor between two overlapping ones must not hide the overlap
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
     b'"z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, '
     b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', "overlap"),
])
def test_safetensors_headers_python_cannot_use_are_refused(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, bytes(32))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(str(path))


@pytest.mark.parametrize("index,message", [
    ({"weight_map": ["s.safetensors"]}, "weight_map"),
    ({"weight_map": {"w": 5}}, "weight_map"),
    ({"weight_map": {"w": "s.safetensors"}, "metadata": [1]}, "metadata"),
])
def test_indexes_of_the_wrong_shape_are_refused(tmp_path, index, message):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(str(tmp_path))


def test_sparse_tensors_in_torch_files_are_refused(tmp_path):
    torch.save({"w": torch.eye(3).to_sparse(), "b": torch.zeros(3)}, tmp_path / "sparse.pt")
    with pytest.raises(CheckpointError, match="sparse.*dense"):
        Checkpoint(str(tmp_path / "sparse.pt"))


@pytest.mark.parametrize("size", ["1e999GB", "99999999999999999999999999GB", "0", "1.2.3MB", "nanGB"])
def test_shard_sizes_out_of_range_are_refused(size):
    with pytest.raises(CheckpointError, match="size"):
        parse_size(size)


def test_dtypes_that_differ_are_refused_unless_the_output_is_cast(tmp_path, capsys):
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2, 2, dtype=torch.float64)}, str(tmp_path / "b.safetensors"))
    inputs = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    out = tmp_path / "m.safetensors"
    assert main(["merge", *inputs, "-o", str(out), "--quiet"]) == 2
    assert "--dtype float32" in capsys.readouterr().err and not out.exists()
    assert main(["merge", *inputs, "-o", str(out), "--quiet", "--dtype", "float32"]) == 0 and out.exists()


def test_an_output_that_would_change_what_an_input_folder_loads_is_refused(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    torch.save({"w": torch.ones(2, 2)}, a / "pytorch_model.bin")
    save_file({"w": torch.zeros(2, 2)}, str(b / "model.safetensors"))
    options = SameInitOptions("linear")
    for shadow in (a / "model.safetensors", a / "model.safetensors.index.json"):
        with pytest.raises(CheckpointError, match="change what loading|a .safetensors file or a folder"):
            merge_checkpoints([str(a), str(b)], str(shadow), options, progress=False)
        assert not shadow.exists()
    assert Checkpoint(str(a)).files() == [str(a / "pytorch_model.bin")]
    merge_checkpoints([str(a), str(b)], str(a / "merged.safetensors"), options, progress=False)  # beside: fine
    assert Checkpoint(str(a)).files() == [str(a / "pytorch_model.bin")]


def test_a_batch_of_the_wrong_width_after_the_first_is_named():
    models = [zoo.mlp(in_features=8, hidden=(16,), out_features=3).eval() for _ in range(2)]
    data = [torch.randn(32, 8), torch.randn(32, 8), torch.randn(32, 9)]
    with pytest.raises(DataError, match="batch 2: the model cannot run on it"):
        fastmerge.merge(models, "permute", data=data, progress=False)


def _pair(tmp_path):
    save_file({"w": torch.ones(2, 2), "b": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    return [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]


def test_an_output_that_appears_during_the_merge_is_not_replaced(tmp_path, monkeypatch):
    inputs, out = _pair(tmp_path), tmp_path / "m.safetensors"
    publish = writer_module.ShardedWriter._publish

    def race(self, temp, final):  # another run publishes first
        save_file({"other": torch.ones(1)}, final)
        return publish(self, temp, final)

    monkeypatch.setattr(writer_module.ShardedWriter, "_publish", race)
    with pytest.raises(CheckpointError, match="appeared while this merge ran"):
        merge_checkpoints(inputs, str(out), SameInitOptions("linear"), progress=False)
    assert list(Checkpoint(str(out)).keys()) == ["other"]  # the other run's file stays
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_an_interrupt_while_publishing_leaves_nothing(tmp_path, monkeypatch):
    inputs, out = _pair(tmp_path), tmp_path / "new" / "deeper" / "m"
    calls = []

    def interrupted(self, temp, final):  # SIGTERM (KeyboardInterrupt in the CLI) after the first shard
        if calls:
            raise KeyboardInterrupt
        calls.append(final)
        os.replace(temp, final)
        self._published.append(final)

    monkeypatch.setattr(writer_module.ShardedWriter, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(inputs, str(out), SameInitOptions("linear"), max_shard_size=20, progress=False)
    assert calls and not os.path.exists(calls[0])
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]  # the folders it made: gone


def test_temporary_files_of_dead_runs_are_removed_by_the_next(tmp_path):
    inputs, out = _pair(tmp_path), tmp_path / "m.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.safetensors.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".m.safetensors.tmp-{os.getpid()}x"  # not our pattern: left alone
    alive.write_bytes(b"")
    merge_checkpoints(inputs, str(out), SameInitOptions("linear"), progress=False)
    assert not stale.exists() and alive.exists() and out.exists()


def test_config_linear_weights_are_normalised_as_mergekit_reads_them(tmp_path):
    inputs = _pair(tmp_path)
    models = "".join(f"  - model: {p}\n    parameters: {{weight: 3.0}}\n" for p in inputs)
    for normalize, expected in ((None, 0.5), (False, 3.0)):
        config = tmp_path / f"c{normalize}.yml"
        extra = "" if normalize is None else "parameters: {normalize: false}\n"
        config.write_text(f"merge_method: linear\nmodels:\n{models}{extra}")
        out = tmp_path / f"m{normalize}.safetensors"
        assert main(["merge", "--config", str(config), "-o", str(out), "--quiet"]) == 0
        assert torch.allclose(Checkpoint(str(out))["w"], torch.full((2, 2), expected))  # a: ones, b: zeros


@pytest.mark.parametrize("text,key", [
    ("merge_method: linear\nmodels: [a.safetensors]\nparameters: {int8_mask: true}\n", "parameters.int8_mask"),
    ("merge_method: linear\nmodels: [{model: a.safetensors, parameters: {density: 0.3}}]\n",
     "models\\[0\\].parameters.density"),
    ("merge_method: slerp\nmodels: [a.safetensors]\nparameters: {normalize: true}\n", "parameters.normalize"),
])
def test_config_keys_fastmerge_would_not_honour_are_refused(tmp_path, capsys, text, key):
    config = tmp_path / "c.yml"
    config.write_text(text)
    assert main(["merge", "--config", str(config), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert re.search(key, capsys.readouterr().err)


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_runs_started_together_on_one_output_never_mix(tmp_path, overwrite):
    """Real processes, started at once on the same output (the lock, then the no-clobber rename):
    without --overwrite exactly one succeeds and the other exits 2 with one line; with it, they
    run one after the other or the second is refused. The output is always one whole merge."""
    torch.manual_seed(0)
    models = []
    for k in range(2):  # large enough (40 MB each) that the runs overlap
        models.append(str(tmp_path / f"m{k}.safetensors"))
        save_file({f"t{i}": torch.randn(256, 1024) for i in range(40)}, models[-1])
    out = tmp_path / "out.safetensors"
    for trial in range(3):
        if out.exists():
            out.unlink()
        runs = [subprocess.Popen([sys.executable, "-m", "fastmerge", "merge", *models, "-o", str(out), "--quiet",
                                  "--weights", *weights, *(["--overwrite"] if overwrite else [])],
                                 stderr=subprocess.PIPE, text=True)
                for weights in (("0.5", "0.5"), ("0.2", "0.8"))]
        results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
        codes = sorted(rc for rc, _ in results)
        assert codes in ([0, 0], [0, 2]) if overwrite else codes == [0, 2], results
        for rc, err in results:
            if rc == 2:
                assert len(err.strip().splitlines()) == 1, err
                assert re.search("another fastmerge run|appeared while" + ("" if overwrite else "|exists already"), err)
        merged = Checkpoint(str(out))
        a, b = (Checkpoint(m)["t7"].double() for m in models)
        got = merged["t7"].double()
        assert any(torch.allclose(got, w * a + (1 - w) * b, atol=1e-6) for w in (0.5, 0.2)), trial
        assert sorted(os.listdir(tmp_path)) == ["m0.safetensors", "m1.safetensors", "out.safetensors"]


@pytest.mark.parametrize("method, bad", [("model_stock", "base"), ("model_stock", "b"), ("nuslerp", "a"),
                                         ("multislerp", "b"), ("karcher", "a"), ("breadcrumbs", "b"), ("sce", "a")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_is_refused_by_name_by_every_method(tmp_path, method, bad, value):
    """The methods that take their angles from a Gram matrix check the inputs through it (not by a
    separate pass): a NaN/Inf in any model or the base still names that file, and nothing is written."""
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for name in ("base", "a", "b"):
        tensors = {"w": torch.randn(8, 6, generator=generator), "b": torch.randn(6, generator=generator)}
        if name == bad:
            tensors["w"][3, 2] = value
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, paths[name])
    out = tmp_path / "out.safetensors"
    with pytest.raises(NonFiniteError, match=f"{bad}.safetensors.*'w'"):
        merge_checkpoints([paths["a"], paths["b"]], str(out), SameInitOptions(method), base=paths["base"],
                          progress=False)
    assert not out.exists()
