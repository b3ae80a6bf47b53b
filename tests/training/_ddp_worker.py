"""Run under ``torchrun`` by ``tests/training/test_ddp.py``: an ``ivit qat`` command line parsed by the CLI
(``ivit.cli.parse_run``) and run by ``ivit.run_qat``; then every rank writes its final weights and buffers to
``<dump>/rank<R>.safetensors``.

Usage: ``torchrun --nproc_per_node 2 tests/training/_ddp_worker.py DUMP_DIR qat MODEL --data ... --out ...``
"""

from __future__ import annotations

import os
import sys

from safetensors.torch import save_file

from ivit import run_qat
from ivit.cli import parse_run


def main() -> None:
    dump = sys.argv[1]
    cmd, cfg = parse_run(sys.argv[2:])
    assert cmd == "qat"
    res = run_qat(cfg)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().cpu().contiguous() for k, v in res.qmodel.state_dict().items()}
    save_file(state, os.path.join(dump, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
