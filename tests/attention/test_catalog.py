"""The coverage catalogue is derived from the registry and stays consistent with it."""

from __future__ import annotations

import json

from cab import catalog
from cab.cli import main


def test_catalogue_ids_are_unique_and_sections_known():
    ids = [m.id for m in catalog.CATALOG]
    assert len(ids) == len(set(ids))
    assert {m.section for m in catalog.CATALOG} <= set(catalog.SECTIONS)
    assert {f"M{i}" for i in range(1, 66) if i not in (61, 65)} <= set(ids)


def test_every_builtin_claim_names_a_catalogue_entry():
    assert catalog.unknown_claims() == {}


def test_reasons_only_for_entries_no_attention_implements():
    rows = {r.mechanism.id: r for r in catalog.catalog_rows()}
    assert set(catalog.NOT_IMPLEMENTED) <= set(rows)
    for mid in catalog.NOT_IMPLEMENTED:
        assert not rows[mid].attentions, f"{mid} is implemented by {rows[mid].attentions} but has a reason"
        assert catalog.NOT_IMPLEMENTED[mid].strip()


def test_mechanism_ids_parse_lists():
    assert catalog.mechanism_ids("M8, M9") == ["M8", "M9"]
    assert catalog.mechanism_ids("M61.mlra") == ["M61.mlra"]
    assert catalog.mechanism_ids("") == []


def test_cli_catalog_json_resolves_implemented_entries(capsys):
    assert main(["list", "--catalog", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["M7"]["status"] == "implemented" and "performer" in rows["M7"]["attentions"]
    assert rows["M1"]["patterns"] == ["NS", "CS", "NC", "CC"]


def test_cli_catalog_text_lists_every_entry(capsys):
    assert main(["list", "--catalog"]) == 0
    out = capsys.readouterr().out
    assert all(m.id in out for m in catalog.CATALOG)
    assert f"of {len(catalog.CATALOG)}" in out
