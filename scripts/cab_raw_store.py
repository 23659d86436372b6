"""Put CAB's raw cost curves (tests/data/cab_costs.csv) into a new cab results store, as bench results of
CAB's configuration, so that `cab analyze` computes efficiency lengths from CAB's own measurements:

    .venv/bin/python scripts/cab_raw_store.py results/cab-raw.sqlite
    .venv/bin/cab analyze --db results/cab-raw.sqlite --baseline vanilla --method cab
    .venv/bin/cab analyze --db results/cab-raw.sqlite --baseline vanilla            # cab's robust method

Each (attention, length) becomes one ok bench cell: noncausal self (NS), forward with autograd (`fwd`),
batch 4, 8 heads of 64 (model width 512), float32, cuda; its time is CAB's one value per length (one
sample, in ms) and its memory CAB's peak in MiB, stored in bytes (a unit scale moves no crossing).
The store must not exist yet: these rows describe CAB's machine, not this one, and must not mix with
cab's own measurements (a cell of the same configuration would replace them). docs/reproductions.md
shows the outcome beside CAB's published table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from cab.cells import Cell, Result
from cab.status import Status
from cab.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COSTS = ROOT / "tests" / "data" / "cab_costs.csv"
SOURCE = "Shark-NLP/CAB@0e496969545d5cb7c76b87de56d9d8b7600d0ba4 scripts/efficiency_length/cost.xlsx"
# CAB's efficiency_test.py: embed_dim 512, num_heads 8, inputs (length, batch 4, 512) on CUDA, forward only
CONFIGURATION = dict(kind="bench", pattern="NS", batch=4, heads=8, kv_heads=8, head_dim=64, dtype="float32",
                     device="cuda", mode="fwd")
UNITS = {"time_ms": "time", "memory_mib": "memory"}


def read_costs(path: Path) -> "dict[str, dict[str, dict[int, float]]]":
    """{attention: {"time" | "memory": {length: value}}} from the CSV (lines starting with # are notes)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(line for line in f if line.strip() and not line.startswith("#")))
    header, body = rows[0], rows[1:]
    if header[:2] != ["metric", "attention"] or len(header) < 3:
        raise ValueError(f"{path}: expected a header 'metric,attention,<length>,...', got {header}")
    lengths = [int(h) for h in header[2:]]
    costs: dict = {}
    for row in body:
        if row[0] not in UNITS or len(row) != len(header):
            raise ValueError(f"{path}: bad row {row} (metrics: {', '.join(UNITS)}; one value per length)")
        costs.setdefault(row[1], {})[UNITS[row[0]]] = dict(zip(lengths, (float(v) for v in row[2:])))
    return costs


def results(costs: "dict[str, dict[str, dict[int, float]]]") -> "list[Result]":
    out = []
    for attention, metrics in costs.items():
        time, memory = metrics.get("time", {}), metrics.get("memory", {})
        for length in sorted(set(time) | set(memory)):
            values: dict = {"source": SOURCE}
            if length in time:
                values.update(samples_ms=[time[length]], median_ms=time[length])
            if length in memory:
                values.update(peak_mem_bytes=round(memory[length] * 2 ** 20), mem_status="ok",
                              mem_method="CAB: torch.cuda.memory_stats()['active_bytes.all.peak'] >> 20")
            cell = Cell(attention=attention, lq=length, lk=length, **CONFIGURATION)
            out.append(Result(cell, Status.OK, values, provenance={"source": SOURCE, "imported_by": __file__}))
    return out


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="the results store to create (must not exist)")
    parser.add_argument("--costs", type=Path, default=DEFAULT_COSTS, help=f"default {DEFAULT_COSTS}")
    args = parser.parse_args(argv)
    if args.store.exists():
        print(f"{args.store} exists: give a new file (CAB's curves must not mix with other results)", file=sys.stderr)
        return 2
    args.store.parent.mkdir(parents=True, exist_ok=True)
    rows = results(read_costs(args.costs))
    with ResultStore(args.store) as store:
        for result in rows:
            store.put(result)
    print(f"{len(rows)} bench results of CAB's ({SOURCE}) written to {args.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
