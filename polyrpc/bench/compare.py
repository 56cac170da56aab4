"""``polyrpc bench --compare OLD.json``: the change per point from an earlier run."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .runner import LOWER_IS_BETTER, METRICS, headline, size_label


def load(path: Path) -> list[dict]:
    """The results list of a saved run (any schema version that has ``results``)."""
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise SystemExit(f"polyrpc bench --compare: {path} has no 'results' list")
    return document["results"]


def _key(result: dict) -> tuple:
    return (result["transport"], result["workload"], result.get("path", "loopback"))


def change(old: dict, new: dict, metric: str) -> dict:
    """Relative change of one metric, whether it is better, and whether the spreads overlap."""
    before, after = old[metric], new[metric]
    relative = (after - before) / before if before else float("inf")
    better = relative < 0 if metric in LOWER_IS_BETTER else relative > 0
    overlap = False
    if f"{metric}_spread" in old and f"{metric}_spread" in new:
        (lo1, hi1), (lo2, hi2) = old[f"{metric}_spread"], new[f"{metric}_spread"]
        overlap = lo1 <= hi2 and lo2 <= hi1
    return {
        "metric": metric,
        "before": before,
        "after": after,
        "relative": relative,
        "better": better,
        "within_spread": overlap,
    }


def compare(old_results: list[dict], new_results: list[dict], console: Console) -> list[dict]:
    """Print old -> new for each point in both runs (headline metric first); return the rows."""
    old_by_key = {_key(r): r for r in old_results}
    table = Table(title="change from the earlier run (medians)")
    for column in ("row", "point", "headline", "before", "after", "change", "other metrics"):
        table.add_column(
            column, justify="left" if column in ("row", "point", "headline") else "right"
        )
    rows = []
    for new in new_results:
        old = old_by_key.pop(_key(new), None)
        name = f"{new['workload']} ({size_label(new['payload_bytes'])}B×{new['in_flight']})"
        if old is None:
            table.add_row(new["transport"], name, "", "", "", "[dim]new point", "")
            continue
        metric = headline(new)
        if "skipped" in new or "skipped" in old:
            state = "skipped now" if "skipped" in new else "skipped before"
            table.add_row(new["transport"], name, "", "", "", f"[dim]{state}", "")
            continue
        if metric not in old or metric not in new:
            state = "failed now" if metric in old else "failed before"
            if metric not in old and metric not in new:
                state = "failed in both"
            table.add_row(new["transport"], name, "", "", "", f"[red]{state}", "")
            continue
        main = change(old, new, metric)
        others = [change(old, new, m) for m in METRICS if m != metric and m in old and m in new]
        rows.append(
            {"transport": new["transport"], "workload": new["workload"], "changes": [main, *others]}
        )
        colour = "dim" if main["within_spread"] else ("green" if main["better"] else "red")
        noise = " (within spread)" if main["within_spread"] else ""
        table.add_row(
            new["transport"],
            name,
            main["metric"],
            f"{main['before']:,.1f}",
            f"{main['after']:,.1f}",
            f"[{colour}]{main['relative'] * 100:+.1f}%{noise}",
            " ".join(f"{c['metric']} {c['relative'] * 100:+.0f}%" for c in others),
        )
    for old in old_by_key.values():
        table.add_row(old["transport"], old["workload"], "", "", "", "[dim]not run now", "")
    console.print(table)
    return rows
