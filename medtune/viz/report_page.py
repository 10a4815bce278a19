"""``report.html``: a static error-analysis page (no server, no CDN, images embedded).

One self-contained file: the data of :func:`medtune.viz.report_data.page_data` as a JSON block,
a small stylesheet and plain JavaScript (no library). It opens offline from disk.

What the page shows: the summary metrics of the checkpoint on the dataset, then one table row per
question (thumbnail, id, question, reference, prediction, a mark per metric: ✓ right, ✗ wrong, a
number for graded metrics such as token F1), with

- filters: right / wrong (by the rule chosen: ``strict``, ``llava_med`` or ``judge``), answer
  type, modality, and a search box over id, question, reference and prediction;
- side by side: pick a second checkpoint evaluated on the same questions; its prediction and marks
  appear next to the first's, and the status filter gains "first right, second wrong",
  "first wrong, second right" and "they disagree".

Element ids used by tests and users' scripts: ``#status``, ``#rule``, ``#atype``, ``#modality``,
``#search``, ``#compare``, ``#count`` ("N of M questions"); rows are ``tr.row``, hidden ones carry
the ``hidden`` attribute.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtune.utils.jsonl import write_text_atomic

__all__ = ["render_page", "write_page"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px}
table{border-collapse:collapse}
#summary{display:flex;flex-wrap:wrap;gap:4px 18px;margin:8px 0;max-width:1200px}
#summary span{white-space:nowrap}#summary b{font-weight:600}
#controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ccc;
 display:flex;flex-wrap:wrap;gap:10px;align-items:center;z-index:1}
#rows th{background:#f4f4f4;position:sticky;top:44px}
#rows td,#rows th{border:1px solid #ddd;padding:4px 6px;vertical-align:top}
#rows img{max-width:120px;max-height:120px;display:block}
.ok{color:#0a7a2f;font-weight:bold}.bad{color:#c0262d;font-weight:bold}.na{color:#888}
tr.wrong td.pred,tr.wrong2 td.pred2{background:#fdecec}
tr.right td.pred,tr.right2 td.pred2{background:#eaf7ee}
.metrics span,.metrics2 span{display:inline-block;margin-right:6px;font-size:12px;white-space:nowrap}
.err{color:#c0262d;font-size:12px;max-width:160px;word-break:break-all}
.cmp{display:none}body.side .cmp{display:table-cell}
"""

_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const A = D.checkpoints[0];
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
// thumbnails: one object URL per distinct image instead of the data URL repeated per row
const SRC = {};
for (const [k, v] of Object.entries(D.images)) {
  if (!v.src) continue;
  const b = atob(v.src.split(',')[1]); const a = new Uint8Array(b.length);
  for (let i = 0; i < b.length; i++) a[i] = b.charCodeAt(i);
  SRC[k] = URL.createObjectURL(new Blob([a], {type: 'image/jpeg'}));
}
function options(sel, values, all){
  sel.innerHTML = `<option value="">${all}</option>` +
    values.map(v => `<option value="${esc(v)}">${esc(v)}</option>`).join('');
}
options($('atype'), [...new Set(D.rows.map(r => r.answer_type).filter(Boolean))].sort(), 'all answer types');
options($('modality'), [...new Set(D.rows.map(r => r.modality).filter(Boolean))].sort(), 'all modalities');
$('rule').innerHTML = D.rules.map(r => `<option>${esc(r)}</option>`).join('');
$('compare').innerHTML = '<option value="">side by side: off</option>' +
  D.checkpoints.slice(1).map(c => `<option value="${esc(c)}">vs ${esc(c)}</option>`).join('');
if (D.checkpoints.length < 2) $('compare').disabled = true;
if (D.thumbnails_left_out) $('note').textContent = `${D.thumbnails_left_out} images beyond ` +
  `the first ${Object.keys(D.images).length - D.thumbnails_left_out} are shown by path (no thumbnail).`;
const S = $('summary');
S.innerHTML = Object.entries(D.summary).map(([k, v]) =>
  `<span>${esc(k)}: <b>${Number.isInteger(v) ? v : v.toFixed(4)}</b></span>`).join('');
function mark(ok){return ok === true ? '<span class="ok">✓</span>' : ok === false ?
  '<span class="bad">✗</span>' : '<span class="na">–</span>';}
