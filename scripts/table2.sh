#!/usr/bin/env bash
# All of Table 2: every dataset, both models, random init and weight selection.
# DATA_ROOT holds one folder per dataset (DATA_ROOT/cifar10, DATA_ROOT/cifar100, ...); see run_dataset.sh.
set -euo pipefail
: "${DATA_ROOT:?error: set DATA_ROOT to the folder that holds one sub-folder per dataset}"
for d in imagenet svhn food101 eurosat cifar10 cifar100 stl10 flowers pets dtd; do
  DATA_PATH="$DATA_ROOT/$d" bash "$(dirname "$0")/run_dataset.sh" "$d"
done
