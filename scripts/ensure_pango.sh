#!/usr/bin/env bash
# Make the system's Pango text layout library available to WeasyPrint (the portal's PDF health
# summary). Debian's Chromium usually brings it already; nothing else is configured.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libpangoft2-1.0.so.0'; then
  exit 0
fi
echo "Pango (libpangoft2) not found: installing the operating system's package" >&2
# shellcheck source=os_package.sh
source "$(dirname "$0")/os_package.sh"
install_os_package libpangoft2-1.0-0 || echo "no apt-get: install Pango (the PDF summary is unavailable without it)" >&2
