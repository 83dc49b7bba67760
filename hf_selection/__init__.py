"""Weight selection for Hugging Face transformers checkpoints, streamed from (sharded) safetensors.

A student is described by its config.json (the teacher's config with overrides such as a smaller
hidden_size or fewer layers). Every student tensor is planned before anything is read: which teacher
tensor it comes from (layer selection), and which indices it keeps along each dimension (element
selection, one consistent index set per width). The teacher's tensors are then read one at a time,
and only the ones the student needs (a layer that layer selection drops is never read); each student
tensor is written to its output shard as soon as it is produced. Memory stays near the largest teacher
tensor, whatever the size of the model or of a shard. The paper's other variants (random selection without
consistency, Section 3.2; L1 and magnitude pruning, Table 7; and l1_consistent) choose inside each tensor
instead, from the whole teacher tensor (l1_consistent first reads the whole teacher once, a tensor at a time,
to rank the hidden width).

Supported families: LLaMA-style (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2), mixtures
of experts (mixtral, olmoe, qwen2_moe, qwen3_moe, gpt_oss: whole experts kept, the same in every layer), GPT-NeoX
(Pythia), GPT-2, BERT, and vision transformers (vit, dinov2, dinov2_with_registers: same image and patch size, every
position kept). This package needs nothing beyond the project's requirements (torch, timm, numpy): safetensors_io
parses the files, and it needs neither safetensors nor transformers (configs are JSON).

    python weight_selection.py --teacher HF_FOLDER --student_config '{"hidden_size": 1024, ...}' --output OUT

Modules, in the order a selection uses them: families (what each model type's tensors are), student (its config),
axes (which indices each axis keeps), teacher (reading the shards), plan (every student tensor decided up front,
then made), write (the student's shards), selection (select_hf, and run for the command line).
"""
from .plan import Planned
from .selection import EXCLUDABLE, HEAD_SELECTIONS, TENSORWISE, run, select_hf
from .student import read_overrides
from .teacher import is_hf_teacher
from .write import write_json, write_student

__all__ = ['EXCLUDABLE', 'HEAD_SELECTIONS', 'TENSORWISE', 'Planned', 'is_hf_teacher', 'read_overrides', 'run',
           'select_hf', 'write_json', 'write_student']
