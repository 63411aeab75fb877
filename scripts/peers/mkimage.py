#!/usr/bin/env python3
"""Write a reproducible raw image for the bench scripts.

    mkimage.py PATH MIB SEED KIND [first-random]

KIND mixed: 64 KiB blocks, each zeros, text-like or pseudo-random with
probability 1/3 (zeros written out, like a dump of a block device).
KIND dense: no zero blocks; text-like or pseudo-random with probability 1/2
(so every block of a scan is really hashed).
With first-random, block 0 is always pseudo-random (bench-serve-pit.sh: the
timed first read must fetch a chunk).
Prints the block counts.
"""
import os
import random
import sys

path, mib, seed, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
first_random = sys.argv[5:] == ["first-random"]
if sys.argv[5:] and not first_random:
    sys.exit(f"unknown option {sys.argv[5]!r} (first-random)")
if kind not in ("mixed", "dense"):
    sys.exit(f"unknown KIND {kind!r} (mixed or dense)")
rng = random.Random(seed)
block = 64 << 10
# Text-like blocks are 64 KiB windows into an 8 MiB pool of log-ish lines from a
# small vocabulary (zstd -1 keeps about a quarter of them).
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
         for _ in range(512)]
lines, size, n = [], 0, 0
while size < 8 << 20:
    line = b"%010d %s\n" % (n, b" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
    lines.append(line)
    size += len(line)
    n += 1
pool = b"".join(lines)
zeros = bytes(block)
counts = {"zero": 0, "text": 0, "random": 0}
with open(path, "wb") as f:
    for i in range(mib * (1 << 20) // block):
        if i == 0 and first_random:
            r = 2
        else:
            r = rng.randrange(3) if kind == "mixed" else 1 + rng.randrange(2)
        if r == 0:
            counts["zero"] += 1
            f.write(zeros)
        elif r == 1:
            counts["text"] += 1
            start = rng.randrange(len(pool) - block)
            f.write(pool[start:start + block])
        else:
            counts["random"] += 1
            f.write(b"\x01" + rng.randbytes(block - 1))  # never all zeros
    f.flush()
    os.fsync(f.fileno())
print(f"{kind}: {counts['zero']} zero, {counts['text']} text-like, {counts['random']} random blocks")
