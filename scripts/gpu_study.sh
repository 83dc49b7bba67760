#!/usr/bin/env bash
# The transfer study on a lent GPU whose calls carry at most 64 MiB and keep nothing between them (issue 14).
# The CIFAR-10 npz (56 MB) and the DINOv2 teacher (44 MB) do not fit in one call, so the study runs in two
# kinds of call; each continues from the records committed so far (results/transfer_study.jsonl, --done) and
# returns runs.jsonl and transfer_study.md, which replace the committed ones.
#
#   bash scripts/gpu_study.sh prepare               here, once: fills the git-ignored .carry/ and .carry_dino/
#   bash scripts/gpu_study.sh families MINUTES OUT  on the device, carrying .carry: the ViT and ConvNeXt families
#   bash scripts/gpu_study.sh dinov2 MINUTES OUT    on the device, carrying .carry_dino: the DINOv2 ViT-T/14 at 224 px
#
# A call runs two studies side by side, as two processes (ViT-T | ConvNeXt-F; 100 | 500 images per class): the
# students are small enough that one process leaves the GPU waiting on Python most of the time. Each has its
# own teacher and folder; their records are then merged (transfer_study.py with no grid, only --done).
# MINUTES: no new run starts after that many (--time_budget_min); STUDY_LIMIT_S (default 540, inside the
# device's 600 s per call) stops the studies outright, and what they recorded until then still comes back.
# Then, here: cp FILES/runs.jsonl results/transfer_study.jsonl; cp FILES/transfer_study.md results/; commit.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
python=${PYTHON:-python3}
part=${1:?usage: bash scripts/gpu_study.sh prepare | families|dinov2 MINUTES OUT}

if [ "$part" = prepare ]; then
  rm -rf .carry/cifar10 .carry_dino
  mkdir -p .carry .carry_dino/data
  cp -r "$shared/data/cifar10" .carry/
  cp "$shared/teachers/dinov2_vits14_imgfocus_fp16.pt" "$shared/data/cifar10/make_imagefolder.py" .carry_dino/
  for n in 100 500; do  # the target subsets as the study names them: it finds them made and skips the npz
    "$python" "$shared/data/cifar10/make_imagefolder.py" ".carry_dino/data/target_$n" \
      --classes dog,frog,horse,ship,truck --per-class-train "$n" > /dev/null
  done
  du -sh --apparent-size .carry .carry_dino
  exit 0
fi

minutes=${2:?MINUTES}
out=${3:?OUT}
limit=${STUDY_LIMIT_S:-540}
mkdir -p "$out"
done_args=()
[ -f results/transfer_study.jsonl ] && done_args=(--done results/transfer_study.jsonl)
# the study's GPU recipe (README, "Evidence on real images")
recipe=(--device cuda --seeds 0 1 2 --lr_search 2e-3 4e-3 8e-3 --eval_freq 5 ${STUDY_FLAGS:-})  # STUDY_FLAGS=--smoke: try it on a CPU
case $part in
  families)
    imagefolder=.carry/cifar10/make_imagefolder.py
    studies=("--families vit" "--families convnext") ;;
  dinov2)
    imagefolder=.carry_dino/make_imagefolder.py
    dino=".carry_dino/dinov2_vits14_imgfocus_fp16.pt"
    # --student_epochs gives the smallest and the largest subset's epochs: alone, each subset names its own
    studies=("--families --subsets 100 --student_epochs 200 200 --dinov2 $dino"
             "--families --subsets 500 --student_epochs 100 100 --dinov2 $dino") ;;
  *)
    echo "gpu_study.sh: unknown part '$part'; choose prepare, families or dinov2" >&2; exit 2 ;;
esac

pids=() folders=()
for i in "${!studies[@]}"; do
  folder=/tmp/study$i
  [ "$part" = dinov2 ] && { mkdir -p $folder; ln -sfn "$PWD/.carry_dino/data" $folder/data; }  # the made subsets
  # shellcheck disable=SC2086  # each study's flags are words
  timeout -k 10 "$limit" "$python" scripts/transfer_study.py --out $folder ${studies[$i]} "${recipe[@]}" \
    --time_budget_min "$minutes" "${done_args[@]}" --make_imagefolder $imagefolder > "$out/study$i.log" 2>&1 &
  pids+=($!) folders+=("$folder/runs.jsonl")
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
# one runs.jsonl and one report from both (and the earlier calls'); the studies' logs stay in OUT
merged=/tmp/study_merged
existing=()
for f in "${folders[@]}"; do [ -f "$f" ] && existing+=("$f"); done
if [ ${#existing[@]} -gt 0 ]; then
  "$python" scripts/transfer_study.py --out $merged --families "${recipe[@]}" --make_imagefolder $imagefolder \
    --done "${existing[@]}" > "$out/merge.log" 2>&1 || rc=$?
  cp $merged/runs.jsonl $merged/transfer_study.md "$out"/ 2>/dev/null || true
fi
for i in "${!studies[@]}"; do cp /tmp/study$i/transfer_study.md "$out/study$i.md" 2>/dev/null || true; done  # commands
ls "$out"
exit $rc
