"""Weight matching's coordinate descent takes shortcuts (a group whose inputs did not change reuses
its last assignment; a sweep that changed nothing reuses its objective): the permutations and the
objective history must be those of the plain descent, visit for visit."""

import numpy as np
import pytest
import torch

import fastmerge.alignment.weight_matching as wm
import fastmerge.zoo as zoo
from fastmerge.ops import linear_assignment
from fastmerge.spec import trace_spec
from fastmerge.spec.structure import nested_groups


def plain_descent(spec, target, state, seed=0, max_iter=100, tol=1e-12):
    """Every group's cost computed at every visit, the objective after every sweep."""
    perms = {k: v.clone() for k, v in wm.signature_perms(spec, target, state).items()}
    nested = nested_groups(spec)
    order = list(spec.groups)
    rng = np.random.default_rng(seed)
    history = [wm.objective(spec, target, state, perms)]
    for _ in range(max_iter):
        changed = False
        for i in rng.permutation(len(order)):
            group = order[i]
            cost, inner = wm._group_cost(spec, group, nested[group.name], target, state, perms)
            new, nested_perms = wm._solve_nested(group, cost, inner) if inner else (linear_assignment(cost, maximize=True)[1], {})
            for name, p in nested_perms.items():
                changed |= not torch.equal(perms[name], p)
                perms[name] = p
            changed |= not torch.equal(perms[group.name], new)
            perms[group.name] = new
        history.append(wm.objective(spec, target, state, perms))
        if not changed or history[-1] - history[-2] <= tol * abs(history[-2]):
            break
    return perms, history


def models(name):
    if name == "gpt2":  # heads with their dims nested, a residual stream through every block
        make, x = (lambda: zoo.gpt2(vocab_size=50, block_size=16, dim=32, depth=2, heads=4)), torch.zeros(1, 8, dtype=torch.long)
    else:
        make, x = (lambda: zoo.mlp(in_features=20, hidden=(24, 24, 24), out_features=5)), torch.zeros(2, 20)
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(1)
    b = make()
    return trace_spec(a, (x,)), a.state_dict(), b.state_dict()


@pytest.mark.parametrize("name", ["gpt2", "mlp"])
def test_the_descent_equals_the_plain_descent_and_skips_unchanged_groups(name, monkeypatch):
    spec, a, b = models(name)
    want_perms, want_history = plain_descent(spec, a, b)
    computed = []
    group_cost = wm._group_cost
    monkeypatch.setattr(wm, "_group_cost", lambda spec, group, *args: computed.append(group.name) or group_cost(spec, group, *args))
    perms, history = wm.match_to(spec, a, b)
    assert history == want_history and len(history) >= 3  # independent models: more than one sweep
    assert all(torch.equal(perms[k], want_perms[k]) for k in want_perms)
    sweeps = len(history) - 1
    assert len(computed) < sweeps * len(spec.groups)  # the confirming sweep reused assignments


def test_weights_that_require_grad_are_matched_like_a_state_dict():
    # a model's parameters (requires_grad) as the states: the same permutations, no autograd error
    spec, _, _ = models("mlp")
    torch.manual_seed(0)
    a = zoo.mlp(in_features=20, hidden=(24, 24, 24), out_features=5)
    torch.manual_seed(1)
    b = zoo.mlp(in_features=20, hidden=(24, 24, 24), out_features=5)
    from_params, _ = wm.weight_matching(spec, [dict(a.named_parameters()), dict(b.named_parameters())])
    from_state, _ = wm.weight_matching(spec, [a.state_dict(), b.state_dict()])
    assert all(torch.equal(from_params[1][k], from_state[1][k]) for k in from_state[1])
