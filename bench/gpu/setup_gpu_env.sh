#!/usr/bin/env bash
# A Triton-ready Python on a GPU machine without internet (see bench/gpu/README.md):
#   bench/gpu/setup_gpu_env.sh WHEELS_DIR ENV_DIR [TORCH_PYTHON]
# ENV_DIR gets numpy 1.26 (Triton 2.51's Python backend returns empty tensors with numpy 2, server#8301),
# the carried wheels (tritonclient, python-rapidjson, a newer transformers if carried), this project,
# and a .pth naming TORCH_PYTHON's site-packages AFTER its own (torch and CUDA come from there).
# Run the check with ENV_DIR/bin/python: the stub runs the `python3` first on PATH, which the
# launcher (coordexp.serving.server) makes this interpreter.
set -euo pipefail
wheels=$1 env=$2 torch_py=${3:-python3}
"$torch_py" -m venv --without-pip "$env"
site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$torch_py" -m pip install --no-index --no-deps --find-links "$wheels" --target "$site" "$wheels"/*.whl
"$torch_py" -m pip install --no-deps --no-build-isolation --target "$site" "$(dirname "$0")/../.."
"$torch_py" -c 'import site, sys; print("\n".join(site.getsitepackages()))' > "$site/zz_torch_env.pth"
"$env/bin/python" -c 'import numpy, torch; assert numpy.__version__.startswith("1."), numpy.__version__; print("numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
