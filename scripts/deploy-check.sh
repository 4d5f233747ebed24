#!/usr/bin/env bash
# Offline checks of deploy/: every manifest against the Kubernetes schemas, a security lint (checkov)
# whose findings must each be fixed or justified in deploy/ci/checkov-skips.txt, the manifests' promises
# (read-only RBAC, NET_ADMIN only, host paths, paths = contract constants), the init container's install
# script, and the Containerfile's paths and names. No cluster, no container engine, no release build.
#
# Installs its Python tools once into a venv (PyPI), then runs offline. Env:
#   PALISADE_DEPLOY_VENV   where the venv lives (default ~/.cache/palisade/deploy-check-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

# Kubernetes version of the schemas: the one k8s-openapi is built for (feature v1_33 in Cargo.toml).
K8S_VERSION=1.33.0
REQUIREMENTS=(kubernetes-validate==1.37.0 checkov==3.3.30)
venv="${PALISADE_DEPLOY_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/palisade/deploy-check-venv}"
stamp="$venv/.palisade-requirements"

python=$(command -v python3 || true)
[ -n "$python" ] || { echo "deploy-check: python3 not found (apt-get install python3)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "deploy-check: needs Python >= 3.11 (tomllib); $python is $("$python" -V 2>&1)" >&2; exit 1; }

make_venv() {
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
}

if [ ! -x "$venv/bin/checkov" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]; then
  echo "== installing ${REQUIREMENTS[*]} into $venv"
  if ! make_venv 2>/dev/null; then
    # Debian's python3 ships venv's pip bootstrap separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
      make_venv
    else
      echo "deploy-check: '$python -m venv' failed: install python3-venv" >&2
      exit 1
    fi
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input "${REQUIREMENTS[@]}"
  echo "${REQUIREMENTS[*]}" > "$stamp"
fi

"$venv/bin/python" deploy/ci/deploy_check.py --k8s-version "$K8S_VERSION" --checkov "$venv/bin/checkov"
echo "deploy-check: done in $(( $(date +%s) - start ))s"
