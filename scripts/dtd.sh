#!/usr/bin/env bash
# Table 2, dtd: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/dtd NGPUS=8 bash scripts/dtd.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=dtd exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
