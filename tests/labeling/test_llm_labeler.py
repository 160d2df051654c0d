"""The OpenAI-compatible backend against a loopback HTTP server started here: batching, retries, tokens,
and the API key sent but never logged."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from featureatlas.tasks.labeling.llm_labeler import OpenAIChatBackend, build_prompt, clean_label

SECRET = "sk-test-do-not-log-0123456789"


@pytest.fixture
def server():
    seen: list[dict] = []
    state = {"fail_first": 2}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"auth": self.headers.get("Authorization"), "body": body})
            if state["fail_first"] > 0:
                state["fail_first"] -= 1
                self.send_response(503)
                self.end_headers()
                return
            prompt = body["messages"][-1]["content"]
            answer = "Label: cats" if "cat" in prompt else "dogs"
            data = {
                "choices": [{"message": {"content": answer}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2},
            }
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen, state
    httpd.shutdown()
    httpd.server_close()


def test_backend_retries_batches_and_counts_tokens(server, monkeypatch, caplog):
    url, seen, _ = server
    monkeypatch.setenv("FA_TEST_KEY", SECRET)
    backend = OpenAIChatBackend(url, "tiny", api_key_env="FA_TEST_KEY", batch_size=3, backoff_s=0.01)
    prompts = [build_prompt(["the «cat» sat"], [" meow"]), build_prompt(["a «dog» ran"])] * 2
    with caplog.at_level(logging.DEBUG):
        answers = backend.complete(prompts)
    assert [clean_label(a) for a in answers] == ["cats", "dogs", "cats", "dogs"]
    assert backend.requests == 4 and backend.total_tokens == 4 * 12
    assert len(seen) == 6  # two 503s were retried
    assert all(s["auth"] == f"Bearer {SECRET}" for s in seen)
    assert "retry" in caplog.text and SECRET not in caplog.text and SECRET not in repr(backend)


def test_backend_gives_up_with_a_clear_error(server):
    url, _, state = server
    state["fail_first"] = 100
    backend = OpenAIChatBackend(url, "tiny", max_retries=1, backoff_s=0.01)
    with pytest.raises(RuntimeError, match="HTTP 503 after 2 attempt"):
        backend.complete(["x"])


def test_prompt_and_label_cleaning():
    prompt = build_prompt(["the «cat» sat", "my «cat»"], [" meow"])
    assert "1. the «cat» sat" in prompt and '" meow"' in prompt and prompt.endswith("Label:")
    assert clean_label(' "Cats and kittens"\nbecause...') == "Cats and kittens"
    assert clean_label("") == ""


@pytest.mark.slow  # generate() on a loaded 2-core machine takes ~30 s even for a tiny model
def test_local_transformers_backend_generates_and_counts():
    import copy

    from featureatlas.tasks.labeling.llm_labeler import TransformersChatBackend
    from tests.helpers import build_tiny_llama, build_tiny_tokenizer

    tok = copy.deepcopy(build_tiny_tokenizer())
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    backend = TransformersChatBackend(build_tiny_llama(), tok, max_new_tokens=4)
    answers = backend.complete([build_prompt(["the «cat» sat"])])
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert backend.completion_tokens <= 4 and backend.prompt_tokens > 10
