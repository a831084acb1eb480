#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the browser tests (report.html, /review).
# Never fails: where nothing can be installed, those tests skip with a message.
set -u
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get on this machine; the browser tests will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-browser: not root and no sudo; the browser tests will skip" >&2
    exit 0
  fi
fi
echo "install-browser: installing Debian's chromium and chromium-driver (once)" >&2
if ! { $SUDO apt-get update -qq >/dev/null 2>&1 &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
         chromium chromium-driver >/dev/null 2>&1; }; then
  echo "install-browser: could not install chromium; the browser tests will skip" >&2
fi
exit 0
