#!/usr/bin/env bash
# Creates .venv with the pinned test environment (A1111 1.10's torch 2.1.2 + torchvision 0.16.2, CPU is fine).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
# The real ldm UNet classes A1111 runs, and OpenCLIP (A1111's pin) whose text tower checks SDXL's bigG conversion;
# --no-deps because their own pins (pytorch-lightning, transformers; timm, protobuf) would replace the WebUI's.
.venv/bin/python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 open-clip-torch==2.20.0
