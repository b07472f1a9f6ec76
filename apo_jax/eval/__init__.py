"""Evaluation by generation: ``python -m apo_jax.eval`` and the library it runs on.

- :mod:`apo_jax.eval.prompts`: prompt rows in, rejects with stable reasons.
- :mod:`apo_jax.eval.generation`: chat-template rendering, length buckets, batched KV-cache
  generation, decoded rows; :func:`apo_jax.eval.generation.sample` for a few prompts in training.
- :mod:`apo_jax.eval.scoring` and :mod:`apo_jax.eval.checkers`: checkers and bootstrap intervals.
- :mod:`apo_jax.eval.judge`: pairwise judge win rates through an OpenAI-compatible endpoint.
- :mod:`apo_jax.eval.exports`: AlpacaEval, Arena-Hard and MixEval answer files.
- :mod:`apo_jax.eval.runner`: the command (resume log, generations.jsonl, summary.json).
"""
