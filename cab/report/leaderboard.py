"""The accuracy side of the leaderboard, from the task results of the store (cab.training.summary): one
board per pattern (NS, CS, NC, CC) with every (task, metric) as mean +- 95% interval over seeds, ranks that
tie within noise, the compositional index and the difference to vanilla, and per task whether it measures
attention at all (exact attention against the negative control, cab.report.informative); the extrapolation
curves; the quality-versus-speed Pareto plot; the cross-pattern rank correlations; recall versus decode state
size; recall versus model width (Zoology's MQAR figure, when a store has recall results at several widths).
Negative controls (family "control") are ranked on the boards but left out of the compositional index, whose
mu and sigma describe the attentions compared, not an attention that mixes nothing.

Typed tables in (cab.tables: the task, bench and decode tables), dataclasses and pandas frames out (the frames
are the CSV / Markdown exports); the figures come from cab.report.plots."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from cab.report.fields import integer, label, mapping, number, slug, status, text
from cab.report.informative import NOT_INFORMATIVE, Informativeness, control_labels, judge, primary_metric
from cab.report.plots import Plot, Series, heatmaps, line_panels, scatter
from cab.report.ranks import pattern_correlations
from cab.report.support import PATTERNS
from cab.stats import summarize
from cab.tables import Tables

# cab.training.summary is imported inside the functions that need it, never here: it loads the task registry
# (cab.tasks, pydantic), and a store without task results must render where those are absent (a GPU image,
# scripts/gpu-check.sh; tests/run/test_gpu_check.py renders one with pydantic made unimportable).

BASELINE = "vanilla"
ARROWS = {1: "↑", -1: "↓"}


@dataclass(frozen=True)
class MetricColumn:
    task: str
    metric: str
    direction: int  # +1 higher is better, -1 lower

    @property
    def title(self) -> str:
        return f"{self.task} · {self.metric} {ARROWS.get(self.direction, '')}".strip()


@dataclass(frozen=True)
class Score:
    """One attention's (task, metric) over seeds. `half` is the 95% interval's half width (None with one
    seed), `rank` 1 + the number of attentions separated from it on the better side (None with one seed),
    `tied` the attentions sharing its rank within noise, `delta` the difference of means to vanilla."""

    mean: "float | None" = None
    half: "float | None" = None
    n: int = 0
    rank: "int | None" = None
    tied: tuple = ()
    best: bool = False
    delta: "float | None" = None

    @property
    def missing(self) -> bool:
        return self.mean is None


@dataclass(frozen=True)
class BoardRow:
    label: str
    attention: str
    scores: tuple
    index: "float | None"
    delta_index: "float | None"
    n_tasks: int
    sparsity: "float | None"
    backend: str
    control: bool = False  # a negative control: ranked, but outside the compositional index
    time_ms: "float | None" = None  # median forward time at the board's cost shape (Leaderboard.cost_shape)
    memory_bytes: "int | None" = None  # peak forward memory at that shape


@dataclass(frozen=True)
class Leaderboard:
    pattern: str
    id: str
    columns: tuple
    rows: tuple
    chance: tuple  # per column: the chance level (mean over the results that recorded one) or None
    reference: tuple  # lines naming the attentions each (task, metric)'s mu and sigma came from
    has_baseline: bool
    verdicts: tuple = ()  # one Informativeness per task on the board, in task order
    cost_shape: str = ""  # the bench shape of the rows' time_ms / memory_bytes ("" = no bench result fits)

    def verdict(self, task: str) -> "Informativeness | None":
        """Whether the board's `task` measures attention (None when it was not judged)."""
        return next((v for v in self.verdicts if v.task == task), None)

    @property
    def uninformative(self) -> tuple:
        return tuple(v for v in self.verdicts if v.state == NOT_INFORMATIVE)


