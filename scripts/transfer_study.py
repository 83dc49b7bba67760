"""Weight selection on real images, offline: a CIFAR-10 transfer study with only the project's own commands.

  1. split CIFAR-10 into a source task (airplane automobile bird cat deer) and a target task
     (dog frog horse ship truck) with ../shared/data/cifar10/make_imagefolder.py;
  2. pretrain teachers on the source task with main.py: ViT-S/4 and ConvNeXt-T at 32 px;
  3. select students (ViT-T/4, ConvNeXt-F) with weight_selection.py for every element selection, and for
     ConvNeXt-F (fewer blocks than its teacher; ViT-S and ViT-T both have 12) first vs uniform layer selection;
  4. train the students on target subsets (N images per class) from random init and from each selection,
     over seeds, evaluating on all target test images; optionally also a ViT-T/14 at 224 px from the
     real DINOv2 ViT-S/14 (--dinov2 CKPT; --dinov2_input_size), random init vs weight selection;
  5. write OUT/transfer_study.md (mean ± std, device, versions; the commands and wall time of the runs of this
     call, if it ran any) and OUT/runs.jsonl.

    python scripts/transfer_study.py --out runs/transfer --device cuda --seeds 0 1 2 --lr_search 2e-3 4e-3 8e-3 \
        --eval_freq 5 --dinov2 ../shared/teachers/dinov2_vits14_imgfocus_fp16.pt
    python scripts/transfer_study.py --out /tmp/smoke --smoke          # the whole pipeline on the CPU in minutes
    python scripts/transfer_study.py --out /tmp/dino56 --device cpu --families --dinov2 CKPT --dinov2_input_size 56 \
        --subsets 100 --student_epochs 30 30 --batch_size 32 --lr_search 1e-3 2e-3 4e-3 8e-3 3.2e-2
                                                                   # only the DINOv2 part, sized for a CPU

One recipe per model and subset size, the same for every initialization: the paper's recipe with its lr
scaled linearly to the study's batch (--blr: 2e-3 for ViT-T and 4e-3 for ConvNeXt-F per 512 images, the
paper's lr at the paper's batch; 1.25e-4 for ViT-T at batch 32), drop path 0 for ViT-T (Table 15) and 0.1
for ConvNeXt-F. The same seed gives every init the same data order and augmentation, so the report gives
paired per-seed differences of the final accuracy against random init (the best epoch's beside it, unpaired).

--lr_search BLR [BLR ...] chooses that lr instead of assuming it: for each model and subset size, random init
trains with every candidate on a validation split carved from the training subset (the last --val_per_class
images of each class are held out; the test set is never looked at), and the candidate with the highest mean
final validation accuracy over the seeds becomes the one recipe for every init of that model and subset.

--done RUNS.jsonl [...] continues a study across machines that keep nothing (a GPU lent one call or one
session at a time): a run whose record is there, with the same settings and the same kind of device (CPU or
GPU), is not run again and its record is reused. Only the records travel; a teacher is trained, in the call
that first needs it, only while some of its students are still to run. A selection's teacher is part of its
run (the sha256 of its weights): once the teacher is known (carried with --teachers, or trained in this call),
only that teacher's selections are reused, and the report gives each teacher's rows apart and says how many
teacher trainings a family's students came from. Records of the same settings that this
call's grid does not cover (another part of the study) are carried into its runs.jsonl and report, so the last
call's report is the whole study's; `--families --done RUNS.jsonl` (no grid) only writes that report.
Students keep their logs, not their checkpoints (--save_ckpt false): the study needs their accuracies only.

--teachers DIR keeps one teacher per family across such calls: a teacher pretrained here is written to
DIR/<family>.pth (fp16 weights) and used; a call that finds it there trains none (--only_teachers: train them
and stop). On a lent GPU whose calls carry at most 64 MiB, scripts/gpu_study.sh prepares and runs the calls.
"""
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import utils  # noqa: E402
SHARED = os.path.join(os.path.dirname(HERE), 'shared', 'data', 'cifar10')
SOURCE = 'airplane,automobile,bird,cat,deer'
TARGET = 'dog,frog,horse,ship,truck'
ELEMENTS = ('uniform', 'consecutive', 'random', 'random_inconsistent', 'l1', 'l1_consistent', 'magnitude')
# Base lr per 512 images of global batch (main.py --blr): the paper's lr at its batch (Appendix A).
BLR = {'vit': 2e-3, 'convnext': 4e-3}
MODELS = {  # family: (teacher, teacher kwargs, student, student kwargs) at 32 px
    'vit': ('vit_small_patch16_224', {'img_size': 32, 'patch_size': 4}, 'vit_tiny_patch16_224',
            {'img_size': 32, 'patch_size': 4}),
    'convnext': ('convnext_tiny', {}, 'convnext_femto_linear', {}),
}

# Families whose student has fewer layers than its teacher: only there do first and uniform layer selection
# differ (ViT-S and ViT-T both have 12 blocks; ConvNeXt-T's stages 3-3-9-3 become ConvNeXt-F's 2-2-6-2).
LAYERS_DIFFER = ('convnext',)


