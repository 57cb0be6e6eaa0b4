#!/bin/sh
# Run by the Dockerfile's build stages on /opt/venv: what an image never runs. The packages' own test suites
# and data (numpy's tests, onnx's backend test models), and pip and setuptools (nothing installs at run time).
set -eu
site=$(echo /opt/venv/lib/python3*/site-packages)
rm -rf "$site"/numpy/tests "$site"/numpy/*/tests "$site"/onnx/backend/test/data
/opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools
