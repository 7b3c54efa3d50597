"""Weight matching (Git Re-Basin): permutations from the weights alone, no data; MergeMany for
more than two models. The algorithm is fastmerge.alignment.weight_matching."""

from .base import AlignmentMethod, WeightMatchingOptions, register


def _grid(n: int) -> list[dict]:
    # restarts from several group orders; for more models, MergeMany against all-to-one
    return [{"restarts": 5, "merge_many": many} for many in ((False, True) if n > 2 else (False,))]


register(AlignmentMethod(name="weight_matching", label="weight matching", options=WeightMatchingOptions,
                         statistics=None, grid=_grid))
