#!/usr/bin/env bash
# Make sure Debian's Chromium is installed: the status page's tests drive it headless.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "ensure_chromium: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
echo "ensure_chromium: installing chromium from Debian"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
echo "ensure_chromium: $(chromium --version 2>/dev/null | head -1)"
