#!/usr/bin/env bash
# The transfer study on a lent GPU whose calls carry at most 64 MiB and keep nothing between them (issue 14).
# The CIFAR-10 npz (56 MB) and the DINOv2 teacher (44 MB) do not fit in one call, so the study runs in two
# kinds of call; each continues from the records committed so far (results/transfer_study.jsonl, --done) and
# returns runs.jsonl and transfer_study.md, which replace the committed ones.
#
#   bash scripts/gpu_study.sh prepare                     here, once: fills the git-ignored .carry/ and .carry_dino/
#   bash scripts/gpu_study.sh vit|convnext MINUTES OUT    on the device, carrying .carry: one family's teacher and students
#   bash scripts/gpu_study.sh dinov2 MINUTES OUT          on the device, carrying .carry_dino: the DINOv2 ViT-T/14 at 224 px
#
# MINUTES: no new run starts after that many (--time_budget_min); STUDY_LIMIT_S (540) stops the study outright,
# and what it recorded until then still comes back.
# One family per call: a family's teacher is trained again in every call that still has students of it to run.
# Then, here: cp FILES/runs.jsonl results/transfer_study.jsonl; cp FILES/transfer_study.md results/; commit.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
python=${PYTHON:-python3}
part=${1:?usage: bash scripts/gpu_study.sh prepare | vit|convnext|dinov2 MINUTES OUT}

if [ "$part" = prepare ]; then
  rm -rf .carry/cifar10 .carry_dino
  mkdir -p .carry .carry_dino/study/data
  cp -r "$shared/data/cifar10" .carry/
  cp "$shared/teachers/dinov2_vits14_imgfocus_fp16.pt" "$shared/data/cifar10/make_imagefolder.py" .carry_dino/
  for n in 100 500; do  # the target subsets as the study names them: it finds them made and skips the npz
    "$python" "$shared/data/cifar10/make_imagefolder.py" ".carry_dino/study/data/target_$n" \
      --classes dog,frog,horse,ship,truck --per-class-train "$n" > /dev/null
  done
  du -sh .carry .carry_dino
  exit 0
fi

minutes=${2:?MINUTES}
out=${3:?OUT}
mkdir -p "$out"
study=/tmp/study
[ "$part" = dinov2 ] && study=.carry_dino/study
# The study stops itself at LIMIT seconds (default 540, inside the device's 600 s per call) so that what it has
# is always copied back: runs.jsonl is rewritten after every run; the report exists once the study wrote it.
limit=${STUDY_LIMIT_S:-540}
done_args=()
[ -f results/transfer_study.jsonl ] && done_args=(--done results/transfer_study.jsonl)
# the study's GPU recipe (README, "Evidence on real images")
common=(--device cuda --seeds 0 1 2 --lr_search 2e-3 4e-3 8e-3 --eval_freq 5 --time_budget_min "$minutes"
        "${done_args[@]}")
rc=0
case $part in
  vit|convnext)
    timeout -k 10 "$limit" "$python" scripts/transfer_study.py --out $study --families "$part" "${common[@]}" \
      --make_imagefolder .carry/cifar10/make_imagefolder.py || rc=$? ;;
  dinov2)
    timeout -k 10 "$limit" "$python" scripts/transfer_study.py --out $study --families "${common[@]}" \
      --make_imagefolder .carry_dino/make_imagefolder.py --dinov2 .carry_dino/dinov2_vits14_imgfocus_fp16.pt \
      || rc=$? ;;
  *)
    echo "gpu_study.sh: unknown part '$part'; choose prepare, vit, convnext or dinov2" >&2; exit 2 ;;
esac
cp $study/runs.jsonl $study/transfer_study.md "$out"/ 2>/dev/null || true
ls "$out"
exit $rc
