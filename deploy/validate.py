"""Offline validation of rendered Kubernetes manifests for cb-proxy (no cluster, no network).

Three layers, every problem reported at once, exit status 1 on any:

1. Schema: built-in kinds against the Kubernetes OpenAPI schemas bundled with kubernetes-validate
   (strict: unknown fields are errors) for every version in K8S_VERSIONS; the Prometheus Operator
   CRDs (PodMonitor, PrometheusRule) against our own minimal schemas in deploy/schemas/. A kind with
   no schema is an error, not a warning.
2. Sidecar policy, for every workload with a container named "cb-proxy": hardened security
   context, resources, probes on /healthz and /readyz at the metrics port 9464, the env contract
   of docs/architecture.md, the rules file mounted where CB_RULES points, the app's
   OPENAI_BASE_URL, and the shutdown arithmetic (see deploy/k8s/base/deployment.yaml).
3. Cross references: non-optional ConfigMap/Secret references resolve, the PodMonitor selects the
   sidecar pods and names their metrics port and job, the PrometheusRule carries exactly the
   groups of deploy/prometheus/alerts.yml, the dashboard ConfigMap exactly
   deploy/grafana/dashboard.json.

Usage: python deploy/validate.py [--expect-stack] FILE...   (FILE may be "-" for stdin)
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

DEPLOY_DIR = Path(__file__).resolve().parent
SCHEMA_DIR = DEPLOY_DIR / "schemas"
ALERTS_FILE = DEPLOY_DIR / "prometheus" / "alerts.yml"
DASHBOARD_FILE = DEPLOY_DIR / "grafana" / "dashboard.json"

# Native sidecars (restartPolicy: Always on init containers) are on by default from 1.29;
# the newest bundled schema catches removals.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}
PROXY_CONTAINER = "cb-proxy"
METRICS_PORT = 9464
JOB_NAME = "cb-proxy"
EXPECTED_PROXY_ENV = {
    "CB_LISTEN": "127.0.0.1:3000",
    "CB_METRICS_LISTEN": f"0.0.0.0:{METRICS_PORT}",
    "CB_RULES": "/etc/cb-proxy/rules.yaml",
}
EXPECTED_APP_ENV = {"OPENAI_BASE_URL": "http://127.0.0.1:3000/v1", "OPENAI_API_KEY": "not-needed"}
PROVIDER_KEY_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")
# `cb-proxy serve` drains for this long unless --grace-period says otherwise. The shutdown delay
# (--shutdown-delay, CB_SHUTDOWN_DELAY: still accepting after SIGTERM) is part of it, never added:
# the process exits within the grace period + 1 s whatever the delay (proxy/server/lifecycle.py).
DEFAULT_PROXY_GRACE_SECONDS = 25
DEFAULT_PROXY_SHUTDOWN_DELAY_SECONDS = 3
# Time for the process to exit after draining (under 1 s), and for the kubelet's signalling.
SHUTDOWN_MARGIN_SECONDS = 5
POD_SPEC_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
}

Doc = dict[str, Any]


def _dig(node: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _name(doc: Doc) -> str:
    return f"{doc.get('kind')}/{_dig(doc, 'metadata', 'name')}"


# --- 1. schemas -----------------------------------------------------------------------------------


def _crd_registry() -> Registry:
    registry: Registry = Registry()
    for path in SCHEMA_DIR.glob("*.json"):
        schema = json.loads(path.read_text(encoding="utf-8"))
        registry = registry.with_resource(path.name, Resource.from_contents(schema))
    return registry


def schema_problems(docs: list[Doc]) -> list[str]:
    problems: list[str] = []
    registry = _crd_registry()
    for doc in docs:
        crd_schema = CRD_SCHEMAS.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        if crd_schema is not None:
            schema = registry.contents(crd_schema)
            validator = jsonschema.Draft202012Validator(schema, registry=registry)
            for error in validator.iter_errors(doc):
                where = ".".join(str(part) for part in error.absolute_path) or "(root)"
                problems.append(f"{_name(doc)}: {where}: {error.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path) or "(root)"
                problems.append(f"{_name(doc)}: k8s {version}: {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{_name(doc)}: no schema: {error.message}")
                break
    return problems


# --- 2. sidecar policy ----------------------------------------------------------------------------


def _pod_templates(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        path = POD_SPEC_PATHS.get(str(doc.get("kind")))
        template = _dig(doc, *path) if path else None
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            yield doc, template


def _containers(spec: Doc) -> list[Doc]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def _env_values(container: Doc) -> dict[str, Any]:
    return {
        env["name"]: env.get("value", env.get("valueFrom")) for env in container.get("env") or []
    }


def _proxy_grace_seconds(container: Doc) -> int:
    args = [str(arg) for arg in [*(container.get("command") or []), *(container.get("args") or [])]]
    for index, arg in enumerate(args):
        if arg == "--grace-period" and index + 1 < len(args):
            return int(args[index + 1])
        if arg.startswith("--grace-period="):
            return int(arg.split("=", 1)[1])
    return DEFAULT_PROXY_GRACE_SECONDS


def _proxy_shutdown_delay(container: Doc) -> float:
    args = [str(arg) for arg in [*(container.get("command") or []), *(container.get("args") or [])]]
    for index, arg in enumerate(args):
        if arg == "--shutdown-delay" and index + 1 < len(args):
            return float(args[index + 1])
        if arg.startswith("--shutdown-delay="):
            return float(arg.split("=", 1)[1])
    env = _env_values(container).get("CB_SHUTDOWN_DELAY")
    return float(env) if isinstance(env, str) else DEFAULT_PROXY_SHUTDOWN_DELAY_SECONDS


def _sleep_seconds(handler: Any) -> int | None:
    """Seconds a preStop handler waits: `exec: sleep N` or the native `sleep` action."""
    command = [str(part) for part in _dig(handler, "exec", "command") or []]
    if len(command) == 2 and posixpath.basename(command[0]) == "sleep":
        return int(command[1])
    seconds = _dig(handler, "sleep", "seconds")
    return int(seconds) if seconds is not None else None


def _resolve_port(container: Doc, port: Any) -> int | None:
    if isinstance(port, int):
        return port
    for declared in container.get("ports") or []:
        number = declared.get("containerPort")
        if declared.get("name") == port and isinstance(number, int):
            return number
    return None


def _security_problems(where: str, pod_spec: Doc, container: Doc) -> list[str]:
    problems: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem must be true")
    if "ALL" not in (_dig(sc, "capabilities", "drop") or []):
        problems.append(f"{where}: capabilities must drop ALL")
    if sc.get("privileged"):
        problems.append(f"{where}: must not be privileged")
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        problems.append(f"{where}: runAsNonRoot must be true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        problems.append(f"{where}: runAsUser must not be 0")
    seccomp = _dig(sc, "seccompProfile", "type") or _dig(pod_sc, "seccompProfile", "type")
    if seccomp != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile must be RuntimeDefault")
    requests = _dig(container, "resources", "requests") or {}
    if "cpu" not in requests or "memory" not in requests:
        problems.append(f"{where}: resources.requests needs cpu and memory")
    if "memory" not in (_dig(container, "resources", "limits") or {}):
        problems.append(f"{where}: resources.limits needs memory")
    return problems


def _probe_problems(where: str, proxy: Doc) -> list[str]:
    problems: list[str] = []
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = _dig(proxy, probe, "httpGet")
        if not isinstance(http, dict) or http.get("path") != path:
            problems.append(f"{where}: {probe} must be httpGet {path}")
        elif _resolve_port(proxy, http.get("port")) != METRICS_PORT:
            problems.append(f"{where}: {probe} must use the metrics port {METRICS_PORT}")
    ports = {(p.get("name"), p.get("containerPort")) for p in proxy.get("ports") or []}
    if ("metrics", METRICS_PORT) not in ports:
        problems.append(f"{where}: needs containerPort {METRICS_PORT} named 'metrics'")
    return problems


def _env_problems(where: str, proxy: Doc, apps: list[Doc]) -> list[str]:
    problems: list[str] = []
    env = _env_values(proxy)
    for key, expected in EXPECTED_PROXY_ENV.items():
        if env.get(key) != expected:
            problems.append(f"{where}: env {key} must be {expected!r}, got {env.get(key)!r}")
    for key in PROVIDER_KEY_ENVS:
        if not isinstance(env.get(key), dict) or "secretKeyRef" not in env[key]:
            problems.append(f"{where}: env {key} must come from a Secret (secretKeyRef)")
    if not apps:
        problems.append(f"{where}: no app container beside the sidecar")
    for app in apps:
        app_env = _env_values(app)
        for key, expected in EXPECTED_APP_ENV.items():
            if app_env.get(key) != expected:
                problems.append(f"{where}: app {app.get('name')}: env {key} must be {expected!r}")
    return problems


def _rules_mount_problems(where: str, pod_spec: Doc, proxy: Doc, docs: list[Doc]) -> list[str]:
    rules_path = str(_env_values(proxy).get("CB_RULES", EXPECTED_PROXY_ENV["CB_RULES"]))
    directory, filename = posixpath.split(rules_path)
    mounts = [m for m in proxy.get("volumeMounts") or [] if m.get("mountPath") == directory]
    if not mounts:
        return [f"{where}: nothing is mounted at {directory} (CB_RULES={rules_path})"]
    if mounts[0].get("subPath"):
        return [f"{where}: mount the rules directory, not a subPath (subPath gets no updates)"]
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    configmap_name = _dig(volumes.get(mounts[0].get("name")), "configMap", "name")
    configmaps = {_dig(d, "metadata", "name"): d for d in docs if d.get("kind") == "ConfigMap"}
    configmap = configmaps.get(configmap_name)
    if configmap is None:
        return [f"{where}: the rules volume's ConfigMap {configmap_name!r} is not in the manifests"]
    rules_text = (configmap.get("data") or {}).get(filename)
    if rules_text is None:
        return [f"{where}: ConfigMap {configmap_name} has no key {filename!r}"]
    rules = yaml.safe_load(rules_text)
    if not isinstance(rules, dict) or rules.get("version") != 1 or not rules.get("providers"):
        return [f"{where}: {filename} in {configmap_name} is not a version 1 rules file"]
    return []


def _shutdown_problems(where: str, pod_spec: Doc, proxy: Doc, native: bool) -> list[str]:
    grace = int(pod_spec.get("terminationGracePeriodSeconds", 30))
    drain = _proxy_grace_seconds(proxy)
    delay = _proxy_shutdown_delay(proxy)
    if delay > drain:
        # The proxy would cut it to the grace period: the manifest says something it does not do.
        return [f"{where}: --shutdown-delay {delay:g} is longer than --grace-period {drain}"]
    pre_stop = _dig(proxy, "lifecycle", "preStop")
    if native:
        # The app exits before the sidecar gets SIGTERM: no preStop delay is needed.
        needed = drain + SHUTDOWN_MARGIN_SECONDS
        if pre_stop is not None:
            return [f"{where}: a native sidecar needs no preStop hook"]
        if grace < needed:
            return [f"{where}: terminationGracePeriodSeconds {grace} < drain {drain} + margin"]
        return []
    problems: list[str] = []
    sleep = _sleep_seconds(pre_stop)
    if sleep is None:
        return [
            f"{where}: a classic sidecar needs a preStop sleep so the app's last calls get through"
        ]
    if _dig(proxy, "lifecycle", "postStart") is None:
        problems.append(
            f"{where}: a classic sidecar needs a postStart hook holding the app's start"
        )
    needed = sleep + drain + SHUTDOWN_MARGIN_SECONDS
    if grace < needed:
        problems.append(
            f"{where}: terminationGracePeriodSeconds {grace} < preStop {sleep} + drain {drain}"
            f" + margin {SHUTDOWN_MARGIN_SECONDS}"
        )
    return problems


def sidecar_problems(docs: list[Doc]) -> tuple[list[str], int]:
    """Policy problems, and how many workloads carry the sidecar."""
    problems: list[str] = []
    found = 0
    for doc, template in _pod_templates(docs):
        spec: Doc = template["spec"]
        init = {c["name"]: c for c in spec.get("initContainers") or []}
        main = {c["name"]: c for c in spec.get("containers") or []}
        proxy = init.get(PROXY_CONTAINER) or main.get(PROXY_CONTAINER)
        if proxy is None:
            continue
        found += 1
        where = f"{_name(doc)}"
        native = PROXY_CONTAINER in init
        if native and proxy.get("restartPolicy") != "Always":
            problems.append(f"{where}: cb-proxy as an init container needs restartPolicy: Always")
        if not native and main and next(iter(main)) != PROXY_CONTAINER:
            problems.append(f"{where}: a classic cb-proxy sidecar must be the first container")
        for container in _containers(spec):
            problems += _security_problems(f"{where}: {container['name']}", spec, container)
        apps = [c for name, c in main.items() if name != PROXY_CONTAINER]
        problems += _probe_problems(f"{where}: cb-proxy", proxy)
        problems += _env_problems(f"{where}: cb-proxy", proxy, apps)
        problems += _rules_mount_problems(f"{where}: cb-proxy", spec, proxy, docs)
        problems += _shutdown_problems(where, spec, proxy, native)
    return problems, found


# --- 3. cross references --------------------------------------------------------------------------


def reference_problems(docs: list[Doc]) -> list[str]:
    problems: list[str] = []
    present = {(d.get("kind"), _dig(d, "metadata", "name")) for d in docs}
    for doc, template in _pod_templates(docs):
        spec = template["spec"]
        refs: list[tuple[str, Any]] = []
        for volume in spec.get("volumes") or []:
            refs.append(("ConfigMap", volume.get("configMap")))
            refs.append(("Secret", volume.get("secret")))
        for container in _containers(spec):
            for env in container.get("env") or []:
                refs.append(("ConfigMap", _dig(env, "valueFrom", "configMapKeyRef")))
                refs.append(("Secret", _dig(env, "valueFrom", "secretKeyRef")))
            for env_from in container.get("envFrom") or []:
                refs.append(("ConfigMap", env_from.get("configMapRef")))
                refs.append(("Secret", env_from.get("secretRef")))
        for kind, ref in refs:
            if not isinstance(ref, dict) or ref.get("optional"):
                continue
            name = ref.get("name", ref.get("secretName"))
            if (kind, name) not in present:
                problems.append(
                    f"{_name(doc)}: refers to {kind} {name!r}, which is not in the manifests"
                )
    return problems


def monitoring_problems(docs: list[Doc], expect_stack: bool) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[Doc]] = {}
    for doc in docs:
        by_kind.setdefault(str(doc.get("kind")), []).append(doc)
    sidecar_pods = [
        template
        for _, template in _pod_templates(docs)
        if any(c.get("name") == PROXY_CONTAINER for c in _containers(template["spec"]))
    ]
    for monitor in by_kind.get("PodMonitor", []):
        wanted = _dig(monitor, "spec", "selector", "matchLabels") or {}
        selected = [
            pod
            for pod in sidecar_pods
            if wanted.items() <= (_dig(pod, "metadata", "labels") or {}).items()
        ]
        if not selected:
            problems.append(f"{_name(monitor)}: selects no pod carrying the cb-proxy sidecar")
        for endpoint in _dig(monitor, "spec", "podMetricsEndpoints") or []:
            for pod in selected:
                proxy = next(
                    c for c in _containers(pod["spec"]) if c.get("name") == PROXY_CONTAINER
                )
                if _resolve_port(proxy, endpoint.get("port")) != METRICS_PORT:
                    problems.append(
                        f"{_name(monitor)}: port {endpoint.get('port')!r} is not {METRICS_PORT}"
                    )
            sets_job = any(
                r.get("targetLabel") == "job" and r.get("replacement") == JOB_NAME
                for r in endpoint.get("relabelings") or []
            )
            if not sets_job:
                problems.append(
                    f"{_name(monitor)}: must set job={JOB_NAME!r} (the rules select it)"
                )
    alerts_groups = yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))["groups"]
    for rule in by_kind.get("PrometheusRule", []):
        if _dig(rule, "spec", "groups") != alerts_groups:
            problems.append(f"{_name(rule)}: groups differ from deploy/prometheus/alerts.yml")
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    dashboards = [
        d
        for d in by_kind.get("ConfigMap", [])
        if _dig(d, "metadata", "labels", "grafana_dashboard") == "1"
    ]
    for configmap in dashboards:
        texts = list((configmap.get("data") or {}).values())
        if len(texts) != 1 or json.loads(texts[0]) != dashboard:
            problems.append(f"{_name(configmap)}: differs from deploy/grafana/dashboard.json")
    if expect_stack:
        for kind, items in (
            ("PodMonitor", by_kind.get("PodMonitor")),
            ("PrometheusRule", by_kind.get("PrometheusRule")),
        ):
            if not items:
                problems.append(f"missing {kind}")
        if not dashboards:
            problems.append('missing the dashboard ConfigMap (label grafana_dashboard: "1")')
    return problems


def load(paths: list[str]) -> list[Doc]:
    docs: list[Doc] = []
    for path in paths:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        docs += [doc for doc in yaml.safe_load_all(text) if doc is not None]
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="validate rendered cb-proxy manifests offline")
    parser.add_argument("files", nargs="+")
    parser.add_argument(
        "--expect-stack",
        action="store_true",
        help="require the whole stack: a sidecar workload, PodMonitor, PrometheusRule, dashboard",
    )
    args = parser.parse_args(argv)
    docs = load(args.files)
    if not docs:
        print("FAIL: no objects", file=sys.stderr)
        return 1
    problems = schema_problems(docs)
    workloads = 0
    try:
        policy, workloads = sidecar_problems(docs)
        problems += policy
        problems += reference_problems(docs)
        problems += monitoring_problems(docs, args.expect_stack)
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as exc:
        # Malformed objects (already reported by the schema layer) can break the policy walk.
        problems.append(f"policy checks could not run: {exc!r}")
    if args.expect_stack and workloads == 0:
        problems.append("no workload carries a cb-proxy container")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(docs)} objects ({', '.join(_name(d) for d in docs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
