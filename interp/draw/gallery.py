"""A static HTML gallery of a ``visualize`` output folder.

``index.html`` needs no server: it only references files next to it
(``assets/...``, the panel PNGs) and carries its data in the markup, so it
works from ``file://`` (where browsers refuse ``fetch``). It lists every
layer; per channel the top-k tiles (projection for the selected method, the
input crop below); hovering, focusing or clicking a tile shows the full input
image with the unit's receptive-field box drawn on it (a click pins it).
A layer the engine could not handle exactly (a measured or global-context
receptive field, a nonlinearity without a projection rule) shows its notes
in a box under its title, and its link in the navigation carries a mark.

The page is built from ``gallery.json``, written by :func:`interp.visualize`.
"""
from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .panels import METHOD_NAMES, to_uint8
from .._utils import write_atomic

__all__ = ["write_gallery", "load_manifest", "encode_tile"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:2;
  display:flex;gap:6px 16px;align-items:center;flex-wrap:wrap;margin-right:340px}
header h1{font-size:18px;margin:0}
.weights{font-size:12px;color:#444}
.weights.random{color:#a04000}
nav#layers{display:flex;flex-wrap:wrap;gap:2px 10px;padding:6px 16px;margin-right:340px;max-height:7.5em;
  overflow-y:auto;border-bottom:1px solid #ddd;background:#fff}
nav#layers a{font-size:13px;white-space:nowrap}
main{padding:8px 16px 16px;margin-right:340px}
section.layer{margin:18px 0 28px;scroll-margin-top:var(--header-h,64px)}
section.layer h2{font-size:17px;margin:4px 0}
.panels a{font-size:13px;margin-right:10px}
.channel{display:flex;align-items:flex-start;gap:6px;margin:6px 0;flex-wrap:wrap}
.channel .label{width:84px;font-size:12px;padding-top:22px}
.tile{margin:0;padding:2px;border:2px solid transparent;cursor:pointer;background:#fff;text-align:center}
.tile:hover,.tile:focus,.tile.pinned{border-color:#d22;outline:none}
.tile img{display:block;width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#888}
.tile figcaption{font-size:10px;color:#666}
#viewer{position:fixed;right:0;top:0;width:320px;padding:10px;background:#fff;border-left:1px solid #ddd;
  height:100vh;box-sizing:border-box;overflow:auto;z-index:3}
#viewer .frame{position:relative;width:300px;line-height:0;background:#888}
#viewer-img{width:100%;height:100%;image-rendering:pixelated;visibility:hidden}
#viewer-box{position:absolute;border:2px solid #f22;box-shadow:0 0 0 1px #fff;box-sizing:border-box;display:none}
#viewer-caption{font-size:12px;line-height:1.4;margin-top:8px;word-break:break-all}
.hint{font-size:12px;color:#666}
.notes{margin:4px 0 8px;padding:6px 10px;background:#fff4e0;border-left:4px solid #e08a00;font-size:13px;
  max-width:900px}
.notes p{margin:2px 0}
nav a.noted::after{content:" \\26A0";color:#c06000}
"""

_JS = """
(function(){
  var viewer = document.getElementById('viewer');
  var img = document.getElementById('viewer-img');
  var frame = viewer.querySelector('.frame');
  var box = document.getElementById('viewer-box');
  var caption = document.getElementById('viewer-caption');
  var pinned = null;
  function show(tile){
    var b = tile.getAttribute('data-box').split(',').map(Number);
    var h = Number(tile.getAttribute('data-h')), w = Number(tile.getAttribute('data-w'));
    // Size the frame from the known input size, so the box is right even
    // before the image has loaded.
    frame.style.aspectRatio = w + ' / ' + h;
    img.src = tile.getAttribute('data-input');
    img.style.visibility = 'visible';  // hidden until a tile is chosen: no broken-image icon
    box.style.top = (100 * b[0] / h) + '%';
    box.style.left = (100 * b[1] / w) + '%';
    box.style.height = (100 * (b[2] - b[0]) / h) + '%';
    box.style.width = (100 * (b[3] - b[1]) / w) + '%';
    box.style.display = 'block';
    caption.textContent = tile.getAttribute('data-caption');
    viewer.setAttribute('data-shown', tile.id);
  }
  function restore(){ if (pinned) { show(pinned); } }
  var tiles = document.querySelectorAll('.tile');
  for (var i = 0; i < tiles.length; i++) {
    (function(tile){
      tile.addEventListener('mouseenter', function(){ show(tile); });
      tile.addEventListener('focus', function(){ show(tile); });
      tile.addEventListener('mouseleave', restore);
      tile.addEventListener('click', function(){
        if (pinned) { pinned.classList.remove('pinned'); }
        pinned = (pinned === tile) ? null : tile;
        if (pinned) { pinned.classList.add('pinned'); show(tile); }
      });
    })(tiles[i]);
  }
  var select = document.getElementById('method');
  // Open on the method the page was written with (the first of --method),
  // whatever selection the browser restores from an earlier visit.
  select.value = document.body.getAttribute('data-method');
  function setMethod(){ document.body.setAttribute('data-method', select.value); }
  select.addEventListener('change', setMethod);
  setMethod();
  // A jump to a layer lands below the sticky header, however tall it wrapped.
  var header = document.querySelector('header');
  function fit(){ document.documentElement.style.setProperty('--header-h', (header.offsetHeight + 8) + 'px'); }
  window.addEventListener('resize', fit);
  fit();
})();
"""


def encode_tile(tile: np.ndarray, max_px: int | None = 128) -> tuple[bytes, str]:
    """Encode a gallery tile: PNG for small fields (exact pixels), JPEG otherwise.

    Tiles larger than ``max_px`` are shrunk (the page shows them at 64 px);
    that keeps a ResNet all-conv gallery at a few MB instead of tens.
    """
    img = Image.fromarray(to_uint8(tile))
    if max_px is not None and max(img.size) > max_px:
        s = max_px / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    if max(tile.shape[:2]) <= 64:
        img.save(buf, format="PNG")  # (optimize=True: about 20% more time for under 1% fewer bytes on 48 px crops)
        return buf.getvalue(), "png"
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue(), "jpg"


def load_manifest(out_dir: str | Path) -> dict:
    """Read ``gallery.json`` from a ``visualize`` output folder."""
    out_dir = Path(out_dir)
    path = out_dir / "gallery.json"
    if not out_dir.is_dir():
        raise FileNotFoundError(f"folder not found: {out_dir}")
    if not path.is_file():
        raise FileNotFoundError(
            f"{out_dir} has no gallery.json; run `cnn-internals visualize MODEL --data PATH --out {out_dir}` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run `cnn-internals visualize`") from exc
    if data.get("format") != "cnn-internals.gallery/1":
        raise ValueError(f"{path} is not a cnn-internals gallery manifest")
    return data


_NOTED = ' class="noted" title="this layer has notes"'


def _attr(v: object) -> str:
    return html.escape(str(v), quote=True)


def weights_text(weights: dict | None) -> str:
    """One line saying where the model's weights came from (a manifest's ``"weights"``)."""
    if not weights:
        return "weights: not recorded"
    if weights.get("random"):
        seed = weights.get("seed")
        return "weights: random" + (f" (seed {seed})" if seed is not None else "") + ", not trained"
    parts = [str(weights.get("name", "?"))]
    if weights.get("file"):
        parts.append(Path(str(weights["file"])).name)
    if weights.get("weights"):
        parts.append(str(weights["weights"]))
    if weights.get("source"):
        parts.append(f"from its {weights['source']}")
    if weights.get("sha256"):
        parts.append(f"sha256 {str(weights['sha256'])[:12]}")
    return "weights: " + ", ".join(parts)


def render_html(manifest: dict) -> str:
    """The gallery page for a manifest (see :func:`interp.visualize`)."""
    model_id = manifest["model_id"]
    methods = manifest["methods"]
    h, w = manifest["input_size"]
    weights = manifest.get("weights") or {}  # (manifests written before provenance existed have none)
    weights_title = weights.get("file") or ""
    # Hide every projection except the selected method's (pure CSS, no JS needed).
    css_methods = "".join(
        f'body[data-method="{m}"] img.proj:not([data-method="{m}"]){{display:none}}' for m in methods
    )
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cnn-internals: {_attr(model_id)}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{_CSS}{css_methods}</style></head>",
        f'<body data-method="{_attr(methods[0])}">',
        f"<header><h1>{_attr(model_id)}</h1>",
        '<label>projection <select id="method" autocomplete="off">'
        + "".join(f'<option value="{_attr(m)}"{" selected" if i == 0 else ""}>{_attr(METHOD_NAMES.get(m, m))}'
                  "</option>" for i, m in enumerate(methods))
        + "</select></label>",
        f'<span class="weights{" random" if weights.get("random") else ""}" title="{_attr(weights_title)}">'
        f"{_attr(weights_text(manifest.get('weights')))}</span>",
        f'<span class="hint">top-{manifest["k"]} of {manifest["n_images"]} images; hover or click a tile '
        "to see its receptive field on the input</span></header>",
        # Outside the sticky header: with 80+ layers it wraps to many lines and scrolls on its own.
        '<nav id="layers" aria-label="layers">'
        + "".join(f'<a href="#layer-{i}"{_NOTED if L.get("notes") else ""}>{_attr(L["name"])}</a>'
                  for i, L in enumerate(manifest["layers"]))
        + "</nav>",
        "<main>",
    ]
    for li, layer in enumerate(manifest["layers"]):
        out.append(f'<section class="layer" id="layer-{li}"><h2>{_attr(layer["title"])}</h2>')
        if layer.get("notes"):  # (manifests written before notes existed have none)
            out.append('<div class="notes" role="note"><strong>Note:</strong>'
                       + "".join(f"<p>{_attr(n)}</p>" for n in layer["notes"]) + "</div>")
        out.append('<div class="panels">panel: ' + "".join(
            f'<a href="{_attr(p)}">{_attr(METHOD_NAMES.get(m, m))}</a>' for m, p in layer["panels"].items()
        ) + "</div>")
        for ch in layer["channels"]:
            out.append(f'<div class="channel"><div class="label">channel {ch["channel"]}</div>')
            for t in ch["tiles"]:
                tid = f"t{li}-{ch['channel']}-{t['rank']}"
                caption = (f"{layer['name']} channel {ch['channel']} rank {t['rank'] + 1}: "
                           f"value {t['value']:.4g} at (y={t['y']}, x={t['x']}); {t['label']}; "
                           f"receptive field rows {t['box'][0]}-{t['box'][2] - 1}, cols {t['box'][1]}-{t['box'][3] - 1}")
                imgs = "".join(
                    f'<img class="proj" data-method="{_attr(m)}" src="{_attr(p)}" alt="{_attr(m)} projection">'
                    for m, p in t["proj"].items()
                )
                out.append(
                    f'<figure class="tile" id="{tid}" tabindex="0" data-input="{_attr(t["input"])}" '
                    f'data-box="{",".join(str(int(v)) for v in t["box"])}" data-h="{h}" data-w="{w}" '
                    f'data-caption="{_attr(caption)}">{imgs}'
                    f'<img class="crop" src="{_attr(t["crop"])}" alt="input crop">'
                    f"<figcaption>{t['value']:.3g}</figcaption></figure>"
                )
            out.append("</div>")
        out.append("</section>")
    out += [
        "</main>",
        '<aside id="viewer"><div class="frame"><img id="viewer-img" alt="input image">'
        '<div id="viewer-box"></div></div><div id="viewer-caption" class="hint">'
        "Hover or click a tile.</div></aside>",
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(out) + "\n"


def write_gallery(out_dir: str | Path) -> Path:
    """Write ``index.html`` for a ``visualize`` output folder; returns its path.

    Raises
    ------
    FileNotFoundError
        When the folder or its ``gallery.json`` (or a file it names) is missing.
    """
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    missing = []
    for layer in manifest["layers"]:
        for ch in layer["channels"]:
            for t in ch["tiles"]:
                for rel in [t["input"], t["crop"], *t["proj"].values()]:
                    if not (out_dir / rel).is_file():
                        missing.append(rel)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} gallery file(s) missing in {out_dir} (e.g. {missing[0]}); "
            "re-run `cnn-internals visualize` into this folder"
        )
    return write_atomic(out_dir / "index.html", render_html(manifest))
