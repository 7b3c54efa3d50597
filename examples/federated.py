"""Federated-style rounds with fastmerge: clients train from different initialisations on disjoint
shards of real data, a server aligns and merges their models, and the clients continue from the
merged model.

    python examples/federated.py                        # digits, 4 clients, 3 rounds, CCA
    python examples/federated.py --align weight_matching --rounds 5 --dataset mnist5k
    python examples/federated.py --np-merge             # NP Merge on a small server-held set

Each round prints the clients' mean test accuracy, the merge without alignment (plain weight
averaging, what FedAvg does) and the merge after alignment. In the first round the clients start
from different initialisations, so their hidden units are in arbitrary order and plain averaging
fails; alignment recovers a working model. Later rounds start from one merged model, so the
clients stay close and both merges work; alignment still corrects the drift of the units.

The server's data: a few batches of the (unlabelled) fit split for the activation statistics, and
for --np-merge, labelled batches of the validation split (half trains the coefficients, half picks
the step count). Accuracy is always on the held-out test split.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
from torch import nn

import fastmerge
from fastmerge.eval.metrics import accuracy
from fastmerge.datasets import load_dataset
from fastmerge.zoo import mlp


@dataclass
class Config:
    dataset: str = "digits"
    clients: int = 4
    rounds: int = 3
    hidden: int = 64
    epochs: int = 30  # first round; later rounds train `epochs // 3` (fine-tuning from the merge)
    lr: float = 1e-3
    align: str = "cca"  # or weight_matching, permute, zipit
    np_merge: bool = False
    server_batches: int = 4
    seed: int = 0


@dataclass
class Round:
    index: int
    clients: float  # mean test accuracy (%) of the client models
    averaged: float  # test accuracy of the plain average (no alignment)
    aligned: float  # test accuracy of the merge after alignment (and NP Merge with --np-merge)


def train_client(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam on one client's shard; the data order is seeded per client and round."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def server_merge(models: list[nn.Module], config: Config, server_x: torch.Tensor, val) -> nn.Module:
    """Aligns every client onto client 0 on the server's batches and merges (uniformly, or with NP
    Merge's learned coefficients)."""
    batches = [server_x[i : i + 128] for i in range(0, len(server_x), 128)][: config.server_batches]
    if not config.np_merge:
        return fastmerge.merge(models, config.align, data=batches, progress=False)
    x_val, y_val = val
    half = len(x_val) // 2
    train_batches = [(x_val[i : i + 64], y_val[i : i + 64]) for i in range(0, half, 64)]
    pick_batches = [(x_val[half:], y_val[half:])]
    alignment = fastmerge.align(models, config.align, spec=fastmerge.trace_spec(models[0], (batches[0],)),
                                data=batches, progress=False)
    return fastmerge.merge(models, "np_merge", alignment=alignment, data=train_batches, val_data=pick_batches,
                           np_options={"steps": 150, "lr": 3e-2}, progress=False)


def run(config: Config, log=print) -> list[Round]:
    split = load_dataset(config.dataset, seed=config.seed)
    n_in = split.x_fit.shape[1]
    # disjoint client shards of the fit split
    order = torch.randperm(len(split.x_fit), generator=torch.Generator().manual_seed(config.seed))
    shards = [order[k :: config.clients] for k in range(config.clients)]
    models = []
    for k in range(config.clients):  # a different initialisation per client
        torch.manual_seed(1000 * config.seed + k)
        models.append(mlp(in_features=n_in, hidden=(config.hidden, config.hidden), out_features=10))
    rounds = []
    for r in range(config.rounds):
        epochs = config.epochs if r == 0 else max(1, config.epochs // 3)
        for k, (model, idx) in enumerate(zip(models, shards)):
            train_client(model, split.x_fit[idx], split.y_fit[idx], epochs, config.lr, seed=100 * r + k)
        client_acc = sum(accuracy(m, split.x_test, split.y_test) for m in models) / len(models)
        averaged = fastmerge.merge(models, "average", progress=False)
        merged = server_merge(models, config, split.x_fit, (split.x_val, split.y_val))
        result = Round(r + 1, client_acc, accuracy(averaged, split.x_test, split.y_test),
                       accuracy(merged, split.x_test, split.y_test))
        rounds.append(result)
        log(f"round {result.index}: clients {result.clients:.1f}%  average without alignment "
            f"{result.averaged:.1f}%  {config.align}{' + NP Merge' if config.np_merge else ''} "
            f"{result.aligned:.1f}%")
        models = [copy.deepcopy(merged) for _ in models]  # every client continues from the merge
    return rounds


def main(argv: list[str] | None = None) -> None:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "mnist5k"), default=defaults.dataset)
    p.add_argument("--clients", type=int, default=defaults.clients)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--hidden", type=int, default=defaults.hidden)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--align", choices=("cca", "weight_matching", "permute", "zipit"), default=defaults.align)
    p.add_argument("--np-merge", action="store_true", help="learn the merge coefficients on a server-held set")
    p.add_argument("--seed", type=int, default=defaults.seed)
    args = p.parse_args(argv)
    run(Config(dataset=args.dataset, clients=args.clients, rounds=args.rounds, hidden=args.hidden,
               epochs=args.epochs, align=args.align, np_merge=args.np_merge, seed=args.seed))


if __name__ == "__main__":
    main()
