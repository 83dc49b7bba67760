#!/usr/bin/env bash
# Table 2, stl10: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/stl10 NGPUS=8 bash scripts/stl10.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=stl10 exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
