"""TLS with a private CA (SSL_CERT_FILE), egress through a CONNECT proxy, NO_PROXY, local failures.

The CA is a throwaway made by ``trustme``; the upstream is the OpenAI mock served
over https with a certificate that CA signed for ``upstream.test``, a name only
the test's CONNECT proxy (``tests.fakes.connect_proxy``) resolves: a call that
skipped the proxy could not even find the host, so every call that succeeds
went through the tunnel. Everything listens on 127.0.0.1, port 0.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web

from proxy.core.outcome import Outcome
from proxy.mock.app import create_mock_app
from proxy.server.health import HealthChecker, Verdict
from proxy.upstream.client import UpstreamPool
from proxy.upstream.egress import EgressConfigError, EgressProxies, ProxyRoute
from proxy.upstream.errors import (
    ConnectFailed,
    LocalResourceError,
    PoolExhausted,
    failure,
)
from tests.fakes.connect_proxy import ConnectProxy
from tests.harness import running_proxy, write_rules

HOST = "upstream.test"
CONNECT = 5.0
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
RULES = """
version: 1
providers:
  up:
    type: openai
    base_url: {base}/v1
    timeouts: {{connect: 5, first_token: 10, idle: 10, total: 30}}
models:
  m:
    provider: up
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "127.0.0.1").configure_cert(context)
    return context


@asynccontextmanager
async def mock_upstream(tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """The OpenAI mock on 127.0.0.1 (over TLS when ``tls``); yields its port."""
    runner = web.AppRunner(create_mock_app("openai", name="tls"))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def post(api: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(api + "/v1/chat/completions", json=body) as resp,
    ):
        return resp.status, await resp.read()


# -- TLS ---------------------------------------------------------------------------------------


async def test_ssl_cert_file_makes_a_private_ca_trusted(ca: trustme.CA, ca_file: Path) -> None:
    async with mock_upstream(server_context(ca)) as port:
        url = f"https://127.0.0.1:{port}/v1/models"
        pool = UpstreamPool(environ={"SSL_CERT_FILE": str(ca_file)})
        try:
            async with await pool.request("GET", url, {}, None, connect_timeout=CONNECT) as resp:
                assert resp.status == 200
                assert orjson.loads(await resp.read())["object"] == "list"
        finally:
            await pool.close()
        pool = UpstreamPool(environ={})  # the system CAs alone do not know this CA
        try:
            with pytest.raises(ConnectFailed) as info:
                await pool.request("GET", url, {}, None, connect_timeout=CONNECT)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        finally:
            await pool.close()


# -- egress through a CONNECT proxy ------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_every_kind_of_upstream_call_goes_through_the_connect_proxy(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, scheme: str
) -> None:
    """A plain request, a stream and a health check, to a host only the proxy can resolve."""
    tls = server_context(ca) if scheme == "https" else None
    variable = "HTTPS_PROXY" if scheme == "https" else "http_proxy"  # lower case works too
    async with mock_upstream(tls) as port, ConnectProxy(hosts={HOST: "127.0.0.1"}) as egress:
        rules = write_rules(tmp_path, RULES.format(base=f"{scheme}://{HOST}:{port}"))
        environ = {variable: egress.url, "SSL_CERT_FILE": str(ca_file)}
        async with running_proxy(rules, environ=environ) as proxy:
            status, raw = await post(proxy.api_url, BODY)
            assert status == 200, raw
            status, raw = await post(proxy.api_url, {**BODY, "stream": True})
            assert status == 200
            assert raw.rstrip().endswith(b"data: [DONE]")
            checker = HealthChecker(proxy.state, interval=30)
            health = await checker.check_once(proxy.state.rules.providers["up"])
            assert (health.verdict, health.detail) == (Verdict.PASS, "HTTP 200")
        assert egress.tunnels
        assert {t.target for t in egress.tunnels} == {f"{HOST}:{port}"}


async def test_no_proxy_bypasses_the_egress_proxy(tmp_path: Path) -> None:
    async with mock_upstream() as port, ConnectProxy(refuse=True) as egress:
        rules = write_rules(tmp_path, RULES.format(base=f"http://127.0.0.1:{port}"))
        environ = {"HTTP_PROXY": egress.url, "NO_PROXY": "localhost,127.0.0.0/8"}
        async with running_proxy(rules, environ=environ) as proxy:
            status, _ = await post(proxy.api_url, BODY)
            assert status == 200
            checker = HealthChecker(proxy.state, interval=30)
            health = await checker.check_once(proxy.state.rules.providers["up"])
            assert health.verdict is Verdict.PASS
        assert egress.tunnels == []


