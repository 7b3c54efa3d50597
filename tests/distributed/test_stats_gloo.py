"""Activation statistics under torch.distributed with real gloo processes on localhost: each rank
takes a shard of real data (digits), and every rank ends with the statistics of the union, equal to
one process's on all the data."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmerge import StatsCollector, collect_stats, zoo
from fastmerge.datasets import batches, load_dataset
from fastmerge.spec import trace_spec
from tests.helpers import end_rank


def models_and_spec():
    torch.manual_seed(0)
    models = [zoo.mlp(in_features=64, hidden=(32, 32), out_features=10).eval() for _ in range(2)]
    return models, trace_spec(models[0], (torch.zeros(2, 64),))


def shards(world: int):
    data = batches(load_dataset("digits").x_fit, 64)
    return [data[r::world] for r in range(world)]  # uneven shards on purpose


def _rank_main(rank: int, world: int, folder: str, how: str = "collect_stats") -> None:
    # a bounded timeout: a rank that waits for a missing peer fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        models, spec = models_and_spec()
        if how == "collect_stats":
            stats = collect_stats(models, shards(world)[rank], spec, pairs="full", progress=False)
        else:  # a training loop's own forward passes, watched by the collector, then reduced
            with StatsCollector(models, spec, pairs="full") as collector, torch.no_grad():
                for batch in shards(world)[rank]:
                    for m in models:
                        m(batch)
            stats = collector.stats.all_reduce_()
        torch.save({g: (s.count, s.mean, s.m2) for g, s in stats.states.items()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    end_rank()  # only after the work succeeded: an exception above still fails the rank


@pytest.mark.parametrize("world,how", [(2, "collect_stats"), (3, "collect_stats"), (2, "collector")])
def test_distributed_statistics_equal_one_process_on_the_union(tmp_path, world, how):
    mp.spawn(_rank_main, args=(world, str(tmp_path), how), nprocs=world, join=True)  # raises if a rank fails
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    models, spec = models_and_spec()
    union = [b for shard in shards(world) for b in shard]
    single = collect_stats(models, union, spec, pairs="full", progress=False, distributed=False)
    for group, state in single.states.items():
        count, mean, m2 = results[0][group]
        assert float(count) == float(state.count)
        for got, want in zip(mean, state.mean):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
        for got, want in zip(m2, state.m2):
            assert float((got - want).norm() / want.norm()) < 1e-12
        for other in results[1:]:  # every rank holds the same bits
            assert all(torch.equal(a, b) for a, b in zip(other[group][2], m2))
            assert all(torch.equal(a, b) for a, b in zip(other[group][1], mean))


def test_all_reduce_needs_a_process_group():
    from fastmerge.errors import InvalidArgumentError
    from fastmerge.ops import CovarianceState

    with pytest.raises(InvalidArgumentError):
        CovarianceState([3]).all_reduce_()


def _merge_rank(rank: int, world: int, folder: str, method: str) -> None:
    from fastmerge import merge

    dist.init_process_group("gloo", init_method=f"file://{folder}/store2", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        models, _ = models_and_spec()
        for i, m in enumerate(models):
            m.load_state_dict(torch.load(f"{folder}/model{i}.pt"))
        merged = merge(models, method, data=shards(world)[rank], progress=False)
        torch.save(merged.state_dict(), f"{folder}/merged{rank}.pt")
    finally:
        dist.destroy_process_group()
    end_rank()  # only after the work succeeded: an exception above still fails the rank


@pytest.mark.parametrize("method", ["permute", "cca"])
def test_alignment_is_computed_once_and_every_rank_merges_identically(tmp_path, method):
    """merge() under a process group: statistics from every rank's shard, the alignment computed on
    rank 0 and broadcast; all ranks hold the same merged model, the one a single process computes
    on all the data (real digits models, trained here; these have dead units, where CCA's transform
    must not depend on rounding)."""
    from fastmerge import merge
    from fastmerge.zoo.training import TrainConfig, train

    split = load_dataset("digits")
    models, _ = models_and_spec()
    for i in range(2):
        trained = train(TrainConfig(hidden=32, epochs=8), split, seed=i)
        models[i].load_state_dict(trained.state_dict())
        torch.save(trained.state_dict(), tmp_path / f"model{i}.pt")
    mp.spawn(_merge_rank, args=(2, str(tmp_path), method), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"merged{r}.pt") for r in range(2)]
    single = merge(models, method, data=[b for s in shards(2) for b in s], progress=False, distributed=False)
    for k, v in single.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.allclose(ranks[0][k], v, rtol=1e-5, atol=1e-6), k
