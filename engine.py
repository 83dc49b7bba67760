"""The training and evaluation loops (in the style of DeiT/ConvNeXt's engine.py)."""
import contextlib
import math
import time

import torch
import torch.distributed as dist

import utils


class NonFiniteLoss(utils.UserError):
    """The loss became NaN or infinite: training stops, the last good checkpoint is kept."""


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, schedule, *, update_freq=1,
                    amp_dtype=None, scaler=None, clip_grad=None, mixup_fn=None, model_ema=None,
                    ema_source=None, log_writer=None, print_freq=50, start_step=0, partial=None, on_step=None,
                    channels_last=False):
    """One epoch. `schedule(optimizer, step)` sets the lr (and weight decay) of an optimizer step;
    `start_step` is the optimizer step count at which this call starts; `partial` the state of an epoch
    interrupted after some steps ({'loss_sum', 'micro', 'seen'}, as given to `on_step`), whose remaining
    batches `loader` yields. After each optimizer step
    `on_step(step, get_partial)` is called (mid-epoch checkpoints). `channels_last`: the model's memory format,
    which batches are given on the device too (a compiled model would otherwise also compile for the other
    layout). `model_ema` follows `ema_source`, the plain model (the forward model may be compiled, wrapped in DDP
    or, with feature distillation, hold the projector too). Returns the epoch's mean loss, last lr and throughput."""
    if model_ema is not None and ema_source is None:
        raise ValueError('model_ema needs ema_source, the plain model it follows')
    model.train()
    optimizer.zero_grad(set_to_none=True)
    partial = partial or {'loss_sum': torch.zeros((), device=device), 'micro': 0, 'seen': 0}
    loss_sum = partial['loss_sum'].to(device)
    micro_done, seen = partial['micro'], partial['seen']
    num_micro = micro_done + len(loader)
    num_steps = num_micro // update_freq
    start, step, seen_here = time.time(), start_step, 0
    for i, (images, targets) in enumerate(loader):
        micro = micro_done + i
        if micro >= num_steps * update_freq:
            break  # an incomplete accumulation window at the end of the epoch is dropped
        final_micro = (micro + 1) % update_freq == 0
        if micro % update_freq == 0:  # the lr (and wd) of this optimizer step, set per step
            schedule(optimizer, step)
        images = images.to(device, non_blocking=True, memory_format=memory_format(channels_last))
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        # DDP all-reduces gradients only on the final micro-step of an accumulation window.
        sync = contextlib.nullcontext() if final_micro or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                loss = criterion(images, model(images), targets)
            if scaler is not None:
                scaler.scale(loss / update_freq).backward()
            else:
                (loss / update_freq).backward()
        loss_sum += loss.detach()
        seen += images.shape[0]
        seen_here += images.shape[0]
        if final_micro:
            optimizer_step(model, optimizer, scaler, clip_grad)
            if model_ema is not None:
                model_ema.update(ema_source, step=step)
            step += 1
            if on_step is not None:
                state = {'loss_sum': loss_sum, 'micro': micro + 1, 'seen': seen}
                on_step(step, lambda: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                       for k, v in state.items()})
        # every print_freq steps and the last (where the epoch's mean loss syncs anyway): loss.item() waits for
        # the device, which small models feel at every extra print
        if (micro + 1) % print_freq == 0 or micro == num_micro - 1:
            elapsed = time.time() - start
            log_progress(loss, optimizer, epoch, step, micro, num_micro, seen_here / max(elapsed, 1e-9),
                         elapsed / (i + 1) * (num_micro - micro - 1), log_writer)
    loss_mean = utils.all_reduce_mean(loss_sum / max(num_steps * update_freq, 1)).item()
    if not math.isfinite(loss_mean):
        raise NonFiniteLoss(f'mean loss is {loss_mean} at epoch {epoch}; stopped, the last good checkpoint is kept')
    elapsed = time.time() - start
    return {'loss': loss_mean, 'lr': scheduled_lr(optimizer), 'steps': step - start_step,
            'images_per_sec': seen_here * utils.world_size() / max(elapsed, 1e-9)}


