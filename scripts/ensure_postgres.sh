#!/usr/bin/env bash
# Make PostgreSQL server binaries (initdb, pg_ctl) available for the test suite.
# The tests start their own throwaway instance; nothing is configured system-wide.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
echo "PostgreSQL not found: installing the operating system's package" >&2
# shellcheck source=os_package.sh
source "$(dirname "$0")/os_package.sh"
install_os_package postgresql || {
  echo "no apt-get: install PostgreSQL 13+ server binaries, or set FHIRSERVER_TEST_SKIP_PG=1" >&2
  exit 1
}
