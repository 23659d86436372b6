"""One line saying what a correctness-gate verdict covers, from the coverage a conformance report stores
(cab.check: shapes, dtypes, backends, checks not run); shown beside every timing by `cab bench` and the
leaderboard. Plain data in, text out: no torch, so the report can use it."""

from __future__ import annotations


def coverage_summary(coverage: "dict | None") -> str:
    """E.g. "float64+float32 suite (12 shapes); published B=1 Hq=4 Hkv=4 Lq=1024 Lk=1024 D=64 float32;
    backend torch" ("" when nothing is recorded)."""
    if not coverage:
        return ""
    parts = []
    dtypes = coverage.get("dtypes") or {}
    shapes = [s for s in coverage.get("shapes") or [] if not s.startswith("published")]
    if dtypes:
        both = dict.fromkeys([dtypes.get("structural"), dtypes.get("requested")])
        text = "+".join(d for d in both if d) + f" suite ({len(shapes)} shapes)"
        if coverage.get("structural_fallback"):
            text += ", no float64"
        parts.append(text)
    parts += [s.replace("published: ", "published ") for s in coverage.get("shapes") or [] if s.startswith("published")]
    backends = sorted(set((coverage.get("backends") or {}).values()))
    if backends:
        parts.append("backend " + "/".join(backends))
    return "; ".join(parts)
