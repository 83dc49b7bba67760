"""Classic initializations the paper compares weight selection with (Tables 3 and 12).

  timm     the model's own init (truncated normal, std 0.02, for ViT-T and ConvNeXt-F)
  xavier   Glorot & Bengio 2010: xavier_uniform_ on every Linear and Conv weight, zero biases
  kaiming  He et al. 2015: kaiming_normal_ (fan_in, ReLU gain) on every Linear and Conv weight, zero biases
  mimetic  Trockman & Kolter 2023, on each attention layer of a ViT (the rest keeps timm's init):
           per head, W_q^T W_k = best rank-k approximation of a1 Z1 + b1 I, and for the layer
           W_proj W_v = a2 Z2 - b2 I, with Z ~ N(0, 1/d) and (a1, b1) = (0.7, 0.7), (a2, b2) = (0.4, 0.4),
           the values Trockman & Kolter use for small ViTs; each product is split by SVD into two factors
           U sqrt(S) and sqrt(S) V^T.
"""
import torch
import torch.nn as nn

INITS = ('timm', 'xavier', 'kaiming', 'mimetic')


def apply_init(model, scheme, generator=None, qk=(0.7, 0.7), vproj=(0.4, 0.4)):
    if scheme == 'timm':
        return model
    if scheme in ('xavier', 'kaiming'):
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if scheme == 'xavier':
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        return model
    if scheme == 'mimetic':
        attentions = [m for m in model.modules() if hasattr(m, 'qkv') and hasattr(m, 'proj') and hasattr(m, 'num_heads')]
        if not attentions:
            from utils import UserError
            raise UserError('--init mimetic initializes self-attention layers; the model has none (use a ViT)')
        for attn in attentions:
            mimetic_attention_(attn, qk, vproj, generator)
        return model
    raise ValueError(f'unknown init {scheme}; choose from {", ".join(INITS)}')


def _factor(target, rank):
    """Two factors L (d x rank), R (rank x d) with L R the best rank-`rank` approximation of target."""
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def mimetic_attention_(attn, qk=(0.7, 0.7), vproj=(0.4, 0.4), generator=None):
    d = attn.qkv.in_features
    heads = attn.num_heads
    k = attn.qkv.out_features // 3 // heads
    w = attn.qkv.weight.view(3, heads, k, d)
    for h in range(heads):
        z = torch.randn(d, d, generator=generator) / d ** 0.5
        left, right = _factor(qk[0] * z + qk[1] * torch.eye(d), k)
        w[0, h] = left.T   # W_q,h: (k, d), so that W_q,h^T W_k,h = left @ right
        w[1, h] = right    # W_k,h
    z = torch.randn(d, d, generator=generator) / d ** 0.5
    left, right = _factor(vproj[0] * z - vproj[1] * torch.eye(d), d)
    w[2] = right.view(heads, k, d)       # W_v (d, d)
    attn.proj.weight.copy_(left)         # W_proj (d, d): W_proj W_v = a2 Z - b2 I
    if attn.qkv.bias is not None:
        attn.qkv.bias.zero_()
    if attn.proj.bias is not None:
        attn.proj.bias.zero_()
