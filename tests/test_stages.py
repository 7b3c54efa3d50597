"""Where the time goes: stages are recorded only when asked, exclusively (nested time counts once),
and a CLI merge ends with a one-line summary of them."""

import time
from collections import OrderedDict

import torch
from safetensors.torch import save_file

import fastmerge
from fastmerge import zoo
from fastmerge.cli import main
from fastmerge.spec import cache as spec_cache
from fastmerge.stages import record_stages, stage, stage_summary


def test_nested_stages_count_their_time_once():
    with record_stages() as times:
        start = time.perf_counter()
        with stage("outer"):
            time.sleep(0.02)
            with stage("inner"):
                time.sleep(0.03)
            time.sleep(0.01)
        wall = time.perf_counter() - start
    assert list(times) == ["outer", "inner"]
    assert times["inner"] >= 0.03 and times["outer"] >= 0.03
    assert times["outer"] < 0.03 + (wall - 0.03)  # the inner sleep is not counted in the outer stage
    assert abs(sum(times.values()) - wall) < 0.01
    assert stage_summary(times).startswith("time per stage: outer ")


def test_nothing_is_recorded_outside_a_recording():
    with record_stages() as times:
        pass
    with stage("lost"):
        pass
    assert times == {}


def test_a_merge_reports_its_stages_and_traces_an_architecture_once(monkeypatch):
    monkeypatch.setattr(spec_cache, "_specs", OrderedDict())  # no spec from an earlier test
    torch.manual_seed(0)
    models = [zoo.resnet20(width=1).eval() for _ in range(2)]
    data = [torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(b)) for b in range(3)]
    with record_stages() as times:
        fastmerge.merge(models, "cca", data=data, progress=False)
    assert {"checks", "trace", "statistics", "align", "transforms", "combine", "BN reset"} <= set(times)
    assert all(t >= 0 for t in times.values())
    # the same architecture again (new weights): the spec comes from the cache; another width is traced
    others = [zoo.resnet20(width=1).eval() for _ in range(2)]
    with record_stages() as again:
        fastmerge.merge(others, "permute", data=data, progress=False)
    assert "trace" not in again and "statistics" in again
    wider = [zoo.resnet20(width=2).eval() for _ in range(2)]
    with record_stages() as wide:
        fastmerge.merge(wider, "permute", data=data, progress=False)
    assert "trace" in wide
    assert spec_cache.cached_trace_spec(others[0], (data[0],)) is spec_cache.cached_trace_spec(models[0], (data[0],))


def test_a_cli_merge_ends_with_the_stage_summary(tmp_path, capsys):
    a, b = {"w": torch.randn(4, 4)}, {"w": torch.randn(4, 4)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("time per stage: merge ")
