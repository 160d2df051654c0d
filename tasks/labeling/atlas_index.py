"""The atlas index: every feature of one dictionary, or of all dictionaries of a pipeline run, in one table.

The table is sortable (click a header; again to reverse), searchable (label text, LLM label, dictionary id)
and filtered by minimum frequency and detection score, all in inline JavaScript over inline
JSON, so the page opens from disk. The URL fragment presets the view and is kept up to date, so a view can
be shared: `index.html#q=cat&minfreq=0.01&minscore=0.8&sort=frequency&desc=1`. Above the table, each
dictionary's feature-density histogram (log10 of the firing frequency of every feature that fired).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable

import polars as pl

from featureatlas.tasks.labeling.atlas_html import page, svg_histogram

__all__ = ["density_histogram", "index_page", "index_rows"]

INDEX_JS = """const rows=JSON.parse(document.getElementById('data').textContent);
const byId=id=>document.getElementById(id);
const q=byId('q'),f=byId('minfreq'),s=byId('minscore');let sortKey='latent',desc=false;
function fmt(x,d){return x===null||x===undefined?'':x.toFixed(d)}
function esc(t){return String(t).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function ws(t){return esc(t).replace(/\\n/g,'<span class="ws">↵</span>')
  .replace(/\\t/g,'<span class="ws">⇥</span>').replace(/ /g,'<span class="ws">·</span>')
  .replace(/[\\x00-\\x1f]/g,c=>'<span class="ws">'+String.fromCharCode(0x2400+c.charCodeAt(0))+'</span>')}
function cmp(a,b){const x=a[sortKey],y=b[sortKey];if(x===y)return 0;if(x===null||x===undefined)return 1;
  if(y===null||y===undefined)return -1;return (x<y?-1:1)*(desc?-1:1)}
function render(){const needle=q.value.toLowerCase(),mf=parseFloat(f.value)||0,ms=parseFloat(s.value)||0;
const shown=rows.filter(r=>[r.label,r.llm,r.dictionary].join(' ').toLowerCase().includes(needle)
  &&r.frequency>=mf&&(ms===0||(r.score||0)>=ms)).sort(cmp);
byId('count').textContent=shown.length+' of '+rows.length+' features';
document.querySelectorAll('th.sort').forEach(th=>{th.classList.remove('asc','desc');
  if(th.dataset.key===sortKey)th.classList.add(desc?'desc':'asc')});
byId('rows').innerHTML=shown.map(r=>'<tr class="feature">'+(multi?'<td>'+esc(r.dictionary)+'</td>':'')
+'<td><a href="'+esc(r.href)+'">'+r.latent+'</a></td><td>'+esc(r.label||'')
+(r.llm?' <i class="llm">'+esc(r.llm)+'</i>':'')+'</td><td class="tokc">'
+(r.promotes===null?'':ws(r.promotes))+'</td><td>'+fmt(r.frequency,5)+'</td><td>'+fmt(r.score,2)+'</td><td>'
+fmt(r.max_activation,3)+'</td></tr>').join('');
const h=new URLSearchParams();if(q.value)h.set('q',q.value);if(mf)h.set('minfreq',f.value);
if(ms)h.set('minscore',s.value);
if(sortKey!=='latent'||desc){h.set('sort',sortKey);if(desc)h.set('desc','1')}
history.replaceState(null,'','#'+h.toString());}
const multi=new Set(rows.map(r=>r.dictionary)).size>1||document.body.dataset.run==='1';
if(!multi)document.querySelectorAll('.dictcol').forEach(e=>e.remove());
const h=new URLSearchParams(location.hash.slice(1));
[['q',q],['minfreq',f],['minscore',s]].forEach(([k,e])=>{if(h.has(k))e.value=h.get(k)});
if(h.has('sort'))sortKey=h.get('sort');desc=h.get('desc')==='1';
document.querySelectorAll('th.sort').forEach(th=>th.addEventListener('click',()=>{
  if(sortKey===th.dataset.key)desc=!desc;else{sortKey=th.dataset.key;desc=th.dataset.key!=='latent'&&th.dataset.key!=='label'}
  render()}));
[q,f,s].forEach(e=>e.addEventListener('input',render));render();"""

_COLUMNS = [
    ("dictionary", "dictionary"),
    ("latent", "feature"),
    ("label", "label"),
    ("promotes", "promotes (logit lens)"),
    ("frequency", "frequency"),
    ("score", "detection"),
    ("max_activation", "max act."),
]


def index_rows(table: pl.DataFrame, dictionary_id: str, href_prefix: str = "") -> list[dict]:
    """One JSON row per feature: label (statistical, else top token), LLM label, promoted token, figures."""
    rows = []
    for f in table.iter_rows(named=True):
        promoted = f.get("promoted_tokens") or []
        rows.append(
            {
                "dictionary": dictionary_id,
                "latent": f["latent"],
                "href": f"{href_prefix}features/{f['latent']}.html",
                "label": f.get("stat_label") or f.get("label"),
                "llm": next((e["label"] for e in f.get("labels") or [] if e["label_source"] != "stat"), None),
                "promotes": promoted[0]["token"] if promoted else None,
                "frequency": f["frequency"],
                "score": f.get("detection_score"),
                "max_activation": f["max_activation"],
            }
        )
    return rows


def density_histogram(frequencies: Iterable[float], marker: float | None = None, bins: int = 30) -> str:
    """Histogram of log10(frequency) over the features that fired; `marker`: one feature's frequency."""
    logs = [math.log10(x) for x in frequencies if x and x > 0]
    if not logs:
        return ""
    lo, hi = math.floor(min(logs)), max(0.0, math.ceil(max(logs)))
    hi = hi if hi > lo else lo + 1
    counts = [0] * bins
    for v in logs:
        counts[min(int((v - lo) / (hi - lo) * bins), bins - 1)] += 1
    mark = math.log10(marker) if marker else None
    return svg_histogram(counts, lo, hi, caption="feature density, log10(frequency)", marker=mark)


def index_page(title: str, sections: list[tuple[str, list[dict]]], run: bool = False) -> str:
    """The index over `sections` [(dictionary heading, its index rows)]; `run`: always show the dictionary."""
    rows = [r for _, rs in sections for r in rs]
    hists = "".join(
        f"<div><b>{html.escape(head)}</b> {density_histogram(r['frequency'] for r in rs)}</div>"
        for head, rs in sections
    )
    head = "".join(
        f'<th class="sort{" dictcol" if key == "dictionary" else ""}" data-key="{key}">{name}</th>'
        for key, name in _COLUMNS
    )
    # "</" (or "<!--") inside inline JSON would end the script element early; \u003c is the same JSON string
    data = json.dumps(rows, ensure_ascii=False).replace("<", "\\u003c")
    body = (
        f'<h1>{html.escape(title)}</h1><div class="cols">{hists}</div>'
        '<p><label>search <input id="q" type="search" placeholder="label or dictionary"></label>'
        '<label>min frequency <input id="minfreq" type="number" step="any" value="0"></label>'
        '<label>min detection score <input id="minscore" type="number" step="any" value="0"></label></p>'
        f'<p id="count"></p><table><thead><tr>{head}</tr></thead><tbody id="rows"></tbody></table>'
        f'<script type="application/json" id="data">{data}</script>'
    )
    return page(title, body, INDEX_JS, ' data-run="1"' if run else "")
