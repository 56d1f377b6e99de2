"""What the autograder checks, exercise by exercise, and for how many points.

Each check is a function of the student's file (a Sandbox: its functions run in the student's
process, sandbox.py) that returns quietly or raises Failure with a hint: the tensor, the shapes,
the error and the property that failed, never the fix. The checks compare the student's code
with things it cannot influence:

- finite differences in float64 of lora_np's reference forward (the student's backward gets the
  reference forward's cache, whose layout the docstring fixes, so a bug in E1 costs points in E1
  and nowhere else);
- lora_np's reference functions, on shapes hypothesis draws (square and non-square, r = 1,
  dropout on and off, float32 and float64), derandomized so every run grades alike;
- the invariants of LoRA: B = 0 is the base model exactly, unmerge∘merge is the identity to
  round-off, a frozen factor's gradient is never formed (the call's peak memory, measured in the
  student's process).

The points of an exercise are split over its checks; CHECKS lists them in order.
"""

# Importing the two modules registers their checks, E1 to E7 in order.
from ..course import checks_layers, checks_model  # noqa: E402, F401
from .checking import CHECKS  # noqa: E402, F401