def get_args(argv=None):
    p = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', required=True)
    p.add_argument('--make_imagefolder', default=os.path.join(SHARED, 'make_imagefolder.py'))
    p.add_argument('--source', default=None, help='an ImageFolder (train/, test/) to use as the source task instead')
    p.add_argument('--target', default=None, help='an ImageFolder for the target task (its train/ is subsampled)')
    p.add_argument('--subsets', type=int, nargs='+', default=[100, 500], help='training images per target class')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--families', nargs='*', default=['vit', 'convnext'], choices=sorted(MODELS),
                   help='teachers pretrained here; pass the flag with no value to run only the DINOv2 study')
    p.add_argument('--teacher_epochs', type=int, default=100)
    p.add_argument('--student_epochs', type=int, nargs=2, default=[200, 100],
                   help='epochs for the smallest and the largest subset')
    p.add_argument('--batch_size', type=int, default=128)
    lr = p.add_mutually_exclusive_group()
    lr.add_argument('--blr', type=float, default=None,
                   help='base lr per 512 images for every student (default: 2e-3 ViT-T, 4e-3 ConvNeXt-F)')
    lr.add_argument('--lr_search', type=float, nargs='+', default=None, metavar='BLR',
                   help='choose the base lr per 512 images among these, per model and subset size, by random '
                        "init's mean final accuracy on a validation split carved from the training subset")
    p.add_argument('--val_per_class', type=int, default=20,
                   help='with --lr_search: training images per class held out for validation')
    p.add_argument('--eval_freq', type=int, default=1,
                   help="students evaluate every N epochs and after the last (main.py --eval_freq): the test set "
                        "is 2 to 10 times a subset's training images, so evaluation is most of a short run's time")
    p.add_argument('--device', default='cuda')
    p.add_argument('--num_workers', type=int, default=8)
    p.add_argument('--dinov2', default=None, help='the DINOv2 ViT-S/14 checkpoint: adds the ViT-T/14 study')
    p.add_argument('--dinov2_input_size', type=int, default=224,
                   help='input size of the DINOv2 students (a multiple of 14; the position grid is resampled)')
    p.add_argument('--per_class_test', type=int, default=None,
                   help='target test images per class (default: all 1,000); fewer only to fit a CPU')
    p.add_argument('--smoke', action='store_true', help='a few images and one epoch everywhere (CPU, minutes)')
    p.add_argument('--time_budget_min', type=float, default=None,
                   help='start no new run after this many minutes; write a partial report. Finished runs are '
                        'kept, so the same command continues the study (e.g. one GPU window at a time)')
    p.add_argument('--done', nargs='+', default=[], metavar='RUNS_JSONL',
                   help="runs.jsonl of earlier calls: runs recorded there with the same settings, on the same kind of "
                        "device, are reused (a selection's: from the same teacher, where it is known)")
    p.add_argument('--teachers', default=None, metavar='DIR',
                   help='teacher weights, DIR/<family>.pth: a family whose file is there takes it as its teacher '
                        '(no pretraining); a teacher pretrained here is written there (fp16 weights) and used, so '
                        'that later calls carry the one teacher instead of training another')
    p.add_argument('--only_teachers', action='store_true',
                   help='with --teachers: pretrain (or find) each family\'s teacher and stop; no student runs')
    p.add_argument('--subprocess', action='store_true',
                   help='run main.py and weight_selection.py in fresh interpreters (default: in this process, '
                        'which saves the start-up of each of the ~100 runs)')
    p.add_argument('--trust_checkpoint', type=utils.str2bool, default=False,
                   help='fully unpickle a --dinov2 or --teachers file that holds Python objects besides tensors '
                        '(can run code: only for files you trust); passed on to the selections')
    return p.parse_args(argv)


class OutOfTime(Exception):
    """--time_budget_min is spent: no new run starts."""


