"""Magnitude pruning of one large weight: time and peak memory of weight_selection.magnitude_squeeze (blocked radix
select) against one top-k over the whole weight, the code before it. Each in its own process:

    python scripts/benchmark_magnitude.py blocked
    python scripts/benchmark_magnitude.py topk
"""
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
import weight_selection as ws  # noqa: E402

WEIGHT, STUDENT = (14336, 4096), (7168, 2048)  # a LLaMA-3-8B MLP weight in bf16 (117 MB), halved in both widths


def main(method):
    torch.manual_seed(0)
    weight = torch.randn(*WEIGHT, dtype=torch.bfloat16)  # made in bf16: no float32 copy sets the peak first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    if method == 'topk':
        flat = weight.reshape(-1)
        out = flat[ws.magnitudes(flat).topk(STUDENT[0] * STUDENT[1]).indices.sort().values].reshape(STUDENT)
    else:
        out = ws.magnitude_squeeze(weight, STUDENT)
    seconds = time.time() - start
    above = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f'{method}: {seconds:.2f} s, peak {above:.0f} MB above the weight, output {out.numel() * 2 / 2**20:.0f} MB')


if __name__ == '__main__':
    parser = utils.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('method', choices=['blocked', 'topk'], help='blocked: magnitude_squeeze; topk: one top-k')
    main(parser.parse_args().method)
