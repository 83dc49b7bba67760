#!/usr/bin/env bash
# Table 2, svhn: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/svhn NGPUS=8 bash scripts/svhn.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=svhn exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
