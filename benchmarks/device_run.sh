#!/usr/bin/env bash
# Runs a command on a device machine (no package index) with what `device_kit.sh` packed and this checkout
# importable under its installed name: the kit unpacked into /tmp/site and the four folders linked as
# /tmp/site/dinat_batch/{pipeline,kernels,jobs,infra}, as `pip install .` would lay them out.
#   bash benchmarks/device_run.sh python3 -m pytest tests/test_gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /tmp/site ]; then  # unpacked aside first: a step cut while unpacking leaves no half kit
    rm -rf /tmp/kit && mkdir /tmp/kit && tar -xJf .device/site.tar.xz -C /tmp/kit && mv /tmp/kit/site /tmp/site
fi
mkdir -p /tmp/site/dinat_batch
for folder in pipeline kernels jobs infra; do
    ln -sfn "$PWD/$folder" "/tmp/site/dinat_batch/$folder"
done
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$@"
