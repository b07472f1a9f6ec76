"""Batched generation for evaluation: chat-template prompts, length buckets, decoded rows.

Prompts are rendered with the tokenizer's chat template and its generation prompt, then sorted by
length and cut into batches of a fixed size; each batch is left-padded to a bucket length
(16, 32, 48, 64, 96, 128, 192, ... tokens), so the jitted KV-cache loop of
:func:`apo_jax.models.generate.generate` compiles once per bucket, not once per prompt length.
The plan (which rows share a batch, and each batch's sampling key) depends only on the prompts,
the batch size and the seed, so a resumed run samples exactly what an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

from apo_jax.data import tokenize
from apo_jax.errors import UserError
from apo_jax.eval import prompts as prompts_lib
from apo_jax.eval import scoring
from apo_jax.models import generate as generate_lib

Key = tuple[int, int]  # (row index, sample index)


class SamplingError(UserError):
    """Sampling settings that cannot work together."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How responses are sampled."""

    max_new_tokens: int = 512  # the most tokens generated per response
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass (1.0 = off)
    num_samples: int = 1  # responses per prompt
    seed: int = 0  # sampling seed (greedy ignores it)

    def check(self) -> None:
        """Raises SamplingError naming the flag when the settings are unusable."""
        if self.max_new_tokens <= 0:
            raise SamplingError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SamplingError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise SamplingError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise SamplingError(
                f"--num_samples={self.num_samples} with greedy decoding repeats one response; "
                "set --temperature above 0"
            )


def bucket_length(n: int) -> int:
    """The padded prompt length of a batch whose longest prompt has `n` tokens.

    Buckets are 16 x 2^k and 48 x 2^k tokens (16, 32, 48, 64, 96, 128, 192, ...): 16 shapes up to
    4096 tokens, and a prompt longer than 32 tokens is padded by less than half its length.
    """
    k = 0
    while True:
        for b in (16 << k, 48 << (k - 1) if k else 16):
            if b >= n:
                return b
        k += 1


def stop_token_ids(tokenizer: Any, model_dir: str | None = None) -> list[int]:
    """Token ids that end a response: the tokenizer's eos and the model's eos ids.

    The model's ids come from `generation_config.json` (what transformers' `generate` stops on),
    else from `config.json`. Llama-3-Instruct lists `<|eot_id|>` there, the end of a turn; the
    chat template's own end-of-turn token (`data.tokenize.end_of_turn_ids`: `<|im_end|>`,
    `<end_of_turn>` ...) is included too, so a tokenizer alone suffices.
    """
    ids = list(tokenize.end_of_turn_ids(tokenizer))  # eos and the template's end of turn
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name) if model_dir else ""
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                ids.extend(int(t) for t in (eos if isinstance(eos, list) else [eos]))
                break
    return sorted(set(ids))


