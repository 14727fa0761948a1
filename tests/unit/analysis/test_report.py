"""The HTML report renders: in headless Chromium it shows every section and decodes every plot."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from tiny_models import batches, classifier_eval, classifier_model

from onnxq.analysis import AnalysisConfig, analyze
from onnxq.analysis.report import SECTIONS, render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install 'onnxq[report]'")
    out = tmp_path_factory.mktemp("report")
    result = analyze(classifier_model(), batches(4), classifier_eval, eval_data=batches(2, seed=3),
                     options=AnalysisConfig(metric="acc", workers=1, plots=2, fixes=("per-channel",)),
                     output_dir=out)
    return result, out


def test_plots_are_written_and_embedded(report):
    _, out = report
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert {"sensitivity.png", "layer_sqnr.png", "weight_spread.png", "trials.png"} <= set(pngs)
    assert any(p.startswith("weights_") for p in pngs) and any(p.startswith("activation_") for p in pngs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "http://" not in html and "https://" not in html  # self-contained


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report):
    _, out = report
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
           "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={out / 'chromium'}",
           "--dump-dom", (out / "report.html").resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False).stdout
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    decoded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert images >= 6 and decoded == images
    assert "per-channel weights for gemm_4" in dom


def test_without_matplotlib_the_report_says_how_to_get_plots(report):
    result, _ = report
    html = render_html(result.data, {}, plots_wanted=True)
    assert "pip install 'onnxq[report]'" in html and "<img " not in html
