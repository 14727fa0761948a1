"""The compression summary as a self-contained HTML page: totals, chosen ratios, score curves.

One small chart per swept layer (score against the ratio kept, the chosen ratio marked, the
uncompressed score as a dashed line), drawn as inline SVG: no plotting library needed.
"""

from __future__ import annotations

__all__ = ["summary_html"]

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any


def _chart(name: str, curve: Sequence[Mapping[str, Any]], chosen: float | None, baseline: float,
           lo: float, hi: float, w: int = 170, h: int = 110) -> str:
    pts = [(float(p["ratio"]), float(p["score"])) for p in curve if "score" in p and math.isfinite(p["score"])]
    pad = 18
    span = (hi - lo) or 1.0

    def xy(r: float, s: float) -> tuple[float, float]:
        return pad + r * (w - 2 * pad), h - pad - (s - lo) / span * (h - 2 * pad)

    parts = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="#fafafa" stroke="#ccc"/>']
    _, by = xy(0, baseline)
    parts.append(f'<line x1="{pad}" y1="{by:.1f}" x2="{w - pad}" y2="{by:.1f}" stroke="#999" stroke-dasharray="3,3"/>')
    if pts:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(r, s) for r, s in pts))
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        for r, s in pts:
            x, y = xy(r, s)
            color = "#d62728" if chosen is not None and abs(r - chosen) < 1e-9 else "#1f77b4"
            radius = 4 if color == "#d62728" else 2
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{color}"><title>ratio {r:g}: {s:.4g}</title></circle>')
    label = html.escape(name if len(name) <= 26 else "…" + name[-25:])
    parts.append(f'<text x="{pad}" y="12" font-size="10">{label}</text>')
    parts.append(f'<text x="{pad}" y="{h - 4}" font-size="9">0</text><text x="{w - pad - 6}" y="{h - 4}" font-size="9">1</text>')
    parts.append("</svg>")
    return "".join(parts)


def summary_html(summary: Mapping[str, Any]) -> str:
    """The page for a :class:`~onnxq.compress.api.CompressResult` summary."""
    b, a = summary["before"], summary["after"]
    rows = [
        ("MACs (M)", f"{b['macs'] / 1e6:.2f}", f"{a['macs'] / 1e6:.2f}", f"{a['macs'] / b['macs']:.3f}"),
        ("parameters (M)", f"{b['params'] / 1e6:.3f}", f"{a['params'] / 1e6:.3f}", f"{a['params'] / b['params']:.3f}"),
        ("latency (ms, onnxruntime, batch 1)", f"{b['latency']['median_ms']:.2f}", f"{a['latency']['median_ms']:.2f}",
         f"{a['latency']['median_ms'] / b['latency']['median_ms']:.3f}"),
        (f"score ({html.escape(summary['score_name'])})", f"{b['score']:.4f}", f"{a['score']:.4f}", ""),
    ]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>onnxq compress</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
           ".grid{display:flex;flex-wrap:wrap;gap:4px}</style></head><body>",
           f"<h1>Compression to {summary['config']['target_macs']:.0%} of the MACs "
           f"({html.escape(summary['config']['scheme'])})</h1>",
           "<table><tr><th></th><th>before</th><th>after</th><th>ratio</th></tr>"]
    out += [f"<tr><th>{r[0]}</th><td>{r[1]}</td><td>{r[2]}</td><td>{r[3]}</td></tr>" for r in rows]
    out.append("</table>")
    for stage in summary["stages"]:
        out.append(f"<h2>{html.escape(stage['technique'])}: MACs {stage['macs_before'] / 1e6:.2f} M → "
                   f"{stage['macs_after'] / 1e6:.2f} M (aimed at {stage['target_macs'] / 1e6:.2f} M), "
                   f"score {stage['score_before']:.4f} → {stage['score_after']:.4f}</h2>")
        if stage.get("finetune") and stage["finetune"].get("status") != "off":
            out.append(f"<p>fine-tuning: {html.escape(str(stage['finetune'].get('status')))} "
                       f"{html.escape(str(stage['finetune'].get('reason', '')))}</p>")
        layers = stage["layers"]
        if layers:
            out.append("<table><tr><th>layer</th><th>ratio</th><th>rank / kept channels</th><th>MACs before (M)</th></tr>")
            for name, info in layers.items():
                kept = info.get("rank", info.get("kept_channels"))
                macs = info.get("macs_before")
                out.append(f"<tr><td style='text-align:left'>{html.escape(name)}</td><td>{info['ratio']:g}</td>"
                           f"<td>{kept}</td><td>{'' if macs is None else f'{macs / 1e6:.2f}'}</td></tr>")
            out.append("</table>")
        curves = stage["curves"]
        scores = [p["score"] for c in curves.values() for p in c if "score" in p and math.isfinite(p["score"])]
        if scores:
            lo, hi = min(scores + [stage["score_before"]]), max(scores + [stage["score_before"]])
            out.append("<h3>score per layer against the ratio kept (red: chosen; dashed: uncompressed)</h3><div class='grid'>")
            for name, curve in curves.items():
                chosen = layers.get(name, {}).get("ratio")
                out.append(_chart(name, curve, chosen, stage["score_before"], lo, hi))
            out.append("</div>")
        if stage.get("skipped"):
            out.append("<details><summary>layers not swept</summary><ul>")
            out += [f"<li>{html.escape(s['layer'])}: {html.escape(s['reason'])}</li>" for s in stage["skipped"]]
            out.append("</ul></details>")
    out.append("</body></html>")
    return "\n".join(out)
