"""Making preference pairs: CLAIR revisions and the paper's baseline datasets.

Modules: ``prompts`` (the reviser and judge prompts, reply parsers), ``client`` (the
OpenAI-compatible HTTP backend), ``local`` (a local checkpoint backend), ``cache`` (the resumable
request cache), ``keys`` (API keys: where they go, redaction), ``ledger`` (input rows, pairs,
rejects), ``builders`` (the four kinds of dataset) and ``cli`` (``python -m apo_jax.clair``).
Input files are read with :mod:`apo_jax.data.ingest`; the output is the input of
``python -m apo_jax.data.prepare``.
"""