def scheduled_lr(optimizer):
    """The schedule's lr: the largest group's (with --layer_decay the first groups, the embeddings, take a
    fraction of it), as the official ConvNeXt logs."""
    return max(group['lr'] for group in optimizer.param_groups)


def optimizer_step(model, optimizer, scaler=None, clip_grad=None):
    """Unscale (fp16), clip, step and zero the gradients of one optimizer step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def log_progress(loss, optimizer, epoch, step, micro, num_micro, images_per_sec, eta, log_writer=None):
    """The progress line (and TensorBoard scalars); stops the run on a non-finite loss."""
    # the mean over processes: every one stops on a non-finite loss, not only the one that met it (the others
    # would wait at their next collective); the only host synchronisation, once every print_freq steps
    value = utils.all_reduce_mean(loss.detach().float()).item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f'loss is {value} at epoch {epoch}, optimizer step {step}; stopped, '
                            f'the last good checkpoint is kept (lower --lr or enable --clip_grad)')
    lr = scheduled_lr(optimizer)
    utils.print_main(f'epoch {epoch} [{micro + 1}/{num_micro}] loss {value:.4f} lr {lr:.3e} '
                     f'{images_per_sec * utils.world_size():.0f} img/s eta {eta:.0f}s')
    if log_writer is not None:
        log_writer.add_scalar('train/loss', value, step)
        log_writer.add_scalar('train/lr', lr, step)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.preserve_format


@torch.no_grad()
def evaluate(loader, model, device, amp_dtype=None, sharded=False, channels_last=False):
    """Top-1/top-5 accuracy and loss over the loader; `sharded`: each process holds its own shard, and the
    totals are summed over processes; `channels_last` as in train_one_epoch."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, correct@1, correct@5, n
    for images, targets in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format(channels_last))
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        correct = top5.eq(targets[:, None])
        totals += torch.stack([torch.nn.functional.cross_entropy(output, targets, reduction='sum').double(),
                               correct[:, 0].sum().double(), correct.any(dim=1).sum().double(),
                               torch.full((), float(targets.shape[0]), device=device, dtype=torch.float64)])
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, c1, c5, n = totals.tolist()
    n = max(n, 1)
    return {'loss': loss / n, 'acc1': 100 * c1 / n, 'acc5': 100 * c5 / n, 'n': int(n)}


@torch.no_grad()
def features(loader, model, device, amp_dtype=None, channels_last=False):
    """L2-normalized pre-logits features (timm's forward_head(pre_logits=True)) and labels of a loader; batches
    in the model's memory format, as in training."""
    model.eval()
    feats, labels = [], []
    for images, targets in loader:
        with autocast(device, amp_dtype):
            images = images.to(device, non_blocking=True, memory_format=memory_format(channels_last))
            f = model.forward_head(model.forward_features(images), pre_logits=True)
        feats.append(torch.nn.functional.normalize(f.float().flatten(1), dim=1))
        labels.append(targets.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_loader, test_loader, model, device, k=20, temperature=0.07, amp_dtype=None,
                 channels_last=False):
    """Top-1 accuracy (%) of a k-nearest-neighbour vote over cosine similarities, each neighbour weighted
    by exp(similarity / temperature) (DINO's k-NN protocol): how good a model's features are, untrained."""
    # under torchrun each process reads its own share of each split (main.knn_probe); gathered, they are the whole
    # splits (in another order, which the vote does not depend on), and every process votes over the same bank
    bank, bank_labels, test, test_labels = (utils.cat_from_ranks(t) for t in (
        *features(train_loader, model, device, amp_dtype, channels_last),
        *features(test_loader, model, device, amp_dtype, channels_last)))
    classes = int(max(bank_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):  # a (1024 x train) similarity block at a time
        sim, idx = (test[start:start + 1024] @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(sim), classes, device=device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return 100 * correct / max(len(test), 1)
