"""Shared by the eval tests: a random tiny transformers Llama with an in-process trained tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apo_jax.data import demo

N_NEW = 12  # max_new_tokens everywhere: one compilation per prompt bucket


def demo_prompts(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt rows: demo questions, every fourth one as a chat with a system turn."""
    rows = []
    for i, pair in enumerate(demo.generate_pairs(n, seed=seed)):
        if i % 4 == 3:
            rows.append(
                {
                    "id": f"q{i}",
                    "messages": [
                        {"role": "system", "content": demo.SYSTEM},
                        {"role": "user", "content": pair["prompt"]},
                    ],
                }
            )
        else:
            rows.append({"id": f"q{i}", "prompt": pair["prompt"]})
    return rows


def write_jsonl(path: str, rows: list[Any]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_model_dir(path: str) -> tuple[str, Any, Any]:
    """Saves tokenizer + random LlamaForCausalLM (vocab = the tokenizer's) to `path`.

    Its generation_config.json stops on `<|eot_id|>` and on a token the model emits greedily
    a few steps into the first demo prompt, so some responses finish with 'stop'.
    Returns (path, tokenizer, torch model).
    """
    import torch
    import transformers

    texts = [
        m["content"]
        for r in demo.generate_pairs(300, seed=0)
        for side in ("chosen", "rejected")
        for m in r[side]
    ]
    demo.train_tokenizer(texts, path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    first = hf_greedy(model, tok, demo_prompts(1)[0], [tok.eos_token_id])
    stop = first[3]
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": [tok.eos_token_id, stop], "pad_token_id": tok.pad_token_id}, f)
    return path, tok, model


def messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    return row.get("messages") or [{"role": "user", "content": row["prompt"]}]


def hf_greedy(model, tok, row, eos: list[int], n: int = N_NEW) -> list[int]:
    """transformers' greedy generate on the chat template's prompt; the new ids."""
    import torch

    ids = tok.apply_chat_template(messages_of(row), add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


@contextlib.contextmanager
def loopback_server(reply: Callable[[dict], bytes]) -> Iterator[str]:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering `reply(request body)`; its URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            data = reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def chat_reply(text: str) -> bytes:
    """A chat-completions reply body holding `text`."""
    return json.dumps({"choices": [{"message": {"content": text}}]}).encode()
