#!/bin/sh
# Install tensorfleet into a fresh virtual environment: image-install.sh PREFIX SOURCE
# SOURCE is a source tree or a built wheel. The Dockerfile's build stage runs this script, and
# tests/e2e/test_image.py runs the very same script in a fresh virtual environment, since CI has no
# Docker engine.
set -eu
prefix=$1
source=$2
python3 -m venv "$prefix"
# pip compiles every module to bytecode while installing, so nothing is written at run time
# (the containers run with a read-only root filesystem).
"$prefix/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet "$source"
# The runtime needs neither pip nor setuptools: less to scan, less to patch.
"$prefix/bin/python" -m pip uninstall --yes --quiet pip setuptools
"$prefix/bin/tensorfleet" --version
