"""`cab` command line: list, check, bench, run, report, analyze, export, gpu-check."""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from cab import registry
from cab.executors import EXECUTORS
from cab.executors.ray import RayUnavailable
from cab.patterns import Pattern
from cab.registry import PluginError, UnknownAttention, UnknownHyperparameter
from cab.store import StoreError

DEFAULT_DB = "results/cab.sqlite"
DEFAULT_REPORT = "results/leaderboard"


class UsageError(Exception):
    """A user error with a message to print (exit status 2)."""


def _csv_ints(text: str) -> "list[int]":
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _probe_shape(text: str) -> "tuple[int, ...]":
    """B,H,L,D[,HKV[,LK]] as (batch, heads, kv_heads, lq, lk, head_dim)."""
    values = _csv_ints(text)
    if len(values) not in (4, 5, 6):
        raise argparse.ArgumentTypeError(f"expected B,H,L,D[,HKV[,LK]], got {text!r}")
    batch, heads, length, dim = values[:4]
    kv_heads = values[4] if len(values) > 4 else heads
    if heads % kv_heads:
        raise argparse.ArgumentTypeError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    return batch, heads, kv_heads, length, values[5] if len(values) > 5 else length, dim


def _csv(text: str) -> "list[str]":
    return [v.strip() for v in text.split(",") if v.strip()]


def _hparam(text: str) -> "tuple[str, object]":
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"hyper-parameters are KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _report_plugin_errors(errors: "list[PluginError]") -> None:
    for err in errors:
        print(f"cab: plugin failed to load: {err.source}\n{err.traceback.rstrip()}\n", file=sys.stderr)


def _load(plugins: "list[str]") -> "list[PluginError]":
    """Load built-ins, installed entry points and --plugin specs; print every failure, return those of the
    plugins the user named (an installed entry point that fails is reported but does not fail the command)."""
    errors = registry.discover(plugins)
    _report_plugin_errors(errors)
    return [e for e in errors if not e.source.startswith("entry point")]


def _resolve_names(names: "list[str]", plugins: "list[str]", use_all: bool) -> "list[str]":
    """Attention names to act on; a positional that is a .py file is loaded as a plugin and stands for the
    attentions it registers."""
    before = set(registry.names())
    resolved: list[str] = []
    for name in names:
        if name.endswith(".py") or Path(name).is_file():
            errors = registry.load_plugin(name)
            _report_plugin_errors(errors)
            if errors:
                raise UsageError(f"could not load plugin file {name}")
            added = sorted(set(registry.names()) - before - set(resolved))
            if not added:
                raise UsageError(f"plugin file {name} registered no attention")
            resolved += added
        else:
            registry.get_spec(name)  # UnknownAttention with suggestions
            resolved.append(name)
    if use_all:
        resolved = registry.names()
    if not resolved:
        raise UsageError("name at least one attention (or --all); `cab list` shows them")
    return list(dict.fromkeys(resolved))


# commands ---------------------------------------------------------------------------------------------

def _print_catalog(as_json: bool) -> None:
    """The seed-mechanism coverage catalogue: each id, its implementing attentions or why there are none."""
    from cab.catalog import SECTIONS, catalog_rows

    rows = catalog_rows()
    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    section = None
    for row in rows:
        if row.mechanism.section != section:
            section = row.mechanism.section
            print(f"\n{section}  {SECTIONS[section]}")
        if row.attentions:
            what = f"{', '.join(row.attentions)}  [{' '.join(row.patterns)}]"
        else:
            what = f"{row.status}: {row.reason}" if row.reason else "MISSING"
        print(f"  {row.mechanism.id:<18} {row.mechanism.title[:58]:<58}  {what}")
    print("\n" + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f" of {len(rows)}")


