#!/usr/bin/env bash
# Issue 4's measurement on one GPU: ViT-T and the paper's ConvNeXt-F (Linear MLP), eager and compiled,
# the recipe of configs/<model>_cifar10.yaml at 224 px, batch 256, bf16, channels_last, on CIFAR-10 held as
# an ImageFolder (python ../shared/data/cifar10/make_imagefolder.py DATA). Writes one JSON and one torch.profiler
# summary (<setting>_profile.txt, 10 more GPU-path batches) per setting and summary.md into OUT_DIR. A setting
# that fails is reported and the others still run (exit status 1 then).
#   bash scripts/benchmark.sh DATA OUT_DIR [more main.py flags, e.g. --num_workers 15]
# BENCHMARK_FLAGS holds benchmark.py's own flags, e.g. BENCHMARK_FLAGS='--warmup 10 --steps 50' for a shorter run
# ('--profile 0' for no profiles);
# PYTHON the interpreter (default python3, else python).
set -euo pipefail
data=${1:?usage: bash scripts/benchmark.sh DATA OUT_DIR [main.py flags]}
out=${2:?usage: bash scripts/benchmark.sh DATA OUT_DIR [main.py flags]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
failed=0
py=${PYTHON:-$(command -v python3 || command -v python)}
for compile in false true; do  # both eager settings first: a call cut short by its time limit loses a compiled one
  for model in vit_tiny convnext_femto; do
    name=$([ $model = vit_tiny ] && echo vit_tiny_patch16_224 || echo convnext_femto_linear)
    rm -f "$out/${model}_compile_${compile}.json"  # an earlier call's, which a failure here would leave as current
    "$py" scripts/benchmark.py --profile 10 ${BENCHMARK_FLAGS:-} --output "$out/${model}_compile_${compile}.json" -- \
      --config configs/${model}_cifar10.yaml --model "$name" --data_set image_folder --data_path "$data" \
      --batch_size 256 --use_amp true --channels_last true --compile $compile --device cuda "$@" \
      || { echo "benchmark.sh: $model compile $compile failed" >&2; failed=1; }
  done
done
"$py" - "$out" <<'PY'
import glob, json, os, sys
paths = sorted(glob.glob(os.path.join(sys.argv[1], '*_compile_*.json')))  # this script's settings only
if not paths:
    sys.exit('benchmark.sh: no setting produced a result')
projected = [k for k in json.load(open(paths[0])) if k.startswith('projected_')][0]  # --epochs_projected's
epochs = projected.split('_')[1]
rows = [f'| setting | model only | GPU path | CPU loader | GPU/model | GPU/CPU | eval (GPU) | {epochs} epochs |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
failures = []  # a part that failed (its number is nan, the projection '-' without the evaluation's time)
for path in paths:
    r = json.load(open(path)); ips = r['images_per_sec']; ratio = r['ratios']; name = os.path.basename(path)[:-5]
    nan = float('nan')
    rows.append(f"| {name} | {ips['model_only']:.0f} | {ips['gpu_path']:.0f} | {ips.get('cpu_loader', nan):.0f} | "
                f"{ratio['gpu_path / model_only']:.2f} | {ratio.get('gpu_path / cpu_loader', nan):.2f} | "
                f"{ips.get('eval_gpu_path', nan):.0f} | {r.get(projected) or '-'} min |")
    failures += [f'- {name}: {part} failed: {error}' for part, error in r.get('errors', {}).items()]
r = json.load(open(path))
head = (f"Images per second; device {r['device']}; {r['versions']}. Eval is the plain model, compiled rows too, as "
        f"main.py evaluates; {epochs} epochs: training on the GPU path and one evaluation per epoch.\n\n")
text = head + '\n'.join(rows) + '\n' + ('\n' + '\n'.join(failures) + '\n' if failures else '')
open(os.path.join(sys.argv[1], 'summary.md'), 'w').write(text)
print(text)
PY
exit $failed
