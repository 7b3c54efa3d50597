"""NP Merge data-parallel over real gloo processes: the same coefficients as one process on the
whole batches, identical on every rank."""

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmerge import np_merge
from fastmerge.zoo.training import TrainConfig, make_model, train
from fastmerge.datasets import load_dataset
from tests.helpers import end_rank

WORLD = 2


def setup(folder):
    split = load_dataset("digits")
    models = []
    for i in range(2):
        m = make_model(TrainConfig(hidden=32), 64)
        m.load_state_dict(torch.load(f"{folder}/model{i}.pt"))
        models.append(m.eval())
    x, y = split.x_fit[:1024], split.y_fit[:1024]
    train_batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)]
    val = [(split.x_val[:256], split.y_val[:256])]
    return models, train_batches, val


def shard(batches, rank):
    return [(x[rank::WORLD], y[rank::WORLD]) for x, y in batches]


OPTIONS = dict(steps=40, lr=3e-2, eval_every=10, progress=False)


def _rank_main(rank, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        models, train_batches, val = setup(folder)
        result = np_merge(models, shard(train_batches, rank), val_data=shard(val, rank), **OPTIONS)
        torch.save({"coefficients": result.coefficients, "best_step": result.best_step,
                    "state": result.model.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    end_rank()  # only after the work succeeded: an exception above still fails the rank


def test_data_parallel_np_merge_matches_one_process(tmp_path):
    split = load_dataset("digits")
    for i in range(2):  # two real models from different seeds (a short training run)
        torch.save(train(TrainConfig(hidden=32, epochs=8), split, seed=i).state_dict(), tmp_path / f"model{i}.pt")
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    models, train_batches, val = setup(str(tmp_path))
    single = np_merge(models, train_batches, val_data=val, **OPTIONS)
    assert ranks[0]["best_step"] == single.best_step
    for k, c in single.coefficients.items():
        assert torch.allclose(ranks[0]["coefficients"][k], c, atol=1e-4), k
        assert not torch.equal(c, torch.full_like(c, 0.5)), "the coefficients moved"
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k  # every rank holds the same merged model
