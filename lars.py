"""LARS as MAE's linear probe uses it (He et al. 2022; the paper's Table 9 follows that recipe).

timm's Lars applies the trust ratio only when weight decay is non-zero, so with the probe's weight decay 0
it runs as plain SGD with momentum. Here the trust ratio is applied to every matrix/kernel (ndim > 1),
whatever the weight decay; biases and norm parameters (ndim <= 1) get neither weight decay nor trust ratio.
"""
import torch
import torch.nn as nn


class Lars(torch.optim.Optimizer):
    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p, group):
        update = p.grad
        if p.ndim > 1:
            update = update.add(p, alpha=group['weight_decay'])
            p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
            ratio = group['trust_coefficient'] * p_norm / u_norm
            # a zero weight (fresh init) or a zero update: no rescaling, as in MAE
            ratio = torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
            update = update * ratio
        state = self.state[p]
        if 'mu' not in state:
            state['mu'] = torch.zeros_like(p)
        state['mu'].mul_(group['momentum']).add_(update)
        p.add_(state['mu'], alpha=-group['lr'])


def create_lars(model_or_params, lr, weight_decay=0.0, momentum=0.9):
    """Lars over a model's trainable parameters (or given parameters / param groups), for `--opt lars`."""
    if isinstance(model_or_params, nn.Module):
        model_or_params = [p for p in model_or_params.parameters() if p.requires_grad]
    return Lars(model_or_params, lr=lr, weight_decay=weight_decay, momentum=momentum)
