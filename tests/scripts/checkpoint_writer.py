"""Save large checkpoints in a loop until killed; tests/test_checkpoint.py SIGKILLs it mid-write.

    python tests/scripts/checkpoint_writer.py RUN_DIR

Prints "saved <step>" after each complete save. Every checkpoint's tensor is filled with its step number,
so the test can tell which save a loaded file came from.
"""
from __future__ import annotations

import sys

import torch

from glow_dist.checkpoint import save_checkpoint

NUMEL = 50_000_000   # 200 MB of float32: a write takes long enough to be killed in the middle of it


def main(run_dir: str) -> None:
    big = torch.empty(NUMEL)
    step = 0
    while True:
        step += 1
        big.fill_(float(step))
        save_checkpoint({"step": step, "big": big}, run_dir, step, keep=2)
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
