"""Condense an `ncu --page raw --csv` export into one comparison table per metric group.

  python ncu_summary.py RAW.csv [REGEX ...]

Columns: one per profiled kernel launch (short name + duration); rows: the metrics whose names
match any REGEX (default: duration, SM/memory/L2 throughput, the tensor pipes, shared memory,
L2 reduction/atomic traffic, issue activity and the warp stall reasons, largest first per
kernel). Used for the sm90 backward vs cuDNN comparison (sm90_check.py profbwd, issue 12).
"""

from __future__ import annotations

import csv
import re
import sys

DEFAULT = [
    r"^gpu__time_duration\.sum$",
    r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"^gpu__compute_memory_throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"^lts__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
    r"tensor.*pct",
    r"gmma",
    r"^sm__inst_executed_pipe_.*pct",
    r"mem_shared.*(pct|sum$)",
    r"l1tex__data_pipe_lsu_wavefronts_mem_shared",
    r"op_red|op_atom",
    r"^smsp__issue_active\.avg\.pct",
    r"^sm__warps_active\.avg\.pct",
    r"^launch__(block_size|grid_size|registers_per_thread|shared_mem_per_block_dynamic)$",
    r"^smsp__average_warps?_issue_stalled_.*_per_issue_active\.ratio$",
    r"^smsp__average_warp_latency_issue_stalled",
]


def main(path, pats):
    pats = [re.compile(p) for p in (pats or DEFAULT)]
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    # ncu's raw CSV: a header row of metric names, a units row, then one row per launch
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    head, units, data = rows[start], rows[start + 1], rows[start + 2 :]
    name_col = head.index("Kernel Name")
    kernels = []
    for r in data:
        name = r[name_col]
        short = re.sub(r"\(.*", "", name)[:38]
        kernels.append((short, r))
    keep = [i for i, h in enumerate(head) if any(p.search(h) for p in pats)]
    print("| metric | unit | " + " | ".join(k for k, _ in kernels) + " |")
    print("|---" * (2 + len(kernels)) + "|")
    for i in keep:
        vals = [r[i] if i < len(r) else "" for _, r in kernels]
        if not any(v.strip() for v in vals):
            continue
        if "stalled" in head[i]:
            try:
                if max(float(v.replace(",", "")) for v in vals if v.strip()) < 0.05:
                    continue
            except ValueError:
                pass
        print(f"| {head[i]} | {units[i] if i < len(units) else ''} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
