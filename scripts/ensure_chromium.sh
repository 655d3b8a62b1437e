#!/usr/bin/env bash
# Make Debian's Chromium available for the browser tests (Playwright drives it through its
# executable_path; Playwright cannot download browsers here). Nothing else is configured.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "Chromium not found: installing the operating system's package" >&2
# shellcheck source=os_package.sh
source "$(dirname "$0")/os_package.sh"
install_os_package chromium || echo "no apt-get: install Chromium (the browser tests are skipped without it)" >&2
