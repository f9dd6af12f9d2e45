"""Static checks of deploy/: alert rules, dashboard, Kubernetes manifests, Dockerfile, compose.

deploy/check.sh runs this file beside promtool and the manifest validator; it also runs with the
unit tests. Invariants checked here:
- every metric name in the alert rules and the dashboard is exported by proxy/server/metrics.py
  (with the _total/_bucket/_sum/_count sample suffixes), a recording rule from alerts.yml, or `up`;
- the breaker gauges' -1 ("no data") can never satisfy an alert or enter an aggregate;
- every alert selects job="cb-proxy" and has a firing and a quiet case in alerts_test.yml;
- the PrometheusRule and the dashboard ConfigMap carry exactly alerts.yml and dashboard.json;
- every dashboard panel has a datasource and targets filtered by the namespace and pod variables;
- the Dockerfile's final stage runs as a non-root user; compose wires the pieces consistently.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
BASE = DEPLOY / "k8s" / "base"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

JOB_MATCHER = 'job="cb-proxy"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROMETHEUS_BUILTINS = frozenset({"up"})
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
    | {"offset", "inf", "nan"}
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Breaker gauges that are -1 when they have no data (metrics.py).
MINUS_ONE_GAUGES = (
    "circuit_breaker_error_rate",
    "circuit_breaker_latency_p95",
    "circuit_breaker_deployment_error_rate",
)
SEED_ALERTS = {
    "CircuitBreakerOpen": ('circuit_breaker_state{job="cb-proxy"} > 0', "1m", "warning"),
    "HighErrorRate": ('circuit_breaker_error_rate{job="cb-proxy"} > 0.2', "5m", "critical"),
    "HighLatency": ('circuit_breaker_latency_p95{job="cb-proxy"} > 3000', "5m", "warning"),
}
REQUIRED_ALERTS = frozenset(SEED_ALERTS) | {
    "CbProxyHighFallbackRate",
    "CircuitBreakerAllUpstreamsDown",
    "CbProxyDown",
    "CbProxyAbsent",
    "CbProxyCostBurnHigh",
    "CbProxyDeploymentBreakerOpen",
}
RULES_TOP_LEVEL_KEYS = frozenset(
    {"version", "providers", "models", "virtual_models", "routes", "defaults"}
)


# --- helpers ------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def exported_metric_names() -> set[str]:
    """Sample names the proxy exports, read from a fresh Metrics registry."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression reads: identifiers that are not functions,
    keywords, label names or parts of strings, durations and Grafana variables."""
    text = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group()
        if token.lower() in PROMQL_KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    return names


def grafana_query_names(query: str) -> set[str]:
    """Names in a template variable query: label_values(<expr>, label) or a plain expression."""
    found = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, flags=re.DOTALL)
    if found:
        return promql_metric_names(found.group(1))
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return set()
    return promql_metric_names(query)


def alert_rules() -> Iterator[dict[str, Any]]:
    for group in load_yaml(ALERTS)["groups"]:
        yield from group["rules"]


def recording_names() -> set[str]:
    return {rule["record"] for rule in alert_rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def data_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in data_panels() for target in panel["targets"]]


def variable_queries() -> list[str]:
    out: list[str] = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            out.append(query["query"] if isinstance(query, dict) else str(query))
    return out


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=50,
        check=False,
    )


def render(overlay: str) -> list[dict[str, Any]]:
    result = run(DEPLOY / "render.py", DEPLOY / "k8s" / overlay)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        instruction, _, rest = stripped.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


# --- the extractor itself -------------------------------------------------------------------------


def test_extractor_finds_metrics_and_skips_the_rest() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (upstream, le) "
        "(rate(cb_proxy_upstream_duration_seconds_bucket"
        '{job="cb-proxy", pod=~"$pod", reason="x_total"}[$__rate_interval]))) / on (upstream) '
        "group_left cb_proxy:requests:rate5m offset 5m > bool 1e3 and up"
    )
    assert promql_metric_names(expr) == {
        "cb_proxy_upstream_duration_seconds_bucket",
        "cb_proxy:requests:rate5m",
        "up",
    }
    assert grafana_query_names('label_values(circuit_breaker_state{job="x"}, upstream)') == {
        "circuit_breaker_state"
    }


def test_extractor_reports_an_unknown_metric() -> None:
    unknown = promql_metric_names("sum(rate(cb_proxy_no_such_metric_total[5m]))")
    assert unknown == {"cb_proxy_no_such_metric_total"}
    assert not unknown <= exported_metric_names()


# --- alert rules ----------------------------------------------------------------------------------


def test_alert_metric_names_are_exported_by_the_proxy() -> None:
    allowed = exported_metric_names() | PROMETHEUS_BUILTINS | recording_names()
    used = {name for rule in alert_rules() for name in promql_metric_names(rule["expr"])}
    assert used, "no metric names found: the extractor or alerts.yml is broken"
    assert used - allowed == set()


def test_seed_alerts_are_exact() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules() if "alert" in rule}
    for name, (expr, duration, severity) in SEED_ALERTS.items():
        assert (rules[name]["expr"], rules[name]["for"], rules[name]["labels"]["severity"]) == (
            expr,
            duration,
            severity,
        )
    assert set(rules) >= REQUIRED_ALERTS


def test_every_alert_has_severity_and_text() -> None:
    for rule in alert_rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_selector_names_the_job() -> None:
    exported = exported_metric_names()
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]) & (exported | PROMETHEUS_BUILTINS):
            for match in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", rule["expr"]):
                selector = re.match(r"\{[^}]*\}", rule["expr"][match.end() :])
                assert selector, (rule, name)
                assert JOB_MATCHER in selector.group(), (rule, name)


def test_minus_one_gauges_only_compared_against_positive_thresholds() -> None:
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    for gauge in MINUS_ONE_GAUGES:
        uses = guarded = 0
        for expr in exprs:
            uses += len(re.findall(rf"\b{gauge}\b", expr))
            guarded += len(
                re.findall(
                    rf"\b{gauge}(?:\{{[^}}]*\}})?\s*(?:>\s*0*[1-9][0-9.]*|>\s*0\.\d+|>=\s*0\b)",
                    expr,
                )
            )
        assert uses > 0, gauge
        assert guarded == uses, f"{gauge}: an unguarded use would let -1 through"


def test_every_alert_fires_and_stays_quiet_in_promtool_tests() -> None:
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown not firing"


def test_prometheus_rule_carries_exactly_the_alert_groups() -> None:
    rule = load_yaml(BASE / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]


def test_generated_manifests_are_in_sync() -> None:
    result = run(DEPLOY / "render.py", "--check-generated")
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard ------------------------------------------------------------------------------------


def test_dashboard_metric_names_are_exported_by_the_proxy() -> None:
    allowed = exported_metric_names() | PROMETHEUS_BUILTINS | recording_names()
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= promql_metric_names(expr)
    for query in variable_queries():
        used |= grafana_query_names(query)
    assert used - allowed == set()
    # What the issue asks the dashboard to show.
    assert {
        "circuit_breaker_state",
        "cb_proxy_requests_total",
        "cb_proxy_request_duration_seconds_bucket",
        "cb_proxy_time_to_first_token_seconds_bucket",
        "cb_proxy_fallbacks_total",
        "cb_proxy_retries_total",
        "cb_proxy_tokens_total",
        "cb_proxy_cost_usd_total",
        "cb_proxy_overhead_seconds_bucket",
        "circuit_breaker_deployment_state",
        "cb_proxy_hedges_total",
        "cb_proxy_stream_continuations_total",
    } <= used


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod", "upstream"):
        variable = variables[name]
        assert variable["datasource"] == DATASOURCE
        assert variable["includeAll"], name
        assert variable["allValue"] == ".*", name


def test_every_panel_has_a_datasource_and_filtered_targets() -> None:
    panels = data_panels()
    assert len(panels) >= 10
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            for matcher in (JOB_MATCHER, 'namespace=~"$namespace"', 'pod=~"$pod"'):
                assert matcher in target["expr"], (title, matcher)


def test_fallback_panel_shows_who_stood_in_for_whom() -> None:
    exprs = [e for e in dashboard_exprs() if "cb_proxy_fallbacks_total" in e]
    assert any(re.search(r"by \(primary, served_by\)", e) for e in exprs)


def test_panels_do_not_overlap() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(set(ids)) == len(ids)
    occupied: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, (panel["title"], occupied.get((x, y)))
                occupied[(x, y)] = panel["title"]


def test_dashboard_configmap_carries_the_dashboard() -> None:
    configmap = load_yaml(BASE / "grafana-dashboard.yaml")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["cb-proxy.json"]) == dashboard()


def test_grafana_provisioning() -> None:
    sources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert [s["type"] for s in sources] == ["prometheus"]
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/cb-proxy.yml")["providers"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"]}
    path = providers[0]["options"]["path"]
    assert any(target.startswith(path + "/") and target.endswith(".json") for target in mounted)


# --- Kubernetes manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", "classic-sidecar"])
def test_rendered_manifests_validate(overlay: str, tmp_path: Path) -> None:
    result = run(DEPLOY / "render.py", DEPLOY / "k8s" / overlay)
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout, encoding="utf-8")
    checked = run(DEPLOY / "validate.py", "--expect-stack", rendered)
    assert checked.returncode == 0, checked.stderr


def test_sidecar_modes() -> None:
    native = next(d for d in render("base") if d["kind"] == "Deployment")["spec"]["template"][
        "spec"
    ]
    classic = next(d for d in render("classic-sidecar") if d["kind"] == "Deployment")["spec"][
        "template"
    ]["spec"]
    assert [c["name"] for c in native["initContainers"]] == ["cb-proxy"]
    assert native["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in classic["containers"]] == ["cb-proxy", "app"]
    assert "initContainers" not in classic
    assert "restartPolicy" not in classic["containers"][0]
    assert (native["terminationGracePeriodSeconds"], classic["terminationGracePeriodSeconds"]) == (
        30,
        40,
    )


def test_generated_rules_configmap_is_referenced_by_its_hashed_name() -> None:
    docs = render("base")
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
    rules_name = next(n for n in names if n.startswith("cb-proxy-rules-"))
    assert re.fullmatch(r"cb-proxy-rules-[a-z0-9]{10}", rules_name)
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {"name": rules_name} in [v.get("configMap") for v in spec["volumes"]]
    assert all(d["metadata"]["namespace"] == "llm-apps" for d in docs)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda spec: spec.update(terminationGracePeriodSeconds=20),
            "terminationGracePeriodSeconds",
        ),
        (
            lambda spec: spec["initContainers"][0]["securityContext"].update(
                readOnlyRootFilesystem=False
            ),
            "readOnlyRootFilesystem",
        ),
        (lambda spec: spec["initContainers"][0].pop("restartPolicy"), "restartPolicy: Always"),
        (lambda spec: spec["initContainers"][0].update(bogus=1), "bogus"),
        (lambda spec: spec["containers"][0]["env"].clear(), "OPENAI_BASE_URL"),
        (lambda spec: spec["initContainers"][0].pop("readinessProbe"), "readinessProbe"),
        (
            # The delay is part of the grace period: a longer one is a manifest that lies.
            lambda spec: spec["initContainers"][0].update(
                args=["serve", "--grace-period", "25", "--shutdown-delay", "30"]
            ),
            "--shutdown-delay 30 is longer than --grace-period 25",
        ),
    ],
)
def test_validator_rejects_broken_manifests(mutate: Any, message: str, tmp_path: Path) -> None:
    docs = render("base")
    mutate(next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"])
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    result = run(DEPLOY / "validate.py", "--expect-stack", broken)
    assert result.returncode == 1
    assert message in result.stderr


def test_validator_rejects_a_prometheus_rule_that_drifted(tmp_path: Path) -> None:
    docs = render("base")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    rule["spec"]["groups"][1]["rules"][0]["for"] = "10m"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    result = run(DEPLOY / "validate.py", "--expect-stack", broken)
    assert result.returncode == 1
    assert "groups differ from deploy/prometheus/alerts.yml" in result.stderr


def test_secret_example_holds_placeholders_only() -> None:
    secret = load_yaml(BASE / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert all(value.startswith("REPLACE-ME") for value in secret["stringData"].values())
    kustomization = load_yaml(BASE / "kustomization.yaml")
    assert "secret.example.yaml" not in kustomization["resources"]


def _rules_structure(path: Path) -> dict[str, Any]:
    rules: dict[str, Any] = load_yaml(path)
    assert rules["version"] == 1
    assert set(rules) <= RULES_TOP_LEVEL_KEYS
    providers = rules["providers"]
    assert all(p["type"] in {"openai", "anthropic", "gemini"} for p in providers.values())
    for name, model in rules["models"].items():
        deployments = model.get("deployments", [model])
        assert all(d["provider"] in providers for d in deployments), name
    for name in rules.get("defaults", {}).get("fallback_models", []):
        assert name in rules["models"], name
    return rules


def test_k8s_rules_keys_come_from_the_secret() -> None:
    rules = _rules_structure(BASE / "rules.yaml")
    deployment = load_yaml(BASE / "deployment.yaml")
    proxy = deployment["spec"]["template"]["spec"]["initContainers"][0]
    from_secret = {e["name"] for e in proxy["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {p["api_key_env"] for p in rules["providers"].values()} <= from_secret


# --- Dockerfile and compose -----------------------------------------------------------------------


def test_dockerfile_final_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert ("ENTRYPOINT", '["cb-proxy"]') in final
    assert ("CMD", '["serve"]') in final
    exposed = {port for i, args in final if i == "EXPOSE" for port in args.split()}
    assert {"3000", "9464"} <= exposed
    final_text = " ".join(args for _, args in final)
    assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", final_text)
    assert any(i == "RUN" and "pip wheel" in args for i, args in stages[0])
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text(encoding="utf-8")


def test_compose_wires_mocks_proxy_prometheus_and_grafana() -> None:
    services = load_yaml(COMPOSE)["services"]
    assert {"cb-proxy", "prometheus", "grafana"} <= set(services)
    rules = _rules_structure(DEPLOY / "compose" / "rules.yaml")
    mocks: dict[str, tuple[str, str]] = {}
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] == ["mock"]:
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
            options = dict(zip(command[1::2], command[2::2], strict=True))
            mocks[name] = (options["--format"], options["--listen"].rpartition(":")[2])
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert {fmt for fmt, _ in mocks.values()} == {"openai", "anthropic", "gemini"}
    for provider in rules["providers"].values():
        host_port = re.match(r"http://([\w-]+):(\d+)", provider["base_url"])
        assert host_port, provider["base_url"]
        assert mocks[host_port.group(1)] == (provider["type"], host_port.group(2))

    proxy = services["cb-proxy"]
    env = proxy["environment"]
    assert env["CB_METRICS_LISTEN"].endswith(":9464")
    mount_source, mount_target = proxy["volumes"][0].split(":")[:2]
    assert (DEPLOY / mount_source / "rules.yaml").is_file()
    assert env["CB_RULES"] == f"{mount_target}/rules.yaml"
    # Providers without api_key_env need no key (the demo's mocks).
    needed = {p["api_key_env"] for p in rules["providers"].values() if "api_key_env" in p}
    assert needed <= set(env)

    prometheus_args = " ".join(services["prometheus"]["command"])
    config_path = re.search(r"--config\.file=(\S+)", prometheus_args)
    assert config_path
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    host_dir = next(
        src for src, dst in mounts.items() if config_path.group(1).startswith(dst + "/")
    )
    config = load_yaml(DEPLOY / host_dir / Path(config_path.group(1)).name)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["cb-proxy"]["static_configs"][0]["targets"] == ["cb-proxy:9464"]