async def test_a_refused_connect_is_a_connect_failure_and_credentials_ride_along() -> None:
    async with ConnectProxy(refuse=True) as egress:
        proxy_url = egress.url.replace("http://", "http://user:p%40ss@")
        pool = UpstreamPool(environ={"HTTPS_PROXY": proxy_url})
        try:
            with pytest.raises(ConnectFailed, match=r"refused CONNECT upstream\.test:443"):
                await pool.request("GET", f"https://{HOST}/", {}, None, connect_timeout=CONNECT)
        finally:
            await pool.close()
        [tunnel] = egress.tunnels
        assert tunnel.headers["proxy-authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "proxied"),
    [
        ("", "api.openai.com", 443, True),
        ("*", "api.openai.com", 443, False),
        ("openai.com", "api.openai.com", 443, False),
        (".openai.com", "openai.com", 443, False),
        ("openai.com", "notopenai.com", 443, True),
        ("api.openai.com:8443", "api.openai.com", 443, True),
        ("api.openai.com:443", "api.openai.com", 443, False),
        ("10.0.0.0/8", "10.1.2.3", 443, False),
        ("10.0.0.0/8", "11.1.2.3", 443, True),
        ("[::1]:443, localhost", "::1", 443, False),
        (" foo.test , API.OpenAI.com ", "api.openai.com", 443, False),
    ],
)
def test_no_proxy_matching(no_proxy: str, host: str, port: int, proxied: bool) -> None:
    proxies = EgressProxies({"HTTPS_PROXY": "proxy.test:3128", "NO_PROXY": no_proxy})
    route = proxies.route("https", host, port)
    assert (route == ProxyRoute("proxy.test", 3128)) is proxied


def test_proxy_variables_upper_case_first_and_scheme_specific() -> None:
    proxies = EgressProxies(
        {"HTTPS_PROXY": "http://a.test:1", "https_proxy": "http://b.test:2", "http_proxy": "c:3"}
    )
    assert proxies.route("https", "x.test", 443) == ProxyRoute("a.test", 1)
    assert proxies.route("http", "x.test", 80) == ProxyRoute("c", 3)
    assert EgressProxies({"HTTP_PROXY": "http://c:3"}).route("https", "x.test", 443) is None
    with pytest.raises(EgressConfigError, match="only http:// proxies"):
        EgressProxies({"HTTPS_PROXY": "https://tls-proxy.test"})


# -- local failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
async def test_running_out_of_sockets_is_a_local_failure(code: int) -> None:
    async def no_descriptors(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, "out of something")

    pool = UpstreamPool(environ={}, opener=no_descriptors)
    try:
        with pytest.raises(LocalResourceError) as info:
            await pool.request("GET", "http://up.test/", {}, None, connect_timeout=CONNECT)
    finally:
        await pool.close()
    mapped = failure(info.value, "m@up")
    assert mapped.local
    assert mapped.error.http_status == 503
    assert mapped.error.code == "proxy_overloaded"
    assert pool.open_connections(("http", "up.test", 80)) == 0  # the slot came back


async def test_a_refused_socket_is_the_upstreams_failure() -> None:
    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    pool = UpstreamPool(environ={}, opener=refused)
    try:
        with pytest.raises(ConnectFailed) as info:
            await pool.request("GET", "http://up.test/", {}, None, connect_timeout=CONNECT)
    finally:
        await pool.close()
    mapped = failure(info.value, "m@up")
    assert (mapped.outcome, mapped.local, mapped.transient) == (Outcome.FAILURE, False, True)
    assert mapped.error.http_status == 502


def failures() -> Iterator[tuple[BaseException, int, Outcome, bool]]:
    from proxy.upstream import errors

    yield errors.ConnectTimeout("slow"), 504, Outcome.FAILURE, False
    yield TimeoutError(), 504, Outcome.FAILURE, False
    yield errors.Disconnected("gone"), 502, Outcome.FAILURE, False
    yield errors.MalformedHead("bad"), 502, Outcome.FAILURE, False
    yield errors.PayloadError("cut"), 502, Outcome.FAILURE, False
    yield errors.BodyTooLarge("big"), 502, Outcome.FAILURE, False
    yield errors.HeaderTooLarge("big"), 502, Outcome.FAILURE, False
    yield PoolExhausted("busy"), 503, Outcome.IGNORED, True


@pytest.mark.parametrize(("exc", "status", "outcome", "local"), list(failures()))
def test_the_one_error_map(exc: BaseException, status: int, outcome: Outcome, local: bool) -> None:
    mapped = failure(exc, "m@up", doing="waiting for the first token")
    assert (mapped.error.http_status, mapped.outcome, mapped.local) == (status, outcome, local)
    assert set(mapped.error.to_dict()["error"]) == {"message", "type", "param", "code"}
