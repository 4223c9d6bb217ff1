#!/usr/bin/env bash
# Packs what benchmarks/gpu.py and tests/test_gpu.py need beyond a CUDA PyTorch image that cannot reach
# a package index (the device machines: Python 3.12, torch and torchvision with CUDA, numpy, pyarrow,
# pandas, fsspec, pillow, safetensors and pytest already there) into .device/site.tar.xz: Ray,
# pydantic, pyiceberg, s3fs and natten with the dependencies such an image lacks, unpacked and pruned, since
# Ray's wheel alone is over the 64 MiB a device run can carry. Pins come from constraints.txt. Use on
# the device: bash benchmarks/device_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/pip"
# pyiceberg: pipeline/output.py imports the Iceberg layout's names for every run; s3fs and its stack:
# listing, deletion and reads import it (the image's fsspec and aiohttp may not be the versions s3fs pins)
PACKAGES=(ray pydantic pydantic_core annotated-types typing-inspection typing_extensions jsonschema
    jsonschema-specifications referencing rpds-py pyiceberg mmh3 strictyaml tenacity pyroaring cachetools
    zstandard s3fs fsspec aiobotocore botocore jmespath aioitertools wrapt aiohttp aiohappyeyeballs
    aiosignal frozenlist multidict propcache yarl)
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt)")
done
rm -rf .device && mkdir -p .device/wheels
"$PIP" download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .device/wheels "${pins[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
# a wheel is a zip of its files: unpacked as they are, they form an importable folder
for wheel in .device/wheels/*.whl; do
    unzip -q -o "$wheel" -d .device/site
done
# natten has no wheel on PyPI; built without a CUDA toolkit it installs as pure Python (its flex-attention
# path, no libnatten), as in this checkout's venv: that folder travels as it is
cp -r "$(.venv/bin/python -c 'import natten, os; print(os.path.dirname(natten.__file__))')" .device/site/
# Ray's Java jars, web dashboard build and libraries this project never imports
rm -rf .device/site/ray/{jars,rllib,serve,dashboard/client} .device/site/bin
# botocore's models of every AWS service but the two s3fs calls (27 MB unpacked)
find .device/site/botocore/data -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
tar -C .device -cJf .device/site.tar.xz site
rm -rf .device/wheels .device/site
du -h .device/site.tar.xz
