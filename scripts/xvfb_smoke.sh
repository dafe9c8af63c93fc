#!/usr/bin/env bash
# Smoke test of the real window: start Xvfb, open Specula on the default model with SPECULA_AUTORUN (a greedy
# 32-token run starts once the model is loaded), wait until the window title says the run finished, screenshot
# the screen into screenshots/xvfb-greedy.png. Exits non-zero on any failure.
#
# Needs: xvfb, xdotool, imagemagick (import); a release build (cargo build --release -p specula).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${SPECULA_BIN:-$repo/target/release/specula}"
out="${1:-$repo/screenshots/xvfb-greedy.png}"
timeout_s="${SMOKE_TIMEOUT:-180}"

for tool in Xvfb xdotool import; do
    command -v "$tool" >/dev/null || { echo "xvfb_smoke: $tool is not installed" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "xvfb_smoke: no binary at $bin; run cargo build --release -p specula" >&2; exit 2; }

workdir="$(mktemp -d)"
xvfb_pid=""
app_pid=""
cleanup() {
    [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null || true
    [ -n "$xvfb_pid" ] && kill "$xvfb_pid" 2>/dev/null || true
    rm -rf "$workdir"
}
trap cleanup EXIT

# -displayfd picks a free display number and writes it once the server accepts connections.
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp 3>"$workdir/display" >"$workdir/xvfb.log" 2>&1 &
xvfb_pid=$!
for _ in $(seq 200); do [ -s "$workdir/display" ] && break; sleep 0.1; done
[ -s "$workdir/display" ] || { echo "xvfb_smoke: Xvfb did not start; its log:" >&2; cat "$workdir/xvfb.log" >&2; exit 1; }
export DISPLAY=":$(head -n1 "$workdir/display")"

# A private runtime dir silences libwayland's warning; a private data dir keeps the user's saved layout out.
mkdir -m 0700 "$workdir/runtime"
export XDG_RUNTIME_DIR="$workdir/runtime" XDG_DATA_HOME="$workdir/data"
SPECULA_AUTORUN="Explain why the sky is blue in two sentences." \
    "$bin" --threads 1 >"$workdir/app.log" 2>&1 &
app_pid=$!

deadline=$((SECONDS + timeout_s))
title=""
while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "$app_pid" 2>/dev/null; then
        echo "xvfb_smoke: Specula exited early; its log:" >&2
        cat "$workdir/app.log" >&2
        exit 1
    fi
    wid="$(xdotool search --name '^Specula' 2>/dev/null | head -n1 || true)"
    if [ -n "$wid" ]; then
        title="$(xdotool getwindowname "$wid" 2>/dev/null || true)"
        case "$title" in
            *finished*) break ;;
            *failed*) echo "xvfb_smoke: the run failed: $title" >&2; import -window root "$out"; exit 1 ;;
        esac
    fi
    sleep 0.5
done
case "$title" in
    *finished*) ;;
    *) echo "xvfb_smoke: no finished run after ${timeout_s}s (title: '$title'); log:" >&2
       cat "$workdir/app.log" >&2
       import -window root "$out" || true
       exit 1 ;;
esac

xdotool mousemove 1279 799 # no tooltip in the picture
sleep 1 # let the last frame render
mkdir -p "$(dirname "$out")"
import -window root "$out"
echo "xvfb_smoke: ok ($title); screenshot in $out"
