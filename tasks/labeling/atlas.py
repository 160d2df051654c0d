"""A static HTML atlas of one dictionary's features: opens from disk, no server, no network.

`atlas/index.html` is the sortable, searchable index (`atlas_index.py`). `atlas/features/<latent>.html` shows
one latent: its label (what it reads) with the evidence and every labeler's scores; its logit-lens effect
(what it writes: the tokens its decoder direction promotes and suppresses) apart from the label; compact
log-scale histograms of its activations and of the dictionary's feature density (this feature marked); top
contexts (every token shaded by the latent's activation, the peak token marked) and quantile examples (the
sampled token marked), whitespace made visible; decoder neighbours and co-occurring latents, each linked
with its label. A "try it" box stays hidden in the static atlas; served by `featureatlas dashboard --serve`
(`serve.py`), it shows the latent's activation on every token of a text the user types (`#try=text` in the
address fills it in, so an example can be shared). Everything is
escaped; files are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import html
import shutil
import tempfile
from pathlib import Path

import polars as pl

from featureatlas.tasks.labeling.atlas_html import page, show_text, show_token, svg_histogram, table
from featureatlas.tasks.labeling.atlas_index import density_histogram, index_page, index_rows

__all__ = ["write_atlas"]

# Shown only when the page is served by `featureatlas dashboard --serve` with this dictionary loaded.
TRY_JS = """const box=document.getElementById('tryit');
function esc(t){return String(t).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function ws(t){return t.trim()===''?esc(t).replace(/\\n/g,'↵').replace(/ /g,'·').replace(/\\t/g,'⇥')
  :esc(t).replace(/\\n/g,'<span class="ws">↵</span>')}
if(location.protocol.startsWith('http'))fetch('/api/info').then(r=>r.ok?r.json():null).then(info=>{
  if(!info||!info.dictionaries.includes(box.dataset.dictionary))return;box.hidden=false;
  box.querySelector('form').addEventListener('submit',ev=>{ev.preventDefault();
    const text=box.querySelector('textarea').value,out=document.getElementById('tryout');out.textContent='…';
    fetch('/api/activations',{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify(
      {dictionary:box.dataset.dictionary,latent:+box.dataset.latent,text:text})}).then(r=>r.json()).then(d=>{
      if(d.error){out.textContent=d.error;return}
      const m=Math.max(+box.dataset.maxact,...d.activations.filter(a=>a!==null),1e-9);
      out.innerHTML=d.tokens.map((t,i)=>{const a=d.activations[i];if(a===null)
        return '<span class="none" title="not scored">'+ws(t)+'</span>';
        const al=a>0?0.15+0.85*Math.min(a/m,1):0;return '<span class="tok" style="--a:'+al.toFixed(2)
        +'" title="'+a.toFixed(3)+'">'+ws(t)+'</span>'}).join('')
      +'<br><span class="meta">max activation here '+Math.max(0,...d.activations.filter(a=>a!==null))
      .toFixed(3)+'</span>'})});
  const pre=new URLSearchParams(location.hash.slice(1)).get('try');  // #try=text: a shareable example
  if(pre){box.querySelector('textarea').value=pre;box.querySelector('form').requestSubmit()}})"""


def _alpha(activation: float, max_act: float) -> float:
    return 0.15 + 0.85 * min(max(activation / max_act, 0.0), 1.0) if max_act > 0 else 0.5


def _highlight(text: str, activation: float, max_act: float) -> str:
    """A «marked» context: the marked token shaded by activation / max activation, whitespace visible."""
    alpha = _alpha(activation, max_act)
    before, _, rest = text.partition("«")
    token, _, after = rest.partition("»")
    return (
        f'<span class="ctx">{show_text(before)}<mark style="--a:{alpha:.2f}" '
        f'title="{activation:.3f}">{show_token(token, spaces=False)}</mark>{show_text(after)}</span>'
    )


def _highlight_window(c: dict, max_act: float) -> str:
    """A top context with every token shaded by the latent's activation there; the peak token is a <mark>.

    Tokens without an activation row (e.g. an excluded first token) are greyed; silent ones are unshaded."""
    parts = []
    for i, (tok, act) in enumerate(zip(c["tokens"], c["token_activations"])):
        text = show_token(tok, spaces=False)
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


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _labels_table(labels: list[dict]) -> list[str]:
    """Every label of the feature, whichever labeler wrote it, with its scores (embedding only if scored)."""
    if not labels:
        return []
    embedded = any(e.get("embedding_similarity") is not None for e in labels)
    rows = [
        [html.escape(e["label_source"]), html.escape(e["label"]), _fmt(e["detection_score"])]
        + ([_fmt(e.get("embedding_similarity"))] if embedded else [])
        for e in labels
    ]
    return [
        "<h2>Labels</h2>",
        table(["source", "label", "detection"] + (["embedding"] if embedded else []), rows),
    ]


def _logit_lens(f: dict) -> list[str]:
    """What the feature writes: its decoder direction through the unembedding, apart from what it reads."""
    cols = []
    for key, title, cls in (
        ("promoted_tokens", "promoted", "pos"),
        ("suppressed_tokens", "suppressed", "neg"),
    ):
        if f.get(key):
            rows = [
                [f'<span class="tokc">{show_token(t["token"])}</span>', _fmt(t["logit"], 3)] for t in f[key]
            ]
            cols.append(f'<div><b class="{cls}">{title}</b>{table(["token", "logit"], rows)}</div>')
    if not cols:
        return []
    return [
        '<h2>Logit lens <span class="meta">(what the feature writes)</span></h2>',
        f'<div class="cols">{"".join(cols)}</div>',
    ]


def _links(f: dict, labels: dict[int, str | None]) -> list[str]:
    parts = []
    for key, title, score in (
        ("decoder_neighbours", "Nearest by decoder cosine", "cosine"),
        ("cooccurring", "Co-occurring features", "Jaccard"),
    ):
        if f.get(key):
            rows = [
                [
                    f'<a href="{n["latent"]}.html">{n["latent"]}</a>',
                    html.escape(labels.get(n["latent"]) or ""),
                    f"{n['score']:.3f}",
                ]
                for n in f[key]
            ]
            parts.append(f"<div><h2>{title}</h2>{table(['feature', 'label', score], rows)}</div>")
    return [f'<div class="cols">{"".join(parts)}</div>'] if parts else []


def _feature_page(f: dict, dictionary_id: str, labels: dict[int, str | None], density: list[float]) -> str:
    latent, max_act = f["latent"], f["max_activation"] or 0.0
    label = f.get("stat_label") or f.get("label") or "(no label)"
    promoted = f.get("promoted_tokens") or []
    effect = (
        f'<p class="effect">writes: promotes <span class="tokc pos">{show_token(promoted[0]["token"])}</span>'
        + (
            f' · suppresses <span class="tokc neg">{show_token(f["suppressed_tokens"][0]["token"])}</span>'
            if f.get("suppressed_tokens")
            else ""
        )
        + "</p>"
        if promoted
        else ""
    )
    scores = [f"frequency {f['frequency']:.5f}", f"max activation {max_act:.3f}"]
    if f.get("detection_score") is not None:
        scores.append(f"detection {f['detection_score']:.2f}")
    if f.get("embedding_similarity") is not None:
        scores.append(f"embedding {f['embedding_similarity']:.2f}")
    hist = f.get("hist_counts") or []
    parts = [
        f'<p><a href="../index.html">← all features of {html.escape(dictionary_id)}</a></p>',
        f"<h1>Feature {latent}: {html.escape(label)}</h1>",
        effect,
        f'<p class="meta">{" · ".join(scores)}</p>',
        '<div class="cols">',
        svg_histogram(hist, 0.0, max_act, caption="activations when firing") if sum(hist) else "",
        density_histogram(density, marker=f["frequency"]),
        "</div>",
        f"<details><summary>label evidence</summary><pre>{html.escape(f.get('stat_label_evidence') or '')}"
        "</pre></details>",
        f'<section id="tryit" hidden data-dictionary="{html.escape(dictionary_id)}" data-latent="{latent}" '
        f'data-maxact="{max_act}"><h2>Try it</h2><form><textarea rows="3" placeholder="type a text">'
        '</textarea><br><button type="submit">show activations</button></form><p id="tryout" class="ctx"></p>'
        "</section>",
        *_labels_table(f.get("labels") or []),
        *_logit_lens(f),
        "<h2>Top contexts</h2>",
        table(
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
    examples = f.get("quantile_examples") or []
    if examples:
        parts += [
            "<h2>Examples by activation quantile</h2>",
            table(
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
    parts += _links(f, labels)
    return page(f"feature {latent}: {label}", "".join(parts), TRY_JS)


def write_atlas(table_: pl.DataFrame, folder: str | Path, dictionary_id: str) -> Path:
    """Write the atlas of `table_` (the feature table) to `folder`; returns the path of index.html."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "features").mkdir()
        rows = index_rows(table_, dictionary_id)
        labels = {r["latent"]: r["label"] for r in rows}
        density = [r["frequency"] for r in rows]
        for f in table_.iter_rows(named=True):
            (tmp / "features" / f"{f['latent']}.html").write_text(
                _feature_page(f, dictionary_id, labels, density)
            )
        (tmp / "index.html").write_text(
            index_page(f"Feature atlas of {dictionary_id}", [(dictionary_id, rows)])
        )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "index.html"
