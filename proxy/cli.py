"""`cb-proxy serve | check | explain | mock | demo`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from proxy.config.check import load_rules
from proxy.config.model import STRATEGIES, TASK_TYPES, RulesError, format_problems
from proxy.config.settings import SettingsError, load_settings, rules_max_bytes
from proxy.core.breaker import CircuitBreakerConfig
from proxy.core.candidates import StaticView
from proxy.core.prefs import RequestPrefs, parse_prefs
from proxy.core.router import plan_route
from proxy.server.logs import setup_logging
from proxy.upstream.client import check_environment as check_upstream_environment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cb-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--rules", help="rules file (env CB_RULES)")
    serve.add_argument("--listen", help="API HOST:PORT (env CB_LISTEN, default 127.0.0.1:3000)")
    serve.add_argument("--metrics-listen", help="metrics/admin HOST:PORT (env CB_METRICS_LISTEN)")
    serve.add_argument("--log-level", help="debug|info|warning|error (env LOG_LEVEL)")
    serve.add_argument("--log-format", help="json|text (env CB_LOG_FORMAT)")
    serve.add_argument(
        "--max-body-bytes", help="request body limit (env CB_MAX_BODY_BYTES, 20 MiB)"
    )
    serve.add_argument(
        "--grace-period", help="seconds to drain on SIGTERM (env CB_GRACE_PERIOD, 25)"
    )
    serve.add_argument(
        "--shutdown-delay",
        help="seconds still accepting after SIGTERM, part of the grace period "
        "(env CB_SHUTDOWN_DELAY, 3)",
    )

    check = sub.add_parser("check", help="validate a rules file; exit 1 on any problem")
    check.add_argument("file")

    explain = sub.add_parser("explain", help="print the route plan a request would get")
    explain.add_argument("--rules", required=True)
    explain.add_argument("--model", required=True)
    explain.add_argument("--strategy", choices=STRATEGIES)
    explain.add_argument("--task-type", choices=TASK_TYPES)
    explain.add_argument("--max-cost", type=float, help="max USD per 1k tokens (input and output)")
    explain.add_argument("--max-latency-ms", type=float)
    explain.add_argument(
        "--header", action="append", default=[], help="NAME=VALUE, for route matches"
    )
    explain.add_argument("prompt", nargs="?", default="")

    mock = sub.add_parser("mock", help="run a mock upstream with fault control")
    mock.add_argument("--format", choices=("openai", "anthropic", "gemini"), default="openai")
    mock.add_argument("--listen", default="127.0.0.1:18081")
    mock.add_argument("--name", default=None, help="name reported in x-mock-upstream")
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument("--tokens-per-second", type=float, default=None)

    demo = sub.add_parser("demo", help="mock upstreams + proxy + a scripted tour")
    demo.add_argument("--exit-after-tour", action="store_true", help="stop after the tour")
    demo.add_argument("--port", type=int, default=3000, help="proxy API port")
    return parser


def _cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import lifecycle as server

    try:
        settings = load_settings(
            os.environ,
            {
                "rules": args.rules,
                "listen": args.listen,
                "metrics_listen": args.metrics_listen,
                "log_level": args.log_level,
                "log_format": args.log_format,
                "max_body_bytes": args.max_body_bytes,
                "grace_period": args.grace_period,
                "shutdown_delay": args.shutdown_delay,
            },
        )
        # The breaker defaults come from the environment too (CB_TIMEOUT_SECONDS, ...): a bad
        # value is a start-up error with its name, like any other setting, not a traceback.
        CircuitBreakerConfig.from_env(settings.environ)
        # Egress proxy and CA variables likewise (HTTPS_PROXY, SSL_CERT_FILE, ...).
        check_upstream_environment(settings.environ)
    except (SettingsError, ValueError) as exc:
        print(f"cb-proxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        rules = load_rules(settings.rules_path, max_bytes=settings.rules_max_bytes)
    except RulesError as err:
        print(format_problems(err), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cb-proxy: cannot read rules file: {exc}", file=sys.stderr)
        return 1
    result = server.run(lambda: server.serve(settings, rules))
    return result if isinstance(result, int) else 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        max_bytes = rules_max_bytes(os.environ)
    except SettingsError as exc:
        print(f"cb-proxy: {exc}", file=sys.stderr)
        return 2
    try:
        rules = load_rules(args.file, max_bytes=max_bytes)
    except RulesError as err:
        print(format_problems(err))
        return 1
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc}")
        return 1
    print(
        f"{args.file}: ok ({len(rules.providers)} providers, {len(rules.models)} models, "
        f"{len(rules.virtual_models)} virtual models, {len(rules.routes)} routes)"
    )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    """Print the plan ``plan_route`` makes for a request, with no live stats (StaticView)."""
    from proxy.core.errors import ProxyError
    from proxy.core.explain import candidate_facts
    from proxy.core.prefs import estimate_prompt_tokens
    from proxy.core.router import format_usd
    from proxy.core.tasks import guess_task

    try:
        rules = load_rules(args.rules)
    except RulesError as err:
        print(format_problems(err))
        return 1
    raw: dict[str, object] = {}
    if args.strategy:
        raw["routing_strategy"] = args.strategy
    if args.task_type:
        raw["task_type"] = args.task_type
    if args.max_cost is not None:
        raw["max_cost_per_1k_tokens"] = args.max_cost
    if args.max_latency_ms is not None:
        raw["max_latency_ms"] = args.max_latency_ms
    headers = dict(h.split("=", 1) for h in args.header if "=" in h)
    headers = {k.lower(): v for k, v in headers.items()}
    messages: list[dict[str, object]] = (
        [{"role": "user", "content": args.prompt}] if args.prompt else []
    )
    prompt_tokens = estimate_prompt_tokens({"messages": messages})
    try:
        prefs: RequestPrefs = parse_prefs(raw)
        plan = plan_route(
            rules,
            args.model,
            headers,
            prefs,
            StaticView(),
            messages=messages,
            prompt_tokens=prompt_tokens,
        )
    except ProxyError as err:
        print(f"error {err.http_status}: {err.message}")
        return 1

    virtual = rules.virtual_models.get(plan.resolved)
    resolved = plan.resolved + (" (virtual model)" if virtual is not None else "")
    if plan.resolved != plan.requested:
        resolved += " (rewritten by a route)"
    if args.strategy:
        strategy_source = "request"
    elif virtual is not None:
        strategy_source = "virtual model"
    else:
        strategy_source = "defaults"
    if plan.task_source == "detected":
        guess = guess_task(messages)
        scores = ", ".join(f"{task} {score:g}" for task, score in guess.scores.items())
        task = f"{plan.task_type} (detected from the prompt; scores: {scores})"
    elif plan.task_type:
        task = f"{plan.task_type} (from the {plan.task_source or 'request'})"
    else:
        task = "not needed by this plan"
    limits = []
    if plan.max_cost is not None:
        cap = plan.max_cost
        limits.append(f"max cost {format_usd(cap.input)}/1k in, {format_usd(cap.output)}/1k out")
    if plan.max_latency_ms is not None:
        limits.append(f"max latency {plan.max_latency_ms:g}ms")

    print(f"requested:   {plan.requested}")
    print(f"resolved:    {resolved}")
    print(f"strategy:    {plan.strategy} (from the {strategy_source})")
    print(f"task:        {task}")
    print(f"prompt:      ~{plan.prompt_tokens} tokens (characters / 4)")
    print(f"constraints: {'; '.join(limits) or 'none'}")
    print(f"x-cb-route:  {plan.header()}")
    print("candidates (in order; live latency and reliability are not known here):")
    if not plan.candidates:
        print("  none")
    facts = candidate_facts(plan)
    width = max((len(f.candidate.deployment.key) for f in facts), default=0)
    upstream_width = max(
        (
            len(f.candidate.provider.type) + len(f.candidate.deployment.upstream_model)
            for f in facts
        ),
        default=0,
    )
    number_width = len(str(len(facts)))
    for i, fact in enumerate(facts, 1):
        dep = fact.candidate.deployment
        latency = (
            f"{fact.latency_ms:g}ms {fact.latency_source}"
            if fact.latency_ms is not None
            else "latency unknown"
        )
        if fact.quality is None:
            quality = "quality -"
        elif plan.task_type is None:
            quality = f"mean quality {fact.quality:.3g}"
        else:
            quality = f"{plan.task_type} quality {fact.quality:g}"
        cols = [
            f"  {i:>{number_width}}. {dep.key:<{width}}",
            f"{fact.candidate.provider.type} {dep.upstream_model}".ljust(upstream_width + 1),
            f"{format_usd(dep.input_cost_per_1k)} in + "
            f"{format_usd(dep.output_cost_per_1k)} out /1k",
            latency,
            quality,
        ]
        if fact.score is not None:
            cols.append(f"score {fact.score:.3f}")
        if fact.role == "fallback":
            cols.append("[fallback]")
        if fact.blocked:
            cols.append("[breaker open]")
        if i == 1:
            cols.append(f"<- first: {plan.reason}")
        print("  ".join(cols))
    rejected = plan.rejected
    if rejected:
        print("dropped:")
        for rej in rejected:
            print(f"  - {rej.deployment}: {rej.reason}")
    return 0


def _cmd_mock(args: argparse.Namespace) -> int:
    from proxy.config.settings import parse_host_port
    from proxy.mock.app import run_mock

    where = parse_host_port(args.listen, "--listen")
    run_mock(
        args.format,
        where.host,
        where.port,
        name=args.name or args.format,
        latency_ms=args.latency_ms,
        tokens_per_second=args.tokens_per_second,
    )
    return 0


DEMO_EXTRA_MISSING = (
    "cb-proxy demo drives its tour with the official OpenAI SDK, which is not installed.\n"
    'Install it with: pip install "cb-proxy[demo]"   (or: pip install openai)\n'
)


def _cmd_demo(args: argparse.Namespace) -> int:
    # The SDK is an optional extra: a plain `pip install cb-proxy` serves traffic without it.
    if importlib.util.find_spec("openai") is None:
        sys.stderr.write(DEMO_EXTRA_MISSING)
        return 2
    from proxy.mock.demo import run_demo

    return int(run_demo(port=args.port, exit_after_tour=args.exit_after_tour))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": _cmd_serve,
        "check": _cmd_check,
        "explain": _cmd_explain,
        "mock": _cmd_mock,
        "demo": _cmd_demo,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
