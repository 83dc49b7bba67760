#!/usr/bin/env bash
# Table 2, eurosat: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/eurosat NGPUS=8 bash scripts/eurosat.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=eurosat exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
