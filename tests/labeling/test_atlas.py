"""The static atlas: pages are written and escaped, whitespace is visible, neighbours carry their labels, the
logit lens stands apart from the label; in headless Chromium the index searches, filters and sorts and a
feature page shows its contexts and histograms. Skips without chromium only outside CI (CI=true runs it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featureatlas.tasks.labeling.atlas import _highlight, write_atlas
from featureatlas.tasks.labeling.atlas_html import show_token
from featureatlas.tasks.labeling.features import Unembedding, build_feature_table
from featureatlas.tasks.labeling.stat_labeler import count_ngrams
from tests.labeling.test_features import planted
from tests.labeling.test_top_contexts import VOCAB, token_strings
from tests.tracking.browser import chromium, keep_screenshot, needs_chromium

FREQ: dict[int, float] = {}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    import torch

    dictionary, acts, rc, rp, tokens = planted()
    table = build_feature_table(
        dictionary,
        acts,
        rc,
        rp,
        tokens,
        token_strings,
        count_ngrams(tokens),
        unembedding=Unembedding(torch.randn(len(VOCAB), dictionary.d_in)),
        top_k=5,
    )
    FREQ.update(zip(table["latent"].to_list(), table["frequency"].to_list()))
    return write_atlas(table, tmp_path_factory.mktemp("atlas") / "atlas", "dict-<test>")


def test_atlas_files_are_written_and_escaped(atlas):
    folder = atlas.parent
    assert sorted(p.name for p in (folder / "features").iterdir()) == sorted(f"{i}.html" for i in range(12))
    index = atlas.read_text()
    assert "dict-&lt;test&gt;" in index and "dict-<test>" not in index
    page = (folder / "features" / "0.html").read_text()
    assert "<mark" in page and "cat</mark>" in page
    assert "activations when firing" in page and "feature density" in page and "<svg" in page
    assert "Logit lens" in page and "Nearest by decoder cosine" in page
    assert not list(folder.parent.glob(".atlas.*"))  # no temporary folder left


def test_feature_page_keeps_label_and_logit_lens_apart(atlas):
    page = (atlas.parent / "features" / "0.html").read_text()
    # the label is what the latent reads (the n-gram), with no "→ token" from the logit lens in it
    assert "<h1>Feature 0: &quot; cat&quot;</h1>" in page and "→" not in page
    # the logit-lens effect on its own line and table, tokens with visible spaces
    assert re.search(r'<p class="effect">writes: promotes <span class="tokc pos">.*?</span>', page)
    # no embedding score was computed: no empty "embedding" field or column
    assert "embedding" not in page


def test_neighbour_links_carry_their_labels(atlas):
    page = (atlas.parent / "features" / "2.html").read_text()
    # latent 0 is labeled " cat"; wherever it is listed as a neighbour, its label stands beside the link
    links = re.findall(r'<td><a href="(\d+)\.html">\d+</a></td><td>([^<]*)</td>', page)
    assert links and ("0", "&quot; cat&quot;") in links


def test_whitespace_is_visible():
    assert show_token("\n") == '<span class="ws">↵</span>'
    assert show_token(" ", spaces=False) == '<span class="ws">·</span>'  # a whitespace-only token
    assert show_token(" cat", spaces=False) == " cat"  # running text keeps its spaces plain
    assert show_token(" cat") == '<span class="ws">·</span>cat'  # a token table shows the leading space
    assert show_token("\x1c") == '<span class="ws">␜</span>'  # a control character, pictured
    assert _highlight(" «cat» ", 1.0, 1.0).startswith('<span class="ctx"> <mark')  # text around: plain
    got = _highlight("a\n«\n»b", 1.0, 1.0)
    assert "«" not in got and got.count("↵") == 2 and 'title="1.000"><span class="ws">↵</span></mark>' in got


@needs_chromium
def test_atlas_in_headless_chromium(atlas, tmp_path):
    url = atlas.as_uri()
    profile = tmp_path / "profile"
    dom = chromium(["--dump-dom", url], profile)
    assert "12 of 12 features" in dom and "feature density" in dom
    # The search box and filters, preset through the URL fragment: only latent 0 reads the planted direction
    # exactly, so only it is labeled " cat" with a perfect detection score; the dead latent 1 has no label.
    dom = chromium(["--dump-dom", url + "#q=cat"], profile)
    assert 'href="features/0.html"' in dom and 'href="features/1.html"' not in dom
    assert "12 of 12 features" not in dom
    dom = chromium(["--dump-dom", url + "#q=CAT&minscore=0.99"], profile)
    assert "1 of 12 features" in dom and 'href="features/0.html"' in dom
    dom = chromium(["--dump-dom", url + "#minfreq=0.99"], profile)
    assert "0 of 12 features" in dom
    # sorted by frequency, most frequent first: the rows come in the table's order of frequency
    dom = chromium(["--dump-dom", url + "#sort=frequency&desc=1"], profile)
    shown = [int(x) for x in re.findall(r'<tr class="feature"><td><a href="features/(\d+)\.html"', dom)]
    by_freq = sorted(range(12), key=lambda i: -FREQ[i])
    assert [FREQ[i] for i in shown] == [FREQ[i] for i in by_freq]
    assert 'data-key="frequency" class="sort desc"' in dom or 'class="sort desc" data-key="frequency"' in dom
    page = atlas.parent / "features" / "0.html"
    dom = chromium(["--dump-dom", page.as_uri()], profile)
    assert dom.count("cat</mark>") >= 5  # the top contexts, highlighted on " cat"
    assert 'id="tryit" hidden' in dom  # the static atlas stays static: no server, no "try it"
    for name, uri in (("atlas_index.png", url), ("atlas_feature0.png", page.as_uri())):
        shot = tmp_path / name
        chromium([f"--screenshot={shot}", "--window-size=1200,1000", uri], profile)
        assert shot.stat().st_size > 10_000
        keep_screenshot(shot)


def test_every_window_token_is_shaded_by_its_activation():
    from featureatlas.tasks.labeling.atlas import _highlight_window

    c = {"tokens": ["<a>", " b", " c", " d"], "token_activations": [None, 2.0, 1.0, 0.0], "centre": 1}
    got = _highlight_window(c, max_act=2.0)
    # alpha = 0.15 + 0.85 * activation / max: 1.00 at the peak, 0.575 (shown 0.57) at half of it
    assert got == (
        '<span class="ctx"><span class="none" title="no activation">&lt;a&gt;</span>'
        '<mark class="peak" style="--a:1.00" title="2.000"> b</mark>'
        '<span class="tok" style="--a:0.57" title="1.000"> c</span> d</span>'
    )


@needs_chromium
def test_index_across_dictionaries_shows_and_searches_the_dictionary(atlas, tmp_path):
    from featureatlas.tasks.labeling.atlas_index import index_page

    rows = json.loads(re.search(r'id="data">(.*?)</script>', atlas.read_text()).group(1))
    other = [r | {"dictionary": "dict-b", "href": "../b/" + r["href"]} for r in rows[:3]]
    index = tmp_path / "index.html"
    index.write_text(index_page("run", [("dict-a: topk", rows), ("dict-b: topk", other)], run=True))
    dom = chromium(["--dump-dom", index.as_uri()], tmp_path / "profile")
    assert "15 of 15 features" in dom and dom.count("<svg") == 2  # one density histogram each
    assert dom.count("<td>dict-b</td>") == 3 and 'href="../b/features/0.html"' in dom
    dom = chromium(["--dump-dom", index.as_uri() + "#q=dict-b"], tmp_path / "profile")
    assert "3 of 15 features" in dom and "<td>dict-&lt;test&gt;</td>" not in dom
