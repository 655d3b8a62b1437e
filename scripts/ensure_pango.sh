#!/usr/bin/env bash
# What the portal's PDF health summary (WeasyPrint) needs from the operating system: the Pango text
# layout library, and a font with Chinese characters (the portal speaks simplified Chinese; without
# one a zh-CN summary prints empty boxes). Debian's Chromium usually brings Pango already; each is
# installed only where it is missing. The Dockerfile installs the same two packages.
set -euo pipefail
# shellcheck source=os_package.sh
source "$(dirname "$0")/os_package.sh"
if ! ldconfig -p 2>/dev/null | grep -q 'libpangoft2-1.0.so.0'; then
  echo "Pango (libpangoft2) not found: installing the operating system's package" >&2
  install_os_package libpangoft2-1.0-0 || echo "no apt-get: install Pango (the PDF summary is unavailable without it)" >&2
fi
if ! fc-list :lang=zh 2>/dev/null | grep -q .; then
  echo "no font with Chinese characters: installing Noto Sans CJK" >&2
  install_os_package fonts-noto-cjk || echo "no apt-get: install a CJK font (Chinese PDF summaries need one)" >&2
fi
