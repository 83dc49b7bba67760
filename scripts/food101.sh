#!/usr/bin/env bash
# Table 2, food101: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/food101 NGPUS=8 bash scripts/food101.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=food101 exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
