#!/usr/bin/env bash
# Create (or reuse) a separate venv with the real mergekit, for tests/test_mergekit_oracle.py.
#
#   export DISTMERGE_MERGEKIT_PYTHON=$(bash benchmarks/mergekit_env.sh /tmp/mkvenv)
#
# $1: where the venv goes (default .venv-mergekit). Only the venv's python path goes to stdout; all pip
# output goes to stderr. mergekit is never installed into distmerge's own venv: it pins its own
# transformers/torch range. torch is installed first and pinned to the CPU build so pip does not pull a
# multi-GB CUDA torch. Environment overrides: PYTHON (interpreter for the venv, default python3),
# TORCH_SPEC (default torch==2.13.0), MERGEKIT_SPEC (default mergekit==0.1.5, the version checked against).
set -euo pipefail

venv="${1:-.venv-mergekit}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
mergekit_spec="${MERGEKIT_SPEC:-mergekit==0.1.5}"

venv_python="$venv/bin/python"
if [ -x "$venv_python" ] && "$venv_python" -c "import mergekit.scripts.run_yaml, torch" >/dev/null 2>&1; then
    echo "mergekit_env: reusing $venv" >&2
else
    echo "mergekit_env: creating $venv" >&2
    "$python" -m venv "$venv" >&2
    # torch first, pinned, so mergekit's "torch>=..." is already satisfied and no CUDA build is pulled.
    "$venv_python" -m pip install --quiet "$torch_spec" >&2
    "$venv_python" -m pip install --quiet "$mergekit_spec" "$torch_spec" >&2
fi

# Refuse a CUDA torch: it would mean pip replaced the pinned CPU build.
"$venv_python" - >&2 <<'EOF'
import importlib.metadata as md, sys
import torch, mergekit  # noqa: F401
cuda = sorted(d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
print(f"mergekit_env: mergekit {md.version('mergekit')}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}", file=sys.stderr)
if cuda or torch.version.cuda:
    sys.exit(f"mergekit_env: a CUDA torch was installed ({torch.__version__}; {cuda[:3]}); expected the CPU build")
EOF

# An absolute path without resolving the venv's python symlink (resolving would leave the venv).
cd "$(dirname "$venv_python")" && echo "$(pwd)/$(basename "$venv_python")"
