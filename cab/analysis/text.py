"""Plain-text rendering of the analysis tables, as `cab analyze` prints them."""

from __future__ import annotations

import math

import pandas as pd

_MIB = 2 ** 20


def _length(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "<" if value < 0 else ">"
    return f"{value:,.0f}"


def _interval(low, high, lengths: "tuple[int | None, int | None]") -> str:
    """'[a, b]', with an end past the measured range shown as '<shortest' or '>longest' (one value when
    both ends agree, e.g. '<256' when every resample is cheaper from the shortest length on)."""
    def missing(x) -> bool:
        return x is None or (isinstance(x, float) and math.isnan(x))

    def end(x) -> str:
        if math.isinf(x):
            return f"<{lengths[0]:,}" if x < 0 else f">{lengths[1]:,}"
        return f"{x:,.0f}"

    if missing(low) or missing(high):
        return ""
    lo, hi = end(low), end(high)
    return lo if lo == hi and not lo[0].isdigit() else f"[{lo}, {hi}]"


def _configuration(row: pd.Series) -> str:
    cross = "" if row.get("kv_ratio") in (None, 1.0) else f" Lk/Lq={row['kv_ratio']:g}"
    return (f"{row['pattern']} {row['mode']} {row['dtype']} {row['device']} "
            f"B={row['batch']} H={row['heads']} D={row['head_dim']}{cross}")


def _render(headers: "tuple[str, ...]", rows: "list[tuple[str, ...]]") -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _outcome(row: pd.Series) -> str:
    text = {"crosses": "crosses", "always_cheaper": "always cheaper", "never_cheaper": "never cheaper",
            "ends_dearer": "dearer at longest", "no_crossing": "no crossing",
            "too_few_lengths": "too few lengths"}.get(row["outcome"], str(row["outcome"]))
    if row.get("baseline_fails_from") is not None and not pd.isna(row.get("baseline_fails_from")):
        text += f"; baseline {row['baseline_status']} from {int(row['baseline_fails_from']):,}"
    return text


def format_efficiency(table: pd.DataFrame) -> str:
    """Efficiency lengths grouped by configuration: crossing with its 95% interval, first cheaper length."""
    if table.empty:
        return "no efficiency lengths: the store holds no bench results with a baseline to compare against"
    blocks = []
    for config, group in table.groupby(table.apply(_configuration, axis=1), sort=False):
        rows = []
        for _, row in group.iterrows():
            span = (row["min_length"], row["max_length"])
            missing = pd.isna(row["first_cheaper"]) or row["first_cheaper"] is None
            first = "-" if missing else f"{int(row['first_cheaper']):,}"
            rows.append((row["attention"], row["metric"], f"vs {row['baseline']}", _length(row["length"]),
                         _interval(row["low"], row["high"], span), first, _outcome(row)))
        blocks.append(config + "\n" + _render(("attention", "metric", "baseline", "length", "95% interval",
                                                "first cheaper", "outcome"), rows))
    return "\n\n".join(blocks)


def _exponent(value, low, high) -> str:
    if value is None or pd.isna(value):
        return "-"
    if low is None or pd.isna(low):
        return f"{value:.2f}"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def format_exponents(table: pd.DataFrame) -> str:
    """Fitted exponents with their intervals beside the theoretical ones, grouped by configuration."""
    if table.empty:
        return "no exponents: the store holds no bench results"
    blocks = []
    for config, group in table.groupby(table.apply(_configuration, axis=1), sort=False):
        rows = []
        for _, row in group.iterrows():
            theory = "-" if row["theoretical"] is None or pd.isna(row["theoretical"]) else \
                f"{row['theoretical']:g} ({row['theory_source']})"
            span = "-" if row["min_length"] is None or pd.isna(row["min_length"]) else \
                f"{int(row['min_length']):,}-{int(row['max_length']):,}"
            stops = "" if row["fails_from"] is None or pd.isna(row["fails_from"]) else \
                f"{row['fail_status']} from {int(row['fails_from']):,}"
            rows.append((row["attention"], row["metric"], _exponent(row["exponent"], row["low"], row["high"]),
                         theory, span, stops))
        blocks.append(config + "\n" + _render(("attention", "metric", "fitted exponent [95%]", "theoretical",
                                                "lengths", "no result"), rows))
    return "\n\n".join(blocks)


def _bytes(value) -> str:
    if value is None or pd.isna(value):
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def format_decode(table: pd.DataFrame) -> str:
    """Per-token decode latency [p20-p80] and state size by context length, grouped by pattern and shape."""
    if table.empty:
        return "no decode results"
    blocks = []
    keys = ["pattern", "dtype", "device", "batch", "heads", "kv_heads", "head_dim"]
    for key, group in table.groupby(keys, sort=False):
        pattern, dtype, device, batch, heads, kv_heads, dim = key
        kv = f" (KV {kv_heads})" if kv_heads != heads else ""
        rows = [(r["attention"], f"{int(r['context']):,}",
                 f"{r['median_ms']:.3f} [{r['p20_ms']:.3f}-{r['p80_ms']:.3f}]", f"{r['tokens_per_s']:,.0f}",
                 _bytes(r["state_bytes"])) for _, r in group.iterrows()]
        blocks.append(f"{pattern} decode {dtype} {device} B={batch} H={heads}{kv} D={dim}\n" +
                      _render(("attention", "context", "ms per token [p20-p80]", "tokens/s", "state"), rows))
    return "\n\n".join(blocks)
