#!/usr/bin/env bash
# The transfer study on a lent GPU whose calls carry at most 64 MiB and keep nothing between them (issue 14).
# The CIFAR-10 npz (53 MiB), each pretrained teacher (fp16: ViT-S/4 41 MiB, ConvNeXt-T 53 MiB) and the DINOv2
# teacher (42 MiB) fit one at a time, so the study runs in calls of one part each. A teacher is pretrained once,
# in a call of its own, and comes back in parts; every later call of its family carries it, so all of the
# family's selections come from the one teacher. Each student call continues from the records committed so far
# (results/transfer_study.jsonl, --done).
#
#   bash scripts/gpu_study.sh prepare                    here, once: .carry/ (npz), .carry_target/ (the target
#                                                        subsets, made here, packed in one file), .carry_dino/ (the
#                                                        DINOv2 teacher)
#   bash scripts/gpu_study.sh teacher FAMILY OUT         device, carrying .carry: pretrains FAMILY's teacher (vit,
#                                                        convnext); OUT gets FAMILY.pth in 15 MB parts and its sha256
#   bash scripts/gpu_study.sh unpack FAMILY FILES        here: joins the parts into .carry_teachers/FAMILY/FAMILY.pth
#   bash scripts/gpu_study.sh family FAMILY MINUTES OUT  device, carrying .carry_target and .carry_teachers/FAMILY
#   bash scripts/gpu_study.sh dinov2 MINUTES OUT         device, carrying .carry_target and .carry_dino: the DINOv2
#                                                        ViT-T/14 at 224 px
#   bash scripts/gpu_study.sh merge OUT RUNS.jsonl...     here or there: one runs.jsonl and report of the records
#
# A student call runs two studies side by side, as two processes (100 | 500 images per class): the students are
# small enough that one process leaves the GPU waiting on Python most of the time. Each study's runs.jsonl is
# copied into OUT (studyI.jsonl) every 15 s, so a call cut short still returns the runs it finished; at the end
# the two are merged (transfer_study.py with no grid, only --done) into OUT/runs.jsonl and transfer_study.md.
# MINUTES: no new run starts after that many (--time_budget_min; leave a run's time before the limit, guessed but
# not yet measured at half a minute for a 100-image run on an H100 and a minute for a 500-image one); STUDY_LIMIT_S
# (default 540, inside the device's 600 s per call: set it below the call's limit when the session has less time
# left) stops the studies outright. A teacher call stops as soon as its logged epochs show that the teacher
# cannot finish within STUDY_LIMIT_S (exit status 3), and says which --teacher_epochs fits (one cut at the limit
# exits with 4). A teacher is lost when the session ends (its parts are not committed). It trains with
# --deterministic true: on the same GPU model, software and code (commit), a later session's teacher call trains
# the same weights (the same hash), and the family's recorded selections are reused; on another, they run again
# (the first ones stay, in rows of their own). Run a family's student calls in the session of its teacher call
# where the time allows. Set WS_CODE_VERSION=<commit> in the command: every record names the code it ran.
# Then, here, before the next call is sent (it continues from results/transfer_study.jsonl), with the calls'
# STUDY_RECIPE and STUDY_FLAGS (they decide which records the report covers):
#   bash scripts/gpu_study.sh merge /tmp/m results/transfer_study.jsonl FILES/runs.jsonl   (FILES/study*.jsonl
#   where a call returned no runs.jsonl); cp /tmp/m/runs.jsonl results/transfer_study.jsonl;
#   cp /tmp/m/transfer_study.md results/; commit
# A merge, not a copy: a call's runs.jsonl lacks the records of a call sent before this one's were merged.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
python=${PYTHON:-python3}
[ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || python=.venv/bin/python  # here: the project's environment
usage='usage: bash scripts/gpu_study.sh prepare | teacher FAMILY OUT | unpack FAMILY FILES | family FAMILY MINUTES OUT | dinov2 MINUTES OUT | merge OUT RUNS.jsonl...'
usage_error() { echo "$usage" >&2; exit 2; }
part=${1:-}
case $part in  # how many arguments the part needs, each checked here, before anything runs or is removed
  '') usage_error ;;
  teacher|unpack|dinov2) n=2 ;;
  family) n=3 ;;
  merge) n=1 ;;  # and RUNS.jsonl files, checked below
  prepare) n=0 ;;
  *) echo "gpu_study.sh: unknown part '$part'; $usage" >&2; exit 2 ;;
