#!/usr/bin/env bash
# Table 2, pets: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/pets NGPUS=8 bash scripts/pets.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=pets exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
