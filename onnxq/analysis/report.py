"""The analysis report: ``analysis.json``, ``plan.json``, one self-contained ``report.html`` and
``plots/*.png``.

The HTML file needs nothing else: styles are inline and every plot is embedded as a base64 PNG,
so it opens offline from disk or as an attachment. Sections (element ids): ``summary``,
``diagnosis``, ``sanity``, ``sensitivity``, ``weight-ranges``, ``activation-ranges``, ``plan``.
Plots need matplotlib (``pip install 'onnxq[report]'``); without it the report holds the tables
and says how to get the plots. ``plan.json`` is a :class:`~onnxq.quant.config.QuantConfig` file:
``onnxq quantize model.onnx --calib DIR --config plan.json --passes …`` reproduces the plan.
"""

from __future__ import annotations

__all__ = ["make_plots", "render_html", "terminal_summary", "write_report"]

import base64
import html
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SECTIONS = ("summary", "diagnosis", "sanity", "sensitivity", "weight-ranges", "activation-ranges", "plan")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(data: Mapping[str, Any], out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write the report files into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = out / "analysis.json"
    paths["json"].write_text(json.dumps(_finite(data), indent=1, default=_json_default))
    paths["plan"] = out / "plan.json"
    paths["plan"].write_text(json.dumps(data["plan"]["config"], indent=1))
    images: dict[str, bytes] = {}
    if plots:
        images = make_plots(data)
        if images:
            plot_dir = out / "plots"
            plot_dir.mkdir(exist_ok=True)
            for name, png in images.items():
                (plot_dir / f"{name}.png").write_bytes(png)
            paths["plots"] = plot_dir
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(data, images, plots_wanted=plots))
    return paths


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def make_plots(data: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG bytes by plot name; empty when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots (pip install 'onnxq[report]')")
        return {}
    import io

    images: dict[str, bytes] = {}

    def save(name: str, fig: Any) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        images[name] = buf.getvalue()

    sens = list(data["sensitivity"])
    n_plot = int(data["analysis"].get("plots", 12))
    top = sens[: max(10, min(40, len(sens)))]
    if top:
        labels = [_short(f"{e['kind'][0]}: {e['node'] if e['kind'] == 'weight' else e['tensor']}") for e in top]
        en = [(e.get("enabled_alone") or {}).get("proxy", {}).get("sqnr_db") for e in top]
        dis = [(e.get("disabled_alone") or {}).get("proxy", {}).get("sqnr_db") for e in top]
        colors = ["#c0392b" if e["kind"] == "weight" else "#2874a6" for e in top]
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.28 * len(top) + 1.5), sharey=True)
        y = range(len(top))
        axes[0].barh(list(y), [v if v is not None else 0 for v in en], color=colors)
        axes[0].set_xlabel("output SQNR with this quantizer alone enabled (dB, lower = worse)")
        axes[1].barh(list(y), [v if v is not None else 0 for v in dis], color=colors)
        full = (data["summary"]["quantized"].get("proxy") or {}).get("sqnr_db")
        if full is not None:
            axes[1].axvline(full, color="k", ls="--", lw=1, label=f"all enabled: {full:.1f} dB")
            axes[1].legend(loc="lower right", fontsize=8)
        axes[1].set_xlabel("output SQNR with this quantizer alone disabled (dB, higher = it hurts)")
        axes[0].set_yticks(list(y))
        axes[0].set_yticklabels(labels, fontsize=7)
        axes[0].invert_yaxis()
        fig.suptitle("Per-quantizer sensitivity, most harmful first (red: weights, blue: activations)")
        save("sensitivity", fig)

        layer = sorted((e for e in sens if e.get("layer")), key=lambda e: e.get("graph_index", 0))
        if layer:
            fig, ax = plt.subplots(figsize=(13, 3.5))
            vals = [e["layer"]["sqnr_db"] for e in layer]
            ax.bar(range(len(vals)), vals,
                   color=["#c0392b" if e["kind"] == "weight" else "#2874a6" for e in layer])
            ax.set_ylabel("SQNR vs float (dB)")
            ax.set_xlabel("quantizer, in graph order (red: layer output at a weight quantizer, blue: dequantized activation)")
            ax.set_title("Per-layer output SQNR of the quantized model against the float model (calibration data)")
            save("layer_sqnr", fig)

    w_ranges = data["weight_ranges"]
    if w_ranges:
        ids = list(w_ranges)
        spread = [w_ranges[i]["spread"] for i in ids]
        fig, ax = plt.subplots(figsize=(13, 3.5))
        x = list(range(len(ids)))
        ax.bar(x, [min(s, 1e4) for s in spread], color=["#e67e22" if w_ranges[i]["depthwise"] else "#7f8c8d" for i in ids],
               label="before CLE (orange: depthwise)")
        if any(w_ranges[i].get("cle") for i in ids):
            ax.plot(x, [min((w_ranges[i].get("cle") or {}).get("spread", float("nan")), 1e4) for i in ids],
                    "k.", label="after CLE")
        ax.axhline(10, color="r", ls="--", lw=1, label="spread 10")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("max / median channel range")
        ax.set_xlabel("weight layer, in graph order")
        ax.legend(fontsize=8)
        ax.set_title("Per-channel weight-range spread of every layer")
        save("weight_spread", fig)
        worst_w = [e["id"] for e in sens if e["kind"] == "weight" and e["id"] in w_ranges][:n_plot]
        for k, qid in enumerate(worst_w):
            r = w_ranges[qid]
            panels = 2 if r.get("cle") else 1
            fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 3), squeeze=False)
            for ax, (title, stats) in zip(axes[0], [("before CLE", r), ("after CLE", r.get("cle"))]):
                c = list(range(len(stats["min"])))
                ax.vlines(c, stats["min"], stats["max"], color="#2874a6", lw=1)
                if title == "before CLE":
                    ax.axhline(r["grid"][0], color="r", ls="--", lw=1, label="per-tensor grid")
                    ax.axhline(r["grid"][1], color="r", ls="--", lw=1)
                    ax.legend(fontsize=7, loc="upper right")
                ax.set_title(f"{title}: spread {stats['spread']:.1f}", fontsize=9)
                ax.set_xlabel("output channel")
                ax.set_ylabel("weight min..max")
            fig.suptitle(_short(f"{r['node']} ({'depthwise ' if r['depthwise'] else ''}{r['op_type']})", 80), fontsize=10)
            save(f"weights_{k:02d}", fig)

    a_ranges = data["activation_ranges"]
    worst_a = [e["id"] for e in sens if e["kind"] == "activation" and e["id"] in a_ranges][:n_plot]
    for k, qid in enumerate(worst_a):
        r = a_ranges[qid]
        fig, ax = plt.subplots(figsize=(6.5, 3))
        hist = r["hist"]
        edges = [r["lo"] + r["width"] * i for i in range(len(hist) + 1)]
        ax.stairs(hist, edges, fill=True, color="#5dade2")
        ax.set_yscale("log")
        ax.axvline(r["grid"][0], color="r", ls="--", lw=1, label=f"{r['bits']}-bit grid")
        ax.axvline(r["grid"][1], color="r", ls="--", lw=1)
        ax.axvline(r["min"], color="k", ls=":", lw=1, label="observed min/max")
        ax.axvline(r["max"], color="k", ls=":", lw=1)
        ax.legend(fontsize=7)
        ax.set_title(_short(f"{r['tensor']}: {100 * r['clipped']:.3f}% clipped", 70), fontsize=9)
        ax.set_xlabel("value")
        save(f"activation_{k:02d}", fig)

    trials = [t for t in data["trials"] if t.get("score") is not None]
    if trials:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot(range(len(trials)), [t["score"] for t in trials], "o", color="#7f8c8d", ms=4, label="tried")
        kept = [(i, t["score"]) for i, t in enumerate(trials) if t["kept"]]
        if kept:
            ax.plot(*zip(*kept), "o", color="#27ae60", ms=6, label="kept")
        ax.axhline(data["metric"]["target"], color="r", ls="--", lw=1, label="target")
        fp = data["summary"]["fp32"]["score"]
        if fp is not None and data["metric"]["name"] != "sqnr_db":
            ax.axhline(fp, color="k", ls=":", lw=1, label="FP32")
        ax.set_xlabel("trial")
        ax.set_ylabel(data["metric"]["name"])
        ax.legend(fontsize=7)
        ax.set_title("Fixes tried and kept")
        save("trials", fig)
    return images


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f4f6f7}td.l,th.l{text-align:left}tr.kept td{background:#e9f7ef}
.ok{color:#1e8449;font-weight:bold}.bad{color:#c0392b;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}pre{background:#f8f9f9;padding:.8em;overflow:auto;font-size:.8em}
.grid{display:flex;flex-wrap:wrap;gap:.5em}.grid img{max-width:590px}
.note{color:#666;font-size:.9em}
"""

_SCRIPT = """
window.addEventListener('load',function(){var imgs=document.images,ok=0;
for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-loaded',ok);document.body.setAttribute('data-images',imgs.length);});
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None:
        return "–"
    if "dB" in fmt and isinstance(v, (int, float)) and v >= 199.0:
        return "exact"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return _e(v)


def _img(images: Mapping[str, bytes], name: str, alt: str) -> str:
    png = images.get(name)
    if not png:
        return ""
    b64 = base64.b64encode(png).decode()
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}" data-plot="{_e(name)}">'


def render_html(data: Mapping[str, Any], images: Mapping[str, bytes], plots_wanted: bool = True) -> str:
    m = data["metric"]
    s = data["summary"]
    name = m["name"]
    fmt = "{:.1f} dB" if name == "sqnr_db" else "{:.4f}"
    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>onnxq quantization analysis</title>",
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>Quantization analysis: {_e(Path(str(data['model'])).name)}</h1>",
        f"<p class='note'>{data['quantizers']} quantizers; config: weights "
        f"{_e(_spec(data['config']['weights']))}, activations {_e(_spec(data['config']['activations']))}; "
        f"passes: {_e(', '.join(data['passes']) or 'none')}; metric: {_e(name)} ({_e(m['source'])}); "
        f"analysis time {_num(data['timing_s'].get('total'), '{:.0f}')} s on {data['workers']} worker(s).</p>",
    ]
    if plots_wanted and not images:
        parts.append("<p class='note'>No plots: matplotlib is not installed "
                     "(<code>pip install 'onnxq[report]'</code>).</p>")

    # summary
    parts.append("<section id='summary'><h2>Summary</h2><table><tr><th class='l'>model</th>"
                 f"<th>{_e(name)}</th><th>drop vs FP32</th><th>output SQNR</th><th>agreement</th></tr>")
    labels = {"fp32": "FP32", "quantized": "quantized (as configured)", "weights_only": "weights only",
              "activations_only": "activations only", "plan": "automatic fix (plan.json)"}
    for key, label in labels.items():
        row = s.get(key) or {}
        proxy = row.get("proxy") or {}
        drop = row.get("drop")
        parts.append(f"<tr><td class='l'>{label}</td><td>{_num(row.get('score'), fmt)}</td>"
                     f"<td>{_num(None if drop is None else 0.0 - drop * 100 + 0.0, '{:+.2f} pt')}</td>"
                     f"<td>{_num(proxy.get('sqnr_db'), '{:.1f} dB')}</td>"
                     f"<td>{_num(proxy.get('agreement'), '{:.4f}')}</td></tr>")
    parts.append(f"</table><p class='note'>Target: {_e(name)} {'≥' if m['higher_is_better'] else '≤'} "
                 f"{_num(m['target'], fmt)}. Proxy columns: against FP32 on "
                 f"{data['data']['held_out_samples']} held-out samples.</p></section>")

    # diagnosis
    parts.append("<section id='diagnosis'><h2>Diagnosis</h2><ul>")
    parts += [f"<li>{_e(w)}</li>" for w in data["diagnosis"]]
    parts.append("</ul></section>")

    # sanity
    san = data["sanity"]
    status = "<span class='ok'>OK</span>" if san["ok"] else "<span class='bad'>FAILED</span>"
    parts.append(f"<section id='sanity'><h2>FP32 sanity</h2><p>{status}: with every quantizer lossless "
                 f"(no rounding, no clamping) the QDQ model differs from the float model by max |Δ| = "
                 f"{_num(san['max_abs_diff'], '{:.3g}')} ({_num(san['max_rel_diff'], '{:.3g}')} of the "
                 f"output range) on {san['samples']} samples.</p>")
    if san["problems"]:
        parts.append("<table><tr><th class='l'>quantizer</th><th class='l'>problem</th></tr>")
        parts += [f"<tr><td class='l'>{_e(p['quantizer'])}</td><td class='l'>{_e(p['problem'])}</td></tr>"
                  for p in san["problems"][:50]]
        parts.append("</table>")
    parts.append("</section>")

    # sensitivity
    parts.append("<section id='sensitivity'><h2>Per-quantizer sensitivity</h2>"
                 "<p class='note'>Enabled alone: only this quantizer on; disabled alone: all but this "
                 "one on (variants of the same QDQ model, no recalibration). Layer SQNR: the quantized "
                 "model's output at that point against the float model on calibration data.</p>")
    parts.append(_img(images, "sensitivity", "per-quantizer sensitivity"))
    parts.append(_img(images, "layer_sqnr", "per-layer SQNR"))
    use_eval = any((e.get("enabled_alone") or {}).get("eval") for e in data["sensitivity"])
    parts.append("<table><tr><th>rank</th><th class='l'>quantizer</th><th class='l'>op</th>"
                 "<th>enabled alone SQNR</th><th>disabled alone SQNR</th>"
                 + ("<th>enabled alone metric</th>" if use_eval else "")
                 + "<th>layer SQNR</th><th>layer MSE</th><th>spread</th><th>clipped</th></tr>")
    for e in data["sensitivity"][:40]:
        en = (e.get("enabled_alone") or {})
        dis = (e.get("disabled_alone") or {})
        layer = e.get("layer") or {}
        parts.append(
            f"<tr><td>{e['rank']}</td><td class='l'>{_e(e['id'])}</td><td class='l'>"
            f"{'depthwise ' if e.get('depthwise') else ''}{_e(e['op_type'])}</td>"
            f"<td>{_num(en.get('proxy', {}).get('sqnr_db'), '{:.1f} dB')}</td>"
            f"<td>{_num(dis.get('proxy', {}).get('sqnr_db'), '{:.1f} dB')}</td>"
            + (f"<td>{_num(en.get('eval', {}).get('score'))}</td>" if use_eval else "")
            + f"<td>{_num(layer.get('sqnr_db'), '{:.1f} dB')}</td><td>{_num(layer.get('mse'), '{:.3g}')}</td>"
            f"<td>{_num(e.get('spread'), '{:.1f}')}</td>"
            f"<td>{_num(None if 'clipped' not in e else 100 * e['clipped'], '{:.3f}%')}</td></tr>")
    parts.append("</table></section>")

    # weight ranges
    parts.append("<section id='weight-ranges'><h2>Per-channel weight ranges</h2>"
                 f"<p class='note'>Spread = max / median of the per-channel max |w|; above ~10 per-tensor "
                 f"quantization fails. {'After CLE: the same model after cross-layer equalization.' if data.get('cle_ran') else ''}</p>")
    parts.append(_img(images, "weight_spread", "weight-range spread"))
    parts.append("<div class='grid'>")
    parts += [_img(images, k, k) for k in sorted(images) if k.startswith("weights_")]
    parts.append("</div><table><tr><th class='l'>layer</th><th class='l'>op</th><th>channels</th>"
                 "<th>spread</th><th>after CLE</th><th>max |w|</th></tr>")
    w_sorted = sorted(data["weight_ranges"].values(), key=lambda r: -r["spread"] if math.isfinite(r["spread"]) else -1e30)
    for r in w_sorted[:25]:
        parts.append(f"<tr><td class='l'>{_e(r['node'])}</td><td class='l'>{'depthwise ' if r['depthwise'] else ''}"
                     f"{_e(r['op_type'])}</td><td>{r['channels']}</td><td>{_num(r['spread'], '{:.1f}')}</td>"
                     f"<td>{_num((r.get('cle') or {}).get('spread'), '{:.1f}')}</td><td>{_num(r['max_abs'], '{:.3g}')}</td></tr>")
    parts.append("</table></section>")

    # activation ranges
    parts.append("<section id='activation-ranges'><h2>Activation histograms and encodings</h2>"
                 "<p class='note'>Calibration histograms of the most sensitive activation quantizers, with "
                 "the grid of their encoding (red) and the observed min/max (dotted).</p><div class='grid'>")
    parts += [_img(images, k, k) for k in sorted(images) if k.startswith("activation_")]
    parts.append("</div></section>")

    # plan
    plan = data["plan"]
    parts.append("<section id='plan'><h2>Mixed-precision plan</h2>")
    ps = s.get("plan") or {}
    state = "<span class='ok'>target met</span>" if plan["met"] else "<span class='bad'>target not met</span>"
    parts.append(f"<p>{state}: {_e(name)} {_num(ps.get('score'), fmt)} (FP32 {_num(s['fp32']['score'], fmt)}, "
                 f"target {_num(m['target'], fmt)}), {len(plan['high_precision'])} high-precision quantizer(s).</p>")
    if plan["changes"]:
        parts.append("<ol>" + "".join(f"<li>{_e(c)}</li>" for c in plan["changes"]) + "</ol>")
    else:
        parts.append("<p>No change.</p>")
    cmd = (f"onnxq quantize {_e(Path(str(data['model'])).name)} --calib DIR --config plan.json "
           f"--passes {_e(reproduce_passes(plan) or 'none')}")
    parts.append(f"<p>Reproduce: <code>{cmd}</code></p>")
    parts.append(_img(images, "trials", "trials"))
    parts.append("<table><tr><th class='l'>step</th><th class='l'>fix</th><th class='l'>change</th>"
                 f"<th>{_e(name)}</th><th class='l'>kept</th></tr>")
    for t in data["trials"]:
        parts.append(f"<tr class='{'kept' if t['kept'] else ''}'><td class='l'>{_e(t['step'])}</td>"
                     f"<td class='l'>{_e(t['fix'])}</td><td class='l'>{_e(t['change'])}</td>"
                     f"<td>{_num(t['score'], fmt)}</td><td class='l'>{'yes' if t['kept'] else _e(t.get('error') or '')}</td></tr>")
    parts.append("</table><details><summary>plan.json</summary><pre>"
                 + _e(json.dumps(plan["config"], indent=1)) + "</pre></details>")
    timing = data.get("timing_s", {})
    parts.append("<p class='note'>Time per step (s): " + ", ".join(f"{_e(k)} {v:.1f}" for k, v in timing.items())
                 + "</p></section></body></html>")
    return "\n".join(p for p in parts if p)


def reproduce_passes(plan: Mapping[str, Any]) -> str:
    """``--passes`` for ``onnxq quantize``: the float passes, then the weight algorithms as data
    steps (``adaround:iterations=300;…``)."""
    items = list(plan["passes"])
    for algo in plan.get("algorithms", []):
        opts = ";".join(f"{k}={v}" for k, v in sorted(algo.get("options", {}).items()))
        items.append(algo["name"] + (f":{opts}" if opts else ""))
    return ",".join(items)


def _spec(spec: Mapping[str, Any]) -> str:
    return (f"{spec['bits']}-bit {'symmetric' if spec['symmetric'] else 'asymmetric'} "
            f"{'per-channel' if spec.get('per_channel') else 'per-tensor'} {spec['range_method']}")


def terminal_summary(data: Mapping[str, Any]) -> str:
    """A few lines for the end of ``onnxq analyze``."""
    m = data["metric"]
    s = data["summary"]
    name = m["name"]
    fmt = "{:.1f} dB" if name == "sqnr_db" else "{:.4f}"
    lines = [f"{'':<26}{name:>12}{'drop':>10}"]
    for key, label in (("fp32", "FP32"), ("quantized", "quantized"), ("weights_only", "weights only"),
                       ("activations_only", "activations only"), ("plan", "automatic fix")):
        row = s.get(key) or {}
        drop = row.get("drop")
        lines.append(f"{label:<26}{_num(row.get('score'), fmt):>12}"
                     f"{_num(None if drop is None else 0.0 - drop * 100 + 0.0, '{:+.2f} pt'):>10}")
    san = data["sanity"]
    lines.append(f"sanity: {'OK' if san['ok'] else 'FAILED'} (max |Δ| {san['max_abs_diff']:.3g})")
    worst = data["sensitivity"][:3]
    if worst:
        lines.append("worst quantizers: " + ", ".join(e["id"] for e in worst))
    plan = data["plan"]
    lines.append(f"plan ({'target met' if plan['met'] else 'target NOT met'}): "
                 + ("; ".join(plan["changes"]) if plan["changes"] else "no change"))
    lines.append(f"reproduce: onnxq quantize MODEL --calib DIR --config plan.json --passes "
                 f"{reproduce_passes(plan) or 'none'}")
    lines.append(f"analysis time: {data['timing_s'].get('total', 0):.0f} s")
    return "\n".join(lines)
