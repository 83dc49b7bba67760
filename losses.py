"""The training loss: classification, plus knowledge distillation from a frozen teacher (Table 4).

  logit    L = L_class + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))   (Eq. 1; tau = 1: the paper's)
  feature  L = L_class + alpha * L1(O_t, MLP(O_s))                                       (Eq. 2)
           O = the final pre-logit features (after pooling and the final norm); the MLP (Linear, GELU,
           Linear) maps the student's width to the teacher's and is trained with the student.
The teacher sees the same (mixed, augmented) batch, in eval mode, without gradients, under autocast.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

DISTILL_MODES = ('none', 'logit', 'feature')


class FeatureDistillStudent(nn.Module):
    """The student with the projector of feature distillation; returns (logits, projected features)."""

    def __init__(self, model, teacher_dim):
        super().__init__()
        self.model = model
        dim = model.num_features if not hasattr(model, 'head_hidden_size') else model.head_hidden_size
        self.projector = nn.Sequential(nn.Linear(dim, teacher_dim), nn.GELU(), nn.Linear(teacher_dim, teacher_dim))

    def forward(self, x):
        features = self.model.forward_features(x)
        logits = self.model.forward_head(features)
        return logits, self.projector(self.model.forward_head(features, pre_logits=True))

    def no_weight_decay(self):
        inner = self.model.no_weight_decay() if hasattr(self.model, 'no_weight_decay') else set()
        return {f'model.{name}' for name in inner}


class Renormalize(nn.Module):
    """Images normalized with the student's mean/std, re-normalized with the teacher's own (its timm
    pretrained_cfg): the augreg ViTs expect mean = std = 0.5 where the recipe feeds ImageNet's."""

    def __init__(self, student_mean_std, teacher_mean_std):
        super().__init__()
        (s_mean, s_std), (t_mean, t_std) = student_mean_std, teacher_mean_std
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std = x_s * scale + shift, per channel
        self.register_buffer('scale', as_tensor(s_std) / as_tensor(t_std), persistent=False)
        self.register_buffer('shift', (as_tensor(s_mean) - as_tensor(t_mean)) / as_tensor(t_std), persistent=False)

    def forward(self, x):
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class TrainingLoss(nn.Module):
    """criterion(images, outputs, targets): the base loss on the logits, plus the distillation term.
    `teacher_input` maps the batch to what the teacher expects (Renormalize), default unchanged."""

    def __init__(self, base, mode='none', teacher=None, alpha=1.0, tau=1.0, teacher_input=None):
        super().__init__()
        assert mode in DISTILL_MODES and (mode == 'none') == (teacher is None)
        self.base, self.mode, self.teacher, self.alpha, self.tau = base, mode, teacher, alpha, tau
        self.teacher_input = teacher_input if teacher_input is not None else nn.Identity()
        self.last_terms = {}

    def forward(self, images, outputs, targets):
        logits, projected = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = self.base(logits, targets)
        if self.mode == 'none':
            return loss
        with torch.no_grad():
            self.teacher.eval()
            images = self.teacher_input(images)
            if self.mode == 'logit':
                target = self.teacher(images)
            else:
                target = self.teacher.forward_head(self.teacher.forward_features(images), pre_logits=True)
        if self.mode == 'logit':
            term = logit_distillation(logits, target, self.tau)
        else:
            term = F.l1_loss(projected.float(), target.float())
        self.last_terms = {'class': loss.detach(), 'distill': term.detach()}
        return loss + self.alpha * term


def logit_distillation(student_logits, teacher_logits, tau=1.0):
    """tau^2 * KL(p_t || p_s) with p = softmax(z / tau), averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * tau * tau
