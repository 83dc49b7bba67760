#!/usr/bin/env bash
# Table 2 for one dataset: ViT-T and ConvNeXt-F, from random init and from weight selection.
#   DATA_PATH=/data/cifar100 NGPUS=8 bash scripts/run_dataset.sh cifar100
# Environment (defaults in brackets):
#   DATA_PATH      the dataset folder (required; DOWNLOAD=true lets torchvision fetch it there)
#   NGPUS [1]      processes per node for torchrun
#   OUTPUT [runs]  where selections (OUTPUT/ws) and runs (OUTPUT/DATASET/MODEL_INIT) go
#   MODELS ["vit_tiny convnext_femto"], INITS ["random ws"]
#   VIT_TEACHER [vit_small_patch16_224.augreg_in21k], CONVNEXT_TEACHER [convnext_tiny.fb_in22k]
#   VIT_TEACHER_CKPT, CONVNEXT_TEACHER_CKPT   local teacher weights (offline)
#   DOWNLOAD [false]; EXTRA   more main.py flags (e.g. "--epochs 1")
#   DRY_RUN=1      print the commands without running them
set -euo pipefail
dataset="${1:?usage: run_dataset.sh DATASET (cifar10 cifar100 pets flowers stl10 food101 dtd svhn eurosat imagenet)}"
here="$(cd "$(dirname "$0")/.." && pwd)"
case "$dataset" in
  cifar10|cifar100|pets|flowers|stl10|food101|dtd|svhn|eurosat|imagenet) ;;
  *) echo "error: unknown dataset '$dataset'; choose cifar10 cifar100 pets flowers stl10 food101 dtd svhn eurosat imagenet" >&2; exit 2 ;;
esac
: "${DATA_PATH:?error: set DATA_PATH to the folder holding $dataset}"
NGPUS="${NGPUS:-1}"; OUTPUT="${OUTPUT:-runs}"; MODELS="${MODELS:-vit_tiny convnext_femto}"; INITS="${INITS:-random ws}"
PYTHON="${PYTHON:-python}"
run() { echo "+ $*"; if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi; }

for model in $MODELS; do
  case "$model" in
    vit_tiny) student=vit_tiny_patch16_224; teacher="${VIT_TEACHER:-vit_small_patch16_224.augreg_in21k}"; ckpt="${VIT_TEACHER_CKPT:-}" ;;
    convnext_femto) student=convnext_femto_linear; teacher="${CONVNEXT_TEACHER:-convnext_tiny.fb_in22k}"; ckpt="${CONVNEXT_TEACHER_CKPT:-}" ;;
    *) echo "error: unknown model '$model' in MODELS; use vit_tiny and/or convnext_femto" >&2; exit 2 ;;
  esac
  ws_file="$OUTPUT/ws/${student}_from_${teacher//\//_}.pth"
  for init in $INITS; do
    init_flags=()
    if [ "$init" = ws ]; then
      if [ ! -f "$ws_file" ] || [ "${DRY_RUN:-0}" = 1 ]; then
        run mkdir -p "$OUTPUT/ws"
        run "$PYTHON" "$here/weight_selection.py" --teacher "$teacher" ${ckpt:+--teacher_checkpoint "$ckpt"} \
            --student "$student" --output "$ws_file"
      fi
      init_flags=(--initialize "$ws_file")
    elif [ "$init" != random ]; then
      echo "error: unknown init '$init' in INITS; use random and/or ws" >&2; exit 2
    fi
    # shellcheck disable=SC2086
    run "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPUS" "$here/main.py" \
        --config "$here/configs/${model}_${dataset}.yaml" --data_path "$DATA_PATH" --download "${DOWNLOAD:-false}" \
        --output_dir "$OUTPUT/$dataset/${model}_${init}" --log_dir "$OUTPUT/$dataset/${model}_${init}/tb" \
        "${init_flags[@]}" ${EXTRA:-}
  done
done
