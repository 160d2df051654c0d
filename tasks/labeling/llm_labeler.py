"""An LLM labeler with pluggable backends: a prompt per latent from its top contexts and logit effects.

Backends answer `complete(prompts, system=..., max_tokens=...) -> answers` and count the requests and tokens
they used:
- `OpenAIChatBackend`: any OpenAI-compatible `/chat/completions` endpoint over HTTP; `batch_size` requests in
  flight at once, retries with exponential backoff on 429/5xx/connection errors, a timeout per request. The
  API key is read from an environment variable at request time and never stored in logs or reprs.
- `TransformersChatBackend`: a local chat model (e.g. SmolLM2-135M-Instruct), greedy decoding.
Labels from any backend are scored like the statistical ones (`tasks/labeling/scoring.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import torch

log = logging.getLogger(__name__)

__all__ = [
    "DETECT_SYSTEM",
    "SYSTEM",
    "OpenAIChatBackend",
    "TransformersChatBackend",
    "build_detection_prompt",
    "build_prompt",
    "clean_label",
    "parse_yes",
]

SYSTEM = (
    "You label features of a language model. Given text snippets where the feature fires (the token it "
    "fires on is marked «like this») and the tokens it promotes, answer with a label of at most 6 words."
)


DETECT_SYSTEM = (
    "You check labels of language model features. Given a feature's label and a text snippet with one token "
    "marked «like this», answer yes if the feature fires on the marked token, else no. Answer with one word."
)


def build_detection_prompt(label: str, context: str) -> str:
    return f"Feature label: {label}\nSnippet: {context}\nDoes the feature fire on the marked token?"


def parse_yes(answer: str) -> bool:
    """A detection answer is positive when its first word is 'yes' (any case, punctuation ignored)."""
    words = answer.strip().split()
    return bool(words) and words[0].strip(".,!:;\"'`*").lower() == "yes"


def build_prompt(contexts: Sequence[str], promoted: Sequence[str] = (), max_contexts: int = 8) -> str:
    lines = [f"{i + 1}. {c}" for i, c in enumerate(contexts[:max_contexts])]
    tail = f"\nPromoted tokens: {', '.join(json.dumps(t) for t in promoted[:5])}" if promoted else ""
    return "Snippets:\n" + "\n".join(lines) + tail + "\nLabel:"


def clean_label(answer: str) -> str:
    """First line of the answer, without quotes or a 'Label:' prefix, at most 80 characters."""
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    if first.lower().startswith("label:"):
        first = first[6:]
    return first.strip().strip("\"'` ").strip()[:80]


class OpenAIChatBackend:
    """POSTs `{base_url}/chat/completions`; retries only what is safe to repeat (an idempotent question)."""

    RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        batch_size: int = 8,
        max_retries: int = 4,
        timeout_s: float = 30.0,
        backoff_s: float = 0.5,
        max_tokens: int = 32,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.batch_size = model, api_key_env, batch_size
        self.max_retries, self.timeout_s, self.backoff_s, self.max_tokens = (
            max_retries,
            timeout_s,
            backoff_s,
            max_tokens,
        )
        self.prompt_tokens = self.completion_tokens = self.requests = 0
        self._lock = Lock()

    def __repr__(self) -> str:  # the key lives in the environment only; name the variable, never the value
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r}, key from ${self.api_key_env})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def _post(self, prompt: str, system: str = SYSTEM, max_tokens: int | None = None) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read())
                break
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRY_STATUS or attempt == self.max_retries:
                    raise RuntimeError(
                        f"{self.url} answered HTTP {e.code} after {attempt + 1} attempt(s); check the URL, "
                        f"the model name {self.model!r} and ${self.api_key_env}"
                    ) from None
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError) as e:
                if attempt == self.max_retries:
                    raise RuntimeError(
                        f"{self.url} unreachable after {attempt + 1} attempt(s): {e}"
                    ) from None
                reason = type(e).__name__
            delay = self.backoff_s * 2**attempt
            log.warning("LLM request failed (%s); retry %d in %.2f s", reason, attempt + 1, delay)
            time.sleep(delay)
        usage = data.get("usage") or {}
        with self._lock:
            self.requests += 1
            self.prompt_tokens += int(usage.get("prompt_tokens", 0))
            self.completion_tokens += int(usage.get("completion_tokens", 0))
        return data["choices"][0]["message"]["content"]

    def complete(
        self, prompts: Sequence[str], *, system: str = SYSTEM, max_tokens: int | None = None
    ) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(lambda p: self._post(p, system, max_tokens), prompts))


class TransformersChatBackend:
    """A local chat model through its chat template, greedy; counts prompt and generated tokens."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 24):
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens
        self.prompt_tokens = self.completion_tokens = self.requests = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @torch.no_grad()
    def complete(
        self, prompts: Sequence[str], *, system: str = SYSTEM, max_tokens: int | None = None
    ) -> list[str]:
        out = []
        for prompt in prompts:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            ids = ids.to(self.model.device)
            gen = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens or self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
            new = gen[0, ids.shape[1] :]
            self.requests += 1
            self.prompt_tokens += ids.shape[1]
            self.completion_tokens += new.shape[0]
            out.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return out
