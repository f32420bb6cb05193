"""Plans: placements of the model's ops (`model.ops`), named presets and their analytic costs."""

from .plan import DEVICE, ENCLAVE, Placement, Plan, Segment, op_sequence
from .presets import PRESETS, build_plan, register

__all__ = ["DEVICE", "ENCLAVE", "PRESETS", "Placement", "Plan", "Segment", "build_plan", "op_sequence", "register"]
