"""The whole selection: settings checked, the teacher's config and the student's, the plan, then the student
folder and its selection.json; and the command line's Hugging Face branch."""
import json
import os
import sys

import utils
from utils import UserError
from weight_selection import ELEMENT_SELECTIONS

from .axes import IndexChooser, TensorwiseSelector, axis_indices, tensorwise_axes
from .families import family_of, widths_of
from .plan import check_layers_whole, plan_tensors, produce
from .student import check_not_wider, dense_layers, layer_map_for, read_overrides, student_config
from .teacher import TeacherShards, read_config, resolve_teacher
from .write import check_output, parse_size, write_output


# Element selections that choose some axis per tensor, from its key or its values (the rest: one index set per axis)
TENSORWISE = ('random_inconsistent', 'l1', 'l1_consistent', 'magnitude')
HEAD_SELECTIONS = ('auto', 'heads', 'dims')
EXCLUDABLE = ('embed', 'attn', 'mlp', 'norm')


def select_hf(teacher, student_overrides, output, layer_selection='first', element_selection='uniform', seed=0,
              exclude=(), head_selection='auto', max_shard_size='5GB'):
    """Write a student folder (config.json, safetensors, selection.json) selected from a Hugging Face teacher
    folder (or hub id). Everything is checked before the first byte is written; the folder appears whole
    (written under a temporary name, then renamed) or not at all. Returns selection.json's content."""
    check_output(output)
    unknown = [c for c in exclude if c not in EXCLUDABLE]
    if unknown:
        raise UserError(f"unknown component to exclude '{unknown[0]}'; choose from {', '.join(EXCLUDABLE)}")
    if head_selection not in HEAD_SELECTIONS:
        raise UserError(f"--head_selection {head_selection}: choose one of {', '.join(HEAD_SELECTIONS)}")
    max_bytes = parse_size(max_shard_size)
    if element_selection not in ELEMENT_SELECTIONS:
        raise UserError(f"--element_selection {element_selection}: choose one of {', '.join(ELEMENT_SELECTIONS)}")
    tensorwise = element_selection in TENSORWISE
    if tensorwise and head_selection == 'heads':
        raise UserError(f'--head_selection heads keeps the same whole heads in every tensor, but --element_selection '
                        f'{element_selection} chooses inside each tensor; pass --head_selection dims (or auto)')
    folder = resolve_teacher(teacher)
    t_cfg = read_config(folder)
    family = family_of(t_cfg, os.path.join(folder, 'config.json'))
    overrides = student_overrides if isinstance(student_overrides, dict) else read_overrides(student_overrides)
    t = widths_of(t_cfg, family, 'teacher')  # first: every field student_config reads is there and whole
    s_cfg, layer_map = student_config(t_cfg, t, overrides, family, layer_map_for(layer_selection))
    s = widths_of(s_cfg, family, 'student')
    check_not_wider(t, s)
    head_mode = 'dims' if tensorwise else \
        head_selection if head_selection != 'auto' else ('heads' if family.rotary else 'dims')
    chooser = IndexChooser('uniform' if tensorwise else element_selection, seed)
    experts = chooser.pick(t.experts, s.experts)  # the experts kept, in order: an axis that every mode keeps whole
    axes = None if tensorwise else {**axis_indices(t, s, family, head_mode, chooser), 'experts': experts,
                                    'each_expert': experts}
    shards = TeacherShards(folder)
    try:
        check_layers_whole(shards, family, t, dense_layers(t_cfg, t.layers) if family.sparse_layers else set())
        planned, unused = plan_tensors(shards, family, t, s, axes, layer_map, experts.tolist(),
                               s_cfg.get('tie_word_embeddings', family.tied_default), set(exclude),
                               t_cfg.get('tie_word_embeddings', family.tied_default),
                               architecture_of(t_cfg, os.path.join(folder, 'config.json')))
        selector = None
        if tensorwise:  # after the plan, which checks every teacher shape against the config
            selector = TensorwiseSelector(element_selection, seed, family, t, s,
                                          tensorwise_axes(t, s, family, element_selection, shards, experts))
        report = {'meta': {
            'teacher': teacher, 'teacher_folder': os.path.abspath(folder), 'family': family.name,
            'student_config': s_cfg, 'student_overrides': overrides,
            'settings': {'layer_selection': layer_selection, 'element_selection': element_selection, 'seed': seed,
                         'exclude': list(exclude), 'head_selection': head_mode, 'max_shard_size': max_shard_size},
            'layer_map': layer_map, 'versions': utils.versions(('safetensors',))}}
        if family.has_experts:
            report['meta']['experts'] = experts.tolist()  # the teacher expert of each student expert
        if unused:  # the teacher's own output layer, which a tied student replaces with its embedding
            report['meta']['unused'] = unused
        if head_mode == 'heads':  # which teacher heads the student's heads are, in order
            report['meta']['heads'] = {'query': (axes['q'][::t.head_dim] // t.head_dim).tolist(),
                                       'key_value': (axes['kv'][::t.head_dim] // t.head_dim).tolist()}
        report['tensors'] = {p.key: {'action': action_of(p), 'source': p.source,
                                     'teacher_shape': list(p.teacher_shape), 'shape': list(p.shape)}
                             for p in planned}
        make = lambda p, std: produce(p, shards, std, seed, selector, family.norm_init)  # noqa: E731
        write_output(output, s_cfg, planned, make, shards, max_bytes, report)
    finally:
        shards.close()
    report['keys_read'] = shards.keys_read
    return report


def architecture_of(config, path):
    """The model class a config.json names first (architectures), '' when it names none."""
    names = config.get('architectures')
    if names is None:
        return ''
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f'{path}: architectures is {json.dumps(names)}; transformers writes a list of model '
                        f'classes there, e.g. ["LlamaForCausalLM"]')
    return names[0] if names else ''


def action_of(p):
    if p.source is None:
        return 'excluded'
    copied = p.shape == p.teacher_shape and not p.reordered and all(i is None for i in p.indices)
    return 'copied' if copied else 'selected'


def run(args):
    """weight_selection.py's command line with a Hugging Face teacher (see its --help)."""
    if not args.student_config:
        raise UserError(f'--teacher {args.teacher} is a Hugging Face folder: describe the student with '
                        f"--student_config '{{\"hidden_size\": ..., \"num_hidden_layers\": ...}}' "
                        f'(or a config.json file)')
    if not args.teacher or not args.output:
        raise UserError('missing --teacher or --output; e.g. --teacher HF_FOLDER --student_config '
                        "'{\"num_hidden_layers\": 4}' --output OUT_FOLDER")
    import time
    start = time.time()
    exclude = [c.strip() for c in args.exclude.split(',') if c.strip()]
    report = select_hf(args.teacher, read_overrides(args.student_config), args.output, args.layer_selection,
                       args.element_selection, args.seed, exclude, args.head_selection, args.max_shard_size)
    meta, counts = report['meta'], {}
    for entry in report['tensors'].values():
        counts[entry['action']] = counts.get(entry['action'], 0) + 1
    acts = ', '.join(f'{n} {a}' for a, n in sorted(counts.items()))
    ranking = ' (with the whole teacher once for the ranking)' if args.element_selection == 'l1_consistent' else ''
    experts = f", experts {meta['experts']}" if 'experts' in meta else ''
    if 'unused' in meta and not args.quiet:
        print(f"note: the teacher's untied {', '.join(meta['unused'])} is left out: the student ties its output "
              f'layer to its input embedding (tie_word_embeddings)', file=sys.stdout)
    print(f"{meta['family']} student <- {args.teacher} (layers {meta['layer_map']}{experts}, "
          f"{meta['settings']['element_selection']} elements, {meta['settings']['head_selection']} attention): "
          f"{acts}; read {meta['teacher_bytes_read'] / 1e6:.1f} MB of the teacher's "
          f"{meta['teacher_bytes'] / 1e6:.1f} MB{ranking}; "
          f"wrote {args.output} ({len(meta['files'])} shard(s)) in {time.time() - start:.1f}s", file=sys.stdout)
