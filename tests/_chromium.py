"""Headless Chromium for the page tests: load a page from file:// and report what broke."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000",
]

# Injected before the page's own code: records JS errors, failed resource
# loads and console.error calls; after load it clicks the first tile and
# writes a JSON report into the DOM for --dump-dom.
PROBE = """<script>
window.__errs = [];
window.addEventListener('error', function (e) {
  window.__errs.push(e.message || ('failed to load ' + (e.target && (e.target.src || e.target.href))));
}, true);
(function () { var o = console.error; console.error = function () {
  window.__errs.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); o.apply(console, arguments); }; })();
window.addEventListener('load', function () {
  var tiles = document.querySelectorAll('.tile'), broken = 0;
  document.querySelectorAll('img[src]').forEach(function (i) { if (i.complete && i.naturalWidth === 0) broken++; });
  if (tiles.length) tiles[tiles.length - 1].click();
  var vi = document.getElementById('viewer-img');
  if (vi.complete) { setTimeout(finish, 0); } else { vi.addEventListener('load', finish); vi.addEventListener('error', finish); }
  function finish() {
  var box = document.getElementById('viewer-box').getBoundingClientRect();
  var frame = document.querySelector('#viewer .frame').getBoundingClientRect();
  var visible = document.querySelectorAll('img.proj').length ? Array.prototype.filter.call(
      document.querySelectorAll('img.proj'), function (i) { return i.offsetParent !== null; }).length : 0;
  var r = document.createElement('pre'); r.id = '__report';
  r.textContent = JSON.stringify({errors: window.__errs, tiles: tiles.length, broken: broken,
    shown: document.getElementById('viewer').getAttribute('data-shown'),
    box: [box.top - frame.top, box.left - frame.left, box.width, box.height], frame: [frame.width, frame.height],
    visibleProj: visible,
    notes: Array.prototype.map.call(document.querySelectorAll('section.layer'), function (sec) {
      var n = sec.querySelector('.notes'), r = n ? n.getBoundingClientRect() : null;
      return r && r.width > 0 && r.height > 0 ? n.textContent : null; }),
    noted: document.querySelectorAll('nav a.noted').length});
  document.body.appendChild(r);
  }
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium not found: the gallery test needs Debian's chromium "
                "(`.ci/run` installs it; locally: apt-get install -y chromium)")


def load_in_chromium(index: Path, tmp_path: Path) -> dict:
    probe_page = index.with_name("probe.html")
    html = index.read_text(encoding="utf-8")
    probe_page.write_text(html.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    try:
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
             "--v=0", "--dump-dom", probe_page.as_uri()],
            capture_output=True, text=True, timeout=90,
        )
    finally:
        probe_page.unlink()
    m = re.search(r'<pre id="__report">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no report in Chromium's DOM dump (rc {proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    # Console messages Chromium logs itself (uncaught errors are "CONSOLE" lines).
    report["console"] = [line for line in proc.stderr.splitlines()
                         if "CONSOLE" in line or "Uncaught" in line]
    return report
