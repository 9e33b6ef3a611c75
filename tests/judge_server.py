"""Real servers for the llm judge's tests (no mocked sockets).

- `serve_tiny_judge`: `transformers serve` (the real OpenAI-compatible server of transformers)
  over a tiny chat model built here and trained for a second to answer every request with one
  fixed, well-formed line; its scores mean nothing, the protocol and the accounting are what
  the tests check.
- `ScriptedServer`: a real local HTTP server (stdlib http.server, a thread) that answers
  /v1/models and /v1/chat/completions with the statuses a test scripts (429, 5xx, 401, 400), for
  retries, backoff and failure modes that a healthy server never shows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPLY = "Helpfulness: 7; Harmlessness: 3; Refusal: no"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_judge_model(folder: Path, reply: str = REPLY, steps: int = 150) -> Path:
    """A 2-layer Llama chat model (ChatML template) that answers `reply` to any user message."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [reply, "Rate the answer to the request below. Assistant A and B, a user and safe answers."] * 20
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<unk>")  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target = fast(reply, add_special_tokens=False)["input_ids"] + [fast.eos_token_id]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = []
        for _ in range(4):  # any user text: random token ids
            noise = torch.randint(3, len(fast), (int(torch.randint(4, 40, (1,), generator=generator)),),
                                  generator=generator).tolist()  # fmt: skip
            text = fast.apply_chat_template([{"role": "user", "content": fast.decode(noise)}], tokenize=False,
                                            add_generation_prompt=True)  # fmt: skip
            rows.append(fast(text, add_special_tokens=False)["input_ids"])
        longest = max(len(r) for r in rows) + len(target)
        ids = torch.full((len(rows), longest), fast.pad_token_id)
        labels = torch.full((len(rows), longest), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r) + len(target)] = torch.tensor(r + target)
            labels[i, len(r) : len(r) + len(target)] = torch.tensor(target)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fast.save_pretrained(str(folder))
    model.save_pretrained(str(folder))
    return folder


class Served:
    """A `transformers serve` process over a local model folder, on a port of its own."""

    def __init__(self, model: Path, port: int | None = None, options: tuple[str, ...] = ()) -> None:
        self.model, self.port, self.options = model, port or free_port(), options
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> Served:
        cli = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.process = subprocess.Popen(
            [str(cli), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
             "--log-level", "warning", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"transformers serve did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class ScriptedServer:
    """An OpenAI-compatible server whose answers a test scripts.

    models_status: the status of GET /v1/models (200 lists `model`). script: the statuses of the
    next chat requests, in order (200 answers `reply`); once it runs out every request gets
    `then`. Every request is counted in `chat_requests`."""

    def __init__(self, model: str = "judge", reply: str = REPLY, models_status: int = 200,
                 script: list[int] | None = None, then: int = 200, retry_after: str | None = "0") -> None:  # fmt: skip
        self.model, self.reply, self.models_status = model, reply, models_status
        self.script, self.then, self.retry_after = list(script or []), then, retry_after
        self.chat_requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                if server.models_status != 200:
                    return self._send(server.models_status, {"error": {"message": "refused"}})
                return self._send(200, {"object": "list", "data": [
                    {"id": server.model, "object": "model", "created": 0, "owned_by": "test"}]})  # fmt: skip

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.chat_requests += 1
                    status = server.script.pop(0) if server.script else server.then
                if status != 200:
                    headers = {"Retry-After": server.retry_after} if server.retry_after and status == 429 else None
                    return self._send(status, {"error": {"message": f"scripted {status}"}}, headers)
                return self._send(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": server.model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": server.reply}}],
                })  # fmt: skip

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
