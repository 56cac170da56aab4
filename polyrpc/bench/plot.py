"""``polyrpc bench --plot FILE.png``: latency v. size, rate v. in-flight, bulk v. size."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .runner import size_label

STYLE = {"message": "-", "rpc": "--", "reference": ":"}


def require_matplotlib() -> None:
    """Fail early, before a long run, if plotting cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"polyrpc bench --plot needs matplotlib ({exc}): pip install 'polyrpc[plot]'"
        ) from None


def _measured(results: list[dict]) -> list[dict]:
    return [r for r in results if "p50_us" in r]


def panels(results: list[dict]) -> list[dict[str, Any]]:
    """What each panel shows: the fixed parameter, the x and y fields, and the series."""
    ok = _measured(results)
    if not ok:
        return []
    flights = sorted({r["in_flight"] for r in ok})
    sizes = sorted({r["payload_bytes"] for r in ok})
    bulk_flight = flights[len(flights) // 2] if len(flights) > 2 else flights[-1]
    specs = [
        ("latency (p50) v. payload size", "payload_bytes", "p50_us", "in_flight", flights[0]),
        ("call rate v. calls in flight", "in_flight", "requests_per_s", "payload_bytes", sizes[0]),
        ("bulk throughput v. payload size", "payload_bytes", "mb_per_s", "in_flight", bulk_flight),
    ]
    out = []
    for title, x, y, fixed, value in specs:
        series: dict[str, list[tuple[float, float]]] = {}
        kinds: dict[str, str] = {}
        for r in ok:
            if r[fixed] == value:
                series.setdefault(r["transport"], []).append((r[x], r[y]))
                kinds[r["transport"]] = r.get("kind", "message")
        for points in series.values():
            points.sort()
        fixed_text = f"{value} in flight" if fixed == "in_flight" else f"{size_label(value)}B"
        out.append(
            {"title": f"{title} ({fixed_text})", "x": x, "y": y, "series": series, "kinds": kinds}
        )
    return out


REFERENCE_COLOURS = ("black", "dimgray", "saddlebrown", "darkolivegreen")


def _colours(rows: list[str]) -> dict[str, Any]:
    """One colour per scheme (its message and rpc rows share it); dark ones for references."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    schemes = list(dict.fromkeys(r.partition("/")[0] for r in rows if not r.startswith("raw-")))
    references = [r for r in rows if r.startswith("raw-")]
    colours: dict[str, Any] = {}
    for row in rows:
        if row in references:
            colours[row] = REFERENCE_COLOURS[references.index(row) % len(REFERENCE_COLOURS)]
        else:
            colours[row] = palette(schemes.index(row.partition("/")[0]) % 10)
    return colours


LABELS = {
    "payload_bytes": "payload size (bytes, log scale)",
    "in_flight": "calls in flight (log scale)",
    "p50_us": "p50 round-trip latency (µs, log scale)",
    "requests_per_s": "calls per second (log scale)",
    "mb_per_s": "echoed payload MB/s (10⁶ B/s, log scale)",
}


def plot(results: list[dict], path: Path, machine: dict, settings: dict) -> None:
    """Write one PNG with three panels, one line per row (reference rows dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    chosen = panels(results)
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.5), constrained_layout=True)
    colours = _colours(list(dict.fromkeys(r["transport"] for r in _measured(results))))
    for ax, spec in zip(axes, chosen, strict=False):
        for row, points in spec["series"].items():
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                STYLE.get(spec["kinds"][row], "-"),
                marker="o",
                markersize=4,
                color=colours[row],
                label=row,
            )
        ax.set_xscale("log", base=2 if spec["x"] == "payload_bytes" else 10)
        ax.set_yscale("log")
        if spec["x"] == "payload_bytes":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{size_label(int(v))}"))
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(spec["title"])
        ax.set_xlabel(LABELS[spec["x"]])
        ax.set_ylabel(LABELS[spec["y"]])
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, loc="outside lower center", ncol=min(len(labels), 7), fontsize=9
        )
    paths = sorted({r.get("path", "loopback") for r in results})
    loads = machine.get("load_avg", [0.0])[:1] + machine.get("load_avg_end", [])[:1]
    fig.suptitle(
        f"polyrpc bench: medians of {settings.get('repeat')} × {settings.get('seconds')} s per "
        f"point, {machine.get('cpus')} CPUs, 1-min load ≈ {statistics.fmean(loads):.1f}\n"
        + "\n".join(f"path: {p}" for p in paths),
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
