"""The gallery of a deep model (85 layers) at 1280x800 in headless Chromium: no sideways overflow,
the header covers neither the viewer nor a layer jumped to, and the page opens on the CLI's method."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import interp
from interp.data import ArrayImages

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000", "--window-size=1280,800",
         "--hide-scrollbars"]

# After load: measure the layout, jump to the last layer through the navigation, measure again.
PROBE = """<script>
window.addEventListener('load', function () {
  function rect(el) { var r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }
  var nav = document.querySelector('nav#layers'), header = document.querySelector('header');
  var viewer = document.getElementById('viewer');
  var shown = Array.prototype.filter.call(document.querySelectorAll('img.proj'),
      function (i) { return i.offsetParent !== null; }).map(function (i) { return i.getAttribute('data-method'); });
  var report = {innerWidth: window.innerWidth, pageWidth: document.documentElement.scrollWidth,
    navScroll: [nav.scrollWidth, nav.clientWidth], navLinks: nav.querySelectorAll('a').length,
    header: rect(header), viewer: rect(viewer), nav: rect(nav),
    method: document.getElementById('method').value, shown: Array.from(new Set(shown))};
  var links = nav.querySelectorAll('a');
  links[links.length - 1].click();
  setTimeout(function () {
    report.jumped = rect(document.getElementById('layer-' + (links.length - 1)).querySelector('h2'));
    report.headerAfter = rect(header);
    var pre = document.createElement('pre'); pre.id = '__report'; pre.textContent = JSON.stringify(report);
    document.body.appendChild(pre);
  }, 100);
});
</script>"""


@pytest.fixture(scope="module")
def deep_gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(85)]).eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    data = ArrayImages(pixels, lambda im: torch.from_numpy(np.asarray(im, np.float32)[None] / 255.0), mode="L")
    # Not deconvnet first: the page must open on the first method asked for.
    interp.visualize(model, data, out, "all-conv", channels=[0], k=1, methods=["gradient", "deconvnet"],
                     model_id="deep", progress=False, weights_info={"random": True, "seed": 0})
    return out


def test_deep_gallery_fits_1280x800_and_opens_on_the_first_method(deep_gallery, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.fail("chromium not found: the gallery test needs Debian's chromium (apt-get install -y chromium)")
    page = deep_gallery / "probe_layout.html"
    page.write_text((deep_gallery / "index.html").read_text().replace("<head>", "<head>" + PROBE, 1))
    try:
        proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                               page.as_uri()], capture_output=True, text=True, timeout=90)
    finally:
        page.unlink()
    m = re.search(r'<pre id="__report">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no report (rc {proc.returncode}): {proc.stderr[-2000:]}"
    r = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert r["innerWidth"] == 1280 and r["navLinks"] == 85
    assert r["pageWidth"] <= r["innerWidth"], "the page scrolls sideways"
    assert r["navScroll"][0] <= r["navScroll"][1], "the layer navigation overflows sideways"
    assert r["nav"][3] - r["nav"][1] < 200, "the navigation takes most of the screen"
    # Header and viewer side by side, never on top of each other.
    assert r["header"][2] <= r["viewer"][0] and r["nav"][2] <= r["viewer"][0]
    assert r["header"][3] - r["header"][1] < 120
    # The layer jumped to starts below the (sticky) header.
    assert r["jumped"][1] >= r["headerAfter"][3] - 1, r
    assert r["jumped"][3] <= 800
    assert r["method"] == "gradient" and r["shown"] == ["gradient"]