@dataclass(frozen=True)
class Accuracy:
    boards: tuple
    extrapolation: tuple  # (title, Plot, frame id)
    pareto: tuple  # (pattern, Plot, note)
    correlation: "Plot | None"
    correlation_rows: tuple
    recall: "Plot | None"
    recall_note: str
    exports: tuple  # (id, title, DataFrame)
    n_task_results: int
    error: str = ""  # why the accuracy sections could not be built (odd rows), shown instead of them
    recall_width: tuple = ()  # (pattern, Plot, frame id, note): recall accuracy against model width

    @property
    def uninformative(self) -> "list[str]":
        """'task pattern' of every board whose task does not measure attention (see cab.report.informative)."""
        return [f"{v.task} {b.pattern}" for b in self.boards for v in b.uninformative]


def _finite(value) -> "float | None":
    return number(value)


def _attention_of_labels(results: pd.DataFrame) -> "dict[str, str]":
    names = {}
    for row in results.to_dict("records"):
        names.setdefault(label(row), text(row.get("attention")))
    return names


def _bench_extras(bench: pd.DataFrame) -> "dict[tuple[str, str], tuple[float | None, str]]":
    """(label, pattern) -> (mean achieved sparsity over the ok bench rows that record one, backends)."""
    found: dict[tuple[str, str], tuple[list, list]] = {}
    for row in bench.to_dict("records"):
        if status(row.get("status")) != "ok":
            continue
        sparsities, backends = found.setdefault((label(row), text(row.get("pattern"))), ([], []))
        if row.get("achieved_sparsity") is not None:
            sparsities.append(row["achieved_sparsity"])
        if row.get("backend"):
            backends.append(row["backend"])
    return {key: (sum(s) / len(s) if s else None, ", ".join(dict.fromkeys(b)))
            for key, (s, b) in found.items()}


def _chance(tasks: pd.DataFrame) -> "dict[tuple[str, str, str], float]":
    from cab.training.summary import task_labels

    values: dict[tuple[str, str, str], list[float]] = {}
    labels = task_labels(tasks)
    for i, row in zip(tasks.index, tasks.to_dict("records")):
        for metric, value in (row.get("chance") or {}).items():
            if number(value) is not None:
                values.setdefault((labels[i], text(row.get("pattern")), str(metric)), []).append(float(value))
    return {k: sum(v) / len(v) for k, v in values.items()}


def _scores(summary: pd.DataFrame, column: MetricColumn, pattern: str) -> "dict[str, Score]":
    part = summary[(summary["task"] == column.task) & (summary["pattern"] == pattern)
                   & (summary["metric"] == column.metric)]
    means = {r["attention"]: r["mean"] for r in part.to_dict("records")}
    base = means.get(BASELINE)
    rows = part.to_dict("records")
    defined = [r for r in rows if r["n"] >= 2 and _finite(r["ci_low"]) is not None]
    best_rank = min((int(r["rank"]) for r in defined), default=None)
    scores = {}
    for r in rows:
        interval = r["n"] >= 2 and _finite(r["ci_low"]) is not None
        rank = int(r["rank"]) if interval else None
        tied = tuple(sorted(o["attention"] for o in defined if o["attention"] != r["attention"]
                            and int(o["rank"]) == rank)) if interval else ()
        scores[r["attention"]] = Score(
            mean=_finite(r["mean"]), half=(r["ci_high"] - r["ci_low"]) / 2 if interval else None, n=int(r["n"]),
            rank=rank, tied=tied, best=interval and rank == best_rank,
            delta=None if base is None or r["attention"] == BASELINE else r["mean"] - base,
        )
    return scores


def _verdicts(summary: pd.DataFrame, columns: "list[MetricColumn]", pattern: str, names: "dict[str, str]"
              ) -> "tuple[Informativeness, ...]":
    """Per task on the board: exact attention against the negative control on the task's primary metric."""
    verdicts = []
    from cab.training.summary import label_order

    for task in sorted({c.task for c in columns}, key=label_order):
        mine = [c for c in columns if c.task == task]
        metric = primary_metric(task, [c.metric for c in mine])
        direction = next(c.direction for c in mine if c.metric == metric)
        verdicts.append(judge(summary, task, pattern, metric, direction, names))
    return tuple(verdicts)


