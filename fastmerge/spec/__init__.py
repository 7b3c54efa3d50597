"""Merge specs: which weight axes move together (traced, checked, editable as YAML).

    spec = fastmerge.trace_spec(model, example_inputs)
    fastmerge.check_spec(spec, model, example_inputs)
    fastmerge.spec.save_spec(spec, "model.spec.yaml")
"""

from .check import CheckReport, check_spec
from .trace import trace_spec
from .transforms import Dense, apply_permutations, apply_transforms
from .types import Group, Member, MergeSpec, SpecError, TapPoint
from .yaml_io import SpecBuilder, load_spec, save_spec, spec_from_yaml, spec_to_yaml

__all__ = ["CheckReport", "Dense", "Group", "Member", "MergeSpec", "SpecBuilder", "SpecError", "TapPoint",
           "apply_permutations", "apply_transforms", "check_spec", "load_spec", "save_spec", "spec_from_yaml",
           "spec_to_yaml", "trace_spec"]