def cmd_list(args: argparse.Namespace) -> int:
    failed = _load(args.plugin)
    if args.catalog:
        _print_catalog(args.json)
        return 1 if failed else 0
    specs = _selected_specs(args)
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 1 if failed else 0
    if not specs:
        print("cab: no registered attention matches the filters", file=sys.stderr)
        return 1
    rows = [("name", "version", "family", "exact", "patterns", "citation")]
    for s in specs:
        pats = " ".join(p.value if p in s.patterns else "--" for p in Pattern)
        rows.append((s.name, f"v{s.version}", s.family, "exact" if s.exact else "approx", pats, s.citation))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return 1 if failed else 0


def _selected_specs(args: argparse.Namespace) -> "list[registry.AttentionSpec]":
    """The registered attentions that pass `cab list`'s filters: a family, patterns all declared, a name
    glob (`*linear*`); an unknown family is a UsageError naming the known ones."""
    specs = registry.all_specs()
    if args.family is not None:
        families = sorted({s.family for s in specs})
        if args.family not in families:
            near = difflib.get_close_matches(args.family, families, n=2, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise UsageError(f"no attention family {args.family!r}{hint} (families: {', '.join(families)})")
        specs = [s for s in specs if s.family == args.family]
    if args.pattern is not None:
        wanted = Pattern.parse_many(args.pattern)
        specs = [s for s in specs if set(wanted) <= set(s.patterns)]
    if args.name is not None:
        specs = [s for s in specs if fnmatch.fnmatchcase(s.name, args.name)]
    return specs


def cmd_check(args: argparse.Namespace) -> int:
    from cab.check import CheckOutcome, ConformanceReport, published_shape, run_conformance, run_probe, verdict_table
    from cab.failures import CellTimeout, outcome_of_exception, time_limit
    from cab.status import Status

    plugin_errors = _load(args.plugin)
    names = _resolve_names(args.names, args.plugin, args.all)
    patterns = Pattern.parse_many(args.pattern)
    hparams = dict(args.hparam or [])
    reports, failed = [], False
    for name in names:
        spec = registry.get_spec(name)
        if hparams:
            registry.check_hparams(spec, hparams)
        for pattern in patterns:
            try:
                with time_limit(args.timeout):
                    report = run_conformance(name, pattern, hparams=hparams, device=args.device, dtype=args.dtype,
                                             seed=args.seed)
                    for batch, heads, kv_heads, lq, lk, dim in args.shape if pattern in spec.patterns else ():
                        if report.status is not Status.OK:
                            break
                        lk = lk if pattern.cross else lq
                        shape = published_shape(batch, heads, kv_heads, lq, lk, dim)
                        report = report.combined(run_probe(name, pattern, shape, hparams=hparams, device=args.device,
                                                           dtype=args.dtype, seed=args.seed))
            except (CellTimeout, SystemExit) as exc:  # the time limit, or a plugin's sys.exit() outside a check
                outcome = outcome_of_exception(exc)
                name_of = "timeout" if isinstance(exc, CellTimeout) else "exit"
                checks = [CheckOutcome(name_of, outcome.status, message=outcome.message)]
                report = ConformanceReport(name, pattern, checks, hparams, args.device, args.dtype)
            reports.append(report)
            # a pattern fails the command unless it passed or is unsupported: declared but unable to run here
            # (package/device missing), or undeclared and refused (one that runs anyway is incorrect)
            if report.status not in (Status.OK, Status.UNSUPPORTED):
                failed = True
    if args.json:
        print(json.dumps([{"attention": r.attention, "pattern": r.pattern.value, "status": r.status.value,
                           "message": r.message, **r.to_metrics()} for r in reports], indent=2))
    else:
        print(verdict_table(reports))
    return 1 if failed or plugin_errors else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cab.bench import bench_table
    from cab.cells import BENCH_MODES, Cell
    from cab.runner import run_cell

    _load(args.plugin)
    names = _resolve_names(args.names, args.plugin, args.all)
    patterns = Pattern.parse_many(args.pattern)
    modes = args.mode or ["fwd"]
    for mode in modes:
        if mode not in BENCH_MODES:
            raise UsageError(f"unknown mode {mode!r}; modes are {', '.join(BENCH_MODES)}")
    hparams = dict(args.hparam or [])
    cells = []
    for name in names:
        if hparams:
            registry.check_hparams(registry.get_spec(name), hparams)
        for pattern in patterns:
            for length in args.lengths:
                for mode in modes:
                    lk = round(length * args.kv_ratio) if pattern.cross else length
                    cells.append(Cell(
                        kind="bench", attention=name, pattern=pattern.value, hparams=hparams, batch=args.batch,
                        heads=args.heads, kv_heads=args.kv_heads or args.heads, lq=length, lk=lk,
                        head_dim=args.head_dim, dtype=args.dtype, device=args.device, mode=mode, seed=args.seed,
                        versions=registry.versions_of(name, hparams),
                        options={"threads": args.threads, "min_run_time_s": args.min_run_time,
                                 "warmup_s": args.warmup, "flops_convention": args.flops_convention,
                                 "memory": not args.no_memory},
                    ))
    results = []
    store = None
    if args.db:
        from cab.store import ResultStore

        store = ResultStore(args.db)
    try:
        for cell in cells:
            result = run_cell(cell, timeout_s=args.timeout)
            results.append(result)
            if store is not None:
                store.put(result)
            if not args.json:
                print(f"  {cell.attention:>18} {cell.pattern} L={cell.lq:<6} {cell.mode:<9} -> {result.status.value}",
                      file=sys.stderr)
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(bench_table(results))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and systemd send first), handled as Ctrl-C is."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def cmd_run(args: argparse.Namespace) -> int:
    """SIGTERM and Ctrl-C stop the run alike: the run is recorded 'interrupted', the command that resumes
    is printed and the executor stops what it started; the exit status is 128 + the signal (143, 130)."""
    from cab.run import run_grid

    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handled else None
    try:
        summary = run_grid(args.config, force=args.force, retry_failed=args.retry_failed, executor=args.executor,
                           address=args.address, workers=args.workers, db=args.db, report_dir=args.out,
                           render=not args.no_report, progress=not args.no_progress,
                           fidelity_budget_s=args.fidelity_budget)
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    finally:
        if handled:
            signal.signal(signal.SIGTERM, previous)
    print(summary)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cab.report import render_report
    from cab.run import check_output_dir

    check_output_dir(Path(args.out))  # before any plugin loads or any measurement runs
    _load(args.plugin)  # so plugin attentions show their declarations and citations
    index = render_report(args.db, args.out, fidelity_budget_s=args.fidelity_budget)
    print(f"leaderboard written to {index}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from cab.analysis import (
        decode_table,
        efficiency_table,
        exponent_table,
        format_decode,
        format_efficiency,
        format_exponents,
    )
    from cab.store import ResultStore
    from cab.tables import typed_rows

    _load(args.plugin)  # plugin attentions' declared exponents
    with ResultStore(args.db, readonly=True) as store:  # read-only: analyze never writes the store
        df = typed_rows(store.dataframe())  # every result's metrics read once, for the three analyses
    metrics = tuple(args.metric or ("time", "memory"))
    lengths = efficiency_table(df, baselines=tuple(args.baseline), metrics=metrics, method=args.method,
                               n_boot=args.bootstrap)
    exponents = exponent_table(df, metrics=metrics, min_length=args.min_length, n_boot=args.bootstrap)
    decoding = decode_table(df)
    if args.json:
        def records(table):
            return json.loads(table.to_json(orient="records")) if not table.empty else []

        print(json.dumps({"efficiency_lengths": records(lengths), "exponents": records(exponents),
                          "decode": records(decoding)}, indent=2))
        return 0
    print(f"Efficiency lengths ({args.method}; the length from which each attention is cheaper than the baseline)\n")
    print(format_efficiency(lengths))
    print("\nComplexity exponents (slope of log cost vs log length)\n")
    print(format_exponents(exponents))
    print("\nDecoding (one incremental step at each context length)\n")
    print(format_decode(decoding))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cab.export import export_results

    path = export_results(args.db, args.format, args.out)
    print(f"results exported to {path}")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """The offline GPU check (cab.gpucheck): exit 0 when every phase ran and the files fit the limits, 1 when
    a cell failed or the files do not fit (the summary says which), 2 for a usage error."""
    import os
    from dataclasses import replace

    from cab import gpucheck

    plan_path = args.plan or gpucheck.default_plan(args.device)
    plan = gpucheck.load_plan(plan_path)
    if args.device:
        plan = replace(plan, device=args.device)
    if args.estimate:
        print(gpucheck.summarize_plan(plan))
        return 0
    t0 = float(os.environ["CAB_GPU_CHECK_T0"]) if os.environ.get("CAB_GPU_CHECK_T0") else None
    run = gpucheck.run_gpu_check(args.outdir, plan, budget_s=args.budget, t0=t0, force=args.force,
                                 render=not args.no_report)
    failed = {s: n for s, n in run.counts.items() if s in ("error", "incorrect", "timeout", "oom")}
    print(f"cab gpu-check: {run.wall_s:.0f} s; " + ", ".join(f"{n} {s}" for s, n in sorted(run.counts.items()))
          + f"; summary: {run.outdir / gpucheck.SUMMARY_NAME}")
    return 1 if failed or not run.files_ok else 0


