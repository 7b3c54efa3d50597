"""The orthogonal residual alignment under torch.distributed (real gloo processes): every rank
checks the canonical form on its own batches and collects its shard's statistics on the models in
that form; rank 0 aligns, and a rotated copy of a transformer merges back to the model on every
rank, as in one process."""

import datetime
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmerge
import fastmerge.zoo as zoo
from fastmerge.spec import trace_spec
from tests.merge.test_transformer_alignment import _model, _rotated_copy
from tests.helpers import end_rank


def _setup():
    model = _model("llama")
    batches = [zoo.example_inputs("llama", batch=32, generator=torch.Generator().manual_seed(100 + s))
               for s in range(6)]
    spec = trace_spec(model, batches[0])
    return model, _rotated_copy(model, spec), spec, batches


def _rank_main(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model, twin, spec, batches = _setup()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged, alignment = fastmerge.merge([model, twin], "cca", data=batches[rank::world], spec=spec,
                                                return_alignment=True, progress=False)
        with torch.no_grad():
            error = float((merged(*batches[0]) - model(*batches[0])).abs().max())
        torch.save({"error": error, "transform": alignment.diagnostics["stream:embed_tokens"].get("transform"),
                    "canonical": sorted(alignment.canonical)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    end_rank()  # only after the work succeeded: an exception above still fails the rank


def test_rotated_copy_merges_back_under_gloo(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)  # raises if a rank fails
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["canonical"] == ["stream:embed_tokens"]
        assert result["transform"].startswith("orthogonal")
        assert result["error"] <= 1e-4