def board_costs(tasks: pd.DataFrame, bench: pd.DataFrame, pattern: str, gated: "set[tuple[str, str]]"
                ) -> "tuple[str, dict[str, tuple[float | None, int | None]]]":
    """The cost of each attention at the length of `pattern`'s board: its longest task (the largest key
    length, then query length) gives (Lq, Lk); forward bench results of the pattern with that Lk, at that Lq
    when the store has it there, else at Lq = Lk (self-shaped). Returns (shape, label -> (median ms, peak
    bytes)); gated-out and failed cells give nothing."""
    shapes = {(integer(r.get("lq")), integer(r.get("lk"))) for r in tasks.to_dict("records")
              if text(r.get("pattern")) == pattern and status(r.get("status")) == "ok"}
    shapes.discard((None, None))
    if not shapes:
        return "", {}
    lq, lk = max(shapes, key=lambda s: (s[1] or 0, s[0] or 0))
    rows = [r for r in bench.to_dict("records") if text(r.get("pattern")) == pattern
            and text(r.get("mode")) == "fwd" and status(r.get("status")) == "ok"
            and (text(r.get("attention")), pattern) not in gated and integer(r.get("lk")) == lk]
    for query in (lq, lk):
        chosen = [r for r in rows if integer(r.get("lq")) == query]
        if chosen:
            break
    else:
        return "", {}
    costs: dict[str, tuple[float | None, int | None]] = {}
    for r in sorted(chosen, key=lambda r: text(r.get("finished_at"))):  # the latest result of a label wins
        costs[label(r)] = (number(r.get("median_ms")), integer(r.get("peak_mem_bytes")))
    first = chosen[0]
    shape = (f"forward, B={integer(first.get('batch'))} H={integer(first.get('heads'))} "
             f"Lq={query} Lk={lk} D={integer(first.get('head_dim'))} {text(first.get('dtype'))}")
    return shape, costs


def _boards(tables: Tables, long, summary, index, page_of, gated: "set[tuple[str, str]]"
            ) -> "tuple[list[Leaderboard], list]":
    from cab.training.summary import label_order

    extras, chance, names = _bench_extras(tables.bench), _chance(tables.task), _attention_of_labels(tables.results)
    controls = control_labels(names)
    boards, exports = [], []
    table = index.table
    for pattern in PATTERNS:
        mine = long[long["pattern"] == pattern]
        if mine.empty:
            continue
        columns = sorted((MetricColumn(t, m, int(d)) for (t, m), d in
                          mine.groupby(["task", "metric"], sort=True)["direction"].first().items()),
                         key=lambda c: (label_order(c.task), c.metric))
        per_column = [_scores(summary, c, pattern) for c in columns]
        idx = table[table["pattern"] == pattern].set_index("attention")
        labels = sorted(set(mine["attention"]), key=str.casefold)
        cost_shape, costs = board_costs(tables.task, tables.bench, pattern, gated)
        rows = []
        for name in labels:
            has = name in idx.index
            delta = idx.loc[name].get(f"delta_{BASELINE}") if has and f"delta_{BASELINE}" in idx.columns else None
            sparsity, backend = extras.get((name, pattern), (None, ""))
            time_ms, memory_bytes = costs.get(name, (None, None))
            rows.append(BoardRow(
                label=name, attention=names.get(name, name), scores=tuple(s.get(name, Score()) for s in per_column),
                index=_finite(idx.loc[name, "index"]) if has else None, delta_index=_finite(delta),
                n_tasks=int(idx.loc[name, "n_tasks"]) if has else 0, sparsity=sparsity, backend=backend,
                control=name in controls, time_ms=time_ms, memory_bytes=memory_bytes,
            ))
        rows.sort(key=lambda r: (r.index is None, -(r.index or 0.0), r.label.casefold()))
        ref = index.reference[index.reference["pattern"] == pattern]
        reference = tuple(f"{r['task']} · {r['metric']}: mu={r['mu']:.4g}, sigma={r['sigma']:.4g} over "
                          f"{r['n_attentions']} attentions ({r['attentions']})" for r in ref.to_dict("records"))
        board = Leaderboard(pattern=pattern, id=f"board-{pattern}", columns=tuple(columns), rows=tuple(rows),
                            chance=tuple(chance.get((c.task, pattern, c.metric)) for c in columns),
                            reference=reference, has_baseline=BASELINE in labels,
                            verdicts=_verdicts(summary, columns, pattern, names), cost_shape=cost_shape)
        boards.append(board)
        exports.append((board.id, f"{pattern} leaderboard", board_frame(board)))
    verdicts = [v.record() for b in boards for v in b.verdicts]
    if verdicts:
        exports.append(("board-informativeness", "Whether each task board measures attention (exact attention "
                                                 "vs the negative control)", pd.DataFrame(verdicts)))
    return boards, exports


