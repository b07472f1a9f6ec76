"""A :class:`~apo_jax.clair.client.Backend` that samples from a local checkpoint in Flax.

The chats are rendered with the checkpoint's chat template, sampled with
``apo_jax.models.generate.generate`` (imported lazily, so the HTTP path needs no JAX), and
decoded. A chat whose text holds a special-token string of the tokenizer is not sampled (it
would become a control token and could forge turns): it comes back as a ``RequestError``, as
``prepare`` rejects such rows. Finished batches are appended to the same request cache as the
HTTP backend, so a rerun resumes here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from apo_jax.clair.cache import RequestCache, Usage, request_key
from apo_jax.clair.client import RequestError
from apo_jax.clair.prompts import Messages
from apo_jax.data import tokenize


def _load_checkpoint(path: str) -> tuple[Any, Any]:
    """Loads (model, tokenizer) from a Hugging Face style directory of safetensors."""
    from transformers import AutoTokenizer

    from apo_jax.models import hf
    from apo_jax.models.convert import resolve_model_path

    path = resolve_model_path(path)  # a .gguf file: its converted directory
    model, _ = hf.load_hf(path)
    return model, AutoTokenizer.from_pretrained(path)


def _default_generate() -> Callable[..., Any]:
    from apo_jax.models.generate import generate

    return generate


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence and end-of-turn ids: sampling stops there instead of at max_tokens."""
    ids = {tokenizer.eos_token_id, *tokenize.end_of_turn_ids(tokenizer)}
    for token in ("<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))


class LocalBackend:
    """Answers chats with the project's own sampler on a local checkpoint.

    Args:
      checkpoint: directory with the safetensors weights, config and tokenizer.
      name: model name recorded in outputs and cache keys (default: the checkpoint path).
      batch_size: prompts per ``generate`` call.
      cache: optional request cache shared with reruns.
      loader: ``path -> (model, tokenizer)``; defaults to ``apo_jax.models.hf`` + transformers.
      generate_fn: ``generate(model, prompts, **kw) -> completion ids``; defaults to
        ``apo_jax.models.generate.generate``.
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        name: str | None = None,
        batch_size: int = 8,
        cache: RequestCache | None = None,
        loader: Callable[[str], tuple[Any, Any]] | None = None,
        generate_fn: Callable[..., Any] | None = None,
    ):
        self.checkpoint = checkpoint
        self.model = name or checkpoint
        self.batch_size = max(1, batch_size)
        self.cache = cache
        self.usage = Usage()
        self._loader = loader or _load_checkpoint
        self._generate_fn = generate_fn
        self._loaded: tuple[Any, Any] | None = None

    def complete(
        self, messages_list: Sequence[Messages], params: Mapping[str, Any]
    ) -> list[str | RequestError]:
        """Samples an answer to every chat, batch by batch, skipping cached ones."""
        keys = [request_key(self.model, m, params) for m in messages_list]
        results: list[str | RequestError | None] = [None] * len(keys)
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                results[i] = hit["content"]
                self.usage.add(cache_hits=1)
            else:
                todo.append(i)
        if todo:
            todo = self._refuse_special_tokens(messages_list, todo, results)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            texts = self._sample([messages_list[i] for i in chunk], params)
            for i, text in zip(chunk, texts, strict=True):
                results[i] = text
                if self.cache is not None:
                    self.cache.put(keys[i], {"model": self.model, "content": text})
        return results  # type: ignore[return-value]

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = self._loader(self.checkpoint)
        return self._loaded

    def _refuse_special_tokens(self, messages_list, todo: list[int], results: list) -> list[int]:
        """Fills RequestErrors for chats holding special-token text; returns the others."""
        tokenizer, keep = self._load()[1], []
        for i in todo:
            found = next(
                filter(
                    None,
                    (
                        tokenize.find_special_token(tokenizer, m["content"])
                        for m in messages_list[i]
                    ),
                ),
                None,
            )
            if found:
                results[i] = RequestError(f"special token {found!r} in the chat text; not sampled")
                self.usage.add(failed=1)
            else:
                keep.append(i)
        return keep

    def _sample(self, chats: list[Messages], params: Mapping[str, Any]) -> list[str]:
        if self._generate_fn is None:
            self._generate_fn = _default_generate()
        model, tokenizer = self._load()
        rendered = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in chats
        ]
        prompts = [tokenizer.encode(text, add_special_tokens=False) for text in rendered]
        outputs = self._generate_fn(
            model,
            prompts,
            max_new_tokens=int(params.get("max_tokens", 512)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            seed=int(params.get("seed", 0)),
            stop_tokens=_stop_ids(tokenizer),
        )
        texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in outputs]
        self.usage.add(
            completed=len(chats),
            prompt_tokens=sum(len(p) for p in prompts),
            completion_tokens=sum(
                len(tokenizer.encode(t, add_special_tokens=False)) for t in texts
            ),
        )
        return texts
