#!/usr/bin/env bash
# Table 2, imagenet: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/imagenet NGPUS=8 bash scripts/imagenet.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=imagenet exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
