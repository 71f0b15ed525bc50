"""Run on a dom0 (its own python3): write a volume continuously, then verify every block.

``volume_writer.py write DEVICE SECONDS [--blocks N] [--seed S] [--start-pass P]
[--stop-on-error]``
  writes 1 MiB blocks with O_DIRECT round-robin over the first N MiB of DEVICE for SECONDS
  seconds; block i of pass p holds a pattern derived from (seed, i, p) alone. Prints one JSON
  line: writes, errors (with their messages), the longest single write in seconds and when
  it happened, and where it stopped (passes, last). Before that, an ``{"event": "started"}``
  line, and an ``{"event": "error"}`` line the moment the first write fails.
``volume_writer.py random DEVICE --blocks N``
  writes N MiB of random data from the start of DEVICE and prints their sha256.
``volume_writer.py verify DEVICE --blocks N --seed S --passes P --last L``
  reads the blocks back and prints the sha256 of the whole region and the blocks that differ
  from what the writer wrote (blocks 0..L-1 in pass P, the rest in pass P-1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import time

BLOCK = 1 << 20


def pattern(seed: int, index: int, generation: int) -> bytes:
    head = hashlib.sha256(f"{seed}:{index}:{generation}".encode()).digest()
    return (head * (BLOCK // len(head)))[:BLOCK]


def expected(seed: int, blocks: int, passes: int, last: int) -> list[int]:
    """The pass whose pattern each block holds after ``passes`` passes and ``last`` more."""
    return [passes if index < last else passes - 1 for index in range(blocks)]


def write(args: argparse.Namespace) -> dict:
    fd = os.open(args.device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    buffer = mmap.mmap(-1, BLOCK)
    writes, errors, longest, longest_at = 0, [], 0.0, None
    generation, index = args.start_pass, 0
    started = time.monotonic()
    print(json.dumps({"event": "started"}), flush=True)
    try:
        while time.monotonic() - started < args.seconds:
            buffer.seek(0)
            buffer.write(pattern(args.seed, index, generation))
            began = time.monotonic()
            try:
                os.pwrite(fd, buffer, index * BLOCK)
            except OSError as exc:
                errors.append({"at": round(began - started, 2), "block": index,
                               "error": str(exc)})
                if len(errors) == 1:  # the host times this line: clocks differ
                    print(json.dumps({"event": "error", **errors[0]}), flush=True)
                if args.stop_on_error:
                    break
                if len(errors) > 20:
                    break
                time.sleep(0.2)
                continue
            took = time.monotonic() - began
            if took > longest:
                longest, longest_at = took, round(began - started, 2)
            writes += 1
            index += 1
            if index == args.blocks:
                index, generation = 0, generation + 1
    finally:
        os.close(fd)
    return {"writes": writes, "errors": errors, "longest_write": round(longest, 3),
            "longest_at": longest_at, "passes": generation, "last": index,
            "seconds": round(time.monotonic() - started, 2)}


def verify(args: argparse.Namespace) -> dict:
    fd = os.open(args.device, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, BLOCK)
    whole, wanted_whole, wrong = hashlib.sha256(), hashlib.sha256(), []
    try:
        for index, generation in enumerate(expected(args.seed, args.blocks, args.passes,
                                                    args.last)):
            os.preadv(fd, [buffer], index * BLOCK)
            data = bytes(buffer)
            wanted = pattern(args.seed, index, generation) if generation >= 0 else None
            whole.update(data)
            if wanted is not None:
                wanted_whole.update(wanted)
            if wanted is not None and data != wanted:
                wrong.append(index)
    finally:
        os.close(fd)
    return {"sha256": whole.hexdigest(), "expected_sha256": wanted_whole.hexdigest(),
            "wrong_blocks": wrong[:50], "wrong_count": len(wrong)}


def random_fill(args: argparse.Namespace) -> dict:
    """``--blocks`` MiB of fresh random data, written with O_DIRECT; their sha256."""
    fd = os.open(args.device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    buffer = mmap.mmap(-1, BLOCK)
    digest = hashlib.sha256()
    try:
        for index in range(args.blocks):
            data = os.urandom(BLOCK)
            digest.update(data)
            buffer.seek(0)
            buffer.write(data)
            os.pwrite(fd, buffer, index * BLOCK)
    finally:
        os.close(fd)
    return {"sha256": digest.hexdigest(), "mib": args.blocks}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("write", "verify", "random"))
    parser.add_argument("device")
    parser.add_argument("seconds", type=float, nargs="?", default=10.0)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start-pass", type=int, default=0)
    parser.add_argument("--passes", type=int, default=0)
    parser.add_argument("--last", type=int, default=0)
    parser.add_argument("--stop-on-error", action="store_true")
    args = parser.parse_args()
    result = {"write": write, "verify": verify, "random": random_fill}[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
