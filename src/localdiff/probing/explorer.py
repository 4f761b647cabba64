"""An interactive field explorer for a self-contained HTML page: hover or click a pixel of an image and
see that pixel's sensitivity field (and mask) at every noise level, side by side for several models or
datasets, with a colour bar; the arrow keys move the pixel.

Reusable: :func:`field_explorer` takes per model a field array ``[T, n, n]`` (every Jacobian row, n =
C*H*W) or ``[T, P, n]`` (one row per position, P = H*W), the image shape and labels, and returns an
HTML fragment with its data and script inline (no external file, no network). What is shown for
position p is the field summed over input channels (a ``[T, n, n]`` array is first averaged over output
channels, the convention of :mod:`localdiff.sensitivity`).

Compact embedding: each (level, position) field is quantised to int8 with its own scale
``s = max|F| / 127`` (``q = round(F / s)``, so every value is within ``s / 2 = max|F| / 254`` of the
exact one); each position's codes are stored level after level as differences from the previous level
(mod 256; the fields of neighbouring levels are alike, which makes them compress a quarter better);
masks are bit-packed; both are deflate-compressed and base64-encoded, and the page inflates them with the
browser's ``DecompressionStream`` and sums the differences back. The values on display are exposed in the DOM for
checks: every field canvas carries ``data-values`` (row-major H x W), ``data-pixel``, ``data-max``.
"""

from __future__ import annotations

import base64
import html
import json
import zlib
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError

QUANTISATION = ("int8 per (level, position): s = max|F| / 127 (float32), q = round(F / s); every decoded value "
                "q * s is within s / 2 = max|F| / 254 of the exact one")
# the diverging colour map of the page (also used by the tests): blue (-1), near-white (0), red (+1)
COLOUR_NEG, COLOUR_ZERO, COLOUR_POS = (33, 102, 172), (247, 247, 247), (178, 24, 43)


def colour(x: float) -> tuple[int, int, int]:
    """The page's colour of a value ``x`` in [-1, 1] (relative to the panel's scale), as the script computes it."""
    x = max(-1.0, min(1.0, float(x)))
    end = COLOUR_POS if x > 0 else COLOUR_NEG
    u = abs(x)
    return tuple(int(np.floor((1 - u) * z + u * e + 0.5)) for z, e in zip(COLOUR_ZERO, end))


