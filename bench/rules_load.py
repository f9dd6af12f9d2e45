"""Rules loading benchmark: a 50,000-model rules file through the loader and through pydantic v2.

Run: ``.venv/bin/python -m bench.rules_load [--models N] [--repeat R]``.

It generates one rules file (three providers, every fifth model on two
upstreams, aliases, quality scores, a few virtual models and routes), writes it
as YAML and times, best of ``--repeat`` runs:

- ``yaml (pure SafeLoader)`` and ``yaml (libyaml CSafeLoader)``: decoding only;
- ``load_rules``: what ``cb-proxy check``, ``serve`` and a hot reload run (read,
  decode with the duplicate-key-strict loader, validate, build the ``RuleSet``);
- ``parse_rules``: validation and construction only, from the decoded document;
- ``pydantic v2``: ``model_validate`` of the same decoded document against
  pydantic models carrying the same keys, types and ranges (extra keys
  forbidden). It checks less than ``parse_rules`` (no cross-references, no
  alias collisions, no URL or header checks, no ``RuleSet`` indexes), so it is
  a lower bound for a pydantic-based loader.

msgspec is not measured: it is not a dependency, and pydantic v2 (installed
with the dev tools) already shows what a compiled validator saves.

Then it prints what each reports for one file with three mistakes, to compare
the messages (all at once, key path, did-you-mean).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from proxy.config.check import load_rules, parse_rules
from proxy.config.model import RulesError

MODELS = 50_000
PROVIDERS = ("openai", "anthropic", "gemini")


def rules_document(models: int = MODELS) -> dict[str, Any]:
    """A valid rules document with ``models`` models."""
    providers: dict[str, Any] = {
        f"{kind}-main": {
            "type": kind,
            "base_url": f"http://127.0.0.1:{18000 + i}/v1",
            "api_key_env": f"{kind.upper()}_API_KEY",
            "timeouts": {"connect": 5, "first_token": 30},
            "breaker": {"failure_threshold": 5, "open_seconds": 10, "max_open_seconds": 60},
        }
        for i, kind in enumerate(PROVIDERS)
    }
    names = list(providers)
    catalog: dict[str, Any] = {}
    for i in range(models):
        body: dict[str, Any] = {
            "input_cost_per_1k": 0.0001 * (1 + i % 50),
            "output_cost_per_1k": 0.0004 * (1 + i % 50),
            "context_window": 32_000 * (1 + i % 4),
            "quality": {"chat": i % 10, "coding": (i * 3) % 10, "analysis": (i * 7) % 11},
            "aliases": [f"model-{i}-latest"],
        }
        if i % 5 == 0:
            body["deployments"] = [
                {"provider": names[i % 3], "latency_ms": 100 + i % 500},
                {"provider": names[(i + 1) % 3], "upstream_model": f"vendor-model-{i}"},
            ]
        else:
            body["provider"] = names[i % 3]
            body["latency_ms"] = 200 + i % 700
        catalog[f"model-{i}"] = body
    return {
        "version": 1,
        "providers": providers,
        "models": catalog,
        "virtual_models": {
            "auto": {"strategy": "balanced"},
            "cb:cheap": {"strategy": "cost_optimized", "candidates": ["model-1", "model-2"]},
            "cb:coding": {"strategy": "task_specific", "task_type": "coding"},
        },
        "routes": [
            {
                "match": {"model": "gpt-4*", "headers": {"x-team": "research"}},
                "rewrite": {"model": "model-0"},
            },
            {"match": {"model": "legacy-*"}, "fallbacks": ["model-1"]},
        ],
        "defaults": {
            "strategy": "balanced",
            "weights": {"quality": 0.4, "cost": 0.3, "latency": 0.2, "reliability": 0.1},
            "retry": {"max_attempts": 4, "backoff_ms": 100},
        },
    }


def bad_document() -> dict[str, Any]:
    """Three mistakes: a typo'd key, a breaker value out of range, a wrong type."""
    doc = rules_document(3)
    doc["providers"]["openai-main"]["breaker"]["window_seconds"] = 0.5
    doc["models"]["model-1"]["prvider"] = doc["models"]["model-1"].pop("provider")
    doc["models"]["model-2"]["context_window"] = "big"
    return doc


# ----------------------------------------------------------------------------- pydantic v2


