"""``polyrpc bench --plot FILE.png``: latency v. size, rate v. in-flight, bulk v. size."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .runner import size_label

STYLE = {"message": "-", "rpc": "--", "reference": ":"}
HATCH = {"rpc": "..", "reference": "//"}


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
    "payload_bytes": "payload size (bytes)",
    "in_flight": "calls in flight",
    "p50_us": "p50 round-trip latency",
    "requests_per_s": "calls per second",
    "mb_per_s": "echoed payload MB/s (10⁶ B/s)",
}


def _compact(value: float, _position: object = None) -> str:
    """Tick labels without powers of ten: 40k, 1.2M, 0.5."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _latency(value: float, _position: object = None) -> str:
    """Latency tick labels in µs or ms."""
    return f"{value / 1000:g} ms" if value >= 1000 else f"{value:g} µs"


def _sparse(value: float, position: object, labels: Any) -> str:
    """Minor log ticks: label only 2x and 5x a power of ten, so labels never overlap."""
    mantissa = f"{value:.0e}"[0]
    return labels(value, position) if mantissa in "25" else ""


def _draw(ax: Any, spec: dict[str, Any], colours: dict[str, Any]) -> None:
    """One panel: lines over a sweep, or bars when every row has a single point."""
    from matplotlib.ticker import FuncFormatter

    y_format = FuncFormatter(_latency if spec["y"] == "p50_us" else _compact)
    if all(len(points) == 1 for points in spec["series"].values()):
        rows = list(spec["series"])
        values = [spec["series"][row][0][1] for row in rows]
        bars = ax.bar(rows, values, color=[colours[row] for row in rows])
        for bar, row in zip(bars, rows, strict=True):
            bar.set_label(row)
            bar.set_hatch(HATCH.get(spec["kinds"][row], ""))
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_xlabel("row (dotted: call API, striped: hand-written reference)")
        ax.yaxis.set_major_formatter(y_format)
        ax.set_ylabel(LABELS[spec["y"]])
    else:
        for row, points in spec["series"].items():
            xs, ys = zip(*points, strict=True)
            style = STYLE.get(spec["kinds"][row], "-")
            ax.plot(xs, ys, style, marker="o", markersize=4, color=colours[row], label=row)
        ax.set_xscale("log", base=2 if spec["x"] == "payload_bytes" else 10)
        ax.set_yscale("log")
        x_format = (lambda v, _: size_label(int(v))) if spec["x"] == "payload_bytes" else _compact
        ax.xaxis.set_major_formatter(FuncFormatter(x_format))
        ax.yaxis.set_major_formatter(y_format)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: _sparse(v, p, y_format)))
        ax.set_xlabel(LABELS[spec["x"]] + ", log scale")
        ax.set_ylabel(LABELS[spec["y"]] + ", log scale")
    ax.set_title(spec["title"])
    ax.grid(True, which="both", alpha=0.3)


def plot(results: list[dict], path: Path, machine: dict, settings: dict) -> None:
    """Write one PNG with three panels, one line per row (references dark and dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(results)
    fig, axes = plt.subplots(1, 3, figsize=(18, 7), constrained_layout=True)
    colours = _colours(list(dict.fromkeys(r["transport"] for r in _measured(results))))
    for ax, spec in zip(axes, chosen, strict=False):
        _draw(ax, spec, colours)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for ax in axes[: len(chosen)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(
            list(legend.values()),
            list(legend),
            loc="outside lower center",
            ncol=min(len(legend), 7),
            fontsize=9,
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


def main(argv: list[str] | None = None) -> int:
    """``python -m polyrpc.bench.plot RESULTS.json OUT.png``: plot a saved run again."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    require_matplotlib()
    document = json.loads(args.results.read_text())
    plot(document["results"], args.png, document["machine"], document["settings"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