function metrics(p){
  if (!p) return '';
  return Object.entries(p.metrics).map(([k, v]) => `<span title="${esc(k)}">${esc(k)}: ${
    v === 0 || v === 1 ? mark(v === 1) : Number(v).toFixed(3)}</span>`).join('') +
    Object.entries(p.ok).filter(([k]) => k === 'judge').map(([k, v]) =>
      `<span>judge: ${mark(v)}</span>`).join('');
}
function cell(p){return p ? esc(p.prediction) : '<span class="na">(no prediction)</span>';}
function image(r){
  const im = D.images[r.image];
  if (!im) return '<span class="na">no image</span>';
  if (im.error) return `<div class="err">${esc(im.error)}</div>`;
  return SRC[r.image] ? `<img alt="${esc(im.path)}" title="${esc(im.path)}" src="${SRC[r.image]}">`
    : `<span title="${esc(im.path)}">${esc(im.path.split('/').pop())}</span>`;
}
const body = $('rows').tBodies[0];
body.innerHTML = D.rows.map((r, i) => `<tr class="row" data-i="${i}"><td>${image(r)}</td>
  <td>${esc(r.id)}</td><td>${esc(r.question)}</td><td>${esc(Array.isArray(r.answer) ?
  r.answer.join(' | ') : r.answer)}</td><td class="pred">${cell(r.preds[A])}</td>
  <td class="metrics">${metrics(r.preds[A])}</td><td class="cmp pred2"></td>
  <td class="cmp metrics2"></td><td>${esc(r.answer_type)}<br>${esc(r.modality)}</td></tr>`).join('');
const TR = [...body.rows];
function apply(){
  const st = $('status').value, rule = $('rule').value, at = $('atype').value,
        mo = $('modality').value, q = $('search').value.trim().toLowerCase(), B = $('compare').value;
  document.body.classList.toggle('side', !!B);
  let shown = 0;
  D.rows.forEach((r, i) => {
    const tr = TR[i], a = r.preds[A], b = B ? r.preds[B] : null;
    const okA = a ? a.ok[rule] : null, okB = b ? b.ok[rule] : null;
    tr.classList.toggle('right', okA === true); tr.classList.toggle('wrong', okA === false);
    tr.classList.toggle('right2', okB === true); tr.classList.toggle('wrong2', okB === false);
    if (B) {
      tr.querySelector('.pred2').innerHTML = cell(b);
      tr.querySelector('.metrics2').innerHTML = metrics(b);
    }
    let keep = true;
    if (st === 'right') keep = okA === true;
    else if (st === 'wrong') keep = okA === false;
    else if (st === 'unscored') keep = okA === null;
    else if (st === 'a_only') keep = okA === true && okB === false;
    else if (st === 'b_only') keep = okA === false && okB === true;
    else if (st === 'disagree') keep = okA !== null && okB !== null && okA !== okB;
    if (keep && at) keep = r.answer_type === at;
    if (keep && mo) keep = r.modality === mo;
    if (keep && q) keep = [r.id, r.question, JSON.stringify(r.answer), a ? a.prediction : '',
      b ? b.prediction : ''].join('\n').toLowerCase().includes(q);
    tr.hidden = !keep; if (keep) shown++;
  });
  $('count').textContent = `${shown} of ${D.rows.length} questions`;
  for (const o of $('status').options) o.disabled = !B && ['a_only','b_only','disagree'].includes(o.value);
}
for (const id of ['status','rule','atype','modality','compare']) $(id).addEventListener('change', apply);
$('search').addEventListener('input', apply);
apply();
"""

_BODY = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
<h1>{title}</h1>
<p>Written by medtune eval. Rules: <b>strict</b> = closed_accuracy_strict (CLOSED) /
open_exact_match (OPEN); <b>llava_med</b> = closed_accuracy_llava_med / open_hit_llava_med;
<b>judge</b> = the LLM judge's verdict (when a verdicts file was given). – = not scored.</p>
<div id="summary"></div><p id="note" class="na"></p>
<div id="controls">
<select id="status"><option value="">all</option><option value="wrong">wrong</option>
<option value="right">right</option><option value="unscored">not scored</option>
<option value="a_only">first right, second wrong</option>
<option value="b_only">first wrong, second right</option>
<option value="disagree">they disagree</option></select>
<label>rule <select id="rule"></select></label>
<select id="atype"></select><select id="modality"></select>
<input id="search" type="search" placeholder="search id, question, answer, prediction" size="36">
<select id="compare"></select>
<b id="count"></b>
</div>
<table id="rows"><thead><tr><th>image</th><th>id</th><th>question</th><th>reference</th>
<th>prediction ({first})</th><th>metrics</th><th class="cmp">second prediction</th>
<th class="cmp">second metrics</th><th>type / modality</th></tr></thead><tbody></tbody></table>
<script type="application/json" id="data">{data}</script>
<script>{js}</script>
</body></html>
"""


def render_page(data: Mapping[str, Any]) -> str:
    """The HTML text of the page for :func:`medtune.viz.report_data.page_data`'s object."""
    # "</" inside the JSON block would end the script element: escape it (JSON allows "\/")
    blob = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str).replace("</", "<\\/")
    return _BODY.format(
        title=html.escape(str(data["title"])),
        first=html.escape(str(data["checkpoints"][0])),
        css=_CSS,
        js=_JS,
        data=blob,
    )


def write_page(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_page(data))
    return path
