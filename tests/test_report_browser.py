"""report.html in a real (headless) browser at a usual 1280 px window: every figure decodes and shows, and no
table or figure runs past the page's right edge, and no figure is shrunk to fit (a PNG wider than the page is
unreadable). Needs a chromium binary (Debian: ``apt-get install chromium``);
without one the test skips and says how to get it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import PNG_MAGIC, write_run
from test_report_figures import long_settings_runs

from fastrobust.analysis.report import build_report

WINDOW = (1280, 900)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# run after the page has loaded: the verdict is written into the DOM, which --dump-dom prints
CHECK = """<script>
window.addEventListener('load', function () {
  var problems = [];
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (img, i) {
    if (!(img.complete && img.naturalWidth > 0)) problems.push('image ' + i + ' (' + img.alt + ') did not load');
    else if (img.naturalWidth > img.clientWidth + 0.5)
      problems.push('image ' + i + ' is ' + img.naturalWidth + ' px wide, shrunk to ' + img.clientWidth + ' px');
  });
  var page = document.documentElement;
  if (page.scrollWidth > window.innerWidth) problems.push('the page scrolls sideways: ' + page.scrollWidth + ' px');
  var body = document.body.getBoundingClientRect();
  document.querySelectorAll('table, img').forEach(function (el, i) {
    var box = el.getBoundingClientRect();
    if (box.right > body.right + 0.5 || box.left < body.left - 0.5)
      problems.push(el.tagName.toLowerCase() + ' ' + i + ' spans ' + box.left + '-' + box.right + ' px, the body '
                    + body.left + '-' + body.right + ' px');
  });
  var verdict = document.createElement('pre');
  verdict.id = 'verdict';
  verdict.textContent = JSON.stringify({width: window.innerWidth, images: images.length,
                                        tables: document.querySelectorAll('table').length, problems: problems});
  document.body.appendChild(verdict);
});
</script>"""


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH: install one (Debian/Ubuntu: apt-get install chromium) to check "
                "report.html in a browser")


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """A report of several methods, seeds, long labels and every figure kind the records allow."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    write_run(root, "trades", "trades", 0, 0.82, 0.53, 600.0, pgd100=0.525, aa=0.49)
    for seed, acc in ((0, 0.44), (1, 0.46), (2, 0.03)):
        write_run(root, f"fast_at_seed-{seed}", "fast_at", seed, 0.86, acc, 100.0 + seed)
    for gamma, acc in ((0.5, 0.50), (1.0, 0.52)):
        write_run(root, f"bs_gamma-{gamma}", "backward_smoothing", 0, 0.80, acc, 200.0,
                  method_params={"gamma": gamma, "step_size": "8/255"}, pgd100=acc - 0.01, aa=acc - 0.05,
                  eps_curve={2 / 255: 0.75, 4 / 255: 0.65})
    long_settings_runs(root / "settings")  # groups labelled with many settings: no figure may grow wide
    out = root.parent / "report"
    build_report(root, out)
    return out / "report.html"


def test_report_page_shows_every_figure_and_nothing_overflows_at_1280_px(page, tmp_path):
    browser = _browser()
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    done = _chromium(browser, tmp_path / "profile", "--dump-dom", checked.as_uri())
    found = re.search(r"<pre id=\"verdict\">(.*?)</pre>", done.stdout, re.DOTALL)
    assert found, f"no verdict in the dumped page (exit {done.returncode}): {done.stderr[-2000:]}"
    verdict = json.loads(html.unescape(found.group(1)))
    assert verdict["width"] == WINDOW[0]
    assert verdict["images"] == page.read_text().count("data:image/png;base64,") >= 5
    assert verdict["tables"] >= 4
    assert verdict["problems"] == []

    shot = tmp_path / "report.png"
    _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", page.as_uri())
    assert shot.read_bytes()[:8] == PNG_MAGIC
