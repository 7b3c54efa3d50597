"""A corpus of hostile and careless inputs to `fastmerge merge` (issue 21), each run through the
CLI in-process with one harness that checks every promise at once:

- the exit code: 2 with exactly one line on stderr for a refusal (never a traceback), 0 for input
  that is odd but valid, and then the output holds the right numbers;
- nothing left behind: after a refusal the folder tree is exactly as before (no output, no
  temporary or lock file, no created folder); after a success only the output is new;
- no input modified (checksums and modification times of every file that was there);
- no payload ran (pickles and YAML tags that would create a marker file);
- no hang (an alarm fails the case after 60 s).

Cases are built from a few real files (small MLP state dicts saved with safetensors and torch),
then damaged the way an attacker or a careless user would.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pickle
import re
import signal
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.cli import main
from fastmerge.io import Checkpoint

MARKER = "pwned-by-corpus"  # what a payload would create in the working folder


# ---------------------------------------------------------------------------------------- inputs
def state(seed: int, hidden: int = 8, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.weight": torch.randn(hidden, 6, generator=g).to(dtype),
            "layers.0.bias": torch.randn(hidden, generator=g).to(dtype),
            "layers.2.weight": torch.randn(3, hidden, generator=g).to(dtype),
            "layers.2.bias": torch.randn(3, generator=g).to(dtype)}


def raw_safetensors(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def good_header() -> tuple[dict, bytes]:
    """The header and data of a valid file holding state(1)."""
    tensors = state(1)
    header, data, offset = {}, b"", 0
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return header, data


def edited(edit: Callable[[dict], None]) -> bytes:
    header, data = good_header()
    edit(header)
    return raw_safetensors(header, data)


def torch_zip(tensors, edit_pickle: Callable[[bytes], bytes] | None = None, drop: str | None = None,
              compress: str | None = None, extra: dict | None = None) -> Callable[[Path], None]:
    """A torch.save zip, rewritten record by record with one change."""

    def build(path: Path) -> None:
        torch.save(tensors, str(path))
        with zipfile.ZipFile(path) as z:
            records = [(info.filename, z.read(info.filename)) for info in z.infolist()]
        with zipfile.ZipFile(path, "w") as z:
            for name, data in records:
                if drop and name.endswith(drop):
                    continue
                if edit_pickle and name.endswith("/data.pkl"):
                    data = edit_pickle(data)
                method = zipfile.ZIP_DEFLATED if compress and name.endswith(compress) else zipfile.ZIP_STORED
                z.writestr(name, data, compress_type=method)
            for name, data in (extra or {}).items():
                z.writestr(name, data)

    return build


def numel_edit(new: int) -> Callable[[bytes], bytes]:
    """The first storage's element count in the pickle set to `new` (a BININT1 after 'cpu')."""

    def edit(pkl: bytes) -> bytes:
        at = pkl.index(b"cpu") + 3
        at = pkl.index(b"K", at)  # BININT1 of the element count
        return pkl[:at] + b"K" + bytes([new]) + pkl[at + 2:]

    return edit


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class OpenPayload:
    def __reduce__(self):
        return (open, (MARKER, "w"))


def pickle_file(obj, protocol: int = 2) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)

    return build


def torch_file(obj, **kwargs) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, str(path), **kwargs)


def bytes_file(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def st_file(tensors) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, str(path))


# ----------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    build: Callable[["Env"], list[str]]  # makes the inputs, returns the merge's arguments
    rc: int = 2
    message: str | None = None  # a regular expression the one line must match
    expect: Callable[["Env", Path], None] | None = None  # checks a successful output


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs = root / "in"
        self.inputs.mkdir()
        self.out = root / "out" / "merged.safetensors"
        self.good = self.inputs / "good.safetensors"
        save_file(state(0), str(self.good))
        self.other = self.inputs / "other.safetensors"
        save_file(state(1), str(self.other))

    def file(self, name: str, build: Callable[[Path], None]) -> str:
        path = self.inputs / name
        build(path)
        return str(path)

    def config(self, text: str, name: str = "merge.yml") -> str:
        path = self.inputs / name
        path.write_text(text.replace("GOOD", str(self.good)).replace("OTHER", str(self.other)))
        return str(path)


def second(name: str, build: Callable[[Path], None], message: str | None = None, rc: int = 2,
           expect=None) -> Case:
    """The good model merged with a second input `name` built by `build`."""
    return Case(f"input:{name}", lambda env: [str(env.good), env.file(name, build), "-o", str(env.out)], rc, message,
                expect)


def mean_of(*loaders) -> Callable[[Env, Path], None]:
    """The output is the elementwise mean of the inputs (float64 reference)."""

    def check(env: Env, out: Path) -> None:
        states = [load(env) for load in loaders]
        merged = load_file(str(out))
        assert sorted(merged) == sorted(states[0])
        for name, value in merged.items():
            want = sum(s[name].double() for s in states) / len(states)
            torch.testing.assert_close(value.double(), want.to(value.dtype).double(), rtol=1e-6, atol=1e-6)

    return check


GOOD = lambda env: state(0)  # noqa: E731
OTHER = lambda env: state(1)  # noqa: E731


