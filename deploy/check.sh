#!/usr/bin/env bash
# Offline checks of everything under deploy/ (make check-deploy). No network, no cluster, no docker.
# Runs every step, prints each failure, and exits non-zero if any step failed.
#   promtool (Debian package "prometheus"; `make tools` installs it) and the project's virtualenv
#   (kubernetes-validate, jsonschema, pyyaml, pytest; first on PATH when run by make) are required.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAILED=()

step() {
  local name="$1"
  shift
  echo "== $name"
  if "$@"; then
    echo "   ok"
  else
    echo "   FAILED: $name" >&2
    FAILED+=("$name")
  fi
}

if ! command -v promtool >/dev/null 2>&1; then
  echo "deploy/check.sh: promtool not found (Debian package 'prometheus'; run 'make tools')" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import kubernetes_validate, jsonschema, yaml, pytest, proxy.server.metrics' 2>"$TMP/import.err"; then
  echo "deploy/check.sh: the project's virtualenv is not first on PATH (run via 'make check-deploy'):" >&2
  cat "$TMP/import.err" >&2
  exit 2
fi

step "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
step "promtool test rules" promtool test rules deploy/prometheus/alerts_test.yml
step "promtool check config (compose)" promtool check config deploy/compose/prometheus.yml
step "generated manifests in sync" "$PYTHON" deploy/render.py --check-generated

for overlay in base classic-sidecar; do
  step "render k8s/$overlay" bash -c "'$PYTHON' deploy/render.py deploy/k8s/$overlay > '$TMP/$overlay.yaml'"
  step "validate k8s/$overlay" "$PYTHON" deploy/validate.py --expect-stack "$TMP/$overlay.yaml"
done
step "validate secret example" "$PYTHON" deploy/validate.py deploy/k8s/base/secret.example.yaml

# The rules files must load in the proxy itself.
for rules in deploy/k8s/base/rules.yaml deploy/compose/rules.yaml; do
  step "cb-proxy check $rules" cb-proxy check "$rules"
done

if [ "${#FAILED[@]}" -ne 0 ]; then
  echo >&2
  echo "deploy/check.sh: ${#FAILED[@]} step(s) FAILED:" >&2
  printf '  - %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "deploy/check.sh: all checks passed"
