#!/usr/bin/env bash
# Make Debian's Chromium available for the browser tests (Playwright drives it through its
# executable_path; Playwright cannot download browsers here). Nothing else is configured.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "Chromium not found: installing the operating system's package" >&2
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
else
  echo "no apt-get: install Chromium (the browser tests are skipped without it)" >&2
fi