def header_cases() -> list[Case]:
    def entry(name):
        return lambda h: h[name]

    first = "layers.0.weight"
    cases = [
        ("empty-file", b"", "too short|empty|header"),
        ("seven-bytes", b"\x01" * 7, None),
        ("header-length-zero", raw_safetensors(b"", b"\x00" * 16), None),
        ("header-length-max", raw_safetensors(b"{}", b"", length=2**64 - 1), None),
        ("header-length-one-past", raw_safetensors(b"{}", b"", length=3), None),
        ("header-not-utf8", raw_safetensors(b'{"\xff\xfe": 1}'), None),
        ("header-array", raw_safetensors(b"[]"), None),
        ("header-string", raw_safetensors(b'"model"'), None),
        ("header-null", raw_safetensors(b"null"), None),
        ("header-number", raw_safetensors(b"1e999"), None),
        ("header-nan-literal", raw_safetensors(b'{"w": NaN}'), None),
        ("header-nested-deep", raw_safetensors(b'{"w":' + b"[" * 100000 + b"]" * 100000 + b"}"), None),
        ("header-padding-nul", raw_safetensors(json.dumps(good_header()[0]).encode() + b"\x00" * 7, good_header()[1]),
         None),
        ("header-trailing-garbage", raw_safetensors(json.dumps(good_header()[0]).encode() + b"}}", good_header()[1]),
         None),
        ("offsets-reversed", edited(lambda h: h[first].update(data_offsets=h[first]["data_offsets"][::-1])), None),
        ("offsets-past-end", edited(lambda h: h[first].update(data_offsets=[0, 10**6])), None),
        ("offsets-negative", edited(lambda h: h[first].update(data_offsets=[-4, 188])), None),
        ("offsets-strings", edited(lambda h: h[first].update(data_offsets=["0", "192"])), None),
        ("offsets-missing", edited(lambda h: h[first].pop("data_offsets")), None),
        ("offsets-three", edited(lambda h: h[first].update(data_offsets=[0, 96, 192])), None),
        ("offsets-overlap", edited(lambda h: h["layers.0.bias"].update(data_offsets=[0, 32])), None),
        ("offsets-hole", edited(lambda h: [h[n].update(data_offsets=[a + 4, b + 4]) for n, (a, b) in
                                           [(k, v["data_offsets"]) for k, v in h.items() if k != first]]), None),
        ("shape-too-small-for-bytes", edited(lambda h: h[first].update(shape=[8, 5])), None),
        ("shape-negative", edited(lambda h: h[first].update(shape=[-8, -6])), None),
        ("shape-float", edited(lambda h: h[first].update(shape=[8.0, 6])), None),
        ("shape-string", edited(lambda h: h[first].update(shape="8,6")), None),
        ("shape-overflow", edited(lambda h: h[first].update(shape=[2**40, 2**40, 2**40])), None),
        ("shape-bool", edited(lambda h: h[first].update(shape=[True, 48])), None),
        ("shape-missing", edited(lambda h: h[first].pop("shape")), None),
        ("dtype-unknown", edited(lambda h: h[first].update(dtype="F128")), None),
        ("dtype-lowercase", edited(lambda h: h[first].update(dtype="f32")), None),
        ("dtype-missing", edited(lambda h: h[first].pop("dtype")), None),
        ("dtype-number", edited(lambda h: h[first].update(dtype=32)), None),
        ("dtype-wrong-width", edited(lambda h: h[first].update(dtype="F64")), None),
        ("entry-number", edited(lambda h: h.update({first: 5})), None),
        ("entry-list", edited(lambda h: h.update({first: [0, 192]})), None),
        ("metadata-list", edited(lambda h: h.update({"__metadata__": ["a"]})), None),
        ("metadata-nested", edited(lambda h: h.update({"__metadata__": {"a": {"b": "c"}}})), None),
        ("metadata-as-tensor", edited(lambda h: h.update({"__metadata__": dict(h[first])})), None),
        ("tensor-name-empty", edited(lambda h: h.update({"": h.pop(first)})), "tensor|missing|differ"),
        ("tensor-renamed", edited(lambda h: h.update({"layers.0.weights": h.pop(first)})), "tensor|missing|differ"),
        ("tensor-missing", edited(lambda h: h.pop("layers.2.bias")), "tensor|missing|differ"),
        ("tensor-extra", raw_safetensors({**good_header()[0], "extra": {"dtype": "F32", "shape": [1],
                                                                       "data_offsets": [192 + 12 * 4, 196 + 12 * 4]}},
                                         good_header()[1] + b"\x00" * 4), "tensor|extra|differ"),
        ("random-bytes", bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(3)).tolist()),
         None),
        ("zip-as-safetensors", b"PK\x03\x04" + b"\x00" * 100, None),
    ]
    return [second(f"{name}.safetensors", bytes_file(data), message) for name, data, message in cases]


