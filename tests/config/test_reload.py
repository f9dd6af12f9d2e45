"""What check accepts, the runtime runs: serve starts, hot reloads apply or are rejected cleanly.

Each test runs the real proxy (tests.harness: `cb-proxy serve`'s code path on
127.0.0.1 port 0) and waits on ``state.reloads`` (``wait_reloads``), never on
a sleep.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import aiohttp
import pytest

from proxy.config.check import load_rules
from proxy.server import app as app_module
from tests.harness import ProxyHandle, running_proxy, write_rules

RULES = """
version: 1
providers:
  up:
    type: openai
    base_url: http://127.0.0.1:9/v1
    breaker: {breaker}
models:
  m: {{provider: up}}
"""
# The reviewer's cases: check accepted them, the runtime refused them.
WINDOW_HALF_SECOND = RULES.format(breaker="{window_seconds: 0.5}")
MAX_OPEN_ALONE = RULES.format(breaker="{max_open_seconds: 5}")
VALID = RULES.format(breaker="{failure_threshold: 2}")
TIMEOUT_90 = {"CB_TIMEOUT_SECONDS": "90"}  # the inherited first open period is above 5 s


def replace_rules(path: Path, text: str, generation: int) -> None:
    """Write beside and rename over (what editors and kubelet do), with a distinct mtime."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    stamp = 1_700_000_000_000_000_000 + generation * 1_000_000_000
    os.utime(new, ns=(stamp, stamp))
    new.replace(path)


async def error_count(proxy: ProxyHandle) -> float:
    for line in (await proxy.metrics_text()).splitlines():
        if line.startswith('cb_proxy_rules_reloads_total{result="error"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no cb_proxy_rules_reloads_total error series")


async def readyz(proxy: ProxyHandle) -> int:
    async with aiohttp.ClientSession() as session, session.get(proxy.metrics_url + "/readyz") as r:
        return r.status


def test_check_rejects_the_files_the_runtime_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"breaker\.window_seconds: must be >= 1 and <= 3600"):
        load_rules(write_rules(tmp_path, WINDOW_HALF_SECOND))
    load_rules(write_rules(tmp_path, MAX_OPEN_ALONE))  # accepted: the runtime settles it


async def test_serve_starts_with_max_open_seconds_alone_below_the_inherited_open(
    tmp_path: Path,
) -> None:
    path = write_rules(tmp_path, MAX_OPEN_ALONE)
    async with running_proxy(path, environ=TIMEOUT_90) as proxy:
        config = proxy.state.breakers.config_for("up")
        # max_open_seconds caps every open period, the first one included (docs/rules.md).
        assert (config.open_seconds, config.max_open_seconds) == (5, 5)
        assert await readyz(proxy) == 200


async def test_a_bad_reload_is_logged_counted_and_a_later_good_one_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_rules(tmp_path, VALID)
    async with running_proxy(path, reload_interval=0.01, environ=TIMEOUT_90) as proxy:
        before = proxy.state.rules
        assert await error_count(proxy) == 0
        with caplog.at_level(logging.ERROR, logger="cb_proxy"):
            replace_rules(path, WINDOW_HALF_SECOND, 1)
            assert await proxy.state.wait_reloads(1) == [False]
        assert proxy.state.rules is before
        assert await error_count(proxy) == 1
        assert "providers.up.breaker.window_seconds: must be >= 1 and <= 3600, got 0.5" in (
            caplog.text
        )
        assert await readyz(proxy) == 200  # the rules in force are fine

        replace_rules(path, MAX_OPEN_ALONE, 2)
        assert await proxy.state.wait_reloads(2) == [False, True]
        assert proxy.state.rules.providers["up"].breaker.max_open_seconds == 5
        config = proxy.state.breaker("up").config
        assert (config.open_seconds, config.max_open_seconds) == (5, 5)
        assert await error_count(proxy) == 1


async def test_an_unexpected_error_in_a_reload_is_logged_counted_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_rules(tmp_path, VALID)
    async with running_proxy(path, reload_interval=0.01) as proxy:
        before = proxy.state.rules
        calls = 0

        def broken_swap(rules: object) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("swap exploded")

        with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="cb_proxy"):
            patch.setattr(proxy.state, "swap_rules", broken_swap)
            replace_rules(path, MAX_OPEN_ALONE, 1)
            assert await proxy.state.wait_reloads(1) == [False]
        assert calls == 1
        assert proxy.state.rules is before
        assert "swap exploded" in caplog.text
        assert await error_count(proxy) == 1

        replace_rules(path, MAX_OPEN_ALONE, 2)
        assert await proxy.state.wait_reloads(2) == [False, True]
        assert proxy.state.rules.providers["up"].breaker.max_open_seconds == 5


async def test_the_watcher_survives_a_reload_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if reload_rules itself raised, the watcher logs, counts and keeps watching."""
    path = write_rules(tmp_path, VALID)
    async with running_proxy(path, reload_interval=0.01) as proxy:
        real = app_module.reload_rules

        def exploding(state: object) -> bool:
            raise MemoryError("reload exploded")

        with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="cb_proxy"):
            patch.setattr(app_module, "reload_rules", exploding)
            replace_rules(path, MAX_OPEN_ALONE, 1)
            assert await proxy.state.wait_reloads(1) == [False]
        assert app_module.reload_rules is real
        assert "reload exploded" in caplog.text
        assert await error_count(proxy) == 1

        replace_rules(path, MAX_OPEN_ALONE, 2)
        assert await proxy.state.wait_reloads(2) == [False, True]
