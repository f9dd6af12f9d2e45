"""The shutdown delay and the client connection timeouts: defaults, environment, flag, errors."""

from __future__ import annotations

import pytest

from proxy.config.settings import SettingsError, load_settings


def test_defaults() -> None:
    settings = load_settings({}, {})
    assert settings.shutdown_delay == 3.0
    assert settings.grace_period == 25.0
    assert (
        settings.client_header_timeout,
        settings.client_body_timeout,
        settings.client_keepalive_timeout,
    ) == (10.0, 30.0, 120.0)


def test_environment_and_the_flag_that_beats_it() -> None:
    environ = {
        "CB_SHUTDOWN_DELAY": "5",
        "CB_CLIENT_HEADER_TIMEOUT": "2",
        "CB_CLIENT_BODY_TIMEOUT": "4.5",
        "CB_CLIENT_KEEPALIVE_TIMEOUT": "75",
    }
    settings = load_settings(environ, {})
    assert settings.shutdown_delay == 5.0
    assert settings.client_header_timeout == 2.0
    assert settings.client_body_timeout == 4.5
    assert settings.client_keepalive_timeout == 75.0
    assert load_settings(environ, {"shutdown_delay": "0"}).shutdown_delay == 0.0


@pytest.mark.parametrize(
    ("environ", "flags", "name"),
    [
        ({"CB_SHUTDOWN_DELAY": "soon"}, {}, "CB_SHUTDOWN_DELAY"),
        ({"CB_SHUTDOWN_DELAY": "-1"}, {}, "CB_SHUTDOWN_DELAY"),
        ({}, {"shutdown_delay": "x"}, "--shutdown-delay"),
        ({"CB_CLIENT_HEADER_TIMEOUT": "0"}, {}, "CB_CLIENT_HEADER_TIMEOUT"),
        ({"CB_CLIENT_BODY_TIMEOUT": "-3"}, {}, "CB_CLIENT_BODY_TIMEOUT"),
        ({"CB_CLIENT_KEEPALIVE_TIMEOUT": "long"}, {}, "CB_CLIENT_KEEPALIVE_TIMEOUT"),
    ],
)
def test_a_bad_value_names_its_setting(
    environ: dict[str, str], flags: dict[str, str | None], name: str
) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings(environ, flags)


def test_continuation_copy_limit() -> None:
    assert load_settings({}, {}).continuation_max_bytes == 1024 * 1024
    assert load_settings({"CB_CONTINUATION_MAX_BYTES": "0"}, {}).continuation_max_bytes == 0
    with pytest.raises(SettingsError, match="CB_CONTINUATION_MAX_BYTES"):
        load_settings({"CB_CONTINUATION_MAX_BYTES": "-1"}, {})
