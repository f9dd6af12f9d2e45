"""The rules file's size limit (CB_RULES_MAX_BYTES): refused before it is read, with a message.

The reload side (logged, counted, the rules in force kept) is in tests/config/test_reload.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config.check import load_rules
from proxy.config.model import RulesError
from proxy.config.settings import (
    DEFAULT_RULES_MAX_BYTES,
    SettingsError,
    load_settings,
    rules_max_bytes,
)

RULES = """version: 1
providers:
  up: {type: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  m: {provider: up}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def test_a_file_at_the_limit_loads_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, RULES)
    size = path.stat().st_size
    assert load_rules(path, max_bytes=size).models.keys() == {"m"}
    with pytest.raises(RulesError) as info:
        load_rules(path, max_bytes=size - 1)
    assert info.value.problems == [
        f"<root>: the file has {size} bytes, over the limit of {size - 1} (CB_RULES_MAX_BYTES)"
    ]


def test_an_oversize_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # A sparse 64 GiB file: reading it would take minutes and all the memory there is.
    path = write(tmp_path, RULES)
    os.truncate(path, 64 * 1024**3)
    with pytest.raises(
        RulesError, match=r"the file has 68719476736 bytes, over the limit of 33554432"
    ):
        load_rules(path, max_bytes=DEFAULT_RULES_MAX_BYTES)


def test_the_limit_comes_from_the_environment_with_a_documented_default() -> None:
    assert DEFAULT_RULES_MAX_BYTES == 32 * 1024 * 1024
    assert rules_max_bytes({}) == DEFAULT_RULES_MAX_BYTES
    assert rules_max_bytes({"CB_RULES_MAX_BYTES": " "}) == DEFAULT_RULES_MAX_BYTES
    assert rules_max_bytes({"CB_RULES_MAX_BYTES": "1048576"}) == 1048576
    assert load_settings({"CB_RULES_MAX_BYTES": "2048"}, {}).rules_max_bytes == 2048
    for bad in ("0", "-1", "32MiB", "1e6"):
        with pytest.raises(SettingsError, match=r"^CB_RULES_MAX_BYTES: expected a number of b"):
            rules_max_bytes({"CB_RULES_MAX_BYTES": bad})


def test_check_fails_with_the_message_over_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, RULES)
    monkeypatch.setenv("CB_RULES_MAX_BYTES", "64")
    assert main(["check", str(path)]) == 1
    size = path.stat().st_size
    assert capsys.readouterr().out == (
        f"{path}: <root>: the file has {size} bytes, over the limit of 64 (CB_RULES_MAX_BYTES)\n"
    )
    monkeypatch.setenv("CB_RULES_MAX_BYTES", str(size))
    assert main(["check", str(path)]) == 0


def test_check_names_a_bad_limit_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CB_RULES_MAX_BYTES", "lots")
    assert main(["check", str(write(tmp_path, RULES))]) == 2
    assert "CB_RULES_MAX_BYTES: expected a number of bytes >= 1, got 'lots'" in (
        capsys.readouterr().err
    )
