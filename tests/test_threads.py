"""Tiny training steps run on one thread, restored after; the rule depends on the model only."""

import torch

from fastmerge import zoo
from fastmerge.threads import is_small_step, single_thread_if


def test_small_dense_models_are_small_and_convolutions_never():
    assert is_small_step(zoo.mlp(in_features=64, hidden=(32, 32), out_features=10), 64)
    assert not is_small_step(zoo.mlp(in_features=784, hidden=(2048, 2048), out_features=10), 256)
    assert not is_small_step(zoo.resnet20(width=1), 1)  # its work grows with the image


def test_threads_are_restored():
    before = torch.get_num_threads()
    with single_thread_if(True):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with single_thread_if(True):
            raise KeyError
    except KeyError:
        pass
    assert torch.get_num_threads() == before
    with single_thread_if(False):
        assert torch.get_num_threads() == before