esac
for ((i = 2; i <= n + 1; i++)); do
  [ -n "${!i:-}" ] || { echo "gpu_study.sh: $part needs $n argument(s), got $((i - 2)); $usage" >&2; exit 2; }
done
family_of() {
  case "$1" in vit|convnext) echo "$1" ;; *) echo "gpu_study.sh: unknown family '$1'; choose vit or convnext" >&2; exit 2 ;; esac
}

case $part in
  prepare)
    rm -rf .carry/cifar10 .carry_target .carry_dino
    mkdir -p .carry .carry_target/data .carry_dino .carry_teachers
    cp -r --no-preserve=mode "$shared/data/cifar10" .carry/  # writable: the next prepare replaces it
    cp "$shared/data/cifar10/make_imagefolder.py" .carry_target/
    cp "$shared/teachers/dinov2_vits14_imgfocus_fp16.pt" .carry_dino/
    for n in 100 500; do  # the target subsets as the study names them: it finds them made and skips the npz
      "$python" "$shared/data/cifar10/make_imagefolder.py" ".carry_target/data/target_$n" \
        --classes dog,frog,horse,ship,truck --per-class-train "$n" > /dev/null
    done
    # one copy of the 5,000 test images (the same in both): a ConvNeXt-T teacher beside them still fits 64 MiB
    diff -rq .carry_target/data/target_100/test .carry_target/data/target_500/test > /dev/null \
      || { echo "gpu_study.sh: the two subsets' test images differ; cannot share one copy" >&2; exit 1; }
    rm -rf .carry_target/data/target_500/test && ln -s ../target_100/test .carry_target/data/target_500/test
    # one file, not 8,000 small ones: a call's 64 MiB may count each file's overhead (a ConvNeXt-T teacher beside
    # the subsets is 61 MiB of file contents)
    tar czf .carry_target/targets.tgz -C .carry_target data && rm -rf .carry_target/data
    du -sh --apparent-size .carry .carry_target .carry_dino
    exit 0 ;;
  unpack)
    family=$(family_of "$2")
    [ -d "$3" ] \
      || { echo "gpu_study.sh: FILES folder $3 does not exist; give the folder a teacher call's files were fetched into" >&2; exit 1; }
    files=$(cd "$3" && pwd)
    ls "$files/$family.pth.part"* "$files/$family.pth.sha256" > /dev/null 2>&1 \
      || { echo "gpu_study.sh: no $family.pth.part* and $family.pth.sha256 in $files (a teacher call's files)" >&2; exit 1; }
    mkdir -p ".carry_teachers/$family"
    cat "$files/$family.pth.part"* > ".carry_teachers/$family/$family.pth.tmp"
    if ! (cd ".carry_teachers/$family" && sed "s/  .*/  $family.pth.tmp/" "$files/$family.pth.sha256" \
          | sha256sum -c --quiet - 2>/dev/null); then
      rm -f ".carry_teachers/$family/$family.pth.tmp"
      echo "gpu_study.sh: the parts in $files do not join into the teacher that $family.pth.sha256 names; fetch them again" >&2
      exit 1
    fi
    mv ".carry_teachers/$family/$family.pth.tmp" ".carry_teachers/$family/$family.pth"
    echo "unpacked .carry_teachers/$family/$family.pth; carry .carry_teachers/$family in its family calls"
    exit 0 ;;
esac

