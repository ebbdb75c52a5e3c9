#!/usr/bin/env bash
# Checks the Kubernetes manifests in this directory, and deploy/Dockerfile:
#   1. yamllint (the rules in .yamllint);
#   2. kubernetes-validate --strict: every object against the OpenAPI schemas of the oldest
#      Kubernetes release the manifests are for and of the newest it ships (unknown, misspelt or
#      removed fields are errors);
#   3. the embedded sigil.toml / agent.toml parse as TOML, the JSON parses as JSON;
#   4. checkov on the manifests (framework kubernetes) and on deploy/Dockerfile (framework
#      dockerfile). Checks that do not apply are skipped where they arise, with the reason
#      (checkov.io/skipN annotations), never here.
# The tools come from PyPI, pinned, into a venv under ${XDG_CACHE_HOME:-$HOME/.cache}/sigil-ci,
# installed only when missing (or when the pins below change). Every step runs; the script
# names the ones that failed and exits non-zero if any did.
#
#   deploy/kubernetes/validate.sh
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# Kubernetes releases whose API schemas the manifests must satisfy: the oldest they are for
# (native sidecars, initContainers[].restartPolicy, are on by default from 1.29) and the newest
# the pinned kubernetes-validate ships.
K8S_VERSIONS=(1.29.0 1.37.0)
PINS=(yamllint==1.38.0 kubernetes-validate==1.37.0 checkov==3.3.30)

venv="${XDG_CACHE_HOME:-$HOME/.cache}/sigil-ci/venv"
stamp="$venv/.sigil-pins"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PINS[*]}" ]; then
  echo "== installing ${PINS[*]} into $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" \
    || ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"; then
    echo "deploy/kubernetes/validate.sh: FAILED: installing ${PINS[*]} into $venv" >&2
    exit 1
  fi
  echo "${PINS[*]}" > "$stamp"
fi
bin="$venv/bin"

mapfile -t manifests < <(find "$here" -name '*.yaml' -not -name '.*' | LC_ALL=C sort)
if [ ${#manifests[@]} -eq 0 ]; then
  echo "no manifests under $here" >&2
  exit 1
fi

failed=()
step() {
  local name=$1
  shift
  echo "== $name"
  if ! "$@"; then
    failed+=("$name")
    echo "-- FAILED: $name" >&2
  fi
}

step yamllint \
  "$bin/yamllint" --strict -c "$here/.yamllint" "$here/.yamllint" "${manifests[@]}"

for v in "${K8S_VERSIONS[@]}"; do
  step "kubernetes-validate --strict (Kubernetes $v)" \
    "$bin/kubernetes-validate" --strict --quiet --kubernetes-version "$v" "${manifests[@]}"
done

step "embedded TOML and JSON" "$bin/python" - "${manifests[@]}" <<'PY'
import json, sys, tomllib, yaml
bad = 0
for path in sys.argv[1:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != "ConfigMap":
                continue
            for key, text in (doc.get("data") or {}).items():
                try:
                    if key.endswith(".toml"):
                        tomllib.loads(text)
                    elif key.endswith(".json"):
                        json.loads(text)
                except ValueError as e:
                    print(f"{path}: ConfigMap {doc['metadata']['name']}, {key}: {e}")
                    bad += 1
sys.exit(1 if bad else 0)
PY

# --skip-download: nothing is fetched from Prisma Cloud (no network is needed).
step "checkov (kubernetes)" \
  "$bin/checkov" --directory "$here" --framework kubernetes --compact --quiet --skip-download

step "checkov (dockerfile)" \
  "$bin/checkov" --file "$root/deploy/Dockerfile" --framework dockerfile --compact --quiet --skip-download

if [ ${#failed[@]} -gt 0 ]; then
  echo "deploy/kubernetes/validate.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "deploy/kubernetes/validate.sh: all checks passed (${#manifests[@]} manifests; Kubernetes ${K8S_VERSIONS[*]})"
