"""Entry point for the torchrun test (not collected by pytest).

``python -m torch.distributed.run --standalone --nproc-per-node 2 dist_torchrun_main.py OUT``:
every rank joins the group from torchrun's environment through
``fp8train.distributed.init_from_env`` and trains the cases below; rank 0 saves the
results to ``OUT``.
"""

from __future__ import annotations

import sys

import dist_workers
import torch

CASES = [("ddp", "tensorwise", False), ("fsdp2", "tensorwise", True), ("fsdp2", "delayed", True)]
STEPS = 3

if __name__ == "__main__":
    torch.set_num_threads(1)  # bitwise comparison with a single-threaded reference
    import os

    rank = int(os.environ["RANK"])
    result = dist_workers.train_compare(CASES, STEPS)
    if rank == 0:
        torch.save(result, sys.argv[1])
