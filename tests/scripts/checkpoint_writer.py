"""Save large checkpoints in a loop until killed; tests/test_checkpoint.py SIGKILLs it mid-write.

    python tests/scripts/checkpoint_writer.py RUN_DIR
    python tests/scripts/checkpoint_writer.py RUN_DIR --resave SECONDS

Prints "saved <step>" after each complete save. Every checkpoint's tensor is filled with its step number,
so the test can tell which save a loaded file came from. With --resave: step 1 is saved (filled with 1), then saved
again (filled with 2, keep=1) with that rewrite held SECONDS before its rename (GLOW_DIST_INJECT_SLOW_CHECKPOINT), as
a finished job run again rewrites its last step; "resaving 1" is printed when the rewrite starts.
"""
from __future__ import annotations

import os
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


def resave(run_dir: str, hold: str) -> None:
    big = torch.full((NUMEL // 10,), 1.0)
    save_checkpoint({"step": 1, "big": big}, run_dir, 1, keep=1)
    print("saved 1", flush=True)
    os.environ["GLOW_DIST_INJECT_SLOW_CHECKPOINT"] = hold
    print("resaving 1", flush=True)
    save_checkpoint({"step": 1, "big": big.fill_(2.0)}, run_dir, 1, keep=1)
    print("saved 1 again", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--resave":
        resave(sys.argv[1], sys.argv[3])
    else:
        main(sys.argv[1])
