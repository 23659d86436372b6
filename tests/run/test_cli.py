"""The `cab` command line end to end (in-process through cab.cli.main): output, JSON and exit statuses."""

import json
import shutil

from cab.cli import main
from tests.paths import ROOT

BROKEN = ROOT / "tests" / "plugins" / "broken.py"


def test_list_table_and_json(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "NS CS NC CC" in out and "Vaswani" in out
    assert main(["list", "--json"]) == 0
    specs = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert specs["sdpa"]["exact"] is True and specs["sdpa"]["patterns"] == ["NS", "CS", "NC", "CC"]
    assert {"family", "citation", "hparams", "source"} <= set(specs["memory_efficient"])


def test_check_passes_for_exact_attention(capsys):
    assert main(["check", "vanilla", "--pattern", "CS,CC"]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "CS" in out and "CC" in out and "incorrect" not in out


def test_check_json_and_failure_exit_status(capsys):
    assert main(["check", "broken_causal_leak", "--plugin", str(BROKEN), "--pattern", "CS,NS", "--json"]) == 1
    rows = {r["pattern"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["CS"]["status"] == "incorrect" and "causal" in rows["CS"]["message"]
    assert rows["NS"]["status"] == "unsupported"  # not declared and refused: reported, does not fail the command


def test_check_fails_an_attention_that_runs_a_pattern_it_does_not_declare(capsys):
    assert main(["check", "broken_accepts_undeclared", "--plugin", str(BROKEN), "--pattern", "NS,CS", "--json"]) == 1
    rows = {r["pattern"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["NS"]["status"] == "ok" and rows["CS"]["status"] == "incorrect"


ZOO = ROOT / "tests" / "plugins" / "zoo.py"


def test_check_lists_every_failing_check_and_what_each_verdict_covers(capsys):
    assert main(["check", "zoo_dropout_in_eval", "--plugin", str(ZOO), "--pattern", "CS"]) == 1
    out = capsys.readouterr().out
    assert "zoo_dropout_in_eval CS: incorrect" in out
    failing = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(failing) > 3 and failing[0].startswith("  - independence: incorrect [relative error")
    assert "random from call to call" in failing[0]
    assert "  dtypes: structural checks in float64, again in float32" in out
    assert "not run: reference (the attention has no reference())" in out and "shapes: main: " in out


def test_check_probes_a_shape_to_publish(capsys):
    assert main(["check", "zoo_long_path_leak", "--plugin", str(ZOO), "--pattern", "CS"]) == 0
    capsys.readouterr()
    assert main(["check", "zoo_long_path_leak", "--plugin", str(ZOO), "--pattern", "CS",
                 "--shape", "1,2,2048,16"]) == 1
    out = capsys.readouterr().out
    assert "  - published: incorrect" in out and "published: B=1 Hq=2 Hkv=2 Lq=2048 Lk=2048 D=16 float32" in out


def test_bench_table_shows_the_gate_coverage(capsys):
    assert main(["bench", "vanilla", "--lengths", "64", "--pattern", "CS", "--heads", "2", "--head-dim", "16",
                 "--min-run-time", "0.01", "--no-memory", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    assert header.split()[-1] == "gate"
    assert "ok: float64+float32 suite (6 shapes); published B=1 Hq=2 Hkv=2 Lq=64 Lk=64 D=16 float32" in row


def test_check_unknown_name_suggests(capsys):
    assert main(["check", "vanila"]) == 2
    assert "did you mean 'vanilla'" in capsys.readouterr().err


def test_check_plugin_file_positional(tmp_path, capsys):
    plugin = tmp_path / "my_submission.py"
    plugin.write_text(
        "import cab\n"
        "from cab.attention.engine.scores import masked_softmax_attention\n"
        "@cab.register_attention('cli_submission', patterns=('NS', 'CS'), family='exact', exact=True)\n"
        "class Sub(cab.Attention):\n"
        "    def __init__(self, pattern, num_heads, head_dim):\n"
        "        super().__init__(pattern, num_heads, head_dim)\n"
        "    def forward(self, q, k, v, key_padding_mask=None):\n"
        "        return masked_softmax_attention(self, q, k, v, key_padding_mask)\n"
    )
    try:
        assert main(["check", str(plugin), "--pattern", "NS,CS,NC"]) == 0
        out = capsys.readouterr().out
        assert "cli_submission" in out and "unsupported" in out
    finally:
        from cab.registry import unregister_attention

        unregister_attention("cli_submission")


def test_bench_json(capsys):
    code = main(["bench", "sdpa", "--lengths", "32,64", "--pattern", "CS", "--mode", "fwd", "--heads", "2",
                 "--head-dim", "16", "--min-run-time", "0.01", "--no-memory", "--threads", "1", "--json"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["cell"]["lq"] for r in results] == [32, 64]
    for r in results:
        assert r["status"] == "ok" and r["metrics"]["p20_ms"] <= r["metrics"]["median_ms"] <= r["metrics"]["p80_ms"]
        assert r["metrics"]["flops"] > 0 and r["provenance"]["torch"]


def test_bench_rejects_bad_mode(capsys):
    assert main(["bench", "sdpa", "--mode", "forward"]) == 2
    assert "unknown mode" in capsys.readouterr().err


def test_run_report_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "configs" / "smoke.yaml", tmp_path / "smoke.yaml")
    db, out = tmp_path / "r.sqlite", tmp_path / "board"
    assert main(["run", "smoke.yaml", "--db", str(db), "--out", str(out), "--no-progress"]) == 0
    assert (out / "index.html").is_file()
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "again")]) == 0
    assert "vanilla" in (tmp_path / "again" / "index.html").read_text()
    for fmt in ("csv", "json", "parquet"):
        assert main(["export", "--format", fmt, "--db", str(db), "--out", str(tmp_path / f"r.{fmt}")]) == 0
        assert (tmp_path / f"r.{fmt}").stat().st_size > 0
    capsys.readouterr()
    # a rerun skips every finished cell
    assert main(["run", "smoke.yaml", "--db", str(db), "--out", str(out), "--no-progress", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "8 cells planned, 8 already done, 0 run" in out


def test_report_on_missing_store_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "x")]) == 2
    assert "cab run" in capsys.readouterr().err


def test_analyze_prints_efficiency_lengths_exponents_and_decoding(tmp_path, capsys):
    db = tmp_path / "a.sqlite"
    assert main(["bench", "vanilla", "sdpa", "--lengths", "64,128,256", "--heads", "2", "--head-dim", "16",
                 "--min-run-time", "0.02", "--no-memory", "--db", str(db), "--json"]) == 0
    assert main(["bench", "sdpa", "--pattern", "CS", "--mode", "decode", "--lengths", "64", "--heads", "2",
                 "--head-dim", "16", "--min-run-time", "0.02", "--db", str(db), "--json"]) == 0
    capsys.readouterr()
    assert main(["analyze", "--db", str(db), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "Efficiency lengths (robust" in out and "vs vanilla" in out and "Complexity exponents" in out
    assert "2 (declared)" in out and "CS decode float32 cpu" in out
    assert main(["analyze", "--db", str(db), "--json", "--metric", "time", "--method", "cab"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = next(r for r in data["efficiency_lengths"] if r["attention"] == "sdpa" and r["baseline"] == "vanilla")
    assert row["metric"] == "time" and row["n_lengths"] == 3
    assert {r["attention"] for r in data["exponents"]} == {"vanilla", "sdpa"}
    assert [r["context"] for r in data["decode"]] == [64]


def test_analyze_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert main(["analyze", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no results store" in capsys.readouterr().err
