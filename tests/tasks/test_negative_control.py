"""Every shipped task grid trains the negative control (no_mixing) beside exact attention on every (task,
pattern) it trains at all, so that the report can tell whether each board measures attention."""

from __future__ import annotations

import pytest
import yaml

from tests.paths import ROOT

EXACT = {"vanilla", "sdpa"}
CONTROL = "no_mixing"
TASK_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")
                      if "tasks" in (yaml.safe_load(p.read_text(encoding="utf-8")) or {}))


def test_the_shipped_task_grids_are_found():
    assert {"tasks-quick", "tasks-panel-cpu", "tasks-standard", "cab-full"} <= set(TASK_CONFIGS)


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_every_board_has_the_control_and_exact_attention(name):
    from cab.grid import expand

    boards: dict[tuple[str, str], set[str]] = {}
    for cell in expand(ROOT / "configs" / f"{name}.yaml"):
        if cell.kind == "task":
            boards.setdefault((cell.task, cell.pattern), set()).add(cell.attention)
    assert boards, f"{name} trains nothing"
    lacking = {f"{task} {pattern}": sorted({CONTROL} - names) + (["vanilla or sdpa"] if not names & EXACT else [])
               for (task, pattern), names in boards.items() if CONTROL not in names or not names & EXACT}
    assert not lacking, f"{name}: boards without the negative control or exact attention: {lacking}"
