#!/usr/bin/env bash
# Set up a virtual environment, idempotently.
#   bash tools/setup.sh          -> .venv       runtime only (torch==2.13.0, the CPU build; TORCH_SPEC overrides)
#   bash tools/setup.sh --test   -> .venv-test  runtime + test oracles (torch 2.14.1 + torchvision 0.29.1, a pair
#                                               that pytorch-fid's import of torchvision needs), and the CLIP BPE
#                                               vocabulary taken from the clip-anytorch wheel on PyPI (.cache/clip/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--test" ]; then
  venv=.venv-test; torch_spec="torch==2.14.1 torchvision==0.29.1"; extra="-r requirements-test.txt"
else
  venv=.venv; torch_spec=${TORCH_SPEC:-torch==2.13.0}; extra=""
fi
stamp="$venv/.installed-$(cat requirements.txt requirements-test.txt tools/setup.sh | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $torch_spec -r requirements.txt $extra
  touch "$stamp"
fi
if [ "${1:-}" = "--test" ] && [ ! -f .cache/clip/bpe_simple_vocab_16e6.txt.gz ]; then
  # The real 49,408-token vocabulary and OpenAI's reference tokenizer, as shipped on PyPI (never vendored).
  mkdir -p .cache/wheels .cache/clip
  "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d .cache/wheels clip-anytorch==2.6.0
  "$venv/bin/python" - <<'PYEOF'
import zipfile, glob
wheel = glob.glob(".cache/wheels/clip_anytorch-2.6.0-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("clip/bpe_simple_vocab_16e6.txt.gz", "clip/simple_tokenizer.py"):
        open(".cache/" + name, "wb").write(z.read(name))
PYEOF
fi
