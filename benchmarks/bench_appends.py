"""Cost of one stats.jsonl append as the file grows (issue 10): mpdiff's O_APPEND append against the
previous implementation, which rewrote the whole file atomically for every row.

    python benchmarks/bench_appends.py [--rows 1024,16384,131072] [--repeats 20]

Prints a table of seconds per append; both include the fsync that makes a row durable.
"""

import argparse
import json
import os
import tempfile
import time

from mpdiff.storage.files import append_line, write_bytes

ROW = json.dumps({"nimg": 123456789, "kimg": 123456.789, "step": 60000, "loss": 0.123456789, "lr": 0.00123,
                  "img_per_sec": 1234.5, "cpu_mem_gb": 1.23, "gpu_mem_gb": 0.0, "time": 1764600000.0,
                  "nonfinite_loss_steps": 0, "nonfinite_grad_steps": 0, "nonfinite_grad_values": 0,
                  "consecutive_nonfinite": 0})


def rewrite_append(path, line):
    """The old way: read everything, write everything plus the new line through a temporary + rename."""
    with open(path, "rb") as f:
        old = f.read()
    write_bytes(path, old + line.encode() + b"\n")


def seconds_per_append(append, rows, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stats.jsonl")
        with open(path, "w") as f:
            f.write((ROW + "\n") * rows)
        start = time.perf_counter()
        for _ in range(repeats):
            append(path, ROW)
        return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1024,16384,131072")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{'rows':>8} {'O_APPEND (s)':>14} {'rewrite (s)':>12}")
    for rows in (int(r) for r in args.rows.split(",")):
        new = seconds_per_append(append_line, rows, args.repeats)
        old = seconds_per_append(rewrite_append, rows, args.repeats)
        print(f"{rows:>8} {new:>14.5f} {old:>12.5f}")


if __name__ == "__main__":
    main()
