#!/usr/bin/env bash
# A fresh machine's view of the package: builds the wheel from the tracked files only (what a
# clone has), checks that it ships the demo model and stays small, installs it non-editable in a
# throwaway virtualenv (borrowing the project venv's dependencies, so nothing is downloaded), and
# runs the README's demo command from an empty folder: no --model, no ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
max_bytes=$((3 * 1024 * 1024))  # the code plus the 1.1 MB model; anything bigger is a mistake

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/wheel" "$tmp/run"
git ls-files -z | xargs -0 cp --parents -t "$tmp/src"

isolation=--no-build-isolation
"$py" -c "import setuptools" 2>/dev/null || isolation=
(cd "$tmp/src" && "$py" -m pip wheel -q --no-deps $isolation . -w "$tmp/wheel")
wheel=$(ls "$tmp"/wheel/*.whl)
size=$(stat -c %s "$wheel")
echo "$(basename "$wheel"): $size bytes"
if [ "$size" -gt "$max_bytes" ]; then
  echo "the wheel is over $max_bytes bytes" >&2
  exit 1
fi
"$py" - "$wheel" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
wanted = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "LICENSE", "README.md"]
missing = [f for f in wanted if f"positronic/models/stories260K/{f}" not in names]
if missing:
    sys.exit(f"the wheel lacks positronic/models/stories260K/ {missing}")
EOF

python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --no-deps "$wheel"
# Dependencies from the project venv, after the wheel's own site-packages on sys.path.
site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
"$py" -c "import sysconfig; print(sysconfig.get_path('purelib'))" >"$site/project-deps.pth"
where=$(cd "$tmp/run" && "$tmp/venv/bin/python" -c "import positronic; print(positronic.__file__)")
case "$where" in
  "$site"/*) ;;
  *)
    echo "the installed package is not the one imported: $where" >&2
    exit 1
    ;;
esac
out=$(cd "$tmp/run" && "$tmp/venv/bin/positronic" --log-level WARNING generate \
  --prompt "Once upon a time" --max-new-tokens 24)
printf '%s\n' "$out"
case "$out" in
  "Once upon a time"?*) echo "the installed wheel runs the demo with no --model" ;;
  *)
    echo "the demo did not print the prompt and a continuation" >&2
    exit 1
    ;;
esac
