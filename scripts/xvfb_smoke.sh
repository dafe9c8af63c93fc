#!/usr/bin/env bash
# Smoke test of the real window: start Xvfb, open Specula on the default model with SPECULA_AUTORUN (a greedy
# 32-token run starts once the model is loaded), wait until the window title says the run finished, screenshot
# the screen into screenshots/xvfb-greedy.png. Exits non-zero on any failure.
#
#   scripts/xvfb_smoke.sh [SCREENSHOT.png [PANE=EXPORT.png]]
#
# With PANE=EXPORT.png (a pane's title, e.g. Plots=/tmp/plots.png) the app also exports that pane as PNG once the
# run finished, through its Export panel as PNG command (SPECULA_SMOKE_EXPORT answers the save dialog), and the
# script checks the file: a PNG of the size of the panel on screen, of many colours, showing what the screen
# showed there. The screenshot is taken after the export.
#
# Needs: xvfb, xdotool, imagemagick (import, identify, compare, convert); a release build (cargo build --release -p specula).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${SPECULA_BIN:-$repo/target/release/specula}"
out="${1:-$repo/screenshots/xvfb-greedy.png}"
export_spec="${2:-}"
timeout_s="${SMOKE_TIMEOUT:-180}"

for tool in Xvfb xdotool import identify compare convert; do
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

# -displayfd picks a free display number and writes it once the server accepts connections. -noreset: an X server
# resets when its last client leaves, and xdotool below is the first client, so without it Specula could connect
# during that reset and fail with "Failed to open connection to X server" (seen twice, once under load).
Xvfb -displayfd 3 -noreset -screen 0 1280x800x24 -nolisten tcp 3>"$workdir/display" >"$workdir/xvfb.log" 2>&1 &
xvfb_pid=$!
for _ in $(seq 200); do [ -s "$workdir/display" ] && break; sleep 0.1; done
[ -s "$workdir/display" ] || { echo "xvfb_smoke: Xvfb did not start; its log:" >&2; cat "$workdir/xvfb.log" >&2; exit 1; }
export DISPLAY=":$(head -n1 "$workdir/display")"
xdotool mousemove 1279 799 # the pointer off every widget: no hover or tooltip in the pictures

# A private runtime dir silences libwayland's warning; a private data dir keeps the user's saved layout out.
mkdir -m 0700 "$workdir/runtime"
export XDG_RUNTIME_DIR="$workdir/runtime" XDG_DATA_HOME="$workdir/data"
export_png=""
if [ -n "$export_spec" ]; then
    export_png="${export_spec#*=}"
    rm -f "$export_png"
    export SPECULA_SMOKE_EXPORT="$export_spec"
fi
SPECULA_AUTORUN="Explain why the sky is blue in two sentences." \
    "$bin" --threads 1 >"$workdir/app.log" 2>&1 &
app_pid=$!

deadline=$((SECONDS + timeout_s))
title=""
while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "$app_pid" 2>/dev/null; then
        echo "xvfb_smoke: Specula exited early; its log, then Xvfb's:" >&2
        cat "$workdir/app.log" "$workdir/xvfb.log" >&2
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

if [ -n "$export_png" ]; then
    # The app exports once it saw the run finish and prints one line when the file is written (or not).
    line=""
    while [ $SECONDS -lt $deadline ]; do
        line="$(grep -m1 '^specula-export:' "$workdir/app.log" || true)"
        [ -n "$line" ] && break
        kill -0 "$app_pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "xvfb_smoke: $line"
    fail() { echo "xvfb_smoke: export: $*; app log:" >&2; cat "$workdir/app.log" >&2; exit 1; }
    case "$line" in
        *" ok: "*) ;;
        "") fail "the app said nothing about the export within ${timeout_s}s" ;;
        *) fail "the app could not export" ;;
    esac
    field() { sed -n "s/.* $1=\([0-9]*\) .*/\1/p" <<<"$line"; }
    x="$(field x)"; y="$(field y)"; w="$(field width)"; h="$(field height)"
    [ -s "$export_png" ] || fail "no file at $export_png, or an empty one"
    [ "$(identify -format '%m %w %h' "$export_png")" = "PNG $w $h" ] ||
        fail "$(identify -format '%m %w×%h' "$export_png") is not a PNG of the panel's ${w}×${h} pixels"
    (( w >= 200 && h >= 100 )) || fail "the panel is only ${w}×${h} pixels"
    colours="$(identify -format '%k' "$export_png")"
    (( colours >= 16 )) || fail "the PNG has $colours colours: a blank picture"
    # The PNG is what the screen shows at the panel's place (the panel is still; only antialiasing may differ).
    import -window root "$workdir/screen.png"
    convert "$workdir/screen.png" -crop "${w}x${h}+${x}+${y}" +repage "$workdir/screen-panel.png"
    # `compare` prints the count of differing pixels on stderr and exits 1 when there are any.
    differing="$(compare -metric AE -fuzz 10% "$export_png" "$workdir/screen-panel.png" null: 2>&1 || true)"
    differing="${differing%% *}"
    [[ "$differing" =~ ^[0-9]+(\.[0-9]+)?(e\+?[0-9]+)?$ ]] || fail "compare failed: $differing"
    differing="$(printf '%.0f' "$differing")"
    (( differing * 100 <= w * h )) ||
        fail "$differing of $((w * h)) pixels differ from the screen at ${x},${y}"
    echo "xvfb_smoke: export ok: ${w}×${h} PNG, $colours colours, $differing pixels off the screen's"
fi

sleep 1 # let the last frame render
mkdir -p "$(dirname "$out")"
import -window root "$out"
echo "xvfb_smoke: ok ($title); screenshot in $out"
