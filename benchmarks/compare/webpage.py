"""``report.html``: the report as one self-contained page that opens offline in any browser.

Everything is inline (styles, a few lines of script to sort the tables, the plots as SVG drawn here), so the file
can be mailed or attached to an issue and still render. The plots: the task's metric against trainable
parameters with every seed's point and the mean ± sd, and a Pareto view of the metric against step time and against
training memory, where the arms no other arm beats on both axes are marked.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from peftkit_benchmarks.compare import scoring

WIDTH, HEIGHT, MARGIN = 460, 300, 56
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { cursor: pointer; background: #f4f4f4; user-select: none; }
th[data-order="asc"]::after { content: " ▲"; } th[data-order="desc"]::after { content: " ▼"; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
svg { background: #fff; border: 1px solid #ddd; }
.note { color: #555; font-size: 12px; }
"""

SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  table.querySelectorAll("th").forEach((header, column) => header.addEventListener("click", () => {
    const order = header.dataset.order === "asc" ? "desc" : "asc";
    table.querySelectorAll("th").forEach(h => delete h.dataset.order);
    header.dataset.order = order;
    const rows = [...table.tBodies[0].rows];
    const key = row => { const cell = row.cells[column]; const v = parseFloat(cell.dataset.value);
                         return isNaN(v) ? cell.textContent : v; };
    rows.sort((a, b) => { const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (order === "asc" ? 1 : -1); });
    rows.forEach(row => table.tBodies[0].appendChild(row));
  }));
}
document.body.dataset.ready = "yes";
"""


def _cell(text: str, value: float | None = None) -> str:
    sort = "" if value is None or not math.isfinite(value) else f' data-value="{value!r}"'
    return f"<td{sort}>{html.escape(text)}</td>"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _scale(values: list[float], low: float, high: float, log: bool = False):
    transformed = [math.log10(v) if log else v for v in values]
    lo, hi = min(transformed), max(transformed)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    return lambda v: low + (high - low) * (((math.log10(v) if log else v) - lo) / (hi - lo))


def scatter(title: str, x_label: str, y_label: str, points: list[dict[str, Any]], *, log_x: bool = False) -> str:
    """An SVG scatter: each point has name, x, y, optional ys (per seed), sd and a ``front`` flag."""
    xs = [p["x"] for p in points]
    ys = [y for p in points for y in [p["y"], *p.get("ys", [])]] + [
        p["y"] + s for p in points for s in (p.get("sd", 0.0), -p.get("sd", 0.0))
    ]
    to_x = _scale(xs, MARGIN, WIDTH - 16, log=log_x)
    to_y = _scale(ys, HEIGHT - MARGIN + 16, 28)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN + 16}" x2="{WIDTH - 16}" y2="{HEIGHT - MARGIN + 16}" stroke="#888"/>',
        f'<line x1="{MARGIN}" y1="28" x2="{MARGIN}" y2="{HEIGHT - MARGIN + 16}" stroke="#888"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12">{html.escape(x_label)}</text>',
        f'<text x="14" y="{HEIGHT / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {HEIGHT / 2})">{html.escape(y_label)}</text>',
    ]
    for value in (min(xs), max(xs)):
        parts.append(
            f'<text x="{to_x(value):.1f}" y="{HEIGHT - MARGIN + 32}" text-anchor="middle" font-size="10">'
            f"{_short(value)}</text>"
        )
    for value in (min(ys), max(ys)):
        parts.append(
            f'<text x="{MARGIN - 4}" y="{to_y(value):.1f}" text-anchor="end" font-size="10">{_short(value)}</text>'
        )
    for index, point in enumerate(points):
        colour = COLOURS[index % len(COLOURS)]
        x, y = to_x(point["x"]), to_y(point["y"])
        sd = point.get("sd", 0.0)
        if sd:
            parts.append(
                f'<line x1="{x:.1f}" y1="{to_y(point["y"] - sd):.1f}" x2="{x:.1f}" '
                f'y2="{to_y(point["y"] + sd):.1f}" stroke="{colour}"/>'
            )
        for seed_value in point.get("ys", []):
            parts.append(f'<circle cx="{x:.1f}" cy="{to_y(seed_value):.1f}" r="2.5" fill="{colour}" opacity="0.45"/>')
        ring = ' stroke="#000" stroke-width="2"' if point.get("front") else ""
        parts.append(
            f'<circle class="arm" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"{ring}>'
            f"<title>{html.escape(point['name'])}</title></circle>"
        )
        parts.append(f'<text x="{x + 7:.1f}" y="{y - 6:.1f}" font-size="11">{html.escape(point["name"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _short(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e3:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}"


def pareto_front(points: list[dict[str, Any]], higher_is_better: bool) -> set[str]:
    """Names of the arms that no other arm matches or beats on both the metric and the cost, and beats on one."""
    sign = 1 if higher_is_better else -1

    def beats(a, b) -> bool:
        return (
            sign * a["y"] >= sign * b["y"] and a["x"] <= b["x"] and (sign * a["y"] > sign * b["y"] or a["x"] < b["x"])
        )

    return {p["name"] for p in points if not any(beats(q, p) for q in points if q is not p)}


def page(report: dict[str, Any]) -> str:
    """The whole page as one string."""
    arms, task, env = report["arms"], report["task"], report["environment"]
    ratios = report.get("ratios_to_full", {})
    scale, better = task["scale"], task.get("higher_is_better", True)
    metric = f"{task['metric']}{' %' if scale == 100 else ''}"
    extras = scoring.beside_primary(arms, task)
    cuda = env["device"].startswith("cuda")

    def memory(s: dict[str, Any]) -> float:
        return float(s["cuda_peak_allocated_bytes"] if cuda else s["peak_rss_bytes"])

    quality = [
        [
            _cell(name),
            _cell(f"{s['trainable_parameters']:,}", s["trainable_parameters"]),
            _cell(f"{s['trainable_percent_of_base']:.3f}", s["trainable_percent_of_base"]),
            _cell(f"{s['checkpoint_bytes'] / 1e6:.2f}", s["checkpoint_bytes"]),
            _cell(f"{scale * s['score']['mean']:.2f} ± {scale * s['score']['std']:.2f}", s["score"]["mean"]),
            *(_cell(f"{scale * s['metrics'][e]:.2f}", s["metrics"][e]) for e in extras),
            _cell(*_delta(ratios.get(name, {}).get("score_difference"), scale)),
            _cell(", ".join(f"{scale * v:.2f}" for v in s["score"]["per_seed"])),
        ]
        for name, s in arms.items()
    ]
    cost = [
        [
            _cell(name),
            _cell(f"{s['median_step_seconds']:.3f}", s["median_step_seconds"]),
            _cell(*_ratio(ratios.get(name, {}).get("step_seconds_paired_probe"))),
            _cell(f"{memory(s) / 1e6:.1f}", memory(s)),
            _cell(f"{s['state_bytes']['total'] / 1e6:.1f}", s["state_bytes"]["total"]),
            _cell(*_milliseconds(s["latency_seconds"]["unmerged"])),
            _cell(*_milliseconds(s["latency_seconds"]["merged"])),
        ]
        for name, s in arms.items()
    ]
    y_label = f"{metric}{'' if better else ' (lower is better)'}"
    trade_off = [
        {
            "name": name,
            "x": max(s["trainable_parameters"], 1),
            "y": scale * s["score"]["mean"],
            "sd": scale * s["score"]["std"],
            "ys": [scale * v for v in s["score"]["per_seed"]],
        }
        for name, s in arms.items()
    ]
    views = []
    for label, cost_of in (("median step (s)", lambda s: s["median_step_seconds"]), ("training memory (MB)", memory)):
        points = [
            {"name": n, "x": cost_of(s) / (1e6 if "MB" in label else 1), "y": scale * s["score"]["mean"]}
            for n, s in arms.items()
        ]
        front = pareto_front(points, better)
        views.append(
            scatter(f"{metric} vs {label}", label, y_label, [{**p, "front": p["name"] in front} for p in points])
        )
    memory_name = "CUDA peak allocated (MB)" if cuda else "peak RSS (MB)"
    body = [
        f"<h1>{html.escape(report['experiment']['name'])}</h1>",
        f'<p class="note">{html.escape(env["command"])} — {html.escape(env["device"])} '
        f"({html.escape(str(env.get('cuda_device') or env['cpu']))}), {env['threads']} threads, {html.escape(env['dtype'])}, "
        f"torch {html.escape(str(env['versions']['torch']))}, {html.escape(env['utc'])}. Measured on this machine.</p>",
        _task_paragraph(task),
        "<h2>Quality</h2>",
        _table(
            [
                "arm",
                "trainable params",
                "% of base",
                "checkpoint (MB)",
                f"{metric} (mean ± sd)",
                *(scoring.DISPLAY_NAMES.get(e, e) for e in extras),
                "Δ vs full",
                "per seed",
            ],
            quality,
        ),
        "<h2>Cost</h2>",
        _table(
            [
                "arm",
                "median step (s)",
                "step ÷ full (paired)",
                memory_name,
                "params+grads+AdamW (MB)",
                "unmerged latency (ms)",
                "merged latency (ms)",
            ],
            cost,
        ),
        "<h2>Trade-offs</h2>",
        '<div class="plots">',
        scatter(f"{metric} vs trainable parameters", "trainable parameters (log)", y_label, trade_off, log_x=True),
        *views,
        "</div>",
        '<p class="note">Small points: each seed; bars: ± one standard deviation. In the Pareto views a black ring '
        "marks an arm that no other arm matches or beats on both the metric and the cost. Click a column header to "
        "sort.</p>",
    ]
    title = html.escape(f"peftkit compare: {report['experiment']['name']}")
    data = html.escape(json.dumps({"arms": list(arms)}))
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style>'
        f'</head><body data-arms="{data}">{"".join(body)}<script>{SCRIPT}</script></body></html>'
    )


def _task_paragraph(task: dict[str, Any]) -> str:
    if "sizes" not in task:
        return ""
    splits = "; ".join(f"{s} {task['sizes'][s]:,} ({task['origin'][s]})" for s in task["sizes"])
    return f'<p class="note">Task {html.escape(task["name"])}: {html.escape(task["kind"])}. Splits: {html.escape(splits)}.</p>'


def _delta(value: float | None, scale: float) -> tuple[str, float | None]:
    return ("—", None) if value is None else (f"{scale * value:+.2f}", value)


def _ratio(value: float | None) -> tuple[str, float | None]:
    return ("—", None) if value is None else (f"{value:.2f}×", value)


def _milliseconds(seconds: float | None) -> tuple[str, float | None]:
    return ("—", None) if seconds is None else (f"{1000 * seconds:.1f}", seconds)


def write_html(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.html"
    path.write_text(page(report), encoding="utf-8")
    return path
