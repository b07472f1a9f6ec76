"""Make CLAIR preference pairs, and the paper's baseline datasets, from a file of prompts.

``python -m apo_jax.clair KIND --flag_name=value ...``; the kind comes first:

- ``clair``: y_l = the target's answer, y_w = the reviser's minimal revision (--target_*,
  --reviser_*);
- ``stronger``: y_w = a stronger model's own answer (--target_*, --stronger_*);
- ``onpolicy-judge``: two target samples, a judge picks the winner (--target_*, --judge_*);
- ``offpolicy``: existing judged completions, no model calls.

A role is served by an OpenAI-compatible endpoint (``--<role>_url``) or sampled from a local
checkpoint (``--<role>_checkpoint``). A role sends an API key only when ``--<role>_api_key_env``
names the variable holding it. ``python -m apo_jax.clair KIND --help`` lists the kind's flags.

Writes the pairs (``--output``), ``<output>.rejects.jsonl``, ``<output>.manifest.json`` (counts,
token usage, cost; no secrets) and the request cache ``<output>.cache.jsonl``. Rerunning the same
command after a crash, Ctrl-C or ``--max_requests`` resumes from the cache.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from apo_jax import commands, errors
from apo_jax.clair import builders, keys
from apo_jax.clair.cache import RequestCache
from apo_jax.clair.client import BudgetExhausted, OpenAIChatBackend
from apo_jax.clair.ledger import BuildResult, read_objects, read_prompts

KIND_ROLES = {  # the kind of dataset -> the model roles it calls
    "clair": ("target", "reviser"),
    "stronger": ("target", "stronger"),
    "onpolicy-judge": ("target", "judge"),
    "offpolicy": (),
}
EXIT_BUDGET, EXIT_INTERRUPTED = 3, 130
USAGE = "python -m apo_jax.clair KIND --input=PATH --output=PATH [flags]"


def _define_role(role: str, kw: dict[str, Any]) -> None:
    def name(suffix: str) -> str:
        return f"{role}_{suffix}"

    temperature = 0.7 if role == "target" else 0.0
    flags.DEFINE_string(name("model"), None, f"{role}: model name sent and recorded", **kw)
    flags.DEFINE_string(name("url"), None, f"{role}: OpenAI-compatible base URL (.../v1)", **kw)
    flags.DEFINE_string(name("checkpoint"), None, f"{role}: local checkpoint dir, not a URL", **kw)
    flags.DEFINE_string(name("api_key_env"), None, f"{role}: env var holding its key", **kw)
    flags.DEFINE_float(name("temperature"), temperature, f"{role}: sampling temperature", **kw)
    flags.DEFINE_integer(name("max_tokens"), 2048, f"{role}: tokens per answer, at most", **kw)
    flags.DEFINE_float(name("rpm"), None, f"{role}: requests per minute, at most", **kw)
    flags.DEFINE_float(name("price_in"), 0.0, f"{role}: price per 1M input tokens", **kw)
    flags.DEFINE_float(name("price_out"), 0.0, f"{role}: price per 1M output tokens", **kw)


def flag_values(kind: str) -> flags.FlagValues:
    """The flags of one kind of dataset (a fresh set each call)."""
    fv = flags.FlagValues()
    kw = {"flag_values": fv}
    flags.DEFINE_string("input", None, "JSONL (or .jsonl.gz, JSON, Parquet) of prompts", **kw)
    flags.DEFINE_string("output", None, "JSONL of pairs to write (rejects etc. beside it)", **kw)
    flags.DEFINE_string("prompt_field", "prompt", "input field holding the prompt", **kw)
    flags.DEFINE_integer("seed", 0, "seed of the judge's order and the off-policy choice", **kw)
    for name in ("input", "output"):
        flags.mark_flag_as_required(name, flag_values=fv)
    if not KIND_ROLES[kind]:
        return fv
    flags.DEFINE_string("cache", None, "request cache (default <output>.cache.jsonl)", **kw)
    flags.DEFINE_integer("concurrency", 8, "parallel requests per model", **kw)
    flags.DEFINE_integer("max_retries", 6, "retries of a 429/5xx/timeout, per request", **kw)
    flags.DEFINE_float("timeout", 120.0, "seconds per request", **kw)
    flags.DEFINE_float("backoff_base", 1.0, "first retry wait in seconds (doubles)", **kw)
    flags.DEFINE_integer("max_requests", None, "stop after N new requests per model", **kw)
    flags.DEFINE_bool("allow_http_key", False, "send keys over plain http off this host", **kw)
    flags.DEFINE_bool("progress", True, "show a progress bar per model", **kw)
    if kind == "clair":
        flags.DEFINE_bool("keep_identical", False, "keep revisions equal to the answer", **kw)
    for role in KIND_ROLES[kind]:
        _define_role(role, kw)
    commands.positive(
        fv, "concurrency", "max_requests", *(f"{r}_max_tokens" for r in KIND_ROLES[kind])
    )
    return fv


def _kind(argv: Sequence[str]) -> str:
    kind = argv[1] if len(argv) > 1 else ""
    if kind in commands.HELP_ARGS:
        sys.stdout.write(f"usage: {USAGE}\n\n{__doc__}")
        raise SystemExit(0)
    if kind not in KIND_ROLES:
        raise commands.FlagError(
            f"the first argument must be the kind of dataset, one of "
            f"{' | '.join(KIND_ROLES)}; got {kind!r} (see --help)"
        )
    return kind


def parse(argv: Sequence[str]) -> tuple[str, flags.FlagValues]:
    """Reads the kind and its flags from ``argv`` (``argv[0]`` is the program).

    Raises:
      commands.FlagError: no or an unknown kind, a flag that does not parse, a stray argument.
    """
    kind = _kind(argv)
    fv = flag_values(kind)
    about = __doc__.split("\n\n")[0] + f" Kind: {kind}."
    rest = commands.parse(fv, [argv[0], *argv[2:]], USAGE.replace("KIND", kind), about)
    if rest[1:]:
        raise commands.FlagError(f"unexpected arguments {rest[1:]}; flags are --flag_name=value")
    return kind, fv


def _role_flag(fv: flags.FlagValues, role: str, suffix: str) -> Any:
    return fv[f"{role}_{suffix}"].value


def _backend(fv: flags.FlagValues, role: str, cache: RequestCache | None) -> Any:
    url, checkpoint = _role_flag(fv, role, "url"), _role_flag(fv, role, "checkpoint")
    if bool(url) == bool(checkpoint):
        raise commands.FlagError(f"--{role}_url or --{role}_checkpoint: give exactly one")
    if checkpoint:
        from apo_jax.clair.local import LocalBackend

        return LocalBackend(checkpoint, name=_role_flag(fv, role, "model"), cache=cache)
    if not _role_flag(fv, role, "model"):
        raise commands.FlagError(f"--{role}_model: required with --{role}_url")
    return OpenAIChatBackend(
        url,
        _role_flag(fv, role, "model"),
        api_key_env=_role_flag(fv, role, "api_key_env"),
        allow_http_key=fv.allow_http_key,
        cache=cache,
        concurrency=fv.concurrency,
        rpm=_role_flag(fv, role, "rpm"),
        max_retries=fv.max_retries,
        timeout=fv.timeout,
        backoff_base=fv.backoff_base,
        price_in=_role_flag(fv, role, "price_in"),
        price_out=_role_flag(fv, role, "price_out"),
        max_requests=fv.max_requests,
        progress=fv.progress,
    )


def _redactor(fv: flags.FlagValues, kind: str) -> keys.Redactor:
    """Redacts the value of every key a role is configured with (read from the environment)."""
    names = [_role_flag(fv, role, "api_key_env") for role in KIND_ROLES[kind]]
    return keys.Redactor({n: os.environ.get(n, "") for n in names if n})


def _roles(fv: flags.FlagValues, kind: str, cache: RequestCache | None) -> dict[str, Any]:
    out = {}
    for role in KIND_ROLES[kind]:
        params = {"temperature": _role_flag(fv, role, "temperature")}
        params["max_tokens"] = _role_flag(fv, role, "max_tokens")
        out[role] = builders.Role(_backend(fv, role, cache), params)
    return out


def _build(kind: str, fv: flags.FlagValues, roles: dict[str, Any], result: BuildResult) -> None:
    if kind == "offpolicy":
        builders.build_offpolicy_judge(read_objects(fv.input, result), result, seed=fv.seed)
        return
    rows = read_prompts(fv.input, result, fv.prompt_field)
    if kind == "clair":
        builders.build_clair(
            rows, roles["target"], roles["reviser"], result, keep_identical=fv.keep_identical
        )
    elif kind == "stronger":
        builders.build_stronger_preferred(rows, roles["target"], roles["stronger"], result)
    else:
        builders.build_onpolicy_judge(rows, roles["target"], roles["judge"], result, seed=fv.seed)


def _manifest(kind, fv, roles, result: BuildResult, status: str, seconds: float) -> dict[str, Any]:
    role_info = {}
    for name, role in roles.items():
        b = role.backend
        role_info[name] = {
            "model": role.model,
            "endpoint": getattr(b, "url", None) or getattr(b, "checkpoint", None),
            "api_key_env": getattr(b, "api_key_env", None),  # the variable's name, never its value
            "params": role.params,
            "usage": b.usage.summary(),
        }
    usage = [r["usage"] for r in role_info.values()]
    return {
        "kind": kind,
        "status": status,
        "input": fv.input,
        "output": fv.output,
        **result.counts(),
        "roles": role_info,
        "total_cost": round(sum(u["cost"] for u in usage), 6),
        "seconds": round(seconds, 3),
    }


def _say(redact: keys.Redactor, message: str) -> None:
    print(redact.text(f"clair: {message}"), file=sys.stderr, flush=True)


def run(argv: Sequence[str]) -> int:
    """Builds the dataset that ``argv`` describes; returns the exit status.

    0: done; 3: stopped at ``--max_requests`` (rerun to go on); 130: interrupted (rerun to go on).

    Raises:
      UserError: a flag, key, endpoint or input problem (its message redacted of every key).
    """
    kind, fv = parse(argv)
    redact = _redactor(fv, kind)
    stem = fv.output.removesuffix(".jsonl")
    rejects_path, manifest_path = f"{stem}.rejects.jsonl", f"{stem}.manifest.json"
    start, result, status, code = time.monotonic(), BuildResult(), "complete", 0
    roles: dict[str, Any] = {}
    with redact.errors():
        cache = None
        if KIND_ROLES[kind]:
            cache = RequestCache(fv.cache or f"{stem}.cache.jsonl", redact=redact)
        try:
            roles = _roles(fv, kind, cache)
            _build(kind, fv, roles, result)
            result.write(fv.output, rejects_path, redact)
        except BudgetExhausted as err:
            status, code = "incomplete: request budget reached", EXIT_BUDGET
            _say(redact, str(err))
        except KeyboardInterrupt:
            status, code = "interrupted", EXIT_INTERRUPTED
            _say(redact, "interrupted; finished requests are cached, rerun to resume")
        finally:
            if cache is not None:
                cache.close()
        manifest = _manifest(kind, fv, roles, result, status, time.monotonic() - start)
        os.makedirs(os.path.dirname(os.path.abspath(manifest_path)), exist_ok=True)
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(redact(manifest), f, indent=2)
    if code == 0:
        _say(
            redact,
            f"wrote {manifest['written']} pairs to {fv.output}, rejected "
            f"{manifest['rejected']} ({rejects_path}); cost {manifest['total_cost']}",
        )
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The command: :func:`run` under :func:`apo_jax.errors.guard` (one-line errors, exit 2)."""
    return errors.guard(lambda: run(sys.argv if argv is None else argv))
