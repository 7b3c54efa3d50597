"""Reading and writing checkpoint files: safetensors (single, sharded), weights-only torch files."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.errors import CheckpointError
from fastmerge.io import Checkpoint, ShardedWriter, parse_size
from fastmerge.io.reader import release_pages


def sample_state(gen):
    return {
        "emb.weight": torch.randn(50, 8, generator=gen),
        "layer.0.w": torch.randn(16, 8, generator=gen).half(),
        "layer.0.b": torch.randn(16, generator=gen).bfloat16(),
        "layer.1.w": torch.randn(4, 16, generator=gen).double(),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
    }


def write(path, state, **kwargs):
    plan = [(k, v.shape, v.dtype) for k, v in state.items()]
    with ShardedWriter(path, plan, **kwargs) as w:
        for k, v in state.items():
            w.write(k, v)
    return w


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_single_file_round_trip_with_the_safetensors_library(tmp_path, gen):
    state = sample_state(gen)
    write(str(tmp_path / "m.safetensors"), state, metadata={"merge_method": "linear"})
    assert_same(load_file(str(tmp_path / "m.safetensors")), state)  # the reference reader agrees
    ckpt = Checkpoint(str(tmp_path / "m.safetensors"))
    assert_same({k: ckpt[k] for k in ckpt}, state)
    assert ckpt.metadata["merge_method"] == "linear"
    assert ckpt.shape("emb.weight") == (50, 8) and ckpt.dtype("layer.0.b") == torch.bfloat16


def test_tensors_map_the_file_copy_on_write_and_unaligned_ones_are_read(tmp_path, gen):
    state = sample_state(gen)  # "ids" (int64) starts 4 bytes past a multiple of 8 in the file
    path = tmp_path / "m.safetensors"
    write(str(path), state)
    before = path.read_bytes()
    ckpt = Checkpoint(str(path))
    buffer = torch.empty(1 << 12, dtype=torch.uint8)
    ids = ckpt.read("ids", buffer)
    assert torch.equal(ids, state["ids"]) and ids.data_ptr() == buffer.data_ptr()  # read into the buffer
    weight = ckpt.read("emb.weight", buffer)
    assert torch.equal(weight, state["emb.weight"]) and weight.data_ptr() != buffer.data_ptr()  # mapped
    weight += 1.0  # changes the private map, not the file
    del weight
    assert path.read_bytes() == before
    assert torch.equal(ckpt.read("emb.weight"), state["emb.weight"])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads this process's memory from /proc")
def test_released_pages_leave_memory_and_the_tensor_intact(tmp_path, gen):
    """release_pages drops a mapped input's pages from the process (its memory falls by the
    tensor's size) while the tensor keeps its values (read again from the file); tensors not read
    through a map, and views that start elsewhere, are left alone."""
    big = torch.randn(4096, 2048, generator=gen)  # 32 MiB
    path = tmp_path / "m.safetensors"
    write(str(path), {"big": big})
    ckpt = Checkpoint(str(path))
    weight = ckpt.read("big")
    before = _resident_bytes()
    assert release_pages(weight)
    assert before - _resident_bytes() > 24 << 20
    assert torch.equal(weight, big)  # the same bytes, faulted in again
    assert not release_pages(weight[1:])  # a view starting past the tensor's start
    assert not release_pages(big) and torch.equal(big, big.clone())  # ordinary memory: untouched
    unaligned = tmp_path / "u.safetensors"
    write(str(unaligned), sample_state(gen))  # its "ids" are read into the buffer (see above)
    assert not release_pages(Checkpoint(str(unaligned)).read("ids", torch.empty(64, dtype=torch.uint8)))


def test_the_table_of_maps_sheds_dead_entries(tmp_path, gen, monkeypatch):
    from fastmerge.io import reader

    monkeypatch.setattr(reader, "_MAPS", {})
    monkeypatch.setattr(reader, "_MAPS_SWEEP", 8)
    path = tmp_path / "m.safetensors"
    write(str(path), {f"t{i}": torch.randn(64, 64, generator=gen) for i in range(40)})
    ckpt = Checkpoint(str(path))
    for i in range(40):
        ckpt.read(f"t{i}")  # dropped at once: its map dies
    assert len(reader._MAPS) <= 8
    kept = ckpt.read("t0")
    assert release_pages(kept) and torch.equal(kept, ckpt.read("t0"))


def test_writes_start_their_writeback_as_they_go(tmp_path, gen, monkeypatch):
    """Every WRITEBACK_BYTES the written range goes to the kernel (sync_file_range on Linux), the
    ranges follow each other from the start of the file, and the output stays exact."""
    import sys

    from fastmerge.io import writeback
    from fastmerge.io import writer as writer_module

    assert writeback._sync_file_range is not None or not sys.platform.startswith("linux")
    ranges = []

    def record(fd, offset, nbytes):
        ranges.append((offset, nbytes))
        writeback.start_writeback(fd, offset, nbytes)

    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 500)
    monkeypatch.setattr(writer_module, "start_writeback", record)
    state = sample_state(gen)
    write(str(tmp_path / "m.safetensors"), state)
    assert len(ranges) >= 2 and ranges[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    assert all(n >= 500 for _, n in ranges)
    assert_same(load_file(str(tmp_path / "m.safetensors")), state)


def test_sharded_round_trip_and_index(tmp_path, gen):
    state = sample_state(gen)
    writer = write(str(tmp_path / "out"), state, max_shard_bytes=600)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and len(writer.shards) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for shard in set(index["weight_map"].values()):
        part = load_file(str(tmp_path / "out" / shard))
        assert all(index["weight_map"][k] == shard for k in part)
    for source in (tmp_path / "out", tmp_path / "out" / "model.safetensors.index.json"):
        ckpt = Checkpoint(str(source))
        assert_same({k: ckpt[k] for k in ckpt}, state)
    assert not [f for f in files if ".tmp" in f]


def test_overwrite_rules_and_stale_shards(tmp_path, gen):
    state = sample_state(gen)
    write(str(tmp_path / "out"), state, max_shard_bytes=600)
    with pytest.raises(CheckpointError, match="exists already"):
        write(str(tmp_path / "out"), state)
    write(str(tmp_path / "out"), state, overwrite=True)  # now one shard: the old shards must go
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    assert_same(load_file(str(tmp_path / "out" / "model.safetensors")), state)
    with pytest.raises(CheckpointError, match="input"):
        write(str(tmp_path / "out" / "model.safetensors"), state, overwrite=True,
              protected=[str(tmp_path / "out" / "model.safetensors")])


def test_a_failed_write_leaves_nothing(tmp_path, gen):
    state = sample_state(gen)
    plan = [(k, v.shape, v.dtype) for k, v in state.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(str(tmp_path / "out"), plan, max_shard_bytes=600) as w:
            for i, (k, v) in enumerate(state.items()):
                if i == 4:
                    raise RuntimeError("boom")
                w.write(k, v)
    assert not (tmp_path / "out").exists(), "the folder the failed run created is gone too"
    (tmp_path / "out").mkdir()  # a folder that was there before stays, empty
    with pytest.raises(CheckpointError, match="only 1 of"):
        with ShardedWriter(str(tmp_path / "out"), plan) as w:
            w.write("emb.weight", state["emb.weight"])
    assert os.listdir(tmp_path / "out") == []


def test_torch_state_dicts_are_read_weights_only(tmp_path, gen):
    state = {k: v for k, v in sample_state(gen).items()}
    torch.save(state, tmp_path / "m.pt")
    ckpt = Checkpoint(str(tmp_path / "m.pt"))
    assert_same({k: ckpt[k] for k in ckpt}, state)


def test_sharded_torch_folders_are_read_as_older_hugging_face_models_ship_them(tmp_path, gen):
    """pytorch_model.bin.index.json and its .bin shards (Llama-2-era models, mergekit reads them):
    the same tensors, every shard and the index among the files; a tensor in two shards or a
    missing shard is refused, naming the file."""
    state = sample_state(gen)
    names = sorted(state)
    folder = tmp_path / "m"
    folder.mkdir()
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = Checkpoint(str(folder))
    assert_same({k: ckpt[k] for k in ckpt}, state)
    assert [os.path.basename(f) for f in ckpt.files()] == ["pytorch_model-00001-of-00002.bin",
                                                          "pytorch_model-00002-of-00002.bin",
                                                          "pytorch_model.bin.index.json"]
    torch.save({names[0]: state[names[0]]}, folder / "extra.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {**weight_map, "x": "extra.bin"}}))
    with pytest.raises(CheckpointError, match="also in"):
        Checkpoint(str(folder))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    os.remove(folder / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(str(folder))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what a malicious checkpoint does: run code when unpickled
        return (open, (self.path, "w"))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused"):
        Checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_bad_files_give_checkpoint_errors(tmp_path, gen):
    save_file({"w": torch.randn(10, 10, generator=gen)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut.safetensors", "junk.safetensors", "missing.safetensors", "x.onnx"):
        with pytest.raises(CheckpointError):
            Checkpoint(str(tmp_path / name))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(str(tmp_path / "d"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(CheckpointError):
        parse_size("lots")


def _raw_file(path, header, data_size):
    import struct

    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"\0" * data_size)


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "offsets"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "offsets"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "corrupt header entry"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "corrupt header entry"),
    ({"__metadata__": {"k": 3}}, 0, "__metadata__"),
])
def test_untrusted_headers_are_validated(tmp_path, header, data, match):
    _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(str(tmp_path / "bad.safetensors"))
