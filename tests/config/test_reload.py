"""What check accepts, the runtime runs: serve starts, hot reloads apply or are rejected cleanly.

Each test runs the real proxy (tests.harness: `cb-proxy serve`'s code path on
127.0.0.1 port 0) and waits on ``state.reloads`` (``wait_reloads``), never on
a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import suppress
from pathlib import Path

import aiohttp
import pytest
import yaml

from bench.rules_load import rules_document
from proxy.config.check import load_rules
from proxy.config.model import RuleSet
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


async def test_the_watcher_survives_a_loader_that_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Even if loading itself raised (in its worker thread), the reload is logged, counted
    and the watcher keeps watching."""
    path = write_rules(tmp_path, VALID)
    async with running_proxy(path, reload_interval=0.01) as proxy:
        real = proxy.state.rules_loader

        def exploding(path: Path, max_bytes: int | None) -> RuleSet:
            raise MemoryError("reload exploded")

        proxy.state.rules_loader = exploding  # the injection point (state.RulesLoader)
        with caplog.at_level(logging.ERROR, logger="cb_proxy"):
            replace_rules(path, MAX_OPEN_ALONE, 1)
            assert await proxy.state.wait_reloads(1) == [False]
        assert "reload exploded" in caplog.text
        assert await error_count(proxy) == 1

        proxy.state.rules_loader = real
        replace_rules(path, MAX_OPEN_ALONE, 2)
        assert await proxy.state.wait_reloads(2) == [False, True]


async def test_the_blocking_reload_still_applies_or_rejects(tmp_path: Path) -> None:
    """``reload_rules`` (blocking, for callers off the loop) does what the watcher does."""
    path = write_rules(tmp_path, VALID)
    async with running_proxy(path) as proxy:
        path.write_text(WINDOW_HALF_SECOND)
        assert not app_module.reload_rules(proxy.state)
        path.write_text(MAX_OPEN_ALONE)
        assert app_module.reload_rules(proxy.state)
        assert proxy.state.rules.providers["up"].breaker.max_open_seconds == 5
        assert await error_count(proxy) == 1


# A catalog big enough that loading it takes a good part of a second (bench/rules_load.py's
# generator: 4,000 models, about 1.1 MB); on the loop, that would be the loop's lag.
LARGE_CATALOG_MODELS = 4_000
TICK_SECONDS = 0.005
HOLD_SECONDS = 10  # the loader's hold ends by itself: a regression fails, it does not hang


def large_rules_text() -> str:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(rules_document(LARGE_CATALOG_MODELS), Dumper=dumper, sort_keys=False)


async def ticker(lags: list[float]) -> None:
    """How late each tick of the loop is: the loop's lag (a sleep as a clock, not a wait)."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(TICK_SECONDS)
        now = loop.time()
        lags.append(now - last - TICK_SECONDS)
        last = now


async def test_the_loop_stays_responsive_while_a_large_file_reloads(tmp_path: Path) -> None:
    path = write_rules(tmp_path, VALID)
    large = large_rules_text()
    async with running_proxy(path, reload_interval=0.01) as proxy, aiohttp.ClientSession() as http:
        loop = asyncio.get_running_loop()
        loading, loaded = asyncio.Event(), asyncio.Event()
        release = threading.Event()
        load_seconds: list[float] = []
        real = proxy.state.rules_loader

        def held_loader(path: Path, max_bytes: int | None) -> RuleSet:
            loop.call_soon_threadsafe(loading.set)
            started = time.perf_counter()
            try:
                rules = real(path, max_bytes)  # the real read, decode and check
            finally:
                load_seconds.append(time.perf_counter() - started)
                loop.call_soon_threadsafe(loaded.set)
            release.wait(HOLD_SECONDS)  # held in progress until the test has looked
            return rules

        proxy.state.rules_loader = held_loader
        lags: list[float] = []
        tick = asyncio.create_task(ticker(lags))
        try:
            replace_rules(path, large, 1)
            await loading.wait()
            # The file is being decoded in the loader's thread: the loop answers meanwhile.
            async with http.get(proxy.metrics_url + "/healthz") as resp:
                assert resp.status == 200
            await loaded.wait()
            async with http.get(proxy.api_url + "/healthz") as resp:
                assert resp.status == 200
            assert proxy.state.reload_results == []  # still in progress, and yet served
            assert len(proxy.state.rules.models) == 1
            release.set()
            assert await proxy.state.wait_reloads(1) == [True]
        finally:
            release.set()
            tick.cancel()
            with suppress(asyncio.CancelledError):
                await tick
        assert len(proxy.state.rules.models) == LARGE_CATALOG_MODELS
        # On the loop, the load would have been one tick's lag, at least load_seconds late.
        assert lags
        assert max(lags) < load_seconds[0] / 2, (max(lags), load_seconds)


async def test_a_reload_over_the_size_limit_is_refused_counted_and_the_rules_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_rules(tmp_path, VALID)
    async with running_proxy(path, reload_interval=0.01, rules_max_bytes=1024) as proxy:
        before = proxy.state.rules
        with caplog.at_level(logging.ERROR, logger="cb_proxy"):
            replace_rules(path, MAX_OPEN_ALONE + "#" * 2048 + "\n", 1)
            assert await proxy.state.wait_reloads(1) == [False]
        assert proxy.state.rules is before
        assert await error_count(proxy) == 1
        assert "over the limit of 1024 (CB_RULES_MAX_BYTES)" in caplog.text
        assert await readyz(proxy) == 200

        replace_rules(path, MAX_OPEN_ALONE, 2)
        assert await proxy.state.wait_reloads(2) == [False, True]
