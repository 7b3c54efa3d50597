"""mergekit's DARE and DELLA variants: each task vector's entries kept at random with probability
`density` (DELLA: from density - epsilon for the smallest magnitudes of a row to density +
epsilon for the largest), rescaled to the task vector's L1 norm unless rescale: false, weighted,
summed (dare_linear, della_linear) or with TIES' sign consensus (dare_ties, della; della also
normalised by default), scaled by lambda; in the checkpoints' dtype, as mergekit.

The draws are fastmerge's hashed ones (per seed, model and tensor name: reruns are bit-identical),
not torch's generator, so the masks, and the merged model, differ from mergekit's run of the
same config: the same method with other random draws. A config that names them runs only with
--own-masks (fastmerge/cli/merge_config.py). At density 1 nothing is drawn and both tools agree
to the bit."""

from ...errors import InvalidArgumentError
from .base import SameInitMethod, register, task_weights
from .dare import mask_seed
from .gta import gta_as_mergekit


def _dare(consensus: bool, sparsify: str, normalize_by_default: bool):
    def merge(name, tensors, base, options, out_dtype, out):
        n = len(tensors)
        densities = list(options.densities) if options.densities is not None else [options.density] * n
        epsilons = list(options.epsilons) if options.epsilons is not None else [0.15] * n  # mergekit's default
        if len(densities) != n or len(epsilons) != n:
            raise InvalidArgumentError(f"got {len(densities)} densities and {len(epsilons)} epsilons for {n} models")
        if sparsify == "della" and not all(0 < d - e and d + e < 1 for d, e in zip(densities, epsilons) if d < 1):
            raise InvalidArgumentError(f"della: density +/- epsilon must stay in (0, 1), got densities {densities} "
                                       f"and epsilons {epsilons}")
        normalize = normalize_by_default if options.normalize is None else options.normalize
        return gta_as_mergekit(tensors, base, task_weights(options, n), densities, sparsify=sparsify,
                               consensus=consensus, normalize=normalize, scale=options.scale,
                               rescale=options.rescale is not False, epsilons=epsilons,
                               seeds=[mask_seed(options.seed, k, name) for k in range(n)]).to(out_dtype)
    return merge


for _name, _consensus, _sparsify, _normalize in (("dare_linear", False, "random", False),
                                                 ("dare_ties", True, "random", False),
                                                 ("della_linear", False, "della", False),
                                                 ("della", True, "della", True)):
    register(SameInitMethod(name=_name, merge=_dare(_consensus, _sparsify, _normalize), needs_base=True,
                            uses=("weights", "scale", "density", "densities", "normalize", "rescale", "seed",
                                  "epsilons")))