def torch_cases() -> list[Case]:
    good = state(1)
    zeros = {k: torch.zeros_like(v) for k, v in good.items()}
    cases = [
        second("payload-system.pt", pickle_file({"layers.0.weight": Payload()}), "refused"),
        second("payload-open.bin", pickle_file({"x": OpenPayload()}), "refused"),
        second("payload-proto5.pt", pickle_file(OpenPayload(), protocol=5), "refused"),
        second("payload-in-zip.pt", torch_zip(good, edit_pickle=lambda p: pickle.dumps({"w": OpenPayload()})),
               "refused"),
        second("payload-eval.pt", bytes_file(b"cbuiltins\neval\n(V__import__('os').system('touch " + MARKER.encode() +
                                             b"')\ntR."), "refused"),
        second("payload-getattr.pt", bytes_file(b"cbuiltins\ngetattr\n(cos\nsystem\ntR."), "refused"),
        second("storage-record-short.pt", torch_zip({"layers.0.weight": torch.zeros(3, 4)},
                                                      edit_pickle=numel_edit(100)), "record"),
        second("storage-record-long.pt", torch_zip({"layers.0.weight": torch.zeros(3, 4)},
                                                     edit_pickle=numel_edit(2)), "record|storage"),
        second("storage-missing.pt", torch_zip(good, drop="data/1"), "record|readable"),
        second("pickle-missing.pt", torch_zip(good, drop="data.pkl"), "data.pkl|readable"),
        second("storage-compressed.pt", torch_zip(good, compress="data/0"), "compressed"),
        second("two-pickles.pt", torch_zip(good, extra={"other/data.pkl": b"\x80\x02}q\x00."}), "data.pkl"),
        second("zip-truncated.pt", lambda p: (torch.save(good, str(p)), p.write_bytes(p.read_bytes()[:300])), None),
        second("legacy-truncated.pt", lambda p: (torch.save(good, str(p), _use_new_zipfile_serialization=False),
                                                 p.write_bytes(p.read_bytes()[:200])), None),
        second("list-of-tensors.pt", torch_file(list(good.values())), "state dict"),
        second("ints-as-values.pt", torch_file({"layers.0.weight": 3}), "state dict"),
        second("nested-dicts.pt", torch_file({"model": {"a": torch.zeros(1)}, "step": 5}), "state dict"),
        second("int-keys.pt", torch_file({0: torch.zeros(1)}), "state dict|tensor"),
        second("complex.pt", torch_file({**good, "layers.0.weight": torch.zeros(8, 6, dtype=torch.complex64)}),
               "dtype|complex|differ"),
        second("sparse-csr.pt", torch_file({**good, "layers.0.weight": torch.eye(8, 6).to_sparse_csr()}),
               "dense|sparse"),
        second("safetensors-named-bin.bin", st_file(good), "torch|readable"),
        second("text.pt", bytes_file(b"hello, I am not a checkpoint\n"), "readable|refused"),
        second("empty.pt", bytes_file(b""), None),
        # odd but valid: the numbers must come out right
        second("legacy-format.pt", torch_file(good, _use_new_zipfile_serialization=False), rc=0,
               expect=mean_of(GOOD, OTHER)),
        second("state-dict-wrapper.pt", torch_file({"state_dict": good}), rc=0, expect=mean_of(GOOD, OTHER)),
        second("transposed-storage.pt", torch_file({k: v.T.contiguous().T if v.dim() == 2 else v
                                                    for k, v in good.items()}), rc=0, expect=mean_of(GOOD, OTHER)),
        second("views-of-one-storage.pt", lambda p: torch.save(_views_of_one_storage(good), str(p)), rc=0,
               expect=mean_of(GOOD, OTHER)),
        second("expanded-zeros.pt", torch_file({k: torch.zeros(1).expand(v.shape) for k, v in good.items()}), rc=0,
               expect=mean_of(GOOD, lambda env: zeros)),
    ]
    return cases


def _views_of_one_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor a view into one shared flat storage, at its own offset."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    out, at = {}, 0
    for name, t in tensors.items():
        out[name] = flat[at:at + t.numel()].view(t.shape)
        at += t.numel()
    return out


