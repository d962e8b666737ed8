# Sourced by scripts/run and scripts/test: installs what is missing, nothing more.
set -euo pipefail

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.1

need_packages=()
packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config libssl-dev sudo openssl)
# The test suite also needs chromium, which drives the inspector page, and prometheus, whose
# promtool checks the metrics scrape (scripts/test sets DEPS_FOR_TESTS=1).
if [ "${DEPS_FOR_TESTS:-0}" = 1 ]; then
    packages+=(chromium prometheus)
fi
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_packages+=("$pkg")
done
if [ ${#need_packages[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${need_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "==> installing cargo-pgrx $PGRX_VERSION (about 15 minutes on 2 cores)"
    cargo install --locked cargo-pgrx --version "$PGRX_VERSION"
fi

if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi
