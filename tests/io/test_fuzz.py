"""Fuzzing the parsers of untrusted input with hypothesis: safetensors headers (structured and raw
bytes), index.json, merge configs and merge-spec YAML. Whatever the input, the only outcomes are success (and then the data
reads back consistently) or the typed error; never another exception, never a hang."""

import json
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fastmerge import zoo
from fastmerge.cli import main
from fastmerge.errors import CheckpointError, SpecError
from fastmerge.io import Checkpoint
from fastmerge.spec import spec_from_yaml, spec_to_yaml, trace_spec

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "Q4", "", "f32", "F8_E4M3"]
small_ints = st.one_of(st.integers(-3, 40), st.integers(-2**63, 2**64), st.just(2**62))
json_junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                                   st.text(max_size=8)),
                         lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                 st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                         max_leaves=12)
entry = st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": st.lists(small_ints, max_size=3),
                           "data_offsets": st.lists(small_ints, min_size=0, max_size=3)}),
    json_junk)
headers = st.dictionaries(st.one_of(st.text(min_size=1, max_size=12), st.just("__metadata__")), entry, max_size=5)


def check_outcome(path):
    """Opens the file; on success every tensor must read back with its declared shape and dtype."""
    try:
        ckpt = Checkpoint(str(path))
    except CheckpointError:
        return "rejected"
    for name in ckpt.keys():
        t = ckpt[name]
        assert tuple(t.shape) == tuple(ckpt.shape(name)) and t.dtype == ckpt.dtype(name)
    return "read"


@FUZZ
@given(header=headers, data_size=st.integers(0, 256))
def test_structured_headers_give_a_checkpoint_error_or_a_consistent_read(tmp_path, header, data_size):
    text = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x01" * data_size)
    check_outcome(path)


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 64)), body=st.binary(max_size=200))
def test_raw_bytes_give_a_checkpoint_error_or_a_consistent_read(tmp_path, length, body):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(struct.pack("<Q", length) + body)
    check_outcome(path)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "m.safetensors"
    save_file({"a.weight": torch.randn(4, 3), "b": torch.arange(5), "c": torch.randn(2).half()}, str(path),
              metadata={"k": "v"})
    return path.read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_valid_files_give_a_checkpoint_error_or_a_consistent_read(tmp_path, valid_file, flips):
    data = bytearray(valid_file)
    for position, value in flips:
        data[position % len(data)] = value
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    check_outcome(path)


@pytest.fixture(scope="module")
def mlp_spec():
    model = zoo.mlp(in_features=6, hidden=(5, 4), out_features=3)
    spec = trace_spec(model, (torch.zeros(2, 6),))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return yaml.safe_load(spec_to_yaml(spec)), shapes


def _mutate(data, path, value):
    """Replaces the node at `path` (a list of choices, each taken modulo the children) by `value`."""
    if not path or not isinstance(data, (dict, list)) or not data:
        return value
    keys = list(data) if isinstance(data, dict) else list(range(len(data)))
    key = keys[path[0] % len(keys)]
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[key] = _mutate(data[key], path[1:], value)
    return copy


@FUZZ
@given(mutations=st.lists(st.tuples(st.lists(st.integers(0, 50), max_size=6), json_junk), min_size=1, max_size=3))
def test_mutated_spec_yaml_gives_a_spec_error_or_a_valid_spec(mlp_spec, mutations):
    data, shapes = mlp_spec
    for path, value in mutations:
        data = _mutate(data, path, value)
    try:
        spec = spec_from_yaml(yaml.safe_dump(data), shapes)
    except SpecError:
        return
    spec.validate(shapes)  # what loaded is consistent with the model


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_as_spec_yaml_gives_a_spec_error_or_a_spec(text):
    try:
        spec_from_yaml(text, {"w": (3, 3)})
    except SpecError:
        pass


CONFIG_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_path")
PARAMETER_KEYS = ("weight", "density", "lambda", "scale", "t", "seed")
config_value = st.one_of(json_junk, st.dictionaries(st.sampled_from(PARAMETER_KEYS), json_junk, max_size=4),
                         st.lists(st.one_of(st.text(max_size=6), st.fixed_dictionaries(
                             {"model": json_junk}, optional={"parameters": st.one_of(json_junk, st.dictionaries(
                                 st.sampled_from(PARAMETER_KEYS), json_junk, max_size=3))})), max_size=3))


@FUZZ
@given(config=st.dictionaries(st.sampled_from(CONFIG_KEYS), config_value, max_size=6))
def test_any_merge_config_is_a_one_line_refusal_never_a_traceback(tmp_path, capsys, config):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    # no model file exists, so nothing can merge: every config must end in exit 2 with one line
    assert main(["merge", "--config", str(path), "-o", str(tmp_path / "out.safetensors"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastmerge merge: ")


@FUZZ
@given(index=json_junk)
def test_any_index_json_opens_or_is_refused(tmp_path, index):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint(str(tmp_path))
    except CheckpointError:
        return
    assert all(tuple(ckpt.shape(k)) == tuple(ckpt[k].shape) for k in ckpt)
