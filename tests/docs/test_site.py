"""The documentation site: it builds with warnings as errors, its code runs, its links and images work.

* ``mkdocs build --strict`` (warnings are errors), into a temporary folder;
* every ```python block of every page runs, page by page in one namespace, in order
  (the README's own blocks are run by ``tests/docs/test_readme.py``);
* every ``cnn-internals`` command line in a ```bash block parses with the real
  command-line parser (those need data, GPUs or minutes, so they are parsed, not run);
* headless Chromium opens every built page from ``file://`` and finds no image that
  failed to load and no link to a missing page or anchor.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from interp.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO / "tests"))  # also when run as a script
from _chromium import CHROMIUM_FLAGS, chromium  # noqa: E402

PAGES = sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_docs_build_strict_and_cover_every_page(site):
    built = {p.relative_to(site).with_suffix(".md") for p in site.rglob("*.html")}
    missing = [p.relative_to(DOCS) for p in PAGES if p.relative_to(DOCS) not in built]
    assert not missing, f"pages not in the built site: {missing}"
    assert (site / "reference" / "engine.html").read_text().count("interp.project") > 0


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write output folders into the current directory
    namespace: dict = {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
        try:
            exec(compile(block, f"{page.name}[python block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name} python block {i} failed: {exc!r}\n{block}") from exc


def _command_lines(text: str) -> list[str]:
    """``cnn-internals`` invocations in the ```bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "interp.cli " in line:
                line = "cnn-internals " + line.split("interp.cli ", 1)[1]
            if line.startswith("cnn-internals "):
                out.append(line)
    return out


def test_docs_command_lines_parse():
    parser = build_parser()
    lines = [(page, line) for page in PAGES + [REPO / "README.md"] for line in _command_lines(page.read_text())]
    assert len(lines) >= 10
    for page, line in lines:
        words = [w for w in shlex.split(line)[1:] if w not in ("[--sync-bn]",)]
        try:
            parser.parse_args(words)
        except SystemExit as exc:  # argparse reports on stderr and exits 2
            raise AssertionError(f"{page.name}: command line does not parse: {line}") from exc


PROBE = """<script>
window.addEventListener('load', function () {
  var broken = [];
  document.querySelectorAll('img').forEach(function (i) {
    if (!i.complete || i.naturalWidth === 0) broken.push(i.getAttribute('src')); });
  var links = Array.prototype.map.call(document.querySelectorAll('a[href]'), function (a) { return a.href; });
  var r = document.createElement('pre'); r.id = '__report';
  r.textContent = JSON.stringify({broken: broken, links: links});
  document.body.appendChild(r);
});
</script>"""


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k in ("id", "name") and v)


def _ids(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        parser = _Ids()
        parser.feed(path.read_text(encoding="utf-8"))
        cache[path] = parser.ids
    return cache[path]


def test_site_has_no_broken_links_or_images(site, tmp_path):
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    assert len(pages) >= len(PAGES)
    problems, anchors = [], {}
    for page in pages:
        probe = page.with_name("__probe.html")
        probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
        try:
            proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                                   "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=90)
        finally:
            probe.unlink()
        m = re.search(r'<pre id="__report">(.*?)</pre>', proc.stdout, re.S)
        assert m, f"{page.name}: no report in Chromium's DOM dump: {proc.stderr[-1500:]}"
        report = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        name = page.relative_to(site)
        problems += [f"{name}: image did not load: {src}" for src in report["broken"]]
        for href in report["links"]:
            url = urlparse(href)
            if url.scheme != "file":
                continue  # the site links no external page but the theme's own; none is fetched here
            target = Path(unquote(url.path))
            if target.name == "__probe.html":
                target = page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{name}: broken link {href}")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _ids(target, anchors):
                problems.append(f"{name}: link to a missing anchor {href}")
    assert not problems, "\n".join(problems)


def readme_as_index(readme: str) -> str:
    """The site's home page: the README with its links made relative to ``docs/``."""
    t = readme.replace("](ARCHITECTURE.md)", "](architecture.md)").replace("](docs/images/", "](images/").replace("](docs/guide/", "](guide/").replace("](docs/", "](")
    t = t.replace("[`docs/`](", "`docs/` (").replace("(`docs/` (", "(")
    t = t.replace("[`benchmarks/RESULTS.md`](benchmarks/RESULTS.md)", "`benchmarks/RESULTS.md` in the repository")
    return t.replace("The documentation site is built from `docs/` () with MkDocs Material",
                     "This site is built from the `docs/` folder of the repository with MkDocs Material")


def architecture_as_page(text: str) -> str:
    """The site's architecture page: ARCHITECTURE.md (it sits next to the README) with its links made relative."""
    return text.replace("](docs/", "](")


def test_home_page_is_the_readme():
    expected = readme_as_index((REPO / "README.md").read_text())
    assert (DOCS / "index.md").read_text() == expected, (
        "docs/index.md is out of date with README.md: run `python tests/docs/test_site.py`")


def test_architecture_page_is_architecture_md():
    expected = architecture_as_page((REPO / "ARCHITECTURE.md").read_text())
    assert (DOCS / "architecture.md").read_text() == expected, (
        "docs/architecture.md is out of date with ARCHITECTURE.md: run `python tests/docs/test_site.py`")


if __name__ == "__main__":  # regenerate docs/index.md and docs/architecture.md from the top-level pages
    (DOCS / "index.md").write_text(readme_as_index((REPO / "README.md").read_text()))
    (DOCS / "architecture.md").write_text(architecture_as_page((REPO / "ARCHITECTURE.md").read_text()))
