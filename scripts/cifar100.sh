#!/usr/bin/env bash
# Table 2, cifar100: ViT-T and ConvNeXt-F from random init and from weight selection (scripts/tables.py).
#   DATA_PATH=/data/cifar100 NGPUS=8 bash scripts/cifar100.sh      (DRY_RUN=1 prints the commands; MODELS=vit_tiny, ...)
DATASETS=cifar100 exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 2 "$@"