def board_frame(board: Leaderboard) -> pd.DataFrame:
    """The export of a board: per metric its mean, 95% interval half width, seeds and rank (None = missing)."""
    records = []
    for row in board.rows:
        record = {"attention": row.label}
        for column, score in zip(board.columns, row.scores):
            record[f"{column.task}.{column.metric}.mean"] = score.mean
            record[f"{column.task}.{column.metric}.ci95_half"] = score.half
            record[f"{column.task}.{column.metric}.seeds"] = score.n or None
            record[f"{column.task}.{column.metric}.rank"] = score.rank
        record.update({"index": row.index, f"index_delta_{BASELINE}": row.delta_index, "index_tasks": row.n_tasks,
                       "achieved_sparsity": row.sparsity, "backend": row.backend or None})
        if board.cost_shape:
            record.update({"forward_ms": row.time_ms, "forward_peak_bytes": row.memory_bytes,
                           "cost_shape": board.cost_shape})
        records.append(record)
    return pd.DataFrame(records)


def _extrapolation(tasks: pd.DataFrame) -> "tuple[list, list]":
    """Metric versus evaluation length for the task results that store a curve (the score 'extrapolation'),
    one plot per task setting (task_labels) and pattern."""
    from cab.training.summary import task_labels

    labels = task_labels(tasks)
    curves: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = {}
    trained: dict[tuple[str, str], Counter] = {}
    metric_name: dict[tuple[str, str], str] = {}
    for i, row in zip(tasks.index, tasks.to_dict("records")):
        if status(row.get("status")) != "ok":
            continue
        curve = row["scores"].get("extrapolation")
        if not isinstance(curve, list):
            continue
        key = (labels[i], text(row.get("pattern")))
        per_label = curves.setdefault(key, {}).setdefault(label(row), {})
        for point in curve:
            point = mapping(point)
            length = integer(point.get("length"))
            value_key = next((k for k in point if k not in ("length", "status")), None)
            if length is None or value_key is None:
                continue
            metric_name[key] = value_key
            value = number(point.get(value_key))
            per_label.setdefault(length, [])
            if value is not None:
                per_label[length].append(value)
        length = integer(mapping(row.get("task_params")).get("length"))
        if length is not None:
            trained.setdefault(key, Counter())[length] += 1
    plots, exports = [], []
    for (task, pattern), per_label in sorted(curves.items()):
        metric = metric_name.get((task, pattern), "metric")
        train = trained.get((task, pattern), Counter()).most_common(1)
        train_length = train[0][0] if train else None
        series, records = [], []
        lengths = sorted({n for points in per_label.values() for n in points})
        for name in sorted(per_label, key=str.casefold):
            points = per_label[name]
            ys, lows, highs = [], [], []
            record = {"attention": name}
            for n in lengths:
                values = points.get(n, [])
                if values:
                    s = summarize(values)
                    ys.append(s.mean)
                    lows.append(s.ci_low if s.n > 1 else None)
                    highs.append(s.ci_high if s.n > 1 else None)
                    record[f"L={n}"] = s.mean
                else:
                    ys.append(None), lows.append(None), highs.append(None)
                    record[f"L={n}"] = None
            records.append(record)
            series.append(Series(name, tuple(lengths), tuple(ys), tuple(lows), tuple(highs)))
        title = f"{task} ({pattern}): {metric} versus evaluation length"
        plot = line_panels([(title, "evaluation length (tokens, log scale)", f"{metric} (mean over seeds)", series)],
                           loglog=False, logx_base=2, vline=train_length,
                           vline_label=f"training length {train_length}" if train_length else "",
                           alt=f"{metric} of every attention at each evaluation length for {task} ({pattern})",
                           caption=f"{task}, {pattern}: mean over seeds with 95% intervals where there are several "
                                   f"seeds; the dashed line marks the training length"
                                   f"{f' ({train_length})' if train_length else ''}. Missing points: no result.")
        frame_id = f"extrapolation-{slug(task)}-{pattern}"
        plots.append((title, plot, frame_id))
        exports.append((frame_id, title, pd.DataFrame(records)))
    return plots, exports