def pydantic_validator() -> Callable[[object], object] | None:
    """A pydantic v2 model of the same keys, types and ranges; None when pydantic is absent."""
    if importlib.util.find_spec("pydantic") is None:
        return None
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    class Timeouts(Strict):
        connect: float = Field(default=5.0, gt=0, allow_inf_nan=False)
        first_token: float = Field(default=30.0, gt=0, allow_inf_nan=False)
        idle: float = Field(default=30.0, gt=0, allow_inf_nan=False)
        total: float = Field(default=600.0, gt=0, allow_inf_nan=False)

    class Breaker(Strict):
        failure_threshold: int | None = Field(default=None, ge=0)
        failure_rate: float | None = Field(default=None, gt=0, le=1)
        min_throughput: int | None = Field(default=None, ge=1)
        window_seconds: float | None = Field(default=None, ge=1, le=3600)
        open_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)
        max_open_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)
        half_open_probes: int | None = Field(default=None, ge=1)
        slow_call_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
        max_half_open_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    class HealthCheck(Strict):
        path: str | None = None
        interval: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    class Provider(Strict):
        type: Literal["openai", "anthropic", "gemini"]
        base_url: str
        api_key_env: str | None = None
        headers: dict[str, str] = Field(default_factory=dict)
        timeouts: Timeouts = Field(default_factory=Timeouts)
        breaker: Breaker = Field(default_factory=Breaker)
        health_check: HealthCheck = Field(default_factory=HealthCheck)

    class Quality(Strict):
        chat: float | None = Field(default=None, ge=0, le=10)
        coding: float | None = Field(default=None, ge=0, le=10)
        analysis: float | None = Field(default=None, ge=0, le=10)
        creative: float | None = Field(default=None, ge=0, le=10)

    class DeploymentFields(Strict):
        upstream_model: str | None = None
        input_cost_per_1k: float | None = Field(default=None, ge=0, allow_inf_nan=False)
        output_cost_per_1k: float | None = Field(default=None, ge=0, allow_inf_nan=False)
        latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
        context_window: int | None = Field(default=None, ge=1)

    class Deployment(DeploymentFields):
        provider: str

    class Model(DeploymentFields):
        provider: str | None = None
        deployments: list[Deployment] | None = None
        quality: Quality = Field(default_factory=Quality)
        aliases: list[str] = Field(default_factory=list)
        description: str = ""

    class CostCap(Strict):
        input: float = Field(ge=0)
        output: float = Field(ge=0)

    class VirtualModel(Strict):
        strategy: Literal[
            "cost_optimized", "performance_first", "balanced", "reliability_first", "task_specific"
        ]
        task_type: Literal["chat", "coding", "analysis", "creative"] | None = None
        candidates: list[str] | None = None
        max_cost_per_1k_tokens: float | CostCap | None = None
        max_latency_ms: float | None = Field(default=None, gt=0)
        fallback_models: list[str] = Field(default_factory=list)
        description: str = ""

    class Match(Strict):
        model: str | None = None
        headers: dict[str, str] = Field(default_factory=dict)

    class Rewrite(Strict):
        model: str

    class Route(Strict):
        match: Match = Field(default_factory=Match)
        rewrite: Rewrite | None = None
        fallbacks: list[str] = Field(default_factory=list)

    class Weights(Strict):
        quality: float = Field(default=0.0, ge=0)
        cost: float = Field(default=0.0, ge=0)
        latency: float = Field(default=0.0, ge=0)
        reliability: float = Field(default=0.0, ge=0)

    class Retry(Strict):
        max_attempts: int = Field(default=4, ge=1, le=20)
        same_deployment_retries: int = Field(default=1, ge=0, le=5)
        max_retry_wait: float = Field(default=3.0, ge=0, le=60)
        backoff_ms: float = Field(default=100.0, ge=0)
        max_backoff_ms: float = Field(default=500.0, ge=0)
        budget_ratio: float = Field(default=0.2, ge=0, le=1)

    class Defaults(Strict):
        strategy: str = "balanced"
        fallback_models: list[str] = Field(default_factory=list)
        weights: Weights | None = None
        retry: Retry = Field(default_factory=Retry)
        response_metadata: bool = True

    class Rules(Strict):
        version: Literal[1]
        providers: dict[str, Provider]
        models: dict[str, Model]
        virtual_models: dict[str, VirtualModel] = Field(default_factory=dict)
        routes: list[Route] = Field(default_factory=list)
        defaults: Defaults = Field(default_factory=Defaults)

    def validate(data: object) -> object:
        return Rules.model_validate(data)

    return validate


def pydantic_problems(validate: Callable[[object], object], data: object) -> list[str]:
    from pydantic import ValidationError

    try:
        validate(data)
    except ValidationError as err:
        return [".".join(str(part) for part in e["loc"]) + ": " + e["msg"] for e in err.errors()]
    return []


# ----------------------------------------------------------------------------- timing


def best_of(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rules_load")
    parser.add_argument("--models", type=int, default=MODELS)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)

    doc = rules_document(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False))
        text = path.read_text()
        size_mb = len(text) / 1e6
        rows: list[tuple[str, float]] = [
            (
                "yaml (pure SafeLoader)",
                best_of(args.repeat, lambda: yaml.load(text, yaml.SafeLoader)),
            ),
            (
                "yaml (libyaml CSafeLoader)",
                best_of(args.repeat, lambda: yaml.load(text, yaml.CSafeLoader)),
            ),
            ("load_rules (file -> RuleSet)", best_of(args.repeat, lambda: load_rules(path))),
            ("parse_rules (dict -> RuleSet)", best_of(args.repeat, lambda: parse_rules(doc))),
        ]
        validate = pydantic_validator()
        if validate is not None:
            rows.append(
                ("pydantic v2 (dict -> models)", best_of(args.repeat, lambda: validate(doc)))
            )

    print(f"rules file: {args.models} models, {size_mb:.1f} MB of YAML; best of {args.repeat}")
    for name, seconds in rows:
        print(f"  {name:32} {seconds * 1000:9.1f} ms")
    if validate is None:
        print("  pydantic v2: not installed")
    print("  msgspec: not a dependency of the project; not measured")

    bad = bad_document()
    print("\nmessages for one document with three mistakes:")
    try:
        parse_rules(bad)
    except RulesError as err:
        print("  parse_rules:")
        for problem in err.problems:
            print(f"    {problem}")
    if validate is not None:
        print("  pydantic v2:")
        for problem in pydantic_problems(validate, bad):
            print(f"    {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
