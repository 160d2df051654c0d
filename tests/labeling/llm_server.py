"""A real OpenAI-compatible HTTP server on loopback, answering like a tiny rule-following labeler.

Labeling prompts (snippets with «marked» tokens) get "Label: <the commonest marked token>"; detection
prompts get "yes" exactly when the marked token of the snippet is the label's token. `fail_first` requests
answer HTTP 503 and `slow_first` requests answer only after `slow_s` seconds (to trip a client timeout).
Every request is recorded with its Authorization header.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKED = re.compile(r"«([^»]*)»")


def answer(system: str, prompt: str) -> str:
    if "check labels" in system:  # the detection system prompt
        label = prompt.split("Feature label:", 1)[1].split("\n", 1)[0].strip()
        snippet = prompt.split("Snippet:", 1)[1]
        marked = MARKED.search(snippet)
        return "Yes." if marked and marked.group(1).strip() == label else "No."
    tokens = [m.group(1).strip() for line in prompt.splitlines() for m in [MARKED.search(line)] if m]
    return f"Label: {Counter(tokens).most_common(1)[0][0]}" if tokens else "Label: nothing"


@dataclass
class FakeLLM:
    url: str = ""
    seen: list[dict] = field(default_factory=list)
    fail_first: int = 0
    slow_first: int = 0
    slow_s: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def start() -> tuple[FakeLLM, ThreadingHTTPServer]:
    state = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.seen.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                fail, slow = state.fail_first > 0, state.slow_first > 0 and state.fail_first == 0
                state.fail_first -= fail
                state.slow_first -= slow
            if fail:
                self.send_response(503)
                self.end_headers()
                return
            if slow:
                time.sleep(state.slow_s)
            messages = body["messages"]
            text = answer(messages[0]["content"], messages[-1]["content"])
            data = {
                "choices": [{"message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(messages[-1]["content"].split()), "completion_tokens": 2},
            }
            raw = json.dumps(data).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and hung up: expected for `slow_first`

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    return state, httpd
