"""What every self-contained HTML page of localdiff shares: styles, the image check, escaping, tables,
figures embedded as base64 data URIs (no external files).

The page carries a tiny inline script that, once the page has loaded, checks that every ``<img>``
decoded (``naturalWidth > 0``) and records the result on the root element
(``data-image-check="ok"|"broken"``, ``data-images="loaded/total"``) and in the footer; a broken image
is also reported with ``console.error``. On success the page logs nothing to the console.
"""

from __future__ import annotations

import base64
import html
import math

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:18px 26px;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.lead{font-size:1.05em;background:#f3f6fb;border-left:4px solid #3b6fb6;padding:.6em .9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #d6d6d6;padding:.3em .6em;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left} tr.best td{background:#eaf6e6;font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.93em;max-width:900px}
.grids{display:flex;flex-wrap:wrap;gap:14px} .grids figure{margin:0;text-align:center} .grids img{image-rendering:pixelated}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.note{color:#8a5a00} footer{margin-top:2em;color:#666;font-size:.85em}
.warn{background:#fff4e5;border-left:4px solid #d9822b;padding:.5em .9em;color:#6b3d00}
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  var root = document.documentElement;
  root.setAttribute('data-images', (imgs.length - bad.length) + '/' + imgs.length);
  root.setAttribute('data-image-check', bad.length ? 'broken' : 'ok');
  var status = document.getElementById('image-check');
  if (status) {
    status.textContent = bad.length ? bad.length + ' of ' + imgs.length + ' images failed to load'
                                    : 'all ' + imgs.length + ' images loaded';
  }
  if (bad.length) {
    console.error('localdiff report: broken images: ' + bad.map(function (img) { return img.alt; }).join(', '));
  }
});
"""


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def num(x, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(f"<tr class=\"{classes[i] if classes else ''}\">" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, parts: list[str]) -> str:
    """The whole document: styles and the image check inline, ``parts`` as the body."""
    body = "\n".join(p for p in parts if p)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n"
            f"<script>{CHECK_SCRIPT}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def img(png: bytes, alt: str, caption: str) -> str:
    return f"<figure><img src=\"{data_uri(png)}\" alt=\"{esc(alt)}\"><figcaption>{esc(caption)}</figcaption></figure>"



__all__ = ["data_uri", "esc", "num", "table", "page", "img", "CSS", "CHECK_SCRIPT"]