def _reference_times(bench: pd.DataFrame, gated: "set[tuple[str, str]]") -> "dict[str, tuple[int, dict]]":
    """Per pattern: the forward length timed for the most attentions (longest on a tie) and label -> median ms."""
    out = {}
    for pattern in PATTERNS:
        rows = [r for r in bench.to_dict("records") if text(r.get("pattern")) == pattern
                and text(r.get("mode")) == "fwd" and status(r.get("status")) == "ok"
                and (text(r.get("attention")), pattern) not in gated and r.get("median_ms") is not None]
        if not rows:
            continue
        counts = Counter(integer(r.get("lq")) for r in rows)
        length = max(counts, key=lambda n: (counts[n], n or 0))
        times: dict[str, list[float]] = {}
        for r in rows:
            if integer(r.get("lq")) == length:
                times.setdefault(label(r), []).append(float(r["median_ms"]))
        out[pattern] = (length, {k: sorted(v)[len(v) // 2] for k, v in times.items()})
    return out


def pareto_front(points: "list[tuple[str, float, float]]") -> "list[str]":
    """Names of the points no other point beats on both cost (lower) and quality (higher)."""
    front = []
    for name, cost, quality in points:
        dominated = any((c <= cost and q >= quality) and (c < cost or q > quality) for _, c, q in points)
        if not dominated:
            front.append(name)
    return front


def _pareto(boards: "list[Leaderboard]", times: dict) -> list:
    plots = []
    for board in boards:
        if board.pattern not in times:
            plots.append((board.pattern, None, f"no forward timing for {board.pattern} in this store"))
            continue
        length, per_label = times[board.pattern]
        points = [(r.label, per_label[r.label], r.index) for r in board.rows
                  if r.index is not None and r.label in per_label]
        if not points:
            plots.append((board.pattern, None, "no attention has both a compositional index and a forward time"))
            continue
        front = pareto_front(points)
        plot = scatter([(n, c, q, None, None) for n, c, q in points], frontier=front,
                       xlabel=f"forward time at L={length} (ms, log scale)", ylabel="compositional index (z units)",
                       title=f"{board.pattern}: quality versus speed",
                       alt=f"compositional index versus forward time at length {length} for {board.pattern}",
                       caption=f"{board.pattern}: each attention's compositional index against its median forward "
                               f"time at L={length}; the dashed steps join the Pareto front "
                               f"({', '.join(front)}).")
        missing = sorted({r.label for r in board.rows} - {p[0] for p in points}, key=str.casefold)
        note = f"not plotted (no index or no forward time at L={length}): {', '.join(missing)}" if missing else ""
        plots.append((board.pattern, plot, note))
    return plots


def _correlation(index_table: pd.DataFrame) -> "tuple[Plot | None, list]":
    scores: dict[str, dict[str, float]] = {}
    for r in index_table.to_dict("records"):
        if _finite(r["index"]) is not None:
            scores.setdefault(r["pattern"], {})[r["attention"]] = float(r["index"])
    patterns = [p for p in PATTERNS if p in scores]
    if len(patterns) < 2:
        return None, []
    rows = pattern_correlations(scores, patterns)
    lookup = {(r["pattern_a"], r["pattern_b"]): r for r in rows}
    panels = [(f"{name} (compositional index)", patterns,
               [[lookup[(a, b)][key] for b in patterns] for a in patterns])
              for key, name in (("spearman", "Spearman ρ"), ("kendall", "Kendall τ-b"))]
    plot = heatmaps(panels, alt="rank correlation of the attentions' compositional index between patterns",
                    caption="Rank correlation between patterns of the attentions' compositional index, over the "
                            "attentions ranked in both (n/a: fewer than 3 in common or a constant ranking). High "
                            "values: an attention's standing carries over between patterns; CAB found it often "
                            "does not. The number of attentions behind each value is in the export.")
    return plot, rows


def _recall(tables: Tables, summary: pd.DataFrame) -> "tuple[Plot | None, str, pd.DataFrame | None]":
    from cab.analysis.tables import decode_table

    decode = decode_table(tables.decode)
    setting, target = _recall_setting(tables.task)
    recall = summary[(summary["task"] == setting) & (summary["metric"] == "accuracy")]
    if decode.empty or recall.empty:
        why = "no decode results" if decode.empty else "no recall results"
        return None, ("Recall versus state size needs decode benchmarks and recall task results: "
                      f"this store has {why}."), None
    points, records = [], []
    for r in recall.to_dict("records"):
        mine = decode[(decode["attention"] == r["attention"]) & (decode["pattern"] == r["pattern"])
                      & decode["state_bytes"].notna()]
        if mine.empty:
            continue
        contexts = sorted(int(c) for c in mine["context"])
        context = min(contexts, key=lambda c: (abs(c - target), c)) if target else contexts[-1]
        state = float(mine[mine["context"] == context]["state_bytes"].median())
        interval = r["n"] >= 2 and _finite(r["ci_low"]) is not None
        points.append((f"{r['attention']} ({r['pattern']})", state, float(r["mean"]),
                       r["ci_low"] if interval else None, r["ci_high"] if interval else None))
        records.append({"attention": r["attention"], "pattern": r["pattern"], "recall_accuracy": r["mean"],
                        "ci95_half": (r["ci_high"] - r["ci_low"]) / 2 if interval else None, "seeds": r["n"],
                        "decode_context": context, "state_bytes": state})
    if not points:
        return None, "No attention has both recall results and a decode state size in this store.", None
    plot = scatter(points, xlabel=f"decode state at context {target or 'longest'} (bytes, log scale)",
                   ylabel="recall accuracy (fraction, mean over seeds)", title="Recall versus state size",
                   alt="recall accuracy against the bytes of decode state per attention",
                   caption="Multi-query associative recall accuracy against the bytes of KV cache or recurrent state "
                           "held while decoding, at the decode context closest to the recall task's length "
                           "(the BASED paper's trade-off)."
                           + (f" Recall setting: {setting} (the longest sequences, then the widest model, of the "
                              "store's recall settings)." if setting != RECALL_TASK else ""))
    plotted = {(r["attention"], r["pattern"]) for r in records}
    missing = sorted({f"{a} ({p})" for a, p in zip(recall["attention"], recall["pattern"]) if (a, p) not in plotted},
                     key=str.casefold)
    note = f"Without a decode result in the same pattern (not plotted): {', '.join(missing)}." if missing else ""
    return plot, note, pd.DataFrame(records)


RECALL_TASK = "recall"


def _recall_setting(tasks: pd.DataFrame) -> "tuple[str, int | None]":
    """The recall board (task label, see task_labels) that the state-size view plots, and its length: of a
    sweep's settings the one with the longest sequences, then the widest model (where recall is hardest and
    every mixer has its best chance); plain "recall" when the store holds one setting."""
    from cab.training.summary import task_labels, task_name

    labels = task_labels(tasks)
    settings: dict[str, tuple[int, int]] = {}
    for i, row in zip(tasks.index, tasks.to_dict("records")):
        if task_name(labels[i]) == RECALL_TASK:
            params = mapping(row.get("task_params"))
            settings[labels[i]] = (integer(params.get("length")) or 0, integer(params.get("d_model")) or 0)
    if not settings:
        return RECALL_TASK, None
    setting = max(settings, key=lambda k: (settings[k], k))
    return setting, settings[setting][0] or None


def _recall_point(row: dict) -> "tuple | None":
    """(pattern, (length, pairs, binding), width, label, accuracy or None) of a recall result, None when it
    lacks a width or a length. Accuracy is None for a result that is not ok (drawn as a missing point)."""
    params = mapping(row.get("task_params"))
    width, length = integer(params.get("d_model")), integer(params.get("length"))
    if width is None or length is None:
        return None
    pairs = params.get("pairs")
    pairs = tuple(p for p in (integer(v) for v in pairs) if p is not None) if isinstance(pairs, list) else ()
    value = number(row["scores"].get("accuracy")) if status(row.get("status")) == "ok" else None
    return (text(row.get("pattern")), (length, pairs, text(params.get("binding"))), width, label(row), value)


def _panel_title(key: tuple, bindings: int) -> str:
    length, pairs, binding = key
    title = f"L={length}, {', '.join(map(str, pairs)) or '?'} pairs"
    return f"{title} ({binding})" if bindings > 1 and binding else title


def _recall_width(tasks: pd.DataFrame) -> "tuple[list, list]":
    """Recall accuracy against model width (`d_model`), per pattern with recall results at two widths or more:
    one panel per (sequence length, key-value pairs), one line per attention with 95% intervals over seeds
    (Zoology's Figure 2: attention solves MQAR at every width, other mixers need width that grows with the
    sequence length and the number of pairs)."""
    points: dict[str, list] = {}
    for row in tasks.to_dict("records"):
        if text(row.get("task")) != RECALL_TASK:
            continue
        point = _recall_point(row)
        if point is not None:
            points.setdefault(point[0], []).append(point[1:])
    plots, exports = [], []
    for pattern in PATTERNS:
        mine = points.get(pattern, [])
        widths = sorted({w for _, w, _, _ in mine})
        if len(widths) < 2:
            continue
        keys = sorted({k for k, _, _, _ in mine})
        names = sorted({n for _, _, n, _ in mine}, key=str.casefold)
        values: dict[tuple, list[float]] = {}
        failed: dict[tuple, int] = {}
        for key, width, name, value in mine:
            cell = (key, width, name)
            values.setdefault(cell, [])
            if value is None:
                failed[cell] = failed.get(cell, 0) + 1
            else:
                values[cell].append(value)
        bindings = len({k[2] for k in keys})
        panels, records = [], []
        for key in keys:
            series = []
            for name in names:
                ys, lows, highs = [], [], []
                for width in widths:
                    got = values.get((key, width, name), [])
                    s = summarize(got) if got else None
                    interval = s is not None and s.n > 1
                    ys.append(s.mean if s else None)
                    lows.append(s.ci_low if interval else None)
                    highs.append(s.ci_high if interval else None)
                    if (key, width, name) in values:
                        records.append({"pattern": pattern, "length": key[0], "pairs": ", ".join(map(str, key[1])),
                                        "binding": key[2] or None, "d_model": width, "attention": name,
                                        "accuracy_mean": s.mean if s else None,
                                        "ci95_half": (s.ci_high - s.ci_low) / 2 if interval else None,
                                        "seeds": s.n if s else 0, "failed": failed.get((key, width, name), 0)})
                series.append(Series(name, tuple(widths), tuple(ys), tuple(lows), tuple(highs)))
            panels.append((_panel_title(key, bindings), "model width d_model (log scale)",
                           "accuracy (fraction, mean over seeds)", series))
        missing = sorted({f"{name} at L={key[0]}, d_model={width}" for (key, width, name), n in failed.items()
                          if not values.get((key, width, name))}, key=str.casefold)
        note = (f"Not drawn (no accuracy: the cells failed, see Failures): {'; '.join(missing)}."
                if missing else "")
        plot = line_panels(panels, loglog=False, logx_base=2, ylim=(-0.02, 1.02), xticks=widths,
                           alt=f"recall accuracy against model width for every attention, {pattern}, one panel per "
                               f"sequence length",
                           caption=f"Recall versus width ({pattern}): multi-query associative recall accuracy "
                                   f"against model width, one panel per (sequence length, key-value pairs), one "
                                   f"line per attention; mean over seeds with 95% intervals where there are "
                                   f"several seeds. Zoology (Arora et al. 2023) found attention solves the task "
                                   f"at every width while other mixers need width that grows with the length "
                                   f"and the number of pairs. A missing point: the attention was not run there "
                                   f"or did not finish.")
        frame_id = f"recall-width-{pattern}"
        plots.append((pattern, plot, frame_id, note))
        exports.append((frame_id, f"Recall versus width ({pattern})", pd.DataFrame(records)))
    return plots, exports


def accuracy(tables: Tables, gated: "set[tuple[str, str]]", page_of: "Callable[[str], str] | None" = None
             ) -> Accuracy:
    """Everything the accuracy sections show, from the store's typed tables (task, bench, decode)."""
    from cab.training.summary import long_metrics, summary_table, task_index

    empty = Accuracy((), (), (), None, (), None, "", (), 0)
    if "task" not in tables.results:
        return empty
    n_tasks = len(tables.task)
    long = long_metrics(tables.task)
    if long.empty:
        extrapolation, ex_exports = _extrapolation(tables.task)
        width, width_exports = _recall_width(tables.task)
        return Accuracy((), tuple(extrapolation), (), None, (), None, "", tuple(ex_exports + width_exports), n_tasks,
                        recall_width=tuple(width))
    summary = summary_table(long)
    controls = control_labels(_attention_of_labels(tables.results))
    index = task_index(long[~long["attention"].isin(controls)], baseline=BASELINE)
    boards, exports = _boards(tables, long, summary, index, page_of, gated)
    extrapolation, ex_exports = _extrapolation(tables.task)
    pareto = _pareto(boards, _reference_times(tables.bench, gated))
    correlation, corr_rows = _correlation(index.table)
    recall_plot, recall_note, recall_frame = _recall(tables, summary)
    width, width_exports = _recall_width(tables.task)
    exports += ex_exports + width_exports
    if corr_rows:
        exports.append(("rank-correlation", "Rank correlation between patterns", pd.DataFrame(corr_rows)))
    if recall_frame is not None:
        exports.append(("recall-state", "Recall versus state size", recall_frame))
    exports.append(("task-summary", "Task metrics per attention (mean, std, 95% interval, rank)", summary))
    return Accuracy(tuple(boards), tuple(extrapolation), tuple(pareto), correlation, tuple(corr_rows), recall_plot,
                    recall_note, tuple(exports), n_tasks, recall_width=tuple(width))
