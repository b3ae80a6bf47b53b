"""C99 lowering of the integer op set: ``generate`` (whole programs), ``LOWERINGS`` (one per op), ``Target``."""

from .generator import DEFAULT_PASSES, CModule, generate, lower_graph, lower_program, plan_arena
from .lowerings import LOWERINGS, Kernel
from .target import MCU, Target

__all__ = ["DEFAULT_PASSES", "CModule", "LOWERINGS", "Kernel", "MCU", "Target", "generate", "lower_graph",
           "lower_program", "plan_arena"]