def index_cases() -> list[Case]:
    def folder_case(name: str, index, shards: dict[str, dict] | None = None, message: str | None = None,
                    raw_index: bytes | None = None, rc: int = 2, expect=None) -> Case:
        def build(env: Env) -> list[str]:
            folder = env.inputs / name
            folder.mkdir()
            for shard, tensors in (shards if shards is not None else default_shards()).items():
                save_file(tensors, str(folder / shard))
            data = raw_index if raw_index is not None else json.dumps(index).encode()
            (folder / "model.safetensors.index.json").write_bytes(data)
            return [str(env.good), str(folder), "-o", str(env.out)]

        return Case(f"index:{name}", build, rc, message, expect)

    def default_shards():
        s = state(1)
        return {"a.safetensors": {k: s[k] for k in list(s)[:2]}, "b.safetensors": {k: s[k] for k in list(s)[2:]}}

    names = list(state(1))
    good_map = {n: ("a.safetensors" if i < 2 else "b.safetensors") for i, n in enumerate(names)}
    return [
        folder_case("valid", {"weight_map": good_map}, rc=0, expect=mean_of(GOOD, OTHER)),
        folder_case("traversal", {"weight_map": {**good_map, names[0]: "../../good.safetensors"}}, message="outside|/"),
        folder_case("absolute", {"weight_map": {**good_map, names[0]: "/etc/passwd"}}, message="outside|/"),
        folder_case("shard-missing", {"weight_map": {**good_map, names[0]: "c.safetensors"}}, message="c.safetensors"),
        folder_case("shard-is-index", {"weight_map": {**good_map, names[0]: "model.safetensors.index.json"}}),
        folder_case("shard-is-pickle", {"weight_map": {**good_map, names[0]: "evil.bin"}},
                    shards={**default_shards()}, message="safetensors|evil"),
        folder_case("tensor-not-in-shard", {"weight_map": {**good_map, "ghost": "a.safetensors"}},
                    message="ghost"),
        folder_case("tensor-in-other-shard", {"weight_map": {**good_map, names[0]: "b.safetensors"}},
                    message=names[0].replace(".", r"\.")),
        folder_case("tensor-unlisted", {"weight_map": {k: v for k, v in good_map.items() if k != names[0]}},
                    message="layers|listed|tensor"),
        folder_case("empty-map", {"weight_map": {}}),
        folder_case("map-list", {"weight_map": [["a", "b"]]}),
        folder_case("map-values-int", {"weight_map": {n: 1 for n in names}}),
        folder_case("index-list", [good_map]),
        folder_case("index-not-json", None, raw_index=b"{weight_map: a}"),
        folder_case("index-not-utf8", None, raw_index=b'{"weight_map": {"\xff": "a.safetensors"}}'),
        folder_case("index-deep", None, raw_index=b'{"weight_map": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        folder_case("index-nan", None, raw_index=b'{"weight_map": {}, "metadata": {"total_size": NaN}}'),
        folder_case("shard-name-nul", {"weight_map": {**good_map, names[0]: "a.safe\u0000tensors"}}),
        folder_case("shard-dir", {"weight_map": {**good_map, names[0]: "."}}),
        folder_case("duplicate-keys", None, raw_index=("{" + '"weight_map": {"x": "a.safetensors"}, ' +
                                                       '"weight_map": ' + json.dumps(good_map) + "}").encode(),
                    message="duplicate|twice"),
    ]


def config_cases() -> list[Case]:
    def config(name: str, text: str, message: str | None = None, rc: int = 2, expect=None,
               extra: tuple[str, ...] = (), output: bool = True) -> Case:
        if text.startswith("models:"):  # merge_method is required (as in mergekit): linear unless said
            text = "merge_method: linear\n" + text
        return Case(f"config:{name}", lambda env: ["--config", env.config(text),
                                                   *(["-o", str(env.out)] if output else []), *extra], rc,
                    message, expect)

    two = "models: [{model: GOOD}, {model: OTHER}]\n"
    return [
        config("valid", two, rc=0, expect=mean_of(GOOD, OTHER)),
        config("valid-weights", "merge_method: linear\nmodels:\n  - {model: GOOD, parameters: {weight: 3}}\n"
                                "  - {model: OTHER, parameters: {weight: 3}}\n", rc=0, expect=mean_of(GOOD, OTHER)),
        config("alias-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                             "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nmodels: [*c, *c, *c, *c, *c, *c, *c]\n",
               "alias"),
        config("alias-in-models", "x: &m {model: GOOD}\nmodels: [*m, {model: OTHER}]\n", "alias"),
        config("python-tag", "models: !!python/object/apply:os.system ['touch " + MARKER + "']\n"),
        config("python-name-tag", "models: !!python/name:os.system\n"),
        config("custom-tag", "models: !model [GOOD]\n"),
        config("top-list", "- GOOD\n- OTHER\n"),
        config("top-string", "just text\n"),
        config("empty", ""),
        config("only-comment", "# nothing\n"),
        config("models-int", "models: 5\n", "models"),
        config("models-empty", "models: []\n", "model"),
        config("models-one", "models: [{model: GOOD}]\n", "two|2"),
        config("model-key-missing", "models: [{path: GOOD}, {model: OTHER}]\n", "model"),
        config("model-int", "models: [{model: 5}, {model: OTHER}]\n", "model"),
        config("model-null", "models: [{model: null}, {model: OTHER}]\n", "model"),
        config("model-missing-file", "models: [{model: GOOD}, {model: /no/such/model.safetensors}]\n", "no such"),
        config("method-unknown", "merge_method: frankenstein\n" + two, "frankenstein"),
        config("method-missing", "base_model: GOOD\n" + two, "merge_method is required"),
        config("method-random-without-own-masks", "merge_method: dare_ties\nbase_model: GOOD\n" + two, "own-masks"),
        config("per-model-density-for-linear", "merge_method: linear\nmodels:\n  - {model: GOOD, parameters: "
                                               "{weight: 1, density: 0.5}}\n  - {model: OTHER, parameters: "
                                               "{weight: 1}}\n", "density"),
        config("slerp-base-not-a-model", "merge_method: slerp\nbase_model: /x/y.safetensors\n" + two
               + "parameters: {t: 0.5}\n", "one of its two models"),
        config("slices-of-a-model-without-a-layer-stack", "merge_method: passthrough\nslices:\n  - sources: "
                                                           "[{model: GOOD, layer_range: [0, 1]}]\n", "numbered"),
        config("slices-two-sources", "merge_method: passthrough\nslices:\n  - sources: [{model: GOOD, layer_range: "
                                     "[0, 1]}, {model: OTHER, layer_range: [0, 1]}]\n", "exactly one source"),
        config("slices-range-reversed", "merge_method: passthrough\nslices:\n  - sources: [{model: GOOD, "
                                        "layer_range: [2, 1]}]\n", "layer_range"),
        config("slices-with-models", "merge_method: passthrough\n" + two, "slices"),
        config("gradient-empty", "merge_method: linear\nmodels:\n  - {model: GOOD, parameters: {weight: []}}\n"
                                 "  - {model: OTHER, parameters: {weight: 1}}\n", "at least one value"),
        config("gradient-of-text", "merge_method: linear\nmodels:\n  - {model: GOOD, parameters: {weight: [a, b]}}\n"
                                   "  - {model: OTHER, parameters: {weight: 1}}\n", "number"),
        config("condition-unknown-key", "merge_method: linear\nmodels:\n  - {model: GOOD, parameters: {weight: "
                                        "[{filter: mlp, valu: 2}]}}\n  - {model: OTHER, parameters: {weight: 1}}\n",
               "condition"),
        config("filter-matches-nothing-no-default", "merge_method: linear\nmodels:\n  - {model: GOOD, parameters: "
                                                    "{weight: [{filter: nowhere, value: 2}]}}\n  - {model: OTHER, "
                                                    "parameters: {weight: 1}}\n", "has no weight for tensor"),
        config("method-int", "merge_method: 5\n" + two, "merge_method"),
        config("weights-zero-sum", "models:\n  - {model: GOOD, parameters: {weight: 1}}\n"
                                   "  - {model: OTHER, parameters: {weight: -1}}\n", "sum|zero"),
        config("weights-exponent-form", "models:\n  - {model: GOOD, parameters: {weight: 1e-3}}\n"
                                        "  - {model: OTHER, parameters: {weight: 1E-3}}\n", rc=0,
               expect=mean_of(GOOD, OTHER)),  # YAML 1.1 would read a string; mergekit's pydantic a number
        config("weights-sum-overflows", "models:\n  - {model: GOOD, parameters: {weight: 1e308}}\n"
                                        "  - {model: OTHER, parameters: {weight: 1e308}}\n", "range"),
        config("weight-nan", "models:\n  - {model: GOOD, parameters: {weight: .nan}}\n  - {model: OTHER}\n",
               "finite"),
        config("weight-inf", "models:\n  - {model: GOOD, parameters: {weight: .inf}}\n  - {model: OTHER}\n",
               "finite"),
        config("weight-overflow", "models:\n  - {model: GOOD, parameters: {weight: 1e400}}\n  - {model: OTHER}\n",
               "finite|number"),
        config("weight-string", "models:\n  - {model: GOOD, parameters: {weight: heavy}}\n  - {model: OTHER}\n",
               "weight"),
        config("weight-bool", "models:\n  - {model: GOOD, parameters: {weight: true}}\n  - {model: OTHER}\n",
               "weight"),
        config("density-above-one", "merge_method: ties\nbase_model: GOOD\n" + two + "parameters: {density: 1.5}\n",
               "density"),
        config("density-negative", "merge_method: ties\nbase_model: GOOD\n" + two + "parameters: {density: -0.1}\n",
               "density"),
        config("t-outside", "merge_method: slerp\nbase_model: GOOD\n" + two + "parameters: {t: 2}\n", "t"),
        config("t-nan", "merge_method: slerp\nbase_model: GOOD\n" + two + "parameters: {t: .nan}\n", "finite|t"),
        config("seed-huge", "merge_method: dare\nbase_model: GOOD\n" + two + "parameters: {seed: 100000000000000000000"
                                                                              "0000}\n", "seed"),
        config("seed-negative", "merge_method: dare\nbase_model: GOOD\n" + two + "parameters: {seed: -5}\n", "seed"),
        config("dtype-unknown", two + "dtype: float8\n", "dtype"),
        config("dtype-int", two + "dtype: 16\n", "dtype"),
        config("parameters-list", two + "parameters: [1, 2]\n", "parameters"),
        config("parameters-string", two + "parameters: dense\n", "parameters"),
        config("base-missing-file", "merge_method: ties\nbase_model: /no/base.safetensors\n" + two, "no such"),
        config("base-int", "merge_method: ties\nbase_model: 3\n" + two, "base_model"),
        config("unknown-top-key", two + "mystery: 1\n", "mystery"),
        config("unknown-parameter", two + "parameters: {lamda: 1}\n", "lamda"),
        config("deep-nesting", "models: " + "[" * 5000 + "]" * 5000 + "\n"),
        config("bad-syntax", "models: [GOOD, OTHER\n"),
        config("tabs", "models:\n\t- GOOD\n"),
        config("binary", "\x00\x01\x02\x03 models"),
        config("duplicate-keys", "models: [{model: GOOD}]\nmodels: [{model: OTHER}]\n", "duplicate|twice"),
        config("out-path-is-input", two + "out_path: GOOD\n", "input|exists", output=False),
        # anchors and merge keys are read as mergekit reads them; the anchor's own key is still unknown
        config("merge-key", "base: &b {model: GOOD}\nmodels: [{<<: *b}, {model: OTHER}]\n", "unknown keys \\['base'\\]"),
        Case("config:missing-file", lambda env: ["--config", str(env.inputs / "nope.yml"), "-o", str(env.out)],
             message="nope.yml"),
        Case("config:is-folder", lambda env: ["--config", str(env.inputs), "-o", str(env.out)]),
        Case("config:fifo", lambda env: (os.mkfifo(env.inputs / "fifo.yml"),
                                         ["--config", str(env.inputs / "fifo.yml"), "-o", str(env.out)])[1],
             message="regular|fifo|pipe"),
        Case("config:dev-zero", lambda env: ["--config", "/dev/zero", "-o", str(env.out)], message="regular|pipe"),
    ]


def cli_cases() -> list[Case]:
    def cli(name: str, args: Callable[[Env], list[str]], message: str | None = None, rc: int = 2, expect=None) -> Case:
        return Case(f"cli:{name}", args, rc, message, expect)

    two = lambda env: [str(env.good), str(env.other)]  # noqa: E731
    out = lambda env: ["-o", str(env.out)]  # noqa: E731
    return [
        cli("unknown-flag", lambda env: [*two(env), *out(env), "--frobnicate"], "unrecognized"),
        cli("weights-count", lambda env: [*two(env), *out(env), "--weights", "1"], "weight"),
        cli("weights-zero-sum", lambda env: [*two(env), *out(env), "--weights", "1", "-1"], "sum|zero"),
        cli("weights-text", lambda env: [*two(env), *out(env), "--weights", "a", "b"], "invalid float"),
        cli("weights-inf", lambda env: [*two(env), *out(env), "--weights", "inf", "1"], "finite"),
        cli("shard-size-zero", lambda env: [*two(env), *out(env), "--max-shard-size", "0"], "size"),
        cli("shard-size-negative", lambda env: [*two(env), *out(env), "--max-shard-size", "-5GB"], "size"),
        cli("shard-size-overflow", lambda env: [*two(env), *out(env), "--max-shard-size", "1e999"], "size"),
        cli("shard-size-text", lambda env: [*two(env), *out(env), "--max-shard-size", "big"], "size"),
        cli("shard-size-unit", lambda env: [*two(env), *out(env), "--max-shard-size", "5parsecs"], "size"),
        cli("dtype-choice", lambda env: [*two(env), *out(env), "--dtype", "int8"], "invalid choice"),
        cli("method-choice", lambda env: [*two(env), *out(env), "--method", "nope"], "invalid choice"),
        cli("align-choice", lambda env: [*two(env), *out(env), "--align", "telepathy"], "invalid choice"),
        cli("density-above-one", lambda env: [*two(env), *out(env), "--method", "ties", "--base", str(env.good),
                                              "--density", "2"], "density"),
        cli("t-nan", lambda env: [*two(env), *out(env), "--method", "slerp", "--t", "nan"], "finite|t"),
        cli("scale-inf", lambda env: [*two(env), *out(env), "--method", "task_arithmetic", "--base", str(env.good),
                                      "--scale", "inf"], "finite"),
        cli("seed-negative", lambda env: [*two(env), *out(env), "--method", "dare", "--base", str(env.good),
                                          "--seed", "-1"], "seed"),
        cli("seed-huge", lambda env: [*two(env), *out(env), "--method", "dare", "--base", str(env.good),
                                      "--seed", str(2**70)], "seed"),
        cli("seed-text", lambda env: [*two(env), *out(env), "--seed", "x"], "invalid int"),
        cli("no-models", lambda env: out(env), "model"),
        cli("one-model", lambda env: [str(env.good), *out(env)], "two|2"),
        cli("no-output", lambda env: two(env), "output|-o"),
        cli("ties-without-base", lambda env: [*two(env), *out(env), "--method", "ties"], "base"),
        cli("base-missing", lambda env: [*two(env), *out(env), "--method", "ties", "--base", "/no/base"], "no such"),
        cli("model-kwargs-not-json", lambda env: [*two(env), *out(env), "--align", "cca", "--model", "fastmerge.zoo:mlp",
                                                  "--model-kwargs", "{oops", "--data", "x.py:y"], "JSON|json"),
        cli("model-missing-module", lambda env: [*two(env), *out(env), "--align", "cca", "--model", "no_such_mod:f",
                                                 "--data", "x.py:y"], "no_such_mod"),
        cli("data-bad-reference", lambda env: [*two(env), *out(env), "--align", "cca", "--model", "fastmerge.zoo:mlp",
                                               "--data", "nothing-here"], "data|nothing-here"),
        cli("output-is-input", lambda env: [*two(env), "-o", str(env.good), "--overwrite"], "input"),
        cli("output-symlink-to-input", lambda env: (os.symlink(env.good, env.root / "link.safetensors"),
                                                    [*two(env), "-o", str(env.root / "link.safetensors"),
                                                     "--overwrite"])[1], "input"),
        cli("output-under-a-file", lambda env: [*two(env), "-o", str(env.good) + "/sub/merged.safetensors"],
            "cannot write|not a folder|directory"),
        cli("output-json", lambda env: [*two(env), "-o", str(env.root / "out" / "model.safetensors.index.json")],
            "json|folder"),
        cli("output-exists", lambda env: (save_file(state(3), str(env.root / "taken.safetensors")),
                                          [*two(env), "-o", str(env.root / "taken.safetensors")])[1], "exists"),
        cli("output-folder-has-model", lambda env: ((env.root / "taken").mkdir(),
                                                    save_file(state(3), str(env.root / "taken" / "model.safetensors")),
                                                    [*two(env), "-o", str(env.root / "taken")])[2], "exists"),
        cli("output-is-folder-named-like-file", lambda env: ((env.root / "x.safetensors").mkdir(),
                                                             [*two(env), "-o", str(env.root / "x.safetensors")])[1],
            "folder|directory|exists"),
        cli("output-deep-new-folders-then-bad-input",
            lambda env: [str(env.good), env.file("bad.safetensors", bytes_file(b"\x00" * 5)),
                         "-o", str(env.root / "a" / "b" / "c" / "m.safetensors")]),
        cli("output-into-input-folder-loads", lambda env: ((env.inputs / "m").mkdir(),
                                                           torch.save(state(1), str(env.inputs / "m" / "model.pt")),
                                                           [str(env.good), str(env.inputs / "m"),
                                                            "-o", str(env.inputs / "m")])[2], "input"),
        cli("output-locked", _locked_output, "another fastmerge run"),
        cli("output-lock-is-symlink", _lock_symlink, "lock"),
        cli("input-dev-zero", lambda env: [str(env.good), "/dev/zero", *out(env)], "regular"),
        cli("input-fifo", lambda env: (os.mkfifo(env.inputs / "f.safetensors"),
                                       [str(env.good), str(env.inputs / "f.safetensors"), *out(env)])[1], "regular"),
        cli("input-symlink-loop", lambda env: (os.symlink(env.inputs / "loop.safetensors",
                                                          env.inputs / "loop.safetensors"),
                                               [str(env.good), str(env.inputs / "loop.safetensors"), *out(env)])[1],
            "no such|loop"),
        cli("input-empty-folder", lambda env: ((env.inputs / "empty").mkdir(),
                                               [str(env.good), str(env.inputs / "empty"), *out(env)])[1], "folder"),
        cli("input-unknown-extension", lambda env: [str(env.good), env.file("m.onnx", st_file(state(1))), *out(env)],
            "format"),
        # odd but valid
        cli("same-input-twice", lambda env: [str(env.good), str(env.good), *out(env)], rc=0,
            expect=mean_of(GOOD, GOOD)),
        cli("newline-in-path", lambda env: [str(env.good), env.file("we\nird.safetensors", st_file(state(1))),
                                            *out(env)], rc=0, expect=mean_of(GOOD, OTHER)),
        cli("stale-lock-of-dead-run", _stale_lock, rc=0, expect=mean_of(GOOD, OTHER)),
        cli("mixed-formats", lambda env: [str(env.good), env.file("m.pt", torch_file(state(1))), *out(env)], rc=0,
            expect=mean_of(GOOD, OTHER)),
    ]


def _locked_output(env: Env) -> list[str]:
    """Another run holds the output's lock (this test process plays it)."""
    env.out.parent.mkdir()
    lock = env.out.parent / f".{env.out.name}.lock"
    lock.write_text("12345")
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    env.held = (fd, lock)
    return [str(env.good), str(env.other), "-o", str(env.out)]


def _lock_symlink(env: Env) -> list[str]:
    env.out.parent.mkdir()
    os.symlink(env.good, env.out.parent / f".{env.out.name}.lock")
    return [str(env.good), str(env.other), "-o", str(env.out)]


def _stale_lock(env: Env) -> list[str]:
    env.out.parent.mkdir()
    (env.out.parent / f".{env.out.name}.lock").write_text("999999999")  # nobody holds it
    env.removable.add(os.path.join("out", f".{env.out.name}.lock"))  # the run takes it over and removes it
    return [str(env.good), str(env.other), "-o", str(env.out)]


def content_cases() -> list[Case]:
    s1 = state(1)
    nan = dict(s1, **{"layers.0.bias": torch.full((8,), float("nan"))})
    inf = dict(s1, **{"layers.0.bias": torch.full((8,), float("inf"))})
    return [
        second("narrow.safetensors", st_file(state(1, hidden=5)), "shape"),
        second("missing-tensor.safetensors", st_file({k: v for k, v in s1.items() if k != "layers.2.bias"}),
               "layers.2.bias|tensor"),
        second("extra-tensor.safetensors", st_file({**s1, "extra": torch.zeros(2)}), "extra|tensor"),
        second("float64.safetensors", st_file({k: v.double() for k, v in s1.items()}), "dtype"),
        second("bf16.safetensors", st_file({k: v.bfloat16() for k, v in s1.items()}), "dtype"),
        second("nan.safetensors", st_file(nan), "NaN|finite"),
        second("inf.safetensors", st_file(inf), "NaN|finite|Inf"),
        second("int-instead-of-float.safetensors", st_file({k: v.long() for k, v in s1.items()}), "dtype"),
        second("transposed.safetensors", st_file({k: v.T.contiguous() if v.dim() == 2 else v for k, v in s1.items()}),
               "shape"),
        second("scalar-instead-of-vector.safetensors", st_file({**s1, "layers.2.bias": torch.zeros(())}), "shape"),
        Case("content:float16-overflow", lambda env: [str(env.good), env.file("huge.safetensors", st_file(
            {k: v * 1e6 for k, v in s1.items()})), "-o", str(env.out), "--dtype", "float16"],
            message="NaN|Inf|finite|overflow"),
        Case("content:sum-overflows", lambda env: [env.file("a.safetensors", st_file({"w": torch.full((4,), 3e38)})),
                                                   env.file("b.safetensors", st_file({"w": torch.full((4,), 3e38)})),
                                                   "-o", str(env.out), "--weights", "1", "1", "--method",
                                                   "task_arithmetic", "--base", env.file(
                                                       "z.safetensors", st_file({"w": torch.zeros(4)}))],
             message="NaN|Inf|finite"),
        # asked for: NaN/Inf merged and written (--allow-nonfinite), except where the method cannot
        Case("content:allow-nonfinite-masks", lambda env: [
            env.file("a.safetensors", st_file({"w": torch.ones(2), "mask": torch.tensor([0.0, -math.inf])})),
            env.file("b.safetensors", st_file({"w": torch.zeros(2), "mask": torch.tensor([0.0, -math.inf])})),
            "-o", str(env.out), "--allow-nonfinite"], rc=0,
            expect=lambda env, out: _close(load_file(str(out)), {"w": torch.full((2,), 0.5),
                                                                 "mask": torch.tensor([0.0, -math.inf])})),
        Case("content:allow-nonfinite-overflow", lambda env: [
            env.file("a.safetensors", st_file({"w": torch.full((4,), 3e38)})),
            env.file("b.safetensors", st_file({"w": torch.full((4,), 3e38)})), "-o", str(env.out),
            "--method", "task_arithmetic", "--base", env.file("z.safetensors", st_file({"w": torch.zeros(4)})),
            "--allow-nonfinite"], rc=0,
            expect=lambda env, out: _close(load_file(str(out)), {"w": torch.full((4,), math.inf)})),
        Case("content:allow-nonfinite-ties-nan", lambda env: [
            env.file("a.safetensors", st_file({"w": torch.tensor([1.0, math.nan, 2.0, 3.0])})),
            env.file("b.safetensors", st_file({"w": torch.ones(4)})), "-o", str(env.out),
            "--method", "ties", "--base", env.file("z.safetensors", st_file({"w": torch.zeros(4)})),
            "--allow-nonfinite"], message="NaN"),
        # odd but valid
        Case("content:bf16-pair", lambda env: [env.file("a.safetensors", st_file({k: v.bfloat16() for k, v in
                                                                                  state(0).items()})),
                                               env.file("b.safetensors", st_file({k: v.bfloat16() for k, v in
                                                                                  s1.items()})),
                                               "-o", str(env.out)], rc=0,
             expect=lambda env, out: _close(load_file(str(out)), {k: ((state(0)[k].bfloat16().double() +
                                                                       s1[k].bfloat16().double()) / 2)
                                                                   for k in s1}, 1e-2)),
        Case("content:scalars-and-empty", lambda env: [
            env.file("a.safetensors", st_file({"s": torch.tensor(2.0), "e": torch.zeros(0, 4)})),
            env.file("b.safetensors", st_file({"s": torch.tensor(4.0), "e": torch.zeros(0, 4)})),
            "-o", str(env.out)], rc=0,
            expect=lambda env, out: _close(load_file(str(out)), {"s": torch.tensor(3.0), "e": torch.zeros(0, 4)})),
        Case("content:odd-names", lambda env: [
            env.file("a.safetensors", st_file({"ü ber.w eight": torch.ones(2), "a/b": torch.ones(1)})),
            env.file("b.safetensors", st_file({"ü ber.w eight": torch.zeros(2), "a/b": torch.zeros(1)})),
            "-o", str(env.out)], rc=0,
            expect=lambda env, out: _close(load_file(str(out)), {"ü ber.w eight": torch.full((2,), 0.5),
                                                                 "a/b": torch.full((1,), 0.5)})),
        Case("content:many-tiny-tensors", lambda env: [
            env.file("a.safetensors", st_file({f"t{i}": torch.full((1,), float(i)) for i in range(2000)})),
            env.file("b.safetensors", st_file({f"t{i}": torch.full((1,), float(-i)) for i in range(2000)})),
            "-o", str(env.out)], rc=0,
            expect=lambda env, out: _close(load_file(str(out)), {f"t{i}": torch.zeros(1) for i in range(2000)})),
        Case("content:int-buffers-equal", lambda env: [
            env.file("a.safetensors", st_file({"w": torch.ones(2), "ids": torch.arange(5)})),
            env.file("b.safetensors", st_file({"w": torch.zeros(2), "ids": torch.arange(5)})),
            "-o", str(env.out)], rc=0,
            expect=lambda env, out: _close(load_file(str(out)), {"w": torch.full((2,), 0.5), "ids": torch.arange(5)})),
    ]


def _hf_pair(env: Env, edit_config: Callable[[dict], object] | None = None, config_text: str | bytes | None = None,
             fifo_config: bool = False) -> list[str]:
    """Two small LLaMA checkpoint folders saved by transformers; the first one's config.json edited
    (or replaced); merged into a folder output (which gets the first one's config)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = env.inputs / f"llama{seed}"
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
        folders.append(str(folder))
    path = env.inputs / "llama0" / "config.json"
    if edit_config is not None:
        data = json.loads(path.read_text())
        edit_config(data)
        path.write_text(json.dumps(data))
    if config_text is not None:
        path.write_bytes(config_text.encode() if isinstance(config_text, str) else config_text)
    if fifo_config:
        path.unlink()
        os.mkfifo(path)
    return [*folders, "-o", str(env.root / "out" / "merged")]


def folder_cases() -> list[Case]:
    def folder(name, message, **kwargs) -> Case:
        return Case(f"folder:{name}", lambda env: _hf_pair(env, **kwargs), 2, message)

    def spec_auto(name, message, **kwargs) -> Case:
        return Case(f"folder:spec-auto-{name}", lambda env: [*_hf_pair(env, **kwargs), "--align", "weight_matching",
                                                              "--spec", "auto"], 2, message)

    return [  # a config.json that cannot be copied fails the merge before its weights are published
        folder("config-deep", "nested", config_text="[" * 100000 + "]" * 100000),
        folder("config-not-json", "config.json", config_text="model_type = llama"),
        folder("config-list", "object", config_text="[1, 2]"),
        folder("config-not-utf8", "utf-8", config_text=b"{\"model_type\": \"\xff\"}"),
        folder("config-fifo", "regular", fifo_config=True),
        spec_auto("config-deep", "nested", config_text="[" * 100000 + "]" * 100000),
        # sizes that do not fit the checkpoint: refused from a model built on the meta device,
        # before memory for a real one (10^6 x 10^6 would not fit) is asked for
        spec_auto("config-other-sizes", "does not describe", edit_config=lambda c: c.update(intermediate_size=96)),
        spec_auto("config-huge", "does not describe|names", edit_config=lambda c: c.update(
            hidden_size=2**20, intermediate_size=2**20, vocab_size=2**20)),
        spec_auto("config-size-text", "not a usable", edit_config=lambda c: c.update(hidden_size="wide")),
        spec_auto("config-size-negative", "not a usable|no model built", edit_config=lambda c: c.update(hidden_size=-32)),
        spec_auto("config-unknown-type", "not a usable", edit_config=lambda c: c.update(model_type="frankenstein")),
    ]


def _close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=tol, atol=tol)


CASES = (header_cases() + torch_cases() + index_cases() + config_cases() + cli_cases() + content_cases()
         + folder_cases())


def test_the_corpus_is_large_and_every_case_is_named_once():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 150


# ---------------------------------------------------------------------------------------- harness
def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: files by checksum and modification time, folders and links by kind."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                seen[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[rel] = ("dir",)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    seen[rel] = ("file", hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
            else:
                seen[rel] = ("special",)
    return seen


def _hang(signum, frame):
    raise TimeoutError("the case hung (60 s)")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path)
    env.held, env.removable = None, set()
    argv = ["merge", *case.build(env), "--quiet"]
    capsys.readouterr()  # what building the inputs printed (transformers' progress bars) is not the merge's
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's exit: still the CLI's one line and code
        rc = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if env.held:
            os.close(env.held[0])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert not (tmp_path / MARKER).exists(), "a payload ran"
    after = snapshot(tmp_path)
    for rel, entry in before.items():  # nothing that was there changed or went
        if rel in env.removable:
            continue
        assert after.get(rel) == entry, f"{rel} was modified or removed"
    new = sorted(set(after) - set(before))
    assert not [n for n in new if ".tmp" in n or n.endswith(".lock")], new
    if case.rc == 2:
        assert rc == 2, (rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastmerge"), err
        if case.message:
            assert re.search(case.message, lines[0]), lines[0]
        assert not new, f"left behind: {new}"
    else:
        assert rc == 0, err
        assert all(n in ("out", os.path.join("out", "merged.safetensors")) for n in new), new
        merged = Checkpoint(str(env.out))
        for name in merged.keys():  # NaN/Inf only where asked for
            t = merged[name]
            if t.dtype.is_floating_point and "--allow-nonfinite" not in argv:
                assert torch.isfinite(t).all(), name
        case.expect(env, env.out)
