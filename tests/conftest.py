"""Shared fixtures: mock upstreams and the proxy in front of them, all on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

RULES_TEMPLATE = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    api_key_env: PRIMARY_KEY
    timeouts: {{connect: 2, first_token: 2, idle: 2, total: 30}}
    breaker: {{failure_threshold: 3, min_throughput: 100, open_seconds: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 2, first_token: 2, idle: 2, total: 30}}
    breaker: {{failure_threshold: 3, min_throughput: 100, open_seconds: 30}}
  nokey:
    type: openai
    base_url: {backup}/v1
    api_key_env: CB_TEST_UNSET_KEY
models:
  gpt-4o-mini:
    aliases: [gpt-4o-mini-2024-07-18]
    input_cost_per_1k: 0.00015
    output_cost_per_1k: 0.0006
    context_window: 128000
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
  solo:
    provider: primary
    upstream_model: solo-upstream
    input_cost_per_1k: 0.001
    output_cost_per_1k: 0.002
  backup-only:
    provider: backup
  locked:
    provider: nokey
  text-embedding-3-small:
    provider: primary
    input_cost_per_1k: 0.00002
virtual_models:
  auto: {{strategy: balanced, candidates: [gpt-4o-mini]}}
routes:
  - match: {{model: "gpt-3.5-turbo*"}}
    rewrite: {{model: gpt-4o-mini}}
  - match: {{model: "team-*", headers: {{x-team: "research*"}}}}
    rewrite: {{model: backup-only}}
defaults:
  strategy: cost_optimized  # equal prices: the declared order (primary, then backup) holds
  retry: {{max_attempts: 4, same_deployment_retries: 1, backoff_ms: 1, max_backoff_ms: 2}}
"""

PRIMARY_KEY = "sk-test-primary-secret"


@dataclass
class Stack:
    proxy: ProxyHandle
    primary: RunningMock
    backup: RunningMock


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with (
        running_mock("openai", name="primary") as primary,
        running_mock("openai", name="backup") as backup,
    ):
        path = write_rules(tmp_path, RULES_TEMPLATE.format(primary=primary.url, backup=backup.url))
        async with running_proxy(path, environ={"PRIMARY_KEY": PRIMARY_KEY}) as proxy:
            yield Stack(proxy, primary, backup)
