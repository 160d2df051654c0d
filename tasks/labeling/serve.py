"""`featureatlas dashboard --serve`: the atlas over HTTP on 127.0.0.1, with the model loaded for "try it".

The static atlas pages are served as they are on disk (`/d/<dictionary id>/...`), under an index across the
served dictionaries (`/`). Two JSON endpoints make the feature pages' "try it" box appear and work:
`GET /api/info` lists the served dictionaries, and `POST /api/activations` with
`{"dictionary": id, "latent": n, "text": "..."}` runs the model on the text, reads the dictionary's
hookpoint and answers `{"tokens": [...], "activations": [...]}`: the latent's code on every token, `null`
where the cache left tokens out (the first token, special tokens), as labeling did.

The model is loaded once per model the dictionaries were trained on; one lock serialises forward passes (the
capture hooks are attached to the shared model). Only loopback is served: the server runs code on request.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from featureatlas.tasks.common.hooks import capture_activations
from featureatlas.tasks.common.models import load_model_ref
from featureatlas.tasks.dictionary import load_dictionary
from featureatlas.tasks.labeling.atlas_set import AtlasEntry, AtlasSet, run_index
from featureatlas.tasks.labeling.codes import firing_codes

__all__ = ["TryIt", "make_server", "server_url"]

log = logging.getLogger(__name__)
MAX_TEXT_TOKENS = 512  # a typed text, not a corpus: longer ones are cut with a note


class TryIt:
    """The served dictionaries with their models loaded: a latent's activation on every token of a text."""

    def __init__(self, entries: list[AtlasEntry], device: str = "cpu"):
        self.entries = {e.dictionary.id: e for e in entries}
        self._models: dict[str, object] = {}
        self._dictionaries: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()
        for e in entries:
            m = e.cache.model
            if m.id not in self._models:
                log.info("loading model %s for the try-it box", m.source)
                self._models[m.id] = load_model_ref(m.source, m.spec, m.path, m.converted)
            self._dictionaries[e.dictionary.id] = load_dictionary(e.dictionary.path, device).eval()

    def activations(self, dictionary_id: str, latent: int, text: str) -> dict:
        """`{"tokens", "activations"}` of `latent` of `dictionary_id` on `text`; ValueError on bad input."""
        entry = self.entries.get(dictionary_id)
        if entry is None:
            raise ValueError(f"dictionary {dictionary_id!r} is not served; served: {sorted(self.entries)}")
        d_sae = entry.dictionary.d_sae
        if not 0 <= latent < d_sae:
            raise ValueError(f"latent {latent} is out of range: {dictionary_id} has latents 0..{d_sae - 1}")
        if not text.strip():
            raise ValueError("type some text first")
        loaded = self._models[entry.cache.model.id]
        enc = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TEXT_TOKENS)
        ids = enc["input_ids"]
        with self._lock, torch.inference_mode():
            acts = capture_activations(loaded.model, [entry.dictionary.hookpoint], ids.to(loaded.device))
            x = acts[entry.dictionary.hookpoint][0].float()
            dictionary = self._dictionaries[dictionary_id]
            codes = firing_codes(dictionary, x.to(next(dictionary.parameters()).device))[:, latent]
        values: list[float | None] = [float(v) for v in codes.cpu()]
        spec = entry.cache.spec
        special = set(getattr(loaded.tokenizer, "all_special_ids", []) or [])
        for i, t in enumerate(ids[0].tolist()):
            if (i == 0 and spec.exclude_first_token) or (spec.exclude_special_tokens and t in special):
                values[i] = None  # the cache left these out of labeling: their codes mean nothing here
        tokens = [loaded.tokenizer.decode([t]) for t in ids[0].tolist()]
        return {"tokens": tokens, "activations": values}


def _handler(atlases: AtlasSet, tryit: TryIt | None) -> type[BaseHTTPRequestHandler]:
    folders = {e.dictionary.id: e.atlas.resolve() for e in atlases.entries}
    index = run_index(atlases, lambda e: f"d/{e.dictionary.id}/").encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # through logging, not stderr
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict) -> None:
            self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json")

        def do_GET(self):  # noqa: N802 (the name http.server calls)
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if path in ("/", "/index.html"):
                return self._send(200, index, "text/html; charset=utf-8")
            if path == "/api/info":
                return self._json(200, {"dictionaries": sorted(folders) if tryit else []})
            parts = path.lstrip("/").split("/", 2)
            if len(parts) == 3 and parts[0] == "d" and parts[1] in folders:
                root = folders[parts[1]]
                file = (root / parts[2]).resolve()
                if file.is_relative_to(root) and file.is_file():
                    ctype = (
                        "text/html; charset=utf-8" if file.suffix == ".html" else "application/octet-stream"
                    )
                    return self._send(200, file.read_bytes(), ctype)
            return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self):  # noqa: N802
            if self.path != "/api/activations" or tryit is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                got = tryit.activations(str(body["dictionary"]), int(body["latent"]), str(body["text"]))
            except KeyError as e:
                return self._json(
                    HTTPStatus.BAD_REQUEST, {"error": f"missing field {e}: give dictionary, latent, text"}
                )
            except (ValueError, TypeError) as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return self._json(200, got)

    return Handler


def make_server(atlases: AtlasSet, tryit: TryIt | None, port: int) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0: any free port); call `serve_forever()` on it."""
    return ThreadingHTTPServer(("127.0.0.1", port), _handler(atlases, tryit))


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
