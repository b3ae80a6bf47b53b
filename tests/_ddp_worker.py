"""Run under ``torchrun`` by ``tests/test_train.py``: ``ivit qat`` through ``run_qat``, then every rank
writes its final weights and buffers to ``<dump>/rank<R>.safetensors``.

Usage: ``torchrun --nproc_per_node 2 tests/_ddp_worker.py DUMP_DIR qat MODEL --data ... --out ...``
"""

from __future__ import annotations

import os
import sys

from safetensors.torch import save_file

from ivit.cli import build_parser
from ivit.train_cli import _check, run_qat


def main() -> None:
    dump = sys.argv[1]
    args = build_parser().parse_args(sys.argv[2:])
    _check(args)
    res = run_qat(args)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().cpu().contiguous() for k, v in res.model.state_dict().items()}
    save_file(state, os.path.join(dump, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
