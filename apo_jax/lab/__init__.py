"""The paper's experiment in miniature (`python -m apo_jax.lab`, docs/lab.md).

`world` (checkable tasks, answer styles), `backends` (rule-based reviser, writers, judge),
`pipeline` (settings, target, training cells, evaluation), `sources` (the four pair sources
through `apo_jax.clair.builders`), `steps` (cached resumable steps), `analysis` (intervals and the
claims' verdicts), `report` (results.json, report.md, figures), `run` (the whole lab).
"""
