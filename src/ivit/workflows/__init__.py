"""Workflows as library code: float training, PTQ, QAT, evaluation, latency and the demo.

Each is one function taking a frozen dataclass and returning a result dataclass; the CLI only parses its
arguments into these (``ivit.cli``), and the demo and the benchmarks call them too.  Every default lives
in ``recipes``; ``ModelSpec`` names the exact float network (timm name + constructor arguments).
"""

from . import recipes
from .bench import BenchResult, BenchRun, float_twin, run_bench
from .demo import DemoResult, DemoRun, print_report, run_demo
from .evaluate import EvalResult, EvalRun, open_program, run_eval
from .ptq import PTQResult, PTQRun, run_ptq
from .qat import QATResult, QATRun, run_qat
from .spec import ModelSpec, parse_model_args, spec_from_program
from .train import TrainResult, TrainRun, run_train

__all__ = ["recipes", "ModelSpec", "parse_model_args", "spec_from_program", "TrainRun", "TrainResult", "run_train",
           "PTQRun", "PTQResult", "run_ptq", "QATRun", "QATResult", "run_qat", "EvalRun", "EvalResult", "run_eval",
           "open_program", "BenchRun", "BenchResult", "run_bench", "float_twin", "DemoRun", "DemoResult", "run_demo",
           "print_report"]