def _b64_deflate(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def quantise(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fields`` [T, P, m] -> (int8 codes [T, P, m], float32 scales [T, P]) with ``|F - q s| <= s / 2``."""
    f = np.asarray(fields, dtype=np.float64)
    peak = np.abs(f).max(axis=-1)  # [T, P]
    scale = (peak / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale.astype(np.float64), 1.0)
    q = np.clip(np.rint(f / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


def display_fields(fields: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``[T, n, n]`` or ``[T, P, n]`` -> what the explorer shows, ``[T, P, H*W]`` float64 (see module); a
    ``[T, P, P]`` array of colour images is taken as already summed over input channels."""
    c, h, w = (int(s) for s in shape)
    p, n = h * w, c * h * w
    f = np.asarray(fields, dtype=np.float64)
    if f.ndim == 3 and f.shape[1:] == (p, p) and c > 1:
        return f  # already one summed map per position
    if f.ndim != 3 or f.shape[2] != n or f.shape[1] not in (p, n):
        raise ConfigError(f"fields must be [T, {n}, {n}] or [T, {p}, {n}] (or [T, {p}, {p}] already summed over input "
                          f"channels) for images of shape {tuple(shape)}, got {tuple(f.shape)}")
    if f.shape[1] == n and c > 1:
        f = f.reshape(f.shape[0], c, p, n).mean(axis=1)  # mean over output channels
    return f.reshape(f.shape[0], p, c, p).sum(axis=2)  # sum over input channels


def encode_model(fields: np.ndarray, shape: tuple[int, int, int], *, masks: np.ndarray | None = None,
                 background: np.ndarray | None = None) -> dict:
    """One model's explorer data: quantised, compressed fields; packed masks [T, P, P]; background [C, H, W]."""
    c, h, w = (int(s) for s in shape)
    shown = display_fields(fields, shape)
    q, scale = quantise(shown)  # [T, P, m]
    steps = np.diff(q.transpose(1, 0, 2).astype(np.int16), axis=1, prepend=0).astype(np.int8)  # [P, T, m], wraps
    out = {"shape": [c, h, w], "levels": int(shown.shape[0]), "fields": _b64_deflate(steps.tobytes()),
           "scales": _b64_deflate(scale.astype("<f4").tobytes()), "masks": None, "mask_bytes": 0}
    if masks is not None:
        m = np.asarray(masks, dtype=bool)
        if m.shape != shown.shape:
            raise ConfigError(f"masks must be [T, P, P] = {tuple(shown.shape)}, got {tuple(m.shape)}")
        packed = np.packbits(m, axis=-1)  # [T, P, ceil(P / 8)], first position in the high bit
        out["masks"], out["mask_bytes"] = _b64_deflate(packed.tobytes()), int(packed.shape[-1])
    bg = np.zeros((c, h, w)) if background is None else np.asarray(background, dtype=np.float64)
    if bg.shape != (c, h, w):
        raise ConfigError(f"background must be [C, H, W] = {(c, h, w)}, got {tuple(bg.shape)}")
    out["background"] = [round(float(v), 4) for v in bg.ravel()]
    return out


def field_explorer(fields: Mapping[str, np.ndarray], shape, level_labels: Sequence[str], *,
                   masks: Mapping[str, np.ndarray] | None = None, backgrounds: Mapping[str, np.ndarray] | None = None,
                   element_id: str = "field-explorer", title: str = "Field explorer",
                   mask_label: str = "mask") -> str:
    """The explorer as an HTML fragment (data and script inline).

    ``fields``: per model label, ``[T, n, n]`` or ``[T, P, n]``; ``shape``: ``(C, H, W)`` for every model or a
    mapping per model (models of other sizes follow the pixel at the same relative position);
    ``level_labels``: T labels (``"t = 900"``); ``masks``: per model ``[T, P, P]`` bool (row p = the positions
    in p's mask); ``backgrounds``: per model the image ``[C, H, W]`` on the [-1, 1] scale to pick pixels on
    (default grey), e.g. the dataset's mean image."""
    if not fields:
        raise ConfigError("the field explorer needs at least one model's fields")
    shapes = {k: tuple(shape[k] if isinstance(shape, Mapping) else shape) for k in fields}
    models = []
    for label, f in fields.items():
        enc = encode_model(f, shapes[label], masks=None if masks is None else masks.get(label),
                           background=None if backgrounds is None else backgrounds.get(label))
        if enc["levels"] != len(level_labels):
            raise ConfigError(f"model '{label}' has {enc['levels']} levels but {len(level_labels)} labels were given")
        models.append({"label": str(label), **enc})
    spec = {"levels": [str(s) for s in level_labels], "models": models, "quantisation": QUANTISATION,
            "mask_label": mask_label, "colours": [COLOUR_NEG, COLOUR_ZERO, COLOUR_POS]}
    data = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
    eid = html.escape(element_id, quote=True)
    return (f"<div class=\"ex-root\" id=\"{eid}\" tabindex=\"0\" data-state=\"loading\" aria-label=\"{html.escape(title)}\">"
            f"<div class=\"ex-bar\"><span class=\"ex-pixel\">loading the fields…</span> <label><input type=\"checkbox\" "
            "class=\"ex-shared\"> one colour scale per noise level (shared by all rows)</label> "
            "<canvas class=\"ex-colourbar\" width=\"200\" height=\"1\"></canvas> <span class=\"ex-cb-label\"></span>"
            "</div><div class=\"ex-rows\"></div></div>"
            f"<script type=\"application/json\" id=\"{eid}-data\">{data}</script>"
            f"<style>{CSS}</style><script>{_SCRIPT.replace('%ID%', json.dumps(element_id))}</script>")


CSS = """
.ex-root{outline:none;margin:.8em 0}.ex-root:focus{box-shadow:0 0 0 2px #9bc}
.ex-bar{position:sticky;top:0;background:#fff;padding:.4em 0;z-index:2;font-size:.92em}
.ex-colourbar{width:200px;height:12px;vertical-align:middle;border:1px solid #999;image-rendering:pixelated}
.ex-row{display:flex;gap:12px;align-items:flex-start;margin:.6em 0;border-top:1px solid #eee;padding-top:.4em}
.ex-head{width:170px;flex:none;font-size:.9em}.ex-head canvas{width:168px;cursor:crosshair;image-rendering:pixelated;
border:1px solid #bbb}.ex-panels{display:grid;gap:4px 6px}.ex-panel{text-align:center;font-size:.72em;color:#444}
.ex-panel canvas{width:78px;image-rendering:pixelated;border:1px solid #ddd;display:block;margin:0 auto}
"""

_SCRIPT = r"""
(function () {
  var ID = %ID%, root = document.getElementById(ID);
  var spec = JSON.parse(document.getElementById(ID + '-data').textContent);
  var C = spec.colours, state = {r: 0, c: 0, locked: false};
  function bytes(b64) { var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i); return out; }
  function inflate(b64) {
    var stream = new Blob([bytes(b64)]).stream().pipeThrough(new DecompressionStream('deflate'));
    return new Response(stream).arrayBuffer().then(function (b) { return new Uint8Array(b); });
  }
  function colour(x) { x = Math.max(-1, Math.min(1, x)); var e = x > 0 ? C[2] : C[0], u = Math.abs(x);
    return [0, 1, 2].map(function (k) { return Math.floor((1 - u) * C[1][k] + u * e[k] + 0.5); }); }
  function el(tag, cls, parent) { var e = document.createElement(tag); if (cls) e.className = cls;
    if (parent) parent.appendChild(e); return e; }
  function canvas(h, w, parent, cls) { var c = el('canvas', cls, parent); c.width = w; c.height = h; return c; }
  function paint(cv, h, w, rgbAt) { var ctx = cv.getContext('2d'), img = ctx.createImageData(w, h);
    for (var i = 0; i < h * w; i++) { var p = rgbAt(i); img.data[4 * i] = p[0]; img.data[4 * i + 1] = p[1];
      img.data[4 * i + 2] = p[2]; img.data[4 * i + 3] = 255; } ctx.putImageData(img, 0, 0); }
  var ref = spec.models[0].shape, rows = root.querySelector('.ex-rows'), T = spec.levels.length;
  function mapPixel(m) { var s = m.shape;
    return [Math.min(s[1] - 1, Math.floor((state.r + 0.5) * s[1] / ref[1])),
            Math.min(s[2] - 1, Math.floor((state.c + 0.5) * s[2] / ref[2]))]; }
  function build() {
    spec.models.forEach(function (m) {
      var row = el('div', 'ex-row', rows), head = el('div', 'ex-head', row), h = m.shape[1], w = m.shape[2];
      el('div', null, head).textContent = m.label;
      m.bg = canvas(h, w, head, 'ex-mean'); m.bg.dataset.model = m.label;
      m.bg.style.height = (168 * h / w) + 'px';
      var panels = el('div', 'ex-panels', row);
      panels.style.gridTemplateColumns = 'repeat(' + T + ', 84px)';
      m.fc = []; m.mc = []; m.cap = []; m.mcap = [];
      for (var t = 0; t < T; t++) { var fig = el('div', 'ex-panel', panels);
        el('div', null, fig).textContent = spec.levels[t];
        var cv = canvas(h, w, fig, 'ex-field'); cv.dataset.model = m.label; cv.dataset.level = spec.levels[t];
        cv.style.height = (78 * h / w) + 'px'; m.fc.push(cv); m.cap.push(el('div', null, fig)); }
      if (m.mask) for (var t2 = 0; t2 < T; t2++) { var f2 = el('div', 'ex-panel', panels);
        var mv = canvas(h, w, f2, 'ex-mask'); mv.dataset.model = m.label; mv.dataset.level = spec.levels[t2];
        mv.style.height = (78 * h / w) + 'px'; m.mc.push(mv); m.mcap.push(el('div', null, f2)); }
      function pick(ev) { var rect = m.bg.getBoundingClientRect();
        var r = Math.floor((ev.clientY - rect.top) / rect.height * h), c = Math.floor((ev.clientX - rect.left) / rect.width * w);
        r = Math.max(0, Math.min(h - 1, r)); c = Math.max(0, Math.min(w - 1, c));
        return [Math.min(ref[1] - 1, Math.floor((r + 0.5) * ref[1] / h)), Math.min(ref[2] - 1, Math.floor((c + 0.5) * ref[2] / w))]; }
      m.bg.addEventListener('mousemove', function (ev) { if (state.locked) return; var p = pick(ev); set(p[0], p[1], false); });
      m.bg.addEventListener('click', function (ev) { var p = pick(ev); set(p[0], p[1], true); root.focus(); });
    });
    var cb = root.querySelector('.ex-colourbar');
    paint(cb, 1, 200, function (i) { return colour(i / 99.5 - 1); });
  }
  function field(m, t, p) { var P = m.shape[1] * m.shape[2], off = (p * T + t) * P, s = m.scales[t * P + p], out = new Array(P);
    for (var i = 0; i < P; i++) out[i] = m.q[off + i] * s; return out; }
  function render() {
    var shared = root.querySelector('.ex-shared').checked, lims = [];
    for (var t = 0; t < T; t++) lims.push(0);
    spec.models.forEach(function (m) { var rc = mapPixel(m), p = rc[0] * m.shape[2] + rc[1], P = m.shape[1] * m.shape[2];
      m.cur = []; for (var t = 0; t < T; t++) { var v = field(m, t, p), mx = 127 * m.scales[t * P + p];
        m.cur.push({v: v, max: mx, p: p, rc: rc}); lims[t] = Math.max(lims[t], mx); } });
    spec.models.forEach(function (m) { var h = m.shape[1], w = m.shape[2], P = h * w, rc = m.cur[0].rc, bg = m.background;
      paint(m.bg, h, w, function (i) { if (i === m.cur[0].p) return [230, 40, 40];
        var v = 0; for (var ch = 0; ch < m.shape[0]; ch++) v += bg[ch * P + i]; v = Math.round((v / m.shape[0] + 1) * 127.5);
        if (m.shape[0] === 3) return [0, 1, 2].map(function (ch) { return Math.round((bg[ch * P + i] + 1) * 127.5); });
        return [v, v, v]; });
      for (var t = 0; t < T; t++) { var cur = m.cur[t], lim = shared ? lims[t] : cur.max, cv = m.fc[t];
        paint(cv, h, w, function (i) { return lim > 0 ? colour(cur.v[i] / lim) : C[1]; });
        cv.dataset.values = cur.v.map(function (x) { return x.toPrecision(7); }).join(' ');
        cv.dataset.pixel = rc[0] + ',' + rc[1]; cv.dataset.max = cur.max.toPrecision(7); cv.dataset.scale = lim.toPrecision(7);
        m.cap[t].textContent = 'max ' + cur.max.toPrecision(2);
        if (m.mask) { var nb = m.mask_bytes, off = (t * P + cur.p) * nb, count = 0, mv = m.mc[t];
          paint(mv, h, w, function (i) { var bit = (m.mask[off + (i >> 3)] >> (7 - (i & 7))) & 1; count += bit;
            return i === cur.p ? [230, 40, 40] : bit ? [40, 40, 40] : [255, 255, 255]; });
          mv.dataset.size = count; mv.dataset.pixel = cv.dataset.pixel;
          m.mcap[t].textContent = spec.mask_label + ': ' + count + ' px'; } } });
    root.querySelector('.ex-pixel').textContent = 'pixel (row ' + state.r + ', column ' + state.c + ') of ' + ref[1] + ' x ' +
      ref[2] + (state.locked ? ' (held: arrow keys move it, Esc releases)' : ' (hover; click to hold it)');
    root.querySelector('.ex-cb-label').textContent = shared ? '−max … 0 … +max of each noise level' : '−max … 0 … +max of each panel (written under it)';
    root.dataset.pixel = state.r + ',' + state.c;
  }
  function set(r, c, lock) { state.r = Math.max(0, Math.min(ref[1] - 1, r)); state.c = Math.max(0, Math.min(ref[2] - 1, c));
    if (lock !== undefined && lock !== false) state.locked = true; render(); }
  root.addEventListener('keydown', function (ev) { var d = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]}[ev.key];
    if (d) { ev.preventDefault(); set(state.r + d[0], state.c + d[1], true); }
    else if (ev.key === 'Escape') { state.locked = false; render(); } });
  Promise.all(spec.models.map(function (m) {
    return Promise.all([inflate(m.fields), inflate(m.scales), m.masks ? inflate(m.masks) : Promise.resolve(null)])
      .then(function (a) { var q = new Int8Array(a[0].buffer), P = m.shape[1] * m.shape[2];
        for (var p = 0; p < P; p++) for (var t = 1; t < T; t++) {  // level differences back to codes (mod 256)
          var o = (p * T + t) * P; for (var i = 0; i < P; i++) q[o + i] += q[o - P + i]; }
        m.q = q; var dv = new DataView(a[1].buffer);
        m.scales = new Float32Array(a[1].length / 4); for (var i = 0; i < m.scales.length; i++) m.scales[i] = dv.getFloat32(4 * i, true);
        m.mask = a[2]; });
  })).then(function () { build(); state.r = ref[1] >> 1; state.c = ref[2] >> 1;
    root.querySelector('.ex-shared').addEventListener('change', render); render(); root.dataset.state = 'ready'; })
    .catch(function (e) { root.dataset.state = 'error'; root.querySelector('.ex-pixel').textContent = 'the explorer failed: ' + e;
      console.error('localdiff explorer: ' + e); });
})();
"""

__all__ = ["field_explorer", "encode_model", "display_fields", "quantise", "colour", "QUANTISATION"]
