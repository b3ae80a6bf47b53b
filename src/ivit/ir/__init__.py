"""The integer program IR: the op set, the ``.ivit`` format, validation, passes and tracing."""

from .limits import Limits
from .opset import OPSET, OpDef, get_op, op_names
from .passes import PASSES, apply_passes
from .program import FORMAT_VERSION, Node, Program, load_program, save_program
from .types import ProgramError, TType
from .validate import ProgramInfo, validate

__all__ = ["OPSET", "OpDef", "get_op", "op_names", "PASSES", "apply_passes", "FORMAT_VERSION", "Limits", "Node",
           "Program", "load_program", "save_program", "ProgramError", "TType", "ProgramInfo", "validate"]
