"""mergekit's DARE variants: each task vector's entries kept at random with probability `density`
(rescaled to the task vector's L1 norm unless rescale: false), weighted, summed (dare_linear) or
with TIES' sign consensus (dare_ties), scaled by lambda; in the checkpoints' dtype, as mergekit.

The draws are fastmerge's hashed ones (per seed, model and tensor name: reruns are bit-identical),
not torch's generator, so the masks, and the merged model, differ from mergekit's run of the
same config: the same method with other random draws. A config that names them runs only with
--own-masks (fastmerge/cli/merge_config.py). At density 1 nothing is drawn and both tools agree
to the bit."""

from ...errors import InvalidArgumentError
from .base import SameInitMethod, register, task_weights
from .dare import _seed
from .gta import gta_as_mergekit


def _dare(consensus: bool):
    def merge(name, tensors, base, options, out_dtype, out):
        n = len(tensors)
        densities = list(options.densities) if options.densities is not None else [options.density] * n
        if len(densities) != n:
            raise InvalidArgumentError(f"got {len(densities)} densities for {n} models")
        return gta_as_mergekit(tensors, base, task_weights(options, n), densities, sparsify="random",
                               consensus=consensus, normalize=bool(options.normalize), scale=options.scale,
                               rescale=options.rescale is not False,
                               seeds=[_seed(options.seed, k, name) for k in range(n)]).to(out_dtype)
    return merge


for _name, _consensus in (("dare_linear", False), ("dare_ties", True)):
    register(SameInitMethod(name=_name, merge=_dare(_consensus), needs_base=True,
                            uses=("weights", "scale", "density", "densities", "normalize", "rescale", "seed")))
