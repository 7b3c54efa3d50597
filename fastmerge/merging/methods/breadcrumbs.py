"""Model Breadcrumbs (Davari & Belilovsky 2023): each task vector keeps a band of its magnitudes,
the largest `gamma` (outliers) and the smallest dropped to leave `density` of it; then summed
(breadcrumbs) or with TIES' sign consensus (breadcrumbs_ties). mergekit 0.1.5's arithmetic
(methods/gta.py). Which of the entries tied in magnitude at a band edge are kept is fastmerge's
own rule (by position, no sort: ~10x faster); --mergekit-compat takes them in the order of torch's
sort as mergekit does, and then a config merged by both gives the same tensors to the bit."""

import torch

from ...errors import InvalidArgumentError
from .base import SameInitMethod, register, task_weights
from .gta import gta_as_mergekit


def _breadcrumbs(consensus: bool):
    def merge(name, tensors, base, options, out_dtype, out):
        n = len(tensors)
        densities = list(options.densities) if options.densities is not None else [options.density] * n
        if options.gammas is not None and len(options.gammas) != n:
            raise InvalidArgumentError(f"got {len(options.gammas)} gammas for {n} models")
        return gta_as_mergekit(tensors, base, task_weights(options, n), densities, sparsify="band",
                               consensus=consensus, normalize=bool(options.normalize), scale=options.scale,
                               gammas=options.gammas, rescale=bool(options.rescale),
                               compat=options.mergekit_compat).to(out_dtype)
    return merge


def _mergekit_difference(options, dtype) -> str | None:
    if options.mergekit_compat or dtype == torch.float64:  # float64 task vectors are sorted, as mergekit's
        return None
    return ("entries tied in magnitude at the band's edges are kept by position (mergekit: where its sort puts "
            "them; ties are common in bfloat16/float16 task vectors)")


for _name, _consensus in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    register(SameInitMethod(name=_name, merge=_breadcrumbs(_consensus), needs_base=True,
                            mergekit_difference=_mergekit_difference,
                            uses=("weights", "scale", "density", "densities", "normalize", "gammas", "rescale",
                                                  "mergekit_compat")))
