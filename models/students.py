"""The paper's students, as timm @register_model functions. Never reuse a timm name: the official
release overrides `convnext_femto`, which breaks loading timm's own ConvNeXt checkpoints."""
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer


def _build(cls, variant, classifier, pretrained, kwargs):
    """timm's builder with a plain config (no weights to download: these students start from
    weight selection or from scratch)."""
    assert not pretrained, f'{variant} has no pretrained weights: initialize it with weight_selection.py'
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    cfg = {'architecture': variant, 'num_classes': 1000, 'input_size': (3, 224, 224), 'crop_pct': 0.875,
           'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
           'classifier': classifier}
    return build_model_with_cfg(cls, variant, pretrained=False, pretrained_cfg=cfg, **kwargs)


def _vit(variant, pretrained, **kwargs):
    kwargs = {'img_size': 224, 'patch_size': 16, 'embed_dim': 192, 'depth': 12, 'num_heads': 3, **kwargs}
    return _build(VisionTransformer, variant, 'head', pretrained, kwargs)


@register_model
def vit_a_patch16_224(pretrained=False, **kwargs):
    """ViT-A of the paper (Table 6): ViT-T/16 with 6 blocks instead of 12."""
    return _vit('vit_a_patch16_224', pretrained, **{'depth': 6, **kwargs})


@register_model
def vit_tiny_patch16_clip_224(pretrained=False, **kwargs):
    """ViT-T/16 in CLIP's layout, the student of a CLIP ViT-B/16 teacher (Table 5): a LayerNorm before the
    blocks, no patch-embedding bias, and LayerNorm eps 1e-5, as timm's vit_base_patch16_clip_224 and the
    official release's vit_tiny_clip build it."""
    return _vit('vit_tiny_patch16_clip_224', pretrained, **{'pre_norm': True, 'norm_layer': nn.LayerNorm, **kwargs})


@register_model
def vit_tiny_patch14_dinov2(pretrained=False, **kwargs):
    """ViT-T/14 with DINOv2's layer scale (init 1e-5), the student of a DINOv2 ViT-S/14 teacher.
    Its default grid is DINOv2's 518 px; pass img_size=224 for a 16x16 grid."""
    return _vit('vit_tiny_patch14_dinov2', pretrained, **{'img_size': 518, 'patch_size': 14, 'init_values': 1e-5, **kwargs})


@register_model
def convnext_femto_linear(pretrained=False, **kwargs):
    """ConvNeXt-F as in the paper: depths 2/2/6/2, widths 48/96/192/384, and the MLP as Linear
    layers (timm's convnext_femto uses 1x1 convolutions, conv_mlp=True)."""
    kwargs = {'depths': (2, 2, 6, 2), 'dims': (48, 96, 192, 384), 'conv_mlp': False, **kwargs}
    return _build(ConvNeXt, 'convnext_femto_linear', 'head.fc', pretrained, kwargs)
