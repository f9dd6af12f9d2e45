"""The text log format prints the whole route plan and every rejection, like JSON does.

LOG_LEVEL=debug with --log-format text: the request's debug line is followed by the
plan's fields, one line per candidate and one line per rejected deployment.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from proxy.config.check import load_rules
from proxy.core.candidates import StaticView
from proxy.core.prefs import parse_prefs
from proxy.core.router import plan_route
from proxy.server.api import log_plan
from proxy.server.logs import JsonFormatter, TextFormatter

DEMO = Path(__file__).resolve().parents[2] / "rules" / "demo.yaml"


def _record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    rules = load_rules(DEMO)
    prefs = parse_prefs({"max_cost_per_1k_tokens": 0.001, "fallback_models": ["nope"]})
    plan = plan_route(rules, "auto", {}, prefs, StaticView(), endpoint="chat")
    with caplog.at_level(logging.DEBUG, logger="cb_proxy.route"):
        log_plan(plan, "req_7")
    (record,) = [r for r in caplog.records if r.levelno == logging.DEBUG]
    return record


def test_the_text_line_shows_every_candidate_and_every_rejection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = _record(caplog)
    fields = record.__dict__["cb"]
    text = TextFormatter().format(record)
    lines = text.splitlines()
    assert "DEBUG cb_proxy.route route req_7: strategy=balanced" in lines[0]
    assert "requested=auto" in lines[1]
    assert "request_id=req_7" in lines[1]
    assert "max_cost_per_1k=input=0.001,output=0.001" in lines[1]
    candidates = [line for line in lines if line.startswith("  candidates[")]
    rejected = [line for line in lines if line.startswith("  rejected[")]
    assert len(candidates) == len(fields["candidates"]) >= 1
    assert len(rejected) == len(fields["rejected"]) >= 1
    for item, line in zip(fields["candidates"], candidates, strict=True):
        assert f"deployment={item['deployment']} role={item['role']}" in line
    for item, line in zip(fields["rejected"], rejected, strict=True):
        assert f"deployment={item['deployment']} reason={item['reason']!r}" in line


def test_the_text_and_json_formats_carry_the_same_plan(caplog: pytest.LogCaptureFixture) -> None:
    record = _record(caplog)
    as_json = json.loads(JsonFormatter().format(record))
    text = TextFormatter().format(record)
    assert as_json["rejected"]
    assert as_json["candidates"]
    for item in as_json["rejected"]:
        assert item["deployment"] in text
        assert item["reason"] in text
    for item in as_json["candidates"]:
        assert item["deployment"] in text


def test_a_skipped_fallback_is_a_warning_line_at_any_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rules = load_rules(DEMO)
    plan = plan_route(
        rules, "gpt-4o-mini", {}, parse_prefs({"fallback_models": ["nope"]}), StaticView()
    )
    with caplog.at_level(logging.WARNING, logger="cb_proxy.route"):
        log_plan(plan, "req_8")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "fallback model 'nope' does not exist" in record.getMessage()


def test_one_line_records_stay_one_line() -> None:
    record = logging.LogRecord(
        "cb_proxy.admin", logging.INFO, __file__, 1, "reset %s", ("a",), None
    )
    record.cb = {"admin_action": "reset", "upstream": "a"}
    assert "\n" not in TextFormatter().format(record)