# parser -------------------------------------------------------------------------------------------------

def _add_plugin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="load attentions from a .py file or an importable module (repeatable); plugins are code "
                        "and run with your rights")


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hparam", action="append", type=_hparam, metavar="KEY=VALUE",
                   help="hyper-parameter passed to every named attention (repeatable; values parsed as JSON)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per attention and pattern (default 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cab", description="Benchmark efficient attention across the four "
                                     "attention patterns (NS, CS, NC, CC).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the registered attentions")
    p.add_argument("--json", action="store_true")
    p.add_argument("--family", default=None, help="only this family (exact, linear, sparse, ...)")
    p.add_argument("--pattern", default=None, help="only attentions declaring all these patterns, e.g. CS,CC")
    p.add_argument("--name", default=None, metavar="GLOB", help="only names matching this glob, e.g. '*linear*'")
    p.add_argument("--catalog", action="store_true",
                   help="the seed mechanisms (M1-M65) and which attention implements each, or why none does")
    _add_plugin(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check", help="run the conformance suite and print a verdict table")
    p.add_argument("names", nargs="*", metavar="NAME", help="attention names, or a plugin .py file")
    p.add_argument("--all", action="store_true", help="check every registered attention")
    p.add_argument("--pattern", default=None, help="comma-separated patterns (default NS,CS,NC,CC)")
    p.add_argument("--shape", action="append", default=[], type=_probe_shape, metavar="B,H,L,D[,HKV[,LK]]",
                   help="also probe this published shape, as a benchmark's gate would (repeatable): batch, "
                        "query heads, query length, head dim, and optionally key/value heads and key length")
    p.add_argument("--json", action="store_true")
    _add_plugin(p)
    _add_shape(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time attentions and measure their memory")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true")
    p.add_argument("--lengths", type=_csv_ints, default=[512, 1024, 2048])
    p.add_argument("--pattern", default="NS")
    p.add_argument("--mode", type=_csv, default=None, help="comma-separated: fwd, fwd_infer, bwd, fwdbwd, decode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kv-ratio", type=float, default=1.0, help="cross patterns: key length = length * ratio")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed samples per cell")
    p.add_argument("--warmup", type=float, default=0.1, help="seconds of warm-up calls before the samples")
    p.add_argument("--flops-convention", choices=["exact", "flash"], default="exact",
                   help="causal pair count: exact L(L+1)/2 or FlashAttention's L^2/2")
    p.add_argument("--no-memory", action="store_true", help="skip the separate memory pass")
    p.add_argument("--db", default=None, help="also write the results into this store")
    p.add_argument("--json", action="store_true")
    _add_plugin(p)
    _add_shape(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("run", help="run a YAML grid into the results store and render the leaderboard")
    p.add_argument("config")
    p.add_argument("--force", action="store_true", help="rerun cells that already have a result")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that ended in error, timeout or oom")
    p.add_argument("--executor", choices=sorted(EXECUTORS), default=None,
                   help="how cells run: local (this process), subprocess (each cell isolated), pool (warm isolated "
                        "workers, several cells at once; timings still run alone), ray (Ray tasks)")
    p.add_argument("--address", default=None,
                   help="with --executor ray: the Ray cluster to join, 'auto' or HOST:PORT (default: a private "
                        "Ray instance on this machine, listening on loopback only)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="with --executor pool: cells run at once (default: the config's, else one per core)")
    p.add_argument("--db", default=None, help=f"results store (default: the config's, else {DEFAULT_DB})")
    p.add_argument("--out", default=None, help=f"leaderboard directory (default: the config's, else {DEFAULT_REPORT})")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fidelity-budget", type=float, default=None, metavar="SECONDS",
                   help="seconds the leaderboard may spend measuring approximation error and numeric deviation "
                        "(in a separate process; 0 leaves them out; default 3)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="render the HTML leaderboard from the results store")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--out", default=DEFAULT_REPORT)
    p.add_argument("--fidelity-budget", type=float, default=6.0, metavar="SECONDS",
                   help="seconds the report may spend measuring approximation error and numeric deviation "
                        "(the one section the store does not hold; 0 leaves it out; default 6)")
    _add_plugin(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze",
                       help="efficiency lengths, complexity exponents and decode costs from the results store")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--json", action="store_true")
    p.add_argument("--method", choices=["robust", "cab"], default="robust",
                   help="robust: crossing of per-length medians with a bootstrap interval; cab: CAB's script "
                        "(quadratic vs line, the time line without the shortest length; docs/reproductions.md)")
    p.add_argument("--baseline", type=_csv, default=["sdpa", "vanilla"],
                   help="comma-separated exact baselines (default sdpa,vanilla)")
    p.add_argument("--metric", type=_csv, default=None, help="time, memory or both (default)")
    p.add_argument("--min-length", type=int, default=None, help="fit exponents only from this length on")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    _add_plugin(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("gpu-check", help="the offline GPU check within a time budget: environment, gate, Triton "
                       "kernels, a timed panel; store, leaderboard and summary.md into OUTDIR")
    p.add_argument("outdir", metavar="OUTDIR", help="folder for the store, the leaderboard and summary.md (empty)")
    p.add_argument("--device", default=None,
                   help="cuda (default: configs/gpu-check.yaml) or cpu (the tiny rehearsal: "
                        "configs/gpu-check-cpu.yaml)")
    p.add_argument("--plan", default=None, help="another plan file (YAML, as configs/gpu-check.yaml)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="total seconds (default: the plan's)")
    p.add_argument("--force", action="store_true", help="empty a non-empty OUTDIR first")
    p.add_argument("--estimate", action="store_true", help="print the plan's cells and estimated seconds and exit")
    p.add_argument("--no-report", action="store_true", help="leave out the leaderboard")
    p.set_defaults(func=cmd_gpu_check)

    p = sub.add_parser("export", help="write the results table as CSV, JSON or Parquet")
    p.add_argument("--format", required=True, choices=["csv", "json", "parquet"])
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--out", default=None, help="output file (default: next to the store)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point of the `cab` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, UnknownAttention, UnknownHyperparameter, ValueError, FileNotFoundError, StoreError,
            RayUnavailable) as exc:
        print(f"cab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file cab could not read or write: one line naming it, never a traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"cab: error: cannot access{where}: {exc.strerror or exc}; check the path, its permissions and the "
              "free disk space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
