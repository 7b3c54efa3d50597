"""Fake (meta) kernels and autograd formulas of the compiled ops.

Imported by fastmerge.ops once the library has loaded (fastmerge._ext.after_load): the fakes let torch.compile and
torch.library.opcheck reason about shapes without running the kernels; the autograd formula makes
``combine`` differentiable for NP Merge.
"""

from __future__ import annotations

import torch

from .transform import transformed_size


@torch.library.register_fake("fastmerge::cov_update_")
def _cov_update_fake(count, mean, m2, features, pair_left, pair_right):
    return None


@torch.library.register_fake("fastmerge::transform_axes")
def _transform_axes_fake(tensors, transforms, tensor_index, axis):
    shapes = [list(t.shape) for t in tensors]
    for transform, t, a in zip(transforms, tensor_index, axis):
        a = a % len(shapes[t])
        shapes[t][a] = transformed_size(transform, shapes[t][a])
    return [t.new_empty(shape) for t, shape in zip(tensors, shapes)]


@torch.library.register_fake("fastmerge::combine")
def _combine_fake(tensors, coefficients, weights, num_models):
    return [torch.empty_like(tensors[t], memory_format=torch.contiguous_format) for t in range(0, len(tensors), num_models)]


@torch.library.register_fake("fastmerge::combine_out")
def _combine_out_fake(tensors, coefficients, weights, num_models, out):
    return None


@torch.library.register_fake("fastmerge::combine_backward")
def _combine_backward_fake(grad_outputs, tensors, coefficients, num_models):
    return [torch.empty_like(c, memory_format=torch.contiguous_format) for c in coefficients]


@torch.library.register_fake("fastmerge::linear_assignment")
def _linear_assignment_fake(cost, maximize=False):
    k = min(cost.shape[-2], cost.shape[-1])
    shape = (*cost.shape[:-2], k)
    return cost.new_empty(shape, dtype=torch.long), cost.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("fastmerge::count_nonfinite")
def _count_nonfinite_fake(tensors):
    return torch.empty(len(tensors), dtype=torch.long)


@torch.library.register_fake("fastmerge::gram")
def _gram_fake(models, base):
    return torch.empty(len(models), len(models), dtype=torch.float64)


@torch.library.register_fake("fastmerge::dare_draws_out")
def _dare_draws_out_fake(start, seed, out):
    return None


@torch.library.register_fake("fastmerge::magprune_keep_out")
def _magprune_keep_out_fake(rows, density, epsilon, seed, keep):
    return None


@torch.library.register_fake("fastmerge::accumulate_float64_")
def _accumulate_float64_fake(total, parts, fresh):
    return None


@torch.library.register_fake("fastmerge::magnitude_signature")
def _magnitude_signature_fake(rows, positions):
    return rows.new_empty(rows.shape[0], len(positions)), rows.new_empty(rows.shape[0], dtype=torch.float64)


@torch.library.register_fake("fastmerge::magnitude_order_statistics")
def _magnitude_order_statistics_fake(rows, positions):
    return rows.new_empty(rows.shape[0], len(positions))



@torch.library.register_fake("fastmerge::abs_delta_kth_largest")
def _abs_delta_kth_largest_fake(models, base, k, sample=65536):
    return torch.empty(len(models), dtype=torch.float32), torch.empty(len(models), dtype=torch.long)


@torch.library.register_fake("fastmerge::ties_merge_out")
def _ties_merge_out_fake(models, base, weights, thresholds, scale, normalize, out):
    return None


@torch.library.register_fake("fastmerge::dare_merge_out")
def _dare_merge_out_fake(models, base, coefficients, seeds, keep_below, out):
    return None


def _combine_setup_context(ctx, inputs, output):
    tensors, coefficients, weights, num_models = inputs
    ctx.num_models = num_models
    ctx.weights = weights
    ctx.save_for_backward(*tensors, *coefficients)
    ctx.num_tensors = len(tensors)


def _combine_backward(ctx, grads):
    saved = ctx.saved_tensors
    tensors, coefficients = list(saved[: ctx.num_tensors]), list(saved[ctx.num_tensors :])
    k = ctx.num_models
    grads = [g if g is not None else torch.zeros_like(tensors[t * k]) for t, g in enumerate(grads)]
    # needs_input_grad mirrors the inputs: one bool per element of each tensor list.
    need_tensors, need_coefficients = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # The returned structure mirrors the inputs too: one entry per tensor-list element (None where
    # no gradient is needed); a list of floats gets None, an empty list gets [].
    grad_tensors = [None] * len(tensors)
    for index, w in enumerate(tensors):
        if need_tensors[index]:
            c = coefficients[index] if coefficients else ctx.weights[index % k]
            grad_tensors[index] = (grads[index // k] * c).reshape(w.shape).to(w.dtype)
    grad_coefficients = [None] * len(coefficients)
    if any(need_coefficients):
        all_grads = torch.ops.fastmerge.combine_backward(grads, tensors, coefficients, k)
        grad_coefficients = [g if need else None for g, need in zip(all_grads, need_coefficients)]
    return grad_tensors, grad_coefficients, ([] if not ctx.weights else None), None


torch.library.register_autograd("fastmerge::combine", _combine_backward, setup_context=_combine_setup_context)


@torch.library.register_fake("fastmerge::sigmoid_merge")
def _sigmoid_merge_fake(a, b, logits):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in a]


@torch.library.register_fake("fastmerge::sigmoid_merge_backward")
def _sigmoid_merge_backward_fake(grad_outputs, a, b, logits):
    return [torch.empty_like(x) for x in logits]


def _sigmoid_merge_setup_context(ctx, inputs, output):
    a, b, logits = inputs
    ctx.num = len(a)
    ctx.save_for_backward(*a, *b, *logits)


def _sigmoid_merge_backward(ctx, grads):
    saved = ctx.saved_tensors
    n = ctx.num
    a, b, logits = list(saved[:n]), list(saved[n : 2 * n]), list(saved[2 * n :])
    grads = [g if g is not None else torch.zeros_like(a[t]) for t, g in enumerate(grads)]
    grad_logits = [None] * n
    if any(ctx.needs_input_grad[2]):
        grad_logits = torch.ops.fastmerge.sigmoid_merge_backward(grads, a, b, logits)
    # the parents are frozen in NP Merge; their gradients are not computed
    return [None] * n, [None] * n, grad_logits


torch.library.register_autograd("fastmerge::sigmoid_merge", _sigmoid_merge_backward,
                                setup_context=_sigmoid_merge_setup_context)
