"""Permutations by activation matching: a linear assignment on the cross-correlation with the
reference model's units (the base step of every activation method, alone here)."""

from .base import AlignmentMethod, register

register(AlignmentMethod(name="permute", label="permute"))
