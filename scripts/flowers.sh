#!/usr/bin/env bash
# Table 2, flowers: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/flowers NGPUS=8 bash scripts/flowers.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=flowers exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
