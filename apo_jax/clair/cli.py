"""Make CLAIR preference pairs, and the paper's baseline datasets, from a file of prompts.

CLAIR (a remote target served by vLLM, a hosted reviser; the key comes from $OPENAI_API_KEY)::

  python -m apo_jax.data.clair clair --input prompts.jsonl --output data/clair.jsonl \\
    --target_url http://localhost:8000/v1 --target_model meta-llama/Meta-Llama-3-8B-Instruct \\
    --reviser_url https://api.openai.com/v1 --reviser_model gpt-4-turbo \\
    --reviser_price_in 10 --reviser_price_out 30

Baselines: ``stronger`` (--target_*, --stronger_*), ``onpolicy-judge`` (--target_*, --judge_*),
``offpolicy`` (judged completions, no model calls). A role given ``--<role>_checkpoint`` instead
of ``--<role>_url`` samples a local checkpoint with ``apo_jax.models.generate``.

Writes the pairs (``--output``), ``<output>.rejects.jsonl``, ``<output>.manifest.json`` (counts,
token usage, cost; no secrets) and the request cache ``<output>.cache.jsonl``. Rerunning the same
command after a crash, Ctrl-C or ``--max_requests`` resumes from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from apo_jax.data import clair_builders as builders
from apo_jax.data.clair_cache import RequestCache
from apo_jax.data.clair_client import BudgetExhausted, OpenAIChatBackend
from apo_jax.data.clair_io import BuildResult, InputError, read_prompts, read_rows

ROLES = {
    "clair": ("target", "reviser"),
    "stronger": ("target", "stronger"),
    "onpolicy-judge": ("target", "judge"),
    "offpolicy": (),
}


def _add_role(parser: argparse.ArgumentParser, role: str) -> None:
    g = parser.add_argument_group(f"{role} model")
    g.add_argument(f"--{role}_model", help="model name sent to the endpoint and recorded")
    g.add_argument(f"--{role}_url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    g.add_argument(f"--{role}_checkpoint", help="local checkpoint dir (instead of --url)")
    g.add_argument(f"--{role}_api_key_env", default="OPENAI_API_KEY", help="env var with the key")
    g.add_argument(f"--{role}_temperature", type=float, default=0.7 if role == "target" else 0.0)
    g.add_argument(f"--{role}_max_tokens", type=int, default=2048)
    g.add_argument(f"--{role}_rpm", type=float, default=None, help="max requests per minute")
    g.add_argument(f"--{role}_price_in", type=float, default=0.0, help="price per 1M input tokens")
    g.add_argument(f"--{role}_price_out", type=float, default=0.0, help="per 1M output tokens")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: one subcommand per dataset kind."""
    parser = argparse.ArgumentParser(
        prog="python -m apo_jax.data.clair", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="method", required=True)
    for method, roles in ROLES.items():
        p = sub.add_parser(method)
        p.add_argument("--input", required=True, help="JSONL of prompts (or judged completions)")
        p.add_argument("--output", required=True, help="JSONL of pairs to write")
        p.add_argument("--prompt_field", default="prompt")
        p.add_argument("--seed", type=int, default=0, help="judge order / off-policy choice")
        if not roles:
            continue
        p.add_argument("--cache", help="request cache (default <output>.cache.jsonl)")
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--max_retries", type=int, default=6)
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        p.add_argument("--backoff_base", type=float, default=1.0, help="first retry wait, s")
        p.add_argument("--max_requests", type=int, default=None, help="stop after N new requests")
        p.add_argument("--keep_identical", action="store_true", help="keep unrevised answers")
        p.add_argument("--no_progress", action="store_true")
        for role in roles:
            _add_role(p, role)
    return parser


def _backend(args: argparse.Namespace, role: str, cache: RequestCache) -> Any:
    opt = {k[len(role) + 1 :]: v for k, v in vars(args).items() if k.startswith(f"{role}_")}
    if bool(opt["url"]) == bool(opt["checkpoint"]):
        raise InputError(f"--{role}_url or --{role}_checkpoint: give exactly one")
    if opt["checkpoint"]:
        from apo_jax.data.clair_local import LocalBackend

        return LocalBackend(opt["checkpoint"], name=opt["model"], cache=cache)
    if not opt["model"]:
        raise InputError(f"--{role}_model: required with --{role}_url")
    return OpenAIChatBackend(
        opt["url"],
        opt["model"],
        api_key_env=opt["api_key_env"],
        cache=cache,
        concurrency=args.concurrency,
        rpm=opt["rpm"],
        max_retries=args.max_retries,
        timeout=args.timeout,
        backoff_base=args.backoff_base,
        price_in=opt["price_in"],
        price_out=opt["price_out"],
        max_requests=args.max_requests,
        progress=not args.no_progress,
    )


def _roles(args: argparse.Namespace, cache: RequestCache | None) -> dict[str, builders.Role]:
    out = {}
    for role in ROLES[args.method]:
        params = {"temperature": getattr(args, f"{role}_temperature")}
        params["max_tokens"] = getattr(args, f"{role}_max_tokens")
        out[role] = builders.Role(_backend(args, role, cache), params)
    return out


def _build(args: argparse.Namespace, roles: dict[str, builders.Role], result: BuildResult) -> None:
    if args.method == "offpolicy":
        builders.build_offpolicy_judge(read_rows(args.input, result), result, seed=args.seed)
        return
    rows = read_prompts(args.input, result, args.prompt_field)
    if args.method == "clair":
        builders.build_clair(
            rows, roles["target"], roles["reviser"], result, keep_identical=args.keep_identical
        )
    elif args.method == "stronger":
        builders.build_stronger_preferred(rows, roles["target"], roles["stronger"], result)
    else:
        builders.build_onpolicy_judge(rows, roles["target"], roles["judge"], result, seed=args.seed)


def _manifest(args, roles, result: BuildResult, status: str, seconds: float) -> dict[str, Any]:
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
        "method": args.method,
        "status": status,
        "input": args.input,
        "output": args.output,
        **result.counts(),
        "roles": role_info,
        "total_cost": round(sum(u["cost"] for u in usage), 6),
        "seconds": round(seconds, 3),
    }


def run(args: argparse.Namespace) -> int:
    """Builds the dataset described by parsed ``args``; returns the process exit code."""
    stem = args.output[:-6] if args.output.endswith(".jsonl") else args.output
    rejects_path, manifest_path = f"{stem}.rejects.jsonl", f"{stem}.manifest.json"
    start, result, status, code = time.monotonic(), BuildResult(), "complete", 0
    cache = RequestCache(args.cache or f"{stem}.cache.jsonl") if ROLES[args.method] else None
    roles: dict[str, builders.Role] = {}
    try:
        roles = _roles(args, cache)
        _build(args, roles, result)
        result.write(args.output, rejects_path)
    except BudgetExhausted as err:
        status, code = "incomplete: request budget reached", 3
        print(f"clair: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        status, code = "interrupted", 130
        print("clair: interrupted; finished requests are cached, rerun to resume", file=sys.stderr)
    finally:
        if cache is not None:
            cache.close()
    manifest = _manifest(args, roles, result, status, time.monotonic() - start)
    os.makedirs(os.path.dirname(os.path.abspath(manifest_path)), exist_ok=True)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    if code == 0:
        print(
            f"clair: wrote {manifest['written']} pairs to {args.output}, rejected {manifest['rejected']} "
            f"({rejects_path}); cost {manifest['total_cost']}",
            file=sys.stderr,
        )
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: parses ``argv`` and runs; errors in the input are one line, no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"clair: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
