#!/usr/bin/env bash
# Table 2, cifar100: ViT-T and ConvNeXt-F from random init and from weight selection (see run_dataset.sh).
exec bash "$(dirname "$0")/run_dataset.sh" cifar100 "$@"
