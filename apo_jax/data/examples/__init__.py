"""Small data files shipped with the project: the README's real-model quick start reads them.

- ``arith_pairs.jsonl``: 160 CLAIR-style preference pairs on arithmetic questions; the rejected
  answer is written the way SmolLM2-135M-Instruct answers and holds one arithmetic mistake, the
  chosen answer is its minimal revision (the mistaken number corrected, nothing else changed).
- ``arith_prompts.jsonl``: 64 held-out questions of the same kinds with their numeric ``answer``,
  for ``python -m apo_jax.eval --checker=apo_jax.eval.checkers:final_number``.

Both are written by ``python -m apo_jax.data.examples.make_arith`` (deterministic; a test checks
that the shipped files are its output).
"""