# the study's GPU recipe (README, "Evidence on real images"); STUDY_RECIPE replaces it and STUDY_FLAGS adds to it
# (the same in every call: they are part of what identifies a run). A rehearsal of every call on a CPU ran with
# STUDY_RECIPE='--device cpu --seeds 0 --lr_search 2e-3 4e-3 --eval_freq 5' and STUDY_FLAGS='--teacher_epochs 1
# --student_epochs 1 1 --num_workers 1' in all of them; not --smoke, whose smaller target subsets .carry_target
# does not hold
# shellcheck disable=SC2206  # the recipe's flags are words
recipe=(${STUDY_RECIPE:---device cuda --seeds 0 1 2 --lr_search 2e-3 4e-3 8e-3 --eval_freq 5} ${STUDY_FLAGS:-})
limit=${STUDY_LIMIT_S:-540}
[[ $limit =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "gpu_study.sh: STUDY_LIMIT_S=$limit: give seconds, e.g. 540" >&2; exit 2; }
# whether `timeout $limit` stopped a process (exit status $1, after $2 seconds): 124, or 137 past the limit (SIGKILL
# after timeout's grace; earlier, something else killed it, such as the kernel out of memory)
stopped_at_limit() { [ "$1" = 124 ] || { [ "$1" = 137 ] && [ "$2" -ge "${limit%.*}" ]; }; }

merge() {  # merge OUT RUNS.jsonl...: one runs.jsonl and transfer_study.md of the records, under the study's settings
  local dest=$1
  shift
  "$python" scripts/transfer_study.py --out "$dest" --families "${recipe[@]}" --done "$@"
}
if [ "$part" = merge ]; then
  out=$2
  shift 2
  [ $# -gt 0 ] || { echo "gpu_study.sh: merge needs RUNS.jsonl files" >&2; exit 2; }
  merge "$out" "$@"
  exit
fi
rm -rf /tmp/study0 /tmp/study1 /tmp/study0.seconds /tmp/study1.seconds /tmp/study_merged /tmp/study_teacher \
  /tmp/study_targets  # a warm machine keeps /tmp between calls

if [ "$part" = teacher ]; then
  family=$(family_of "$2")
  out=$3
  mkdir -p "$out"
  # the study's --teacher_epochs, as its own parser reads the recipe's flags (--teacher_epochs N or --teacher_epochs=N)
  epochs=$("$python" -c 'import sys; sys.path.insert(0, "scripts"); sys.argv[:1] = ["transfer_study.py", "--out", "-"]
import transfer_study; print(transfer_study.get_args().teacher_epochs)' "${recipe[@]}")
  start=$(date +%s.%N)
  timeout -k 10 "$limit" "$python" scripts/transfer_study.py --out /tmp/study_teacher --families "$family" \
    --only_teachers --teachers /tmp/study_teacher/carry "${recipe[@]}" --make_imagefolder .carry/cifar10/make_imagefolder.py \
    > "$out/teacher_$family.log" 2>&1 &
  study=$!
  # The teacher cannot resume in a later call (its checkpoint stays here): once two epochs after the first are
  # logged, a training that cannot end within the limit is stopped at once, saying how many epochs fit, instead
  # of spending the rest of the call for nothing. An epoch's cost is the time between the writes of log lines
  # (training, evaluation and the checkpoints it writes), from the file's modification times.
  # shellcheck disable=SC2016  # Python, not shell
  watch='import os, sys, time
path, epochs, started, limit, pid = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
base = None
while os.path.exists(f"/proc/{pid}"):
    time.sleep(1)
    try:  # lines, then the time: a line written in between makes the epochs look longer, not shorter
        n = sum(1 for line in open(path) if line.strip())
        written = os.stat(path).st_mtime
    except OSError:
        continue
    if n >= 1 and base is None:  # the first epoch also holds the start-up: measured from its end
        base = (n, written)
    elif base and n >= base[0] + 2 and written > base[1]:
        seconds = (written - base[1]) / (n - base[0])
        fits = n + int((started + limit - 20 - written) // seconds)  # 20 s: the export and hashes at the end
        print("fits" if fits >= epochs else f"an epoch takes {seconds:.1f} s: {epochs} epochs would end after the "
              f"{limit:g} s limit, about {fits} fit; add --teacher_epochs {max(1, fits * 9 // 10)} to STUDY_FLAGS "
              "in this and every later call of the study (its teachers and students)")
        break'
  verdict=$("$python" -c "$watch" "/tmp/study_teacher/teachers/$family/log.txt" "$epochs" "$start" "$limit" $study) \
    || verdict=  # a watcher that fails leaves the teacher to its limit
  rc=0
  if [ -n "$verdict" ] && [ "$verdict" != fits ]; then
    kill $study 2> /dev/null || true
    echo "gpu_study.sh: teacher $family stopped early: $verdict" | tee -a "$out/teacher_$family.log"
    wait $study 2> /dev/null || true
    rc=3
  else
    wait $study || rc=$?
    if stopped_at_limit $rc $(( $(date +%s) - ${start%.*} )); then  # said: the device reads 124 as its own limit
      echo "gpu_study.sh: teacher $family stopped at STUDY_LIMIT_S ($limit s), unfinished: no weights; add a smaller" \
        "--teacher_epochs to STUDY_FLAGS (see $out/teacher_${family}_log.txt)" | tee -a "$out/teacher_$family.log"
      rc=4
    fi
  fi
  cp "/tmp/study_teacher/teachers/$family/log.txt" "$out/teacher_${family}_log.txt" 2> /dev/null || true  # its timings
  if [ -f "/tmp/study_teacher/carry/$family.pth" ]; then  # a call returns files of 16 MiB at most
    (cd /tmp/study_teacher/carry && sha256sum "$family.pth" > "$out/$family.pth.sha256" \
      && split -b 15M -d "$family.pth" "$out/$family.pth.part")
  fi
  ls "$out"
  exit $rc
fi

case $part in
  family)
    family=$(family_of "$2")
    minutes=$3
    out=$4
    teacher=".carry_teachers/$family"
    [ -f "$teacher/$family.pth" ] \
      || { echo "gpu_study.sh: no $teacher/$family.pth; run the teacher call and unpack first, and carry $teacher" >&2; exit 2; }
    studies=("--families $family --teachers $teacher --subsets 100 --student_epochs 200 200"
             "--families $family --teachers $teacher --subsets 500 --student_epochs 100 100") ;;
  dinov2)
    minutes=$2
    out=$3
    dino=".carry_dino/dinov2_vits14_imgfocus_fp16.pt"
    # --student_epochs gives the smallest and the largest subset's epochs: alone, each subset names its own
    studies=("--families --subsets 100 --student_epochs 200 200 --dinov2 $dino"
             "--families --subsets 500 --student_epochs 100 100 --dinov2 $dino") ;;
esac
mkdir -p "$out"
[ -f .carry_target/targets.tgz ] || { echo "gpu_study.sh: no .carry_target/targets.tgz; run prepare here and carry .carry_target" >&2; exit 2; }
targets=/tmp/study_targets
mkdir -p $targets && tar xzf .carry_target/targets.tgz -C $targets
# prepare's link to the one copy of the test images, should the archive have dropped it
[ -d $targets/data/target_500/test ] || ln -sfn ../target_100/test $targets/data/target_500/test
done_args=()
[ -f results/transfer_study.jsonl ] && done_args=(--done results/transfer_study.jsonl)
imagefolder=.carry_target/make_imagefolder.py

pids=()
for i in "${!studies[@]}"; do
  folder=/tmp/study$i
  mkdir -p $folder/data  # the subsets made here, linked one by one: the validation splits are carved beside them in /tmp
  for subset in $targets/data/target_*; do ln -sfn "$subset" $folder/data/; done
  (  # its exit status, and in $folder.seconds how long it ran
    began=$SECONDS
    status=0
    # shellcheck disable=SC2086  # each study's flags are words
    timeout -k 10 "$limit" "$python" scripts/transfer_study.py --out $folder ${studies[$i]} "${recipe[@]}" \
      --time_budget_min "$minutes" "${done_args[@]}" --make_imagefolder $imagefolder > "$out/study$i.log" 2>&1 \
      || status=$?
    echo $((SECONDS - began)) > $folder.seconds
    exit $status
  ) &
  pids+=($!)
done
copy_records() {  # whole files only (a copy, then a rename): a call cut short returns no half-written one
  for i in "${!studies[@]}"; do
    [ -f /tmp/study$i/runs.jsonl ] && cp /tmp/study$i/runs.jsonl "$out/.study$i.jsonl" && mv "$out/.study$i.jsonl" "$out/study$i.jsonl"
  done
  true
}
(while sleep 15; do copy_records; done) > /dev/null 2>&1 &  # no output held open: the call ends when the studies do
copier=$!
rc=0
for i in "${!pids[@]}"; do
  status=0
  wait "${pids[$i]}" || status=$?
  ran=$(cat /tmp/study$i.seconds 2> /dev/null || echo 0)
  if stopped_at_limit $status "$ran"; then  # the limit, not a failure
    echo "gpu_study.sh: STUDY_LIMIT_S ($limit s) stopped study $i; its finished runs, if any, are in $out/study$i.jsonl"
  elif [ $status != 0 ]; then
    echo "gpu_study.sh: study $i failed (exit status $status); the end of $out/study$i.log:"
    tail -n 3 "$out/study$i.log"
    rc=$status
  fi
done
kill $copier 2>/dev/null || true
copy_records
# one runs.jsonl and one report from both (and the earlier calls'); the studies' logs stay in OUT
existing=()
for i in "${!studies[@]}"; do [ -f "$out/study$i.jsonl" ] && existing+=("$out/study$i.jsonl"); done
if [ ${#existing[@]} -gt 0 ]; then
  merge /tmp/study_merged "${existing[@]}" > "$out/merge.log" 2>&1 || rc=$?
  cp /tmp/study_merged/runs.jsonl /tmp/study_merged/transfer_study.md "$out"/ 2>/dev/null || true
fi
ls "$out"
exit $rc
