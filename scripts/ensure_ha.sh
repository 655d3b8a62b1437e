#!/usr/bin/env bash
# Make Patroni and etcd available for the high-availability tests (docs/operations.md): the tests
# start their own etcd and PostgreSQL nodes under Patroni on loopback ports; nothing runs
# system-wide. Debian packages only, installed where missing.
set -euo pipefail
# shellcheck source=os_package.sh
source "$(dirname "$0")/os_package.sh"
if ! command -v patroni >/dev/null 2>&1; then
  echo "Patroni not found: installing the operating system's package" >&2
  install_os_package patroni || { echo "no apt-get: install Patroni 3+" >&2; exit 1; }
fi
if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd not found: installing the operating system's package" >&2
  install_os_package etcd-server || { echo "no apt-get: install etcd 3.4+" >&2; exit 1; }
fi
# the packages start system services of their own; the tests need none of them
for unit in etcd patroni; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$unit" 2>/dev/null; then
    systemctl stop "$unit" || true
  fi
done