class Study:
    def __init__(self, args, out):
        self.args, self.out, self.commands, self.records, self.lr_records = args, out, [], [], []
        self.python = sys.executable
        self.start = time.time()
        self.ran_on = ran_on(args.device)  # each record of this call says where and with what it ran
        self.done, self.used = {}, set()
        for path in args.done:
            for r in read_records(path):
                key = run_key(r)
                if key not in self.done:
                    self.done[key] = r
                elif self.done[key] != r:  # one run trained twice (two calls sent before merging the first)
                    print(f"note: --done holds two records of one run ({r['family']}, {r['per_class']} per class, "
                          f"{r['init']}, seed {r['seed']}, {r['split']}); kept the first given, not the one in "
                          f"{path}", flush=True)

    def settings(self):
        return {name: value(self.args) for name, value in SETTINGS.items()}

    def measured(self, fields, measure):
        """The record of the run `fields` describe: reused from --done, else measure() (which trains). It is
        added to the study's records, and runs.jsonl is written again at once: a call killed later keeps it.
        A selection's teacher is part of its run: where the teacher is known before the run (carried with
        --teachers, or trained earlier in this call), only a record of that teacher is reused; where it is not
        (fields' teacher_weights_sha256 is ANY_TEACHER), a record of any teacher is, so that a call whose runs
        are all recorded trains no teacher (the report keeps each teacher's runs in rows of their own)."""
        found = self.done_key({**fields, **self.settings(), 'device': self.ran_on['device']})
        if found is not None:
            self.used.add(found)
            r = self.done[found]
        else:
            r = {**fields, **self.settings(), **measure()}  # measure() names the teacher it used
        (self.lr_records if r['split'] == 'validation' else self.records).append(r)
        self.save()
        return r

    def done_key(self, r):
        """The key of r's record in --done, or None."""
        if r.get('teacher_weights_sha256') != ANY_TEACHER:
            key = run_key(r)
            return key if key in self.done else None
        return next((key for key, d in self.done.items() if d.get('teacher_weights_sha256')
                     and run_key({**r, 'teacher_weights_sha256': d['teacher_weights_sha256']}) == key), None)

    def earlier(self):
        """The --done records this call's grid did not ask for (other parts of the study, other settings)."""
        return [r for key, r in self.done.items() if key not in self.used]

    def save(self):
        """runs.jsonl: this call's records, then every other --done record unchanged, so that passing it as
        --done to the next call loses nothing."""
        lines = [json.dumps(r) + '\n' for r in self.lr_records + self.records + self.earlier()]
        os.makedirs(self.out, exist_ok=True)  # made here, not at the start: a call that stops on a mistake leaves none
        utils.atomic_write(os.path.join(self.out, 'runs.jsonl'), lambda f: f.writelines(lines), binary=False)

    def run(self, cmd):
        budget = self.args.time_budget_min
        if budget is not None and time.time() - self.start > budget * 60:
            raise OutOfTime()
        self.commands.append(shlex.join(cmd))
        print('+ ' + shlex.join(cmd), flush=True)
        script = os.path.basename(cmd[1])
        if not self.args.subprocess and script in ('main.py', 'weight_selection.py'):
            # the same CLI entry point in this process: no interpreter start-up per run
            import contextlib
            import io
            module = __import__(script[:-3])
            quiet = contextlib.redirect_stdout(io.StringIO()) if self.args.smoke else contextlib.nullcontext()
            with quiet:
                module.main(cmd[2:])
            return
        subprocess.run(cmd, check=True, cwd=HERE, stdout=subprocess.DEVNULL if self.args.smoke else None)

    def imagefolder(self, dest, classes, per_class_train=None, per_class_test=None):
        if os.path.isdir(os.path.join(dest, 'train')):
            return dest
        cmd = [self.python, self.args.make_imagefolder, dest, '--classes', classes]
        if per_class_train:
            cmd += ['--per-class-train', str(per_class_train)]
        if per_class_test:
            cmd += ['--per-class-test', str(per_class_test)]
        self.run(cmd)
        return dest

    def train(self, out, model, model_kwargs, data, epochs, seed, blr, extra=(), input_size=32,
              checkpoints=('--save_ckpt', 'false'), eval_freq=None):
        a = self.args
        cmd = [self.python, os.path.join(HERE, 'main.py'), '--model', model, '--model_kwargs', json.dumps(model_kwargs),
               '--input_size', str(input_size), '--data_set', 'image_folder', '--data_path', data,
               '--epochs', str(epochs), '--warmup_epochs', str(max(1, epochs // 5)),
               '--batch_size', str(a.batch_size),
               '--blr', str(blr),
               '--drop_path', '0.0' if 'vit' in model else '0.1', '--num_workers', str(a.num_workers), '--device', a.device,
               '--use_amp', 'true', '--seed', str(seed), '--output_dir', out, *checkpoints,
               '--print_freq', '1000', '--eval_freq', str(eval_freq or a.eval_freq), *extra]
        log = read_log(out)
        if log or os.path.isfile(os.path.join(out, 'config.yaml')):  # started by an earlier call with this --out
            check_same_run(out, cmd[2:])
        if log and log[-1].get('epoch') == epochs - 1:
            return log
        self.run(cmd)  # not run yet, or not finished (a call killed mid-run, say): main.py resumes it
        return read_log(out)

    def select(self, out, teacher, teacher_kwargs, ckpt, student, student_kwargs, layers, elements, seed=0):
        if not os.path.isfile(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            self.run([self.python, os.path.join(HERE, 'weight_selection.py'), '--teacher', teacher,
                      '--teacher_checkpoint', ckpt, '--teacher_kwargs', json.dumps(teacher_kwargs),
                      '--student', student, '--student_kwargs', json.dumps(student_kwargs),
                      '--layer_selection', layers, '--element_selection', elements, '--seed', str(seed),
                      '--output', out, '--quiet', *(['--trust_checkpoint', 'true'] if self.args.trust_checkpoint
                                                    else [])])
        return out


def read_jsonl(path):
    return utils.read_jsonl(path, 'a runs.jsonl or log.txt holds one JSON object per line')


def read_records(path):
    """A --done file's records: runs.jsonl of earlier calls, each a JSON object that names its run."""
    if not os.path.isfile(path):
        raise utils.UserError(f'--done {path}: file not found')
    records = read_jsonl(path)
    for number, r in enumerate(records, 1):
        if not isinstance(r, dict) or not {'family', 'split'} <= set(r):
            raise utils.UserError(f'--done {path}: record {number} is not a run of this study (no family and split); '
                                  f'pass the runs.jsonl of an earlier call')
    return records


# What makes two runs the same run: its own fields (the teacher of a selection: the DINOv2 checkpoint's file hash,
# or a pretrained teacher's weights hash) and the settings every run of the study shares; the rest of a record is
# what was measured.
RUN_FIELDS = ('split', 'family', 'per_class', 'val_per_class', 'init', 'seed', 'blr', 'epochs', 'teacher_file_sha256',
              'teacher_weights_sha256')
ANY_TEACHER = '*'  # a selection's teacher, not known before its run: Study.measured takes a record of any
SETTINGS = {
    'batch_size': lambda a: a.batch_size,
    'test_per_class': lambda a: a.per_class_test or 1000,
    'teacher_epochs': lambda a: a.teacher_epochs,  # the teachers pretrained here
    'source': lambda a: a.source,                  # None: the CIFAR-10 source classes
    'eval_freq': lambda a: a.eval_freq,
    'smoke': lambda a: a.smoke,
}


def run_key(r):
    """The fields that name a run, its settings, and the kind of device it ran on: a CPU trains in float32 and a
    GPU in bf16, so a record of one is never reused for the other (GPUs of another model are)."""
    return (*(json.dumps(r.get(k), sort_keys=True) for k in (*RUN_FIELDS, *SETTINGS)), device_kind(r))


def device_kind(r):
    """'cpu' or 'gpu' for a record's device (None for a record without one)."""
    return None if r.get('device') is None else 'cpu' if r['device'] == 'cpu' else 'gpu'


def check_same_run(out, flags):
    """A run found in `out` (finished, or to be resumed) is taken only if it ran with these main.py flags (its
    config.yaml): another --batch_size, --eval_freq, --device or epoch count given to the same --out would
    otherwise be reported with its numbers, or continued under the new ones. Paths compare as the folders they
    name (a study folder moved or given relative); --output_dir is `out` itself."""
    import yaml
    import main
    given = vars(main.parse_args(flags))
    try:
        with open(os.path.join(out, 'config.yaml')) as f:
            ran = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        ran = None
    def compared(flag, value):
        return os.path.realpath(value) if flag == 'data_path' and value else value
    names = [f[2:] for f in flags if f.startswith('--') and f[2:] not in ('num_workers', 'print_freq', 'output_dir')]
    differ = ['no readable config.yaml'] if ran is None else [
        f'--{k} {ran.get(k)} (now {given[k]})' for k in names if compared(k, ran.get(k)) != compared(k, given[k])]
    if differ:
        raise utils.UserError(f'{out} holds a run of other settings ({", ".join(differ)}); pass another --out, or '
                              f'remove that folder to train it again')


def read_log(folder):
    path = os.path.join(folder, 'log.txt')
    return read_jsonl(path) if os.path.isfile(path) else []


def main(argv=None):
    args = get_args(argv)
    if args.smoke:
        args.subsets, args.seeds, args.teacher_epochs, args.student_epochs = [4], [0], 1, [1, 1]
        args.per_class_test = 4
        args.batch_size, args.device, args.num_workers = 4, 'cpu', 0
        args.val_per_class = 1
    check_args(args)
    # the teachers train with --deterministic true in this process, maybe after students that did not: PyTorch
    # reads the cuBLAS workspace setting once, at its first cuBLAS call, so it is set before any run
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    out = os.path.abspath(args.out)
    study = Study(args, out)  # reads --done; OUT is made by the first thing written into it (Study.save, a run)
    try:
        run_study(args, out, study)
    except OutOfTime:
        write_report(out, study, time.time() - study.start, args, partial=True)
        print(f'time budget of {args.time_budget_min} min spent: partial report written; run the same command '
              f'again to continue (finished runs are kept)')
        return
    write_report(out, study, time.time() - study.start, args)


# The target subsets are cut from CIFAR-10, which has these images per class: a larger subset would silently be
# the whole split under another name.
CIFAR10_PER_CLASS = {'train': 5000, 'test': 1000}
DINOV2 = 'vit_small_patch14_dinov2'  # timm's name of the --dinov2 teacher
DINOV2_PATCH = 14


def check_args(args):
    """The mistakes a run, a subset or a selection would find only after data, teachers or students were written:
    one line, before anything is."""
    import config
    for n in args.subsets:
        if not 1 <= n <= CIFAR10_PER_CLASS['train']:
            raise utils.UserError(f'--subsets {n}: give 1 to {CIFAR10_PER_CLASS["train"]:,} training images per '
                                  f'target class (CIFAR-10 has {CIFAR10_PER_CLASS["train"]:,})')
    if args.per_class_test is not None and not 1 <= args.per_class_test <= CIFAR10_PER_CLASS['test']:
        raise utils.UserError(f'--per_class_test {args.per_class_test}: give 1 to {CIFAR10_PER_CLASS["test"]:,} '
                              f'test images per target class, or leave the flag out for all of them')
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        raise utils.UserError(f'--time_budget_min {args.time_budget_min:g} must be positive (minutes after which no '
                              f'new run starts); leave it out for no limit')
    for flag, value, least in (('--eval_freq', args.eval_freq, 1), ('--batch_size', args.batch_size, 1),
                               ('--num_workers', args.num_workers, 0), ('--teacher_epochs', args.teacher_epochs, 1),
                               ('--student_epochs', min(args.student_epochs), 1)):
        if value < least:  # main.py's checks, made here: its first run would find them after the data was made
            raise utils.UserError(f'{flag} {value} must be {least} or more')
    for blr in ([args.blr] if args.blr is not None else []) + (args.lr_search or []):
        if blr <= 0:
            flag = '--blr' if args.blr is not None else '--lr_search'
            raise utils.UserError(f'{flag} {blr:g}: a base lr must be positive')
    if config.device_type(args.device) not in ('cpu', 'cuda'):
        raise utils.UserError(f'--device {args.device}: pass cuda, cuda:N or cpu')
    if args.lr_search and not 0 < args.val_per_class < min(args.subsets):
        raise utils.UserError(f'--val_per_class {args.val_per_class} must hold out at least one and leave at least '
                              f'one training image of each class of the smallest subset ({min(args.subsets)} per '
                              f'class)')
    if args.only_teachers and not args.teachers:
        raise utils.UserError('--only_teachers writes the teachers to --teachers DIR; pass it')
    if not (args.families or args.dinov2 or args.done):
        raise utils.UserError('nothing to run: --families with no family and no --dinov2; pass a family, '
                              '--dinov2 CKPT (the DINOv2 part alone), or --done RUNS.jsonl (only write their report)')
    if args.target:
        raise utils.UserError('--target subsets are made from CIFAR-10 here; pass two ImageFolders with '
                              '--source and leave --target out, or subsample your target yourself')
    if (args.families or args.dinov2) and not args.source and not os.path.isfile(args.make_imagefolder):
        raise utils.UserError(f'{args.make_imagefolder} not found; pass --make_imagefolder (the script beside '
                              f'the CIFAR-10 npz in ../shared) or --source FOLDER')
    for flag, folder in (('--out', args.out), ('--teachers', args.teachers)):  # a teacher is written hours in
        if folder:
            utils.check_folder_writable(folder, flag)
    if args.dinov2:  # before hours of teachers and students
        check_dinov2(args)


def check_dinov2(args):
    """The --dinov2 file read as its selection will read it (weights only, unless --trust_checkpoint) and fitted
    to the ViT-S/14, and its students' input size: refused at the selection, the study would stop after the
    random-init students had trained."""
    size = args.dinov2_input_size
    if size < DINOV2_PATCH or size % DINOV2_PATCH:
        below = size // DINOV2_PATCH * DINOV2_PATCH  # the nearest multiples, at least one patch
        near = f'{below} or {below + DINOV2_PATCH}' if below >= DINOV2_PATCH else f'{DINOV2_PATCH} or {2 * DINOV2_PATCH}'
        raise utils.UserError(f'--dinov2_input_size {size} is not a multiple of the patch size {DINOV2_PATCH}; use '
                              f'e.g. {near}')
    if not os.path.isfile(args.dinov2):
        raise utils.UserError(f'--dinov2 {args.dinov2}: file not found (the DINOv2 ViT-S/14 checkpoint, e.g. '
                              f'../shared/teachers/dinov2_vits14_imgfocus_fp16.pt)')
    import torch
    from models import io
    state = io.read_state_dict(args.dinov2, trust=args.trust_checkpoint)
    with torch.device('meta'):  # structure only
        model = io.create_model(DINOV2, '--dinov2')
    try:
        io.fit_checkpoint(state, model, DINOV2, args.dinov2)
    except utils.UserError:  # its message names weight_selection.py's flags: say it in this CLI's
        layout = io.layout_of(model)
        found = io.mismatch(state, model.state_dict(), lambda key: io.is_classifier(key, layout))
        raise utils.UserError(f'--dinov2 {args.dinov2} is not a DINOv2 ViT-S/14 checkpoint (timm {DINOV2}): '
                              f'{io.describe_mismatch(*found)}') from None


def carve_validation(folder, per_class):
    """FOLDER/train split into a new ImageFolder beside it: the last PER_CLASS images of each class (in file
    order) become its test/ (the validation set), the others its train/. FOLDER/test is not read."""
    dest = f'{folder}_val{per_class}'
    if os.path.isdir(os.path.join(dest, 'test')):
        return dest
    train = os.path.join(folder, 'train')
    for cls in sorted(os.listdir(train)):
        files = sorted(os.listdir(os.path.join(train, cls)))
        if len(files) <= per_class:
            raise utils.UserError(f'--val_per_class {per_class} leaves no training image of class {cls} '
                                  f'({len(files)} in {train}); pass a smaller --val_per_class or larger --subsets')
        for split, names in (('train', files[:-per_class]), ('test', files[-per_class:])):
            os.makedirs(os.path.join(dest + '.tmp', split, cls), exist_ok=True)
            for name in names:
                shutil.copyfile(os.path.join(train, cls, name), os.path.join(dest + '.tmp', split, cls, name))
    os.replace(dest + '.tmp', dest)  # a half-written split is never taken for a finished one
    return dest


def choose_blr(args, out, study, model_name, student, s_kwargs, target, n, epochs, input_size=32):
    """The one base lr per 512 images for every init of this model and subset size: --blr or the paper's by
    default; with --lr_search, the candidate with random init's highest mean final validation accuracy.
    target(): the subset's ImageFolder, made when a run first needs it."""
    if not args.lr_search:
        return args.blr or BLR['vit' if 'vit' in student else 'convnext']
    by_blr = {}
    for blr in args.lr_search:
        for seed in args.seeds:
            run_dir = os.path.join(out, 'lr_search', model_name.replace(' ', '_').replace('/', '_').replace('@', ''),
                                   f'n{n}', f'blr{blr:g}', f'seed{seed}')

            def measure():  # the split is carved only when a run needs it
                val_data = carve_validation(target(), args.val_per_class)
                log = study.train(run_dir, student, s_kwargs, val_data, epochs, seed, blr, input_size=input_size)
                return measurement(log, os.path.relpath(run_dir, out), study.ran_on)
            r = study.measured(run_fields(model_name, n, 'random init', seed, epochs, blr, split='validation',
                                          val_per_class=args.val_per_class), measure)
            by_blr.setdefault(blr, []).append(r)
    return chosen_blr(by_blr)


def chosen_blr(by_blr):
    """The candidate whose runs have the highest mean final accuracy; the first of equals, in the order given."""
    return max(by_blr, key=lambda blr: statistics.mean(r['final_acc1'] for r in by_blr[blr]))


class Teacher:
    """A family's teacher: --teachers DIR/<family>.pth where it is there (checked, and its weights hashed, when
    the study starts); else pretrained on the source task the first time a selection needs it (never when every
    student of the family was reused from --done), and, with --teachers, written there as fp16 weights and taken
    from there, as every later call that carries it will. weights_sha256 names it once it is known."""

    def __init__(self, study, family, source, out):
        self.study, self.family, self.source = study, family, source
        self.dir = os.path.join(out, 'teachers', family)
        self.ckpt = os.path.join(self.dir, 'checkpoint-best.pth')
        teachers = study.args.teachers
        self.carried = os.path.join(os.path.abspath(teachers), f'{family}.pth') if teachers else None
        self.weights_sha256 = None
        if self.carried and os.path.isfile(self.carried):
            import torch
            from models import io
            # read once (checked and hashed), as the project reads checkpoints: a file that needs a full unpickle,
            # or a truncated one, is one line
            carried = io.torch_load(self.carried, trust=study.args.trust_checkpoint)
            if not (isinstance(carried, dict) and 'teacher_settings' in carried
                    and isinstance(carried.get('model'), dict)
                    and all(torch.is_tensor(v) for v in carried['model'].values())):
                raise utils.UserError(f'--teachers {self.carried} is not a teacher this study wrote (weights under '
                                      f'"model", settings under "teacher_settings"); remove it to train one')
            made = carried['teacher_settings']
            if made != self.settings():
                raise utils.UserError(f'--teachers {self.carried} was trained with {made}, this study asks for '
                                      f'{self.settings()}; pass the teacher trained with these settings, or remove it '
                                      f'to train one')
            self.ckpt = self.carried
            self.weights_sha256 = state_sha256(carried['model'])

    def settings(self):
        """What the teacher's training depended on (its best epoch is picked on the source test images, and a
        CPU trains in float32, a GPU in bf16): a carried teacher must have been trained so."""
        a = self.study.args
        return {'family': self.family, 'teacher_epochs': a.teacher_epochs, 'batch_size': a.batch_size,
                'source': a.source, 'test_per_class': a.per_class_test or 1000, 'smoke': a.smoke,
                'device': device_kind(self.study.ran_on), 'deterministic': True}

    def sha256_or_any(self):
        """What names the teacher of a selection's run before it runs: its weights hash, or ANY_TEACHER."""
        return self.weights_sha256 or ANY_TEACHER

    def checkpoint(self):
        """The teacher's checkpoint file, pretrained here the first time it is asked for where none was carried."""
        if self.weights_sha256 is None:
            a = self.study.args
            teacher, t_kwargs = MODELS[self.family][:2]
            # the best checkpoint (for selection) and the last epoch's, not one per epoch; deterministic, so that
            # a session that has lost the teacher trains the same weights again on the same GPU model and software
            # (its hash says whether it did), and the family's recorded selections stay its own
            self.study.train(self.dir, teacher, t_kwargs, self.source(), a.teacher_epochs, 0, BLR[self.family],
                             extra=('--deterministic', 'true'),
                             checkpoints=('--save_ckpt_freq', str(a.teacher_epochs), '--save_ckpt_num', '1'),
                             eval_freq=1)
            if self.carried:
                export_weights(self.ckpt, self.carried, self.settings())
                self.ckpt = self.carried
            self.weights_sha256 = weights_sha256(self.ckpt)
        return self.ckpt


def export_weights(ckpt, dest, settings):
    """A training checkpoint's model weights alone, in fp16 ({'model': ...}, as main.py's checkpoints hold them),
    with the settings they were trained with: a ViT-S/4 in 41 MiB and a ConvNeXt-T in 53 MiB, which a device call
    (64 MiB) can carry."""
    import torch
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['model']
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    utils.atomic_write(dest, lambda f: torch.save({'model': half, 'teacher_settings': settings}, f))


def weights_sha256(path):
    """A checkpoint's weights (names and bytes) hashed, not the file, which also holds its run's flags and
    folder: two trainings that gave the same weights give the same hash."""
    import torch
    return state_sha256(torch.load(path, map_location='cpu', weights_only=True)['model'])


def state_sha256(state):
    """weights_sha256 of a state dict already in memory."""
    import hashlib
    import torch
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_study(args, out, study):
    per_test = args.per_class_test
    test_tag = f'_test{per_test}' if per_test else ''
    source_dir = []

    def source():  # only the teachers pretrained here need the source task, and only when they train
        if not source_dir:
            source_dir.append(args.source or study.imagefolder(
                os.path.join(out, 'data', 'source' + ('_smoke' if args.smoke else '') + test_tag), SOURCE,
                8 if args.smoke else None, per_test))
        return source_dir[0]

    def target(n):  # made when a run first needs it, not when every run is reused from --done
        return study.imagefolder(os.path.join(out, 'data', f'target_{n}{test_tag}'), TARGET, n, per_test)
    teachers = {family: Teacher(study, family, source, out) for family in args.families}  # carried ones checked now
    for family, teacher in teachers.items():
        teacher_name, t_kwargs, student, s_kwargs = MODELS[family]
        if args.only_teachers:
            teacher.checkpoint()
            print(f'teacher of {family}: {teacher.ckpt} (weights sha256 {teacher.weights_sha256})', flush=True)
            continue
        inits = {'random init': None}
        for elements in ELEMENTS:
            inits[f'ws {elements}'] = ('first', elements)
        if family in LAYERS_DIFFER:
            inits['ws uniform, uniform layers'] = ('uniform', 'uniform')
        for i, n in enumerate(sorted(args.subsets)):
            epochs = args.student_epochs[0] if i == 0 else args.student_epochs[1]
            blr = choose_blr(args, out, study, family, student, s_kwargs, lambda: target(n), n, epochs)
            for name, sel in inits.items():
                for seed in args.seeds:
                    def measure():
                        folder, extra, more = name.replace(' ', '_').replace(',', ''), [], {}
                        if sel is not None:  # its files name the teacher: another's are never taken for its own
                            layers, elements = sel
                            ckpt = teacher.checkpoint()
                            tag = f'teacher{teacher.weights_sha256[:8]}'
                            folder = f'{folder}_{tag}'
                            ws_file = os.path.join(out, 'ws', f'{family}_{layers}_{elements}_s{seed}_{tag}.pth')
                            extra = ['--initialize', study.select(ws_file, teacher_name, t_kwargs, ckpt, student,
                                                                  s_kwargs, layers, elements, seed)]
                            more = {'teacher_weights_sha256': teacher.weights_sha256}
                        run_dir = os.path.join(out, 'students', family + test_tag, f'n{n}', f'blr{blr:g}', folder,
                                               f'seed{seed}')
                        log = study.train(run_dir, student, s_kwargs, target(n), epochs, seed, blr, extra)
                        return {**measurement(log, os.path.relpath(run_dir, out), study.ran_on), **more}
                    teacher_sha256 = None if sel is None else teacher.sha256_or_any()
                    study.measured(run_fields(family, n, name, seed, epochs, blr,
                                              teacher_weights_sha256=teacher_sha256), measure)
    if args.dinov2 and not args.only_teachers:
        size = args.dinov2_input_size
        s_kwargs = {'img_size': size}
        family = f'dinov2 vit_tiny/14 @{size}'
        dinov2_sha256 = utils.sha256_file(args.dinov2)  # part of its selections' key: another file, other runs

        def ws_file():
            return study.select(os.path.join(out, 'ws', f'dinov2_vit_tiny_14_{size}px_teacher{dinov2_sha256[:8]}.pth'),
                                'vit_small_patch14_dinov2',
                                {}, os.path.abspath(args.dinov2), 'vit_tiny_patch14_dinov2', s_kwargs, 'first', 'uniform')
        for i, n in enumerate(sorted(args.subsets)):
            epochs = args.student_epochs[0] if i == 0 else args.student_epochs[1]
            blr = choose_blr(args, out, study, family, 'vit_tiny_patch14_dinov2', s_kwargs, lambda: target(n), n,
                             epochs, size)
            for name in ('random init', 'ws uniform (DINOv2)'):
                for seed in args.seeds:
                    run_dir = os.path.join(out, 'students', f'dinov2_{size}px{test_tag}', f'n{n}', f'blr{blr:g}',
                                           'random' if name == 'random init' else f'ws_teacher{dinov2_sha256[:8]}',
                                           f'seed{seed}')

                    def measure():
                        extra = [] if name == 'random init' else ['--initialize', ws_file()]
                        log = study.train(run_dir, 'vit_tiny_patch14_dinov2', s_kwargs, target(n), epochs, seed, blr,
                                          extra, input_size=size)
                        return measurement(log, os.path.relpath(run_dir, out), study.ran_on)
                    teacher_file = None if name == 'random init' else dinov2_sha256
                    study.measured(run_fields(family, n, name, seed, epochs, blr, teacher_file_sha256=teacher_file),
                                   measure)


def run_fields(family, n, init, seed, epochs, blr, split='test', val_per_class=None, teacher_file_sha256=None,
               teacher_weights_sha256=None):
    """What names a run (RUN_FIELDS): with Study.settings, the key under which --done finds it."""
    return {'split': split, 'family': family, 'per_class': n, 'val_per_class': val_per_class, 'init': init,
            'seed': seed, 'blr': blr, 'epochs': epochs, 'teacher_file_sha256': teacher_file_sha256,
            'teacher_weights_sha256': teacher_weights_sha256}


def ran_on(device):
    """{'device': the GPU's name or 'cpu', 'code': the code version, 'torch', 'timm': their versions} of this
    process."""
    import torch
    on_gpu = device.startswith('cuda') and torch.cuda.is_available()
    return {'device': torch.cuda.get_device_name() if on_gpu else 'cpu', 'code': utils.code_version(),
            **{k: v for k, v in utils.versions().items() if k in ('torch', 'timm')}}


def measurement(log, run_dir, ran_on):
    """What a run measured (its final and best accuracy on its split), and where and with what it ran."""
    return {'final_acc1': log[-1]['test_acc1'], 'best_acc1': max(r['test_acc1'] for r in log if 'test_acc1' in r),
            'train_minutes': round(sum(r.get('epoch_seconds', 0) for r in log) / 60, 2), **ran_on,
            'run_dir': run_dir}


def mean_std(values):
    if not values:
        return '-'
    return f'{statistics.mean(values):.1f}' + (f' ± {statistics.stdev(values):.1f}' if len(values) > 1 else '')


def report_rows(records):
    """One table row per (model, subset, init, kind of device): the base lr, final and best accuracy, and the
    paired differences of the final accuracy from random init's run of the same seed on the same kind of device.
    Where the records come from a CPU and a GPU, each row names its devices: their runs are never averaged
    together (a CPU trains in float32, a GPU in bf16)."""
    teachers = teachers_per_family(records, teacher_of)  # a family's several teachers: rows of their own
    groups, random_final = {}, {}
    for r in records:
        recipe = (r['family'], r['per_class'], r['epochs'], r['blr'], device_kind(r))
        sha = teacher_of(r)
        init = r['init'] + (f' (teacher {sha[:8]})' if sha and len(teachers[r['family']]) > 1 else '')
        groups.setdefault((*recipe, init), []).append(r)
        if r['init'] == 'random init':
            random_final[(*recipe, r['seed'])] = r['final_acc1']
    rows = []
    for (*recipe, init), runs in groups.items():  # paired with random init of the same recipe and device kind
        family, n, epochs, blr, _ = recipe
        paired = [r['final_acc1'] - random_final[(*recipe, r['seed'])] for r in runs
                  if init != 'random init' and (*recipe, r['seed']) in random_final]
        vs_random = '' if init == 'random init' else mean_std(paired) + (
            f' (n={len(paired)}: the seeds with a random-init run)' if paired and len(paired) != len(runs) else '')
        rows.append(f"| {model_label(family, runs, records)} | {n} | {epochs} | {blr:g} | {init} | "
                    f"{mean_std([r['final_acc1'] for r in runs])} | {vs_random} | "
                    f"{mean_std([r['best_acc1'] for r in runs])} | {len(runs)} |")
    return rows


def teachers_per_family(records, teacher):
    """{family: the teachers its selections came from, as `teacher(record)` names them (None: no teacher)}."""
    teachers = {}
    for r in records:
        if teacher(r):
            teachers.setdefault(r['family'], set()).add(teacher(r))
    return teachers


def teacher_of(r):
    """A selection's teacher: its pretrained teacher's weights hash or its teacher file's hash (DINOv2)."""
    return r.get('teacher_weights_sha256') or r.get('teacher_file_sha256')


def model_label(family, runs, records):
    """The model's name, and, where the report mixes a CPU's and a GPU's records, the devices of these runs."""
    if len({device_kind(r) for r in records}) < 2:
        return family
    return f"{family} ({', '.join(sorted({str(r.get('device')) for r in runs}))})"


def lr_search_rows(lr_records, batch_size, records=()):
    """One row per (model, subset, candidate) of --lr_search: random init's validation accuracy. In bold, the
    candidate that the test `records` of that model and subset trained with; where none did, the one chosen here
    (highest mean final accuracy, the first of equals). A † marks the chosen one where the runs used another: records
    merged from calls of other seeds can move the highest mean away from what each call chose."""
    used = {}
    for r in records:
        used.setdefault((r['family'], r['per_class'], r['epochs'], device_kind(r)), set()).add(r['blr'])
    groups = {}
    for r in lr_records:
        groups.setdefault((r['family'], r['per_class'], r['val_per_class'], r['epochs'], device_kind(r)), {}).setdefault(
            r['blr'], []).append(r)
    rows = []
    for (family, n, val, epochs, kind), by_blr in groups.items():
        chosen = chosen_blr(by_blr)
        bold = used.get((family, n, epochs, kind), {chosen})
        for blr, runs in by_blr.items():
            mark = '**' if blr in bold else ''
            dagger = '†' if blr == chosen and blr not in bold else ''
            rows.append(f"| {model_label(family, runs, lr_records)} | {n - val} + {val} | {epochs} | {mark}{blr:g}{mark}{dagger} | {blr * batch_size / 512:.3g} | "
                        f"{mean_std([r['final_acc1'] for r in runs])} | {mean_std([r['best_acc1'] for r in runs])} | "
                        f"{len(runs)} |")
    return rows


def seeds_of(records):
    """The seeds the records ran, as the report names them."""
    return ', '.join(map(str, sorted({r['seed'] for r in records}))) or 'none'


def provenance(runs, reused):
    """Where the records came from, when some were reused from --done or the selections of a family came from
    more than one teacher training."""
    if not reused:
        return ''
    devices = sorted({r.get('device', '?') for r in runs})
    trained = teachers_per_family(runs, lambda r: r.get('teacher_weights_sha256'))
    several = [f'{family}: {len(shas)}' for family, shas in trained.items() if len(shas) > 1]
    codes = sorted({r.get('code', '?') for r in runs})
    return (f' {reused} of the {len(runs)} runs came from --done (earlier calls, or studies run beside this one); '
            f'the runs ran on {", ".join(devices)} (code {", ".join(codes)}; {recorded_versions(runs)}), '
            f'{sum(r.get("train_minutes", 0) for r in runs):.0f} min of training and evaluation in all.'
            + (f' Teacher trainings behind the selections, per family: {", ".join(several)}.' if several else ''))


def recorded_versions(records):
    """The torch and timm versions that the records name (records of before they were recorded: 'unrecorded')."""
    return '; '.join(f"{k} {', '.join(sorted({str(r.get(k, 'unrecorded')) for r in records}))}"
                     for k in ('torch', 'timm'))


def write_report(out, study, seconds, args, partial=False):
    study.save()
    # the report: this call's runs, and those of earlier calls with the same settings (other parts of the study),
    # so that the last call's report is the whole study's
    settings = study.settings()
    earlier = [r for r in study.earlier() if all(r.get(k) == v for k, v in settings.items())]
    lr_records = study.lr_records + [r for r in earlier if r['split'] == 'validation']
    records = study.records + [r for r in earlier if r['split'] == 'test']
    lines = ['# CIFAR-10 transfer study', '',
             f'Source task: {SOURCE}; target task: {TARGET}. Test acc@1 (%) on '
             + (f'{5 * args.per_class_test:,}' if args.per_class_test else 'all 5,000')
             + ' target test images at the final epoch and at the best one (picked on the test set'
             + (f', among the epochs evaluated: every {args.eval_freq} and the last' if args.eval_freq > 1 else '')
             + f'), mean ± std over seeds {seeds_of(records)}; "vs random" is the mean ± std of the per-seed differences '
             f'from random init (same seed: same data order and augmentation).', '',
             (f"Device: {study.ran_on['device']}; " + ', '.join(f'{k} {v}' for k, v in utils.versions().items())
              + f'; wall time {seconds / 60:.1f} min.' if study.commands else
              'No run in this call: a report of earlier records.') + provenance(lr_records + records, len(study.used) + len(earlier))
             + (' SMOKE RUN: a few images and one epoch; the numbers mean nothing.' if args.smoke else '')
             + (' PARTIAL: the time budget ran out; the same command continues the study.' if partial else ''), '',
             '| model | images per class | epochs | base lr / 512 | init | final acc@1 | final vs random | best acc@1 | n |',
             '|---|---|---|---|---|---|---|---|---|']
    lines += report_rows(records)
    other = len(study.earlier()) - len(earlier)
    if other:
        lines += ['', f'runs.jsonl also keeps {other} record(s) of --done with other settings, not reported here.']
    if lr_records:
        lines += ['', '## Learning rate, chosen on a validation split', '',
                  f'Random init only, trained on the subset less its last {args.val_per_class} images per class and '
                  f'evaluated on those held-out images (never the test set); acc@1 (%) mean ± std over seeds '
                  f'{seeds_of(lr_records)}. In bold, the candidate every init above trained with: the highest mean '
                  f'final accuracy over the seeds of the call that chose it (a †: the highest over all seeds here, '
                  f'where it differs).', '',
                  '| model | train + validation images per class | epochs | base lr / 512 | lr at batch '
                  f'{args.batch_size} | final acc@1 | best acc@1 | n |',
                  '|---|---|---|---|---|---|---|---|']
        lines += lr_search_rows(lr_records, args.batch_size, records)
    if study.commands:
        lines += ['', '## Commands', '', 'Of this call' + (' (the runs reused from --done ran in earlier calls, with '
                                                           'the same settings)' if study.used or earlier else '') + ':',
                  '', '```'] + study.commands + ['```', '']
    else:  # a merge of records (gpu_study.sh): the commands are in the logs of the calls that ran them
        lines += ['', 'Every run above came from --done: their commands are in the logs of the calls that ran them '
                  '(scripts/gpu_study.sh returns them as studyI.log).', '']
    with open(os.path.join(out, 'transfer_study.md'), 'w') as f:
        f.write('\n'.join(lines))
    print(f'wrote {os.path.join(out, "transfer_study.md")} ({len(records)} runs, {seconds / 60:.1f} min)')


if __name__ == '__main__':
    utils.run_cli(main)  # a mistake a run finds (in this process) is one line, as in the CLIs
