"""CAB's efficiency lengths reproduced: `cab analyze --method cab` on CAB's raw curves (tests/data/cab_costs.csv,
from Shark-NLP/CAB's scripts/efficiency_length/cost.xlsx) gives CAB's published figures, each step of CAB's
script is held separately (which lengths each fit uses, the per-length cost from timing samples, the root
taken), and cab's robust method still answers on the same data. docs/reproductions.md shows the table."""

import importlib.util
import json
import math

import numpy as np
import pytest

from cab.analysis import efficiency_length, efficiency_table
from cab.analysis.efficiency_length import CROSSES, NO_CROSSING, cab_crossing, cab_time_cost
from cab.analysis.stats import least_squares
from cab.cli import main
from cab.store import ResultStore
from tests.paths import ROOT

COSTS = ROOT / "tests" / "data" / "cab_costs.csv"
# CAB's README, "Efficiency Length" table (running time, memory usage), the row CAB's raw curves cover
PUBLISHED = {("abc", "time"): 1877, ("abc", "memory"): 70}


def _script():
    spec = importlib.util.spec_from_file_location("cab_raw_store", ROOT / "scripts" / "cab_raw_store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def costs(script):
    return script.read_costs(COSTS)


@pytest.fixture()
def store(script, tmp_path):
    db = tmp_path / "cab-raw.sqlite"
    assert script.main([str(db)]) == 0
    return db


def _curve(costs, attention, metric):
    lengths = sorted(costs[attention][metric])
    return lengths, [costs[attention][metric][n] for n in lengths]


def test_the_data_file_holds_cabs_two_curves_at_cabs_six_lengths(costs):
    assert set(costs) == {"vanilla", "abc"}
    for attention in costs:
        for metric in ("time", "memory"):
            assert sorted(costs[attention][metric]) == [256, 512, 1024, 2048, 4096, 8192]
    assert costs["vanilla"]["time"][8192] == 18.437 and costs["abc"]["memory"][256] == 42


def test_cab_analyze_method_cab_on_cabs_raw_curves_gives_cabs_published_lengths(store, capsys):
    capsys.readouterr()
    assert main(["analyze", "--db", str(store), "--baseline", "vanilla", "--method", "cab", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["efficiency_lengths"]
    found = {(r["attention"], r["metric"]): r for r in rows}
    assert set(found) == set(PUBLISHED)
    for case, published in PUBLISHED.items():
        assert found[case]["outcome"] == CROSSES and found[case]["n_lengths"] == 6
        assert round(found[case]["length"]) == published, case  # CAB prints int(round(length))


def test_cab_analyze_text_shows_the_published_figures(store, capsys):
    capsys.readouterr()
    assert main(["analyze", "--db", str(store), "--baseline", "vanilla", "--method", "cab", "--metric", "time"]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("abc") and "time" in r)
    assert "1,877" in line and "crosses" in line


def test_time_leaves_the_shortest_length_out_of_the_efficient_line_and_memory_does_not(costs):
    """The step the issue was about: fitting ABC's time line over every length gives 1,906 (1.6% off)."""
    lengths, vanilla = _curve(costs, "vanilla", "time")
    _, abc = _curve(costs, "abc", "time")
    time = efficiency_length(lengths, vanilla, abc, "cab", metric="time")
    assert time.details["efficient_fit_lengths"] == lengths[1:] and time.details["exact_fit_lengths"] == lengths
    x = np.asarray(lengths, dtype=float)
    every_length = cab_crossing(least_squares(x, np.asarray(vanilla), 2)[0], least_squares(x, np.asarray(abc), 1)[0])
    assert round(every_length) == 1906 != round(time.length) == 1877
    lengths, vanilla = _curve(costs, "vanilla", "memory")
    _, abc = _curve(costs, "abc", "memory")
    memory = efficiency_length(lengths, vanilla, abc, "cab", metric="memory")
    assert memory.details["efficient_fit_lengths"] == lengths and round(memory.length) == 70


def _cab_script_by_hand(lengths, exact, efficient, skip):
    """CAB's script written out independently: normal equations on the design matrices sklearn builds
    (PolynomialFeatures(2): 1, n, n^2), then CAB's '+' root of the quadratic formula."""
    n = np.asarray(lengths, dtype=float)
    design = np.stack([np.ones_like(n), n, n ** 2], axis=1)
    c, b, a = np.linalg.solve(design.T @ design, design.T @ np.asarray(exact, dtype=float))
    line = np.stack([np.ones_like(n[skip:]), n[skip:]], axis=1)
    e, d = np.linalg.solve(line.T @ line, line.T @ np.asarray(efficient, dtype=float)[skip:])
    return (-(b - d) + math.sqrt((b - d) ** 2 - 4 * a * (c - e))) / (2 * a)


@pytest.mark.parametrize("metric,skip", [("time", 1), ("memory", 0)])
def test_cab_method_equals_cabs_script_written_out(costs, metric, skip):
    lengths, vanilla = _curve(costs, "vanilla", metric)
    _, abc = _curve(costs, "abc", metric)
    found = efficiency_length(lengths, vanilla, abc, "cab", metric=metric)
    assert found.length == pytest.approx(_cab_script_by_hand(lengths, vanilla, abc, skip), rel=1e-9)
    assert found.details["r2_exact"] > 0.99


def test_the_root_is_cabs_where_the_efficient_line_drops_below_not_the_largest():
    """A concave exact fit crosses the line twice: the efficient method is cheaper between 500 and 2,000.
    CAB's formula gives 500 (where it becomes cheaper); the largest root, 2,000, is where it stops."""
    lengths = [250, 500, 1000, 1500, 2000, 3000]
    efficient = [1e-3 * n + 1 for n in lengths]
    exact = [1e-3 * n + 1 - 1e-6 * (n - 500) * (n - 2000) for n in lengths]
    for metric in ("time", "memory"):
        found = efficiency_length(lengths, exact, efficient, "cab", metric=metric)
        assert found.outcome == CROSSES and found.length == pytest.approx(500.0, rel=1e-6)
        assert found.details["exact_fit"][0] < 0


def test_no_crossing_when_cabs_root_is_not_a_positive_real_length():
    """The efficient method cheaper at every length by the fits: the difference of the fits has two negative
    roots (CAB's script would print -1,000) or none (CAB's would print NaN)."""
    lengths = [256, 512, 1024, 2048]
    negative = efficiency_length(lengths, [1e-6 * n ** 2 + 3e-3 * n + 3 for n in lengths], [1.0] * 4, "cab",
                                 metric="memory")  # difference 1e-6 (n + 1000)(n + 2000)
    assert negative.outcome == NO_CROSSING and negative.length is None
    assert negative.details["cab_root"] == pytest.approx(-1000.0, rel=1e-6)
    complex_ = efficiency_length(lengths, [1e-6 * n ** 2 + 10 for n in lengths], [1e-3 * n for n in lengths], "cab",
                                 metric="memory")  # difference 1e-6 n^2 - 1e-3 n + 10 > 0
    assert complex_.outcome == NO_CROSSING and complex_.length is None and complex_.details["cab_root"] is None
    beyond = efficiency_length(lengths, [1.0 + 1e-6 * n ** 2 for n in lengths], [5.0 + 1e-2 * n for n in lengths],
                               "cab", metric="memory")  # dearer at every measured length: the fits cross further on
    assert beyond.outcome == CROSSES and beyond.length > 2048 and beyond.first_cheaper is None


def test_time_cost_per_length_is_cabs_interquartile_mean_of_the_samples():
    """CAB's efficiency_test.py keeps the timings between the 25th and 75th percentiles (midpoint) and
    averages them: for 1, 2, 4, 8, 16 ms that is (2 + 4 + 8) / 3, where the median would be 4."""
    samples = np.array([16.0, 1.0, 8.0, 2.0, 4.0])
    assert cab_time_cost(samples) == pytest.approx(14 / 3)
    lengths = [256, 512, 1024, 2048]
    exact = [samples * n ** 2 for n in lengths]
    efficient = [samples * 1e3 * n for n in lengths]
    time = efficiency_length(lengths, exact, efficient, "cab", metric="time")
    assert time.details["exact_points"] == pytest.approx([14 / 3 * n ** 2 for n in lengths])
    memory = efficiency_length(lengths, exact, efficient, "cab", metric="memory")  # one reading: the median
    assert memory.details["exact_points"] == pytest.approx([4.0 * n ** 2 for n in lengths])


def test_method_cab_needs_the_metric_and_three_lengths():
    with pytest.raises(ValueError, match="needs metric 'time' or 'memory'"):
        efficiency_length([1, 2, 3], [1, 4, 9], [1, 2, 3], "cab")
    with pytest.raises(ValueError, match="at least 3 lengths"):
        efficiency_length([1, 2], [1, 4], [1, 2], "cab", metric="memory")


def test_efficiency_table_with_method_cab_marks_two_lengths_too_few(store, script, costs, tmp_path):
    short = {name: {metric: {n: v for n, v in values.items() if n >= 4096} for metric, values in curves.items()}
             for name, curves in costs.items()}
    with ResultStore(tmp_path / "short.sqlite") as db:
        for result in script.results(short):
            db.put(result)
        df = db.dataframe()
    table = efficiency_table(df, baselines=("vanilla",), method="cab")
    assert set(table["outcome"]) == {"too_few_lengths"} and set(table["n_lengths"]) == {2}
    robust = efficiency_table(df, baselines=("vanilla",), n_boot=0)
    assert set(robust["outcome"]) == {"always_cheaper"}


def test_robust_method_on_cabs_raw_curves(store, capsys):
    """cab's robust method on the same data: ABC's measured time is below vanilla's from 512 tokens on (the
    crossing interpolated between 256 and 512), and its memory below vanilla's at every length."""
    capsys.readouterr()
    assert main(["analyze", "--db", str(store), "--baseline", "vanilla", "--json"]) == 0
    found = {(r["attention"], r["metric"]): r for r in json.loads(capsys.readouterr().out)["efficiency_lengths"]}
    time, memory = found[("abc", "time")], found[("abc", "memory")]
    ratio0, ratio1 = 0.648 / 0.472, 0.59 / 0.628
    t = math.log(ratio0) / (math.log(ratio0) - math.log(ratio1))
    assert time["outcome"] == CROSSES and time["length"] == pytest.approx(256 * 2 ** t, rel=1e-9)
    assert round(time["length"]) == 457 and time["first_cheaper"] == 512
    assert memory["outcome"] == "always_cheaper" and memory["length"] is None and memory["first_cheaper"] == 256


def test_the_store_script_refuses_an_existing_store(script, store, capsys):
    assert script.main([str(store)]) == 2
    assert "exists" in capsys.readouterr().err
