"""The fraction of the hardware bound each GPU bench row reached: achieved bytes/s over peak memory bandwidth, or
achieved FLOP/s over peak dense bf16 tensor-core FLOP/s, for every rate a row reports (``*gbs`` in GB/s, ``*tflops``
in TFLOP/s; the measured ``copy_gbs`` is a yardstick, not a result, and is skipped).

Peaks are the vendor's datasheet figures of the row's device (H100 SXM: 3.35 TB/s, 989 TFLOP/s dense bf16). A rate
measured on fp32 inputs is still set against the bf16 peak, the bound that matters for the project's training dtype.
Run by bench/gpu_check.sh over the rows its benchmarks appended to $OUT:

    python bench/bound_fractions.py OUT_DIR [--csv OUT_DIR/bound_fractions.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

# device-name substring -> (peak memory bandwidth GB/s, peak dense bf16 TFLOP/s)
PEAKS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0)}


def peaks_of(device: str) -> tuple[float, float] | None:
    return next((p for name, p in PEAKS.items() if name in device), None)


def fractions(row: dict) -> list[dict]:
    """One entry per rate in the row: (metric, value, bound, fraction)."""
    peaks = peaks_of(str(row.get("device", "")))
    if peaks is None:
        return []
    out = []
    for key, value in row.items():
        if not isinstance(value, (int, float)) or key == "copy_gbs":
            continue
        if key.endswith("gbs"):
            out.append({"metric": key, "value": value, "bound": peaks[0], "fraction": value / peaks[0]})
        elif key.endswith("tflops"):
            out.append({"metric": key, "value": value, "bound": peaks[1], "fraction": value / peaks[1]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the benches appended their *.jsonl rows")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    table = []
    for path in sorted(args.folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            label = " ".join(f"{k}={row[k]}" for k in ("op", "provider", "mode", "step", "dtype", "B", "N", "V", "S",
                                                        "Dh") if k in row)
            table += [{"bench": row.get("bench", path.stem), "device": row.get("device"), "row": label, **f}
                      for f in fractions(row)]
    if not table:
        print("bound_fractions: no GPU rate in the rows (no known GPU in their device names)", file=sys.stderr)
        return 1
    for r in table:
        print(f"{r['bench']:18s} {r['metric']:15s} {r['value']:10.2f} / {r['bound']:7.0f} = {r['fraction']:6.1%}  "
              f"{r['row']}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
