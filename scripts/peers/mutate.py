#!/usr/bin/env python3
"""Overwrite PERCENT % of an image's 64 KiB blocks, chosen at random from SEED,
with fresh pseudo-random bytes (never all zeros), in place; fsyncs.

    mutate.py PATH SEED PERCENT
"""
import os
import random
import sys

path, seed, percent = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
block = 64 << 10
blocks = os.path.getsize(path) // block
rng = random.Random(seed)
chosen = sorted(rng.sample(range(blocks), max(1, int(blocks * percent / 100))))
with open(path, "r+b") as f:
    for b in chosen:
        f.seek(b * block)
        f.write(b"\x02" + rng.randbytes(block - 1))
    f.flush()
    os.fsync(f.fileno())
print(len(chosen))
