"""A static HTML atlas of one dictionary's features: opens from disk, no server, no network.

`atlas/index.html` lists every latent with its label, frequency and detection score, with a search box
(label text) and minimum-frequency / minimum-score filters, all in inline JavaScript over inline JSON; the
URL fragment presets them (`index.html#q=cat&minfreq=0.01&minscore=0.8`).
`atlas/features/<latent>.html` shows one latent: its labels and evidence, top contexts (every token shaded
by the latent's activation on it, the peak token marked) and quantile examples (the sampled token marked),
the activation histogram, logit tables, decoder neighbours and co-occurring latents. Everything is escaped;
files are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path

import polars as pl

__all__ = ["write_atlas"]

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em}
table{border-collapse:collapse}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}
.ctx{font-family:monospace;white-space:pre-wrap}.bar{display:inline-block;background:#4a7;height:1em}
mark{background:rgba(255,120,0,var(--a));padding:0 .1em}input{margin-right:1em}
.tok{background:rgba(255,120,0,var(--a))}mark.peak{outline:1px solid #c60}.none{color:#999}"""

INDEX_JS = """const rows=JSON.parse(document.getElementById('data').textContent);
const byId=id=>document.getElementById(id);
const q=byId('q'),f=byId('minfreq'),s=byId('minscore');
function fmt(x,d){return x===null?'':x.toFixed(d)}
function esc(t){return String(t).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function render(){const needle=q.value.toLowerCase(),mf=parseFloat(f.value)||0,ms=parseFloat(s.value)||0;
const shown=rows.filter(r=>((r.label||'')+' '+(r.llm||'')).toLowerCase().includes(needle)&&r.frequency>=mf
  &&(ms===0||(r.score||0)>=ms));
byId('count').textContent=shown.length+' of '+rows.length+' features';
byId('rows').innerHTML=shown.map(r=>'<tr class="feature"><td><a href="features/'+r.latent
+'.html">'+r.latent+'</a></td><td>'+esc(r.label||'')+(r.llm?' <i class="llm">'+esc(r.llm)+'</i>':'')
+'</td><td>'+fmt(r.frequency,5)+'</td><td>'
+fmt(r.score,2)+'</td><td>'+fmt(r.max_activation,3)+'</td></tr>').join('');}
const h=new URLSearchParams(location.hash.slice(1));  // index.html#q=cat&minfreq=0.01 is a shareable view
[['q',q],['minfreq',f],['minscore',s]].forEach(([k,e])=>{if(h.has(k))e.value=h.get(k)});
[q,f,s].forEach(e=>e.addEventListener('input',render));render();"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _highlight(text: str, activation: float, max_act: float) -> str:
    """Escape a «marked» context and shade the marked token by activation / max activation."""
    alpha = _alpha(activation, max_act)
    before, _, rest = text.partition("«")
    token, _, after = rest.partition("»")
    return (
        f'<span class="ctx">{html.escape(before)}<mark style="--a:{alpha:.2f}" '
        f'title="{activation:.3f}">{html.escape(token)}</mark>{html.escape(after)}</span>'
    )


def _alpha(activation: float, max_act: float) -> float:
    return 0.15 + 0.85 * min(max(activation / max_act, 0.0), 1.0) if max_act > 0 else 0.5


def _highlight_window(c: dict, max_act: float) -> str:
    """A top context with every token shaded by the latent's activation there; the peak token is a <mark>.

    Tokens without an activation row (e.g. an excluded first token) are greyed; silent ones are unshaded."""
    parts = []
    for i, (tok, act) in enumerate(zip(c["tokens"], c["token_activations"])):
        text = html.escape(tok)
        if i == c["centre"]:
            parts.append(
                f'<mark class="peak" style="--a:{_alpha(act or 0.0, max_act):.2f}" title="{act:.3f}">'
                f"{text}</mark>"
            )
        elif act is None:
            parts.append(f'<span class="none" title="no activation">{text}</span>')
        elif act > 0:
            parts.append(
                f'<span class="tok" style="--a:{_alpha(act, max_act):.2f}" title="{act:.3f}">{text}</span>'
            )
        else:
            parts.append(text)
    return f'<span class="ctx">{"".join(parts)}</span>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _labels_table(labels: list[dict]) -> list[str]:
    """Every label of the feature, whichever labeler wrote it, with its scores."""
    if not labels:
        return []

    def fmt(x):
        return "" if x is None else f"{x:.2f}"

    rows = [
        [
            html.escape(e["label_source"]),
            html.escape(e["label"]),
            fmt(e["detection_score"]),
            fmt(e["embedding_similarity"]),
        ]
        for e in labels
    ]
    return ["<h2>Labels</h2>", _table(["source", "label", "detection", "embedding"], rows)]


def _feature_page(f: dict, dictionary_id: str) -> str:
    latent, max_act = f["latent"], f["max_activation"] or 0.0
    label = f.get("stat_label") or f.get("label") or "(no label)"
    parts = [
        f'<p><a href="../index.html">← all features of {html.escape(dictionary_id)}</a></p>',
        f"<h1>Feature {latent}: {html.escape(label)}</h1>",
        f"<p>frequency {f['frequency']:.5f} · max activation {max_act:.3f} · detection "
        f"{'' if f.get('detection_score') is None else format(f['detection_score'], '.2f')} · embedding "
        f"{'' if f.get('embedding_similarity') is None else format(f['embedding_similarity'], '.2f')}</p>",
        f"<details><summary>label evidence</summary><pre>{html.escape(f.get('stat_label_evidence') or '')}"
        "</pre></details>",
        *_labels_table(f.get("labels") or []),
        "<h2>Top contexts</h2>",
        _table(
            ["activation", "context"],
            [
                [
                    f"{c['activation']:.3f}",
                    _highlight_window(c, max_act)
                    if c.get("tokens")
                    else _highlight(c["text"], c["activation"], max_act),
                ]
                for c in f["contexts"]
            ],
        ),
    ]
    hist = f.get("hist_counts") or []
    if hist:
        peak = max(hist) or 1
        width = max_act / len(hist)
        parts += [
            "<h2>Activation histogram</h2>",
            _table(
                ["activation", "count", ""],
                [
                    [
                        f"{i * width:.3f}–{(i + 1) * width:.3f}",
                        str(n),
                        f'<span class="bar" style="width:{20 * n / peak:.1f}em"></span>',
                    ]
                    for i, n in enumerate(hist)
                ],
            ),
        ]
    examples = f.get("quantile_examples") or []
    if examples:
        parts += [
            "<h2>Examples by activation quantile</h2>",
            _table(
                ["quantile", "activation", "context"],
                [
                    [
                        str(e["quantile"]),
                        f"{e['activation']:.3f}",
                        _highlight(e["text"], e["activation"], max_act),
                    ]
                    for e in examples
                ],
            ),
        ]
    for key, title in (("promoted_tokens", "Promoted tokens"), ("suppressed_tokens", "Suppressed tokens")):
        if f.get(key):
            parts += [
                f"<h2>{title}</h2>",
                _table(
                    ["token", "logit"],
                    [[html.escape(json.dumps(t["token"])), f"{t['logit']:.3f}"] for t in f[key]],
                ),
            ]
    for key, title, score in (
        ("decoder_neighbours", "Nearest by decoder cosine", "cosine"),
        ("cooccurring", "Co-occurring features", "Jaccard"),
    ):
        if f.get(key):
            parts += [
                f"<h2>{title}</h2>",
                _table(
                    ["feature", score],
                    [
                        [f'<a href="{n["latent"]}.html">{n["latent"]}</a>', f"{n['score']:.3f}"]
                        for n in f[key]
                    ],
                ),
            ]
    return _page(f"feature {latent}: {label}", "".join(parts))


def write_atlas(table: pl.DataFrame, folder: str | Path, dictionary_id: str) -> Path:
    """Write the atlas of `table` (the feature table) to `folder`; returns the path of index.html."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "features").mkdir()
        index = []
        for f in table.iter_rows(named=True):
            (tmp / "features" / f"{f['latent']}.html").write_text(_feature_page(f, dictionary_id))
            index.append(
                {
                    "latent": f["latent"],
                    "label": f.get("stat_label") or f.get("label"),
                    "llm": next(
                        (e["label"] for e in f.get("labels") or [] if e["label_source"] != "stat"), None
                    ),
                    "frequency": f["frequency"],
                    "score": f.get("detection_score"),
                    "max_activation": f["max_activation"],
                }
            )
        # "</" inside inline JSON would end the script element early
        data = json.dumps(index, ensure_ascii=False).replace("</", "<\\/")
        body = (
            f"<h1>Feature atlas of {html.escape(dictionary_id)}</h1>"
            '<p><label>search labels <input id="q" type="search"></label>'
            '<label>min frequency <input id="minfreq" type="number" step="any" value="0"></label>'
            '<label>min detection score <input id="minscore" type="number" step="any" value="0"></label></p>'
            '<p id="count"></p><table><thead><tr><th>feature</th><th>label</th><th>frequency</th>'
            '<th>detection</th><th>max act.</th></tr></thead><tbody id="rows"></tbody></table>'
            f'<script type="application/json" id="data">{data}</script><script>{INDEX_JS}</script>'
        )
        (tmp / "index.html").write_text(_page(f"feature atlas {dictionary_id}", body))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "index.html"
