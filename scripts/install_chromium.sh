#!/usr/bin/env bash
# Headless Chromium for the report test (tests/plan/test_browser.py), from Debian's package.
# Idempotent and instant when a chromium binary exists. Installs only as root with apt-get;
# elsewhere it says so and the browser test skips.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no chromium and not root with apt-get; the browser test will skip" >&2
  exit 0
fi
echo "installing chromium (Debian package, one-time)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