def encode(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt ids: the chat rendered with the generation prompt (the template adds the BOS).

    Message text that holds a special-token string (``<|eot_id|>`` ...) is encoded as plain
    text, never as the control token (it would end or forge a turn): such a chat is rendered with
    a placeholder per message, the template's own text is tokenized as usual and each message's
    text with ``split_special_tokens``.
    """
    if not any(tokenize.find_special_token(tokenizer, m["content"]) for m in messages):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters
    masked = [dict(m, content=mark) for m, mark in zip(messages, marks, strict=True)]
    text = tokenizer.apply_chat_template(masked, tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    pos = 0
    for m, mark in zip(messages, marks, strict=True):
        at = text.find(mark, pos)
        if at < 0:
            raise ValueError("the chat template does not render each message's text as written")
        ids += tokenizer(text[pos:at], add_special_tokens=False)["input_ids"]
        ids += tokenizer(m["content"], add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]
        pos = at + len(mark)
    return ids + tokenizer(text[pos:], add_special_tokens=False)["input_ids"]


def encode_examples(
    tokenizer: Any, examples: Sequence[prompts_lib.Example], max_prompt_len: int
) -> tuple[dict[int, list[int]], dict[int, tuple[str, str]]]:
    """Prompt ids by row index, and (reason, detail) for rows that cannot be rendered or fit."""
    ids, bad = {}, {}
    for ex in examples:
        try:
            row = encode(tokenizer, ex.messages)
        except ImportError:  # a missing package is the environment's fault, not the row's
            raise
        except Exception as e:  # jinja raises for conversations the template refuses
            bad[ex.index] = (prompts_lib.TEMPLATE_ERROR, f"{type(e).__name__}: {e}")
            continue
        if len(row) >= max_prompt_len:
            bad[ex.index] = (
                prompts_lib.PROMPT_TOO_LONG,
                f"{len(row)} tokens; the model takes {max_prompt_len}",
            )
            continue
        ids[ex.index] = row
    return ids, bad


def plan_batches(lengths: Mapping[Key, int], batch_size: int) -> list[list[Key]]:
    """Cuts the items, sorted by (prompt length, key), into batches of `batch_size`."""
    order = sorted(lengths, key=lambda k: (lengths[k], k))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def decode_row(
    tokenizer: Any, ids: Sequence[int], stops: set[int], max_new_tokens: int
) -> dict[str, Any]:
    """One generated row (stop token included when it came) -> response, finish reason, tokens."""
    stopped = bool(ids) and ids[-1] in stops
    body = list(ids[:-1] if stopped else ids)
    return {
        "response": tokenizer.decode(body, skip_special_tokens=True),
        "finish_reason": "stop" if stopped else "length",
        "num_tokens": len(body),
    }


class Generator:
    """Generates responses for prompt ids in length-bucketed, fixed-size batches.

    Args:
      model: a decoder from `apo_jax.models` (anything `models.generate.generate` runs).
      tokenizer: its Hugging Face tokenizer.
      sampling: the Sampling settings.
      batch_size: rows per generate call; a multiple of the mesh's data x fsdp size.
      stop_tokens: ids that end a response (see `stop_token_ids`).
      mesh: when given, generation runs under it (rows over 'data' and 'fsdp').
    """

    def __init__(
        self, model, tokenizer, sampling: Sampling, *, batch_size: int, stop_tokens, mesh=None
    ):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.batch_size, self.mesh = batch_size, mesh
        self.stops = [int(t) for t in stop_tokens]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.generated_tokens = 0  # stop tokens included
        self.seconds = 0.0

    def run(
        self, prompt_ids: Mapping[int, Sequence[int]], done: set[Key] = frozenset()
    ) -> Iterator[list[tuple[Key, dict[str, Any]]]]:
        """Yields each batch's finished rows, ((index, sample), row), skipping `done` keys."""
        s = self.sampling
        lengths = {(i, j): len(ids) for i, ids in prompt_ids.items() for j in range(s.num_samples)}
        key = jax.random.key(s.seed)
        for number, batch in enumerate(plan_batches(lengths, self.batch_size)):
            todo = [k for k in batch if k not in done]
            if not todo:
                continue
            rows = [list(prompt_ids[i]) for i, _ in batch]
            rows += [rows[0]] * (self.batch_size - len(rows))  # fixed shape: one compile per bucket
            start = time.perf_counter()
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                outs = generate_lib.generate(
                    self.model,
                    rows,
                    max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    stop_tokens=self.stops,
                    rng=jax.random.fold_in(key, number),
                    pad_id=self.pad_id,
                    include_stop=True,
                    pad_to=bucket_length(max(len(r) for r in rows)),
                )
            self.seconds += time.perf_counter() - start
            finished = []
            for k, out in zip(batch, outs, strict=False):
                if k in done:
                    continue
                self.generated_tokens += len(out)
                finished.append(
                    (k, decode_row(self.tokenizer, out, set(self.stops), s.max_new_tokens))
                )
            yield finished


def sample(
    model: Any,
    tokenizer: Any,
    rows: Sequence[str | Mapping[str, Any]],
    *,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    stop_tokens: Sequence[int] | None = None,
    checker: Callable[[Mapping[str, Any], str], Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> list[dict[str, Any]]:
    """Generates responses for a few prompts; what the training loop's sample hook calls.

    Args:
      model: the decoder (e.g. `nnx.merge(graphdef, params)` inside training).
      tokenizer: its tokenizer, with a chat template.
      rows: prompt strings, or rows with `prompt` or `messages` (and optional `id`, and the
        fields a checker reads).
      sampling: Sampling settings (default greedy, 512 new tokens).
      batch_size: rows per generate call.
      stop_tokens: ids ending a response (default: the tokenizer's eos).
      checker: `fn(row, response) -> bool`; adds `correct` to each result.
      mesh: run under this mesh (rows sharded over 'data' and 'fsdp').

    Returns:
      One dict per prompt and sample, in input order: id, prompt, response, finish_reason,
      num_tokens (and sample when num_samples > 1, correct with a checker). Raises ValueError for
      a row that cannot be evaluated (its reason, as in rejects.jsonl).
    """
    sampling.check()
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(
                prompts_lib.parse({"prompt": row} if isinstance(row, str) else dict(row), i)
            )
        except prompts_lib._Reject as e:
            raise ValueError(f"row {i}: {e.reason} ({e.field}: {e.detail})") from None
    max_len = int(getattr(model.cfg, "max_seq_len", 1 << 30))
    ids, bad = encode_examples(tokenizer, examples, max_len)
    if bad:
        index, (reason, detail) = next(iter(bad.items()))
        raise ValueError(f"row {index}: {reason} ({detail})")
    stops = stop_token_ids(tokenizer) if stop_tokens is None else stop_tokens
    gen = Generator(model, tokenizer, sampling, batch_size=batch_size, stop_tokens=stops, mesh=mesh)
    results: dict[Key, dict[str, Any]] = {}
    for batch in gen.run(ids):
        results.update(batch)
    out, records = [], []
    for ex in examples:
        for j in range(sampling.num_samples):
            out.append(result_row(ex, j, results[(ex.index, j)], sampling.num_samples))
            records.append(ex.record)
    if checker is not None:
        scoring.apply_checker(checker, out, records)
    return out


def result_row(
    ex: prompts_lib.Example, j: int, gen: Mapping[str, Any], num_samples: int
) -> dict[str, Any]:
    """The generations.jsonl row of example `ex`, sample `j`."""
    row = {"id": ex.id, "prompt": ex.prompt}
    if num_samples > 1:
        row["sample"] = j
    row.update(
        response=gen["response"], finish_reason=gen["finish_reason"], num_tokens=gen["num_tokens"]
    )
    return row
