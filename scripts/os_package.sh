#!/usr/bin/env bash
# Shared by the ensure_*.sh scripts: install_os_package PACKAGE installs one operating-system
# package with apt-get (sudo when not root); returns 1 where there is no apt-get.
install_os_package() {
  if ! command -v apt-get >/dev/null 2>&1; then
    return 1
  fi
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >/dev/null
}
