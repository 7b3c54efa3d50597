"""After-merge corrections under torch.distributed (real gloo processes): BatchNorm reset and REPAIR
measure on every rank's shard and combine exactly, so every rank holds the model that one process
computes on all the batches."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmerge import merge, zoo
from fastmerge.datasets import load_dataset
from tests.helpers import end_rank

WORLD = 2


def build(kind):
    torch.manual_seed(0)
    if kind == "resnet-reset":  # BatchNorm everywhere: merge() resets the running statistics
        models = [zoo.resnet20(in_channels=1, width=1) for _ in range(2)]
    else:  # no BatchNorm: REPAIR rescales the merged units
        models = [zoo.mlp(in_features=64, hidden=(32, 32), out_features=10) for _ in range(2)]
    return [m.eval() for m in models]


def inputs(kind):
    x = load_dataset("digits").x_fit[:640]
    if kind == "resnet-reset":
        x = x.view(-1, 1, 8, 8)
    # 5 batches: uneven shards (3 and 2 batches) on purpose
    return [x[i : i + 128] for i in range(0, len(x), 128)]


REPAIR = {"resnet-reset": "auto", "mlp-repair": "repair"}


def _rank_main(rank, folder, kind):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        merged = merge(build(kind), "permute", data=inputs(kind)[rank::WORLD], repair_mode=REPAIR[kind], progress=False)
        torch.save(merged.state_dict(), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    end_rank()  # only after the work succeeded: an exception above still fails the rank


@pytest.mark.parametrize("kind", ["resnet-reset", "mlp-repair"])
def test_corrections_after_a_distributed_merge_equal_one_process(tmp_path, kind):
    mp.spawn(_rank_main, args=(str(tmp_path), kind), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = inputs(kind)
    union = [b for r in range(WORLD) for b in data[r::WORLD]]
    single = merge(build(kind), "permute", data=union, repair_mode=REPAIR[kind], progress=False, distributed=False)
    unmerged_corrections = 0
    for k, v in single.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        if v.is_floating_point():
            assert torch.allclose(ranks[0][k], v, rtol=1e-5, atol=1e-6), (k, float((ranks[0][k] - v).abs().max()))
        else:
            assert torch.equal(ranks[0][k], v), k
        unmerged_corrections += "running_mean" in k
    if kind == "resnet-reset":
        assert unmerged_corrections > 10  # the BatchNorm statistics were among the compared tensors
