"""The training run: Horovod data parallelism with K-FAC preconditioning or plain SGD."""
from __future__ import annotations

import math
import random
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_mod
from .config import kfac_kwargs
from .data import build_datasets, build_loaders, unreadable_paths
from .data import start_epoch as start_epoch_data
from .dist import controller_name, describe_layout, init_horovod, world_layout
from .models import build_model
from .outputs import RunOutputs
from .report import _bytes
from .reliability import (EXIT_DIVERGED, EXIT_INPUT, BufferGuard, Faults, RunStop, Watchdog, all_finite,
                          check_agreement, code_fingerprint, config_fingerprint, logger, setup_logging)
from .schedule import learning_rate, rescalable_weights, rescale_weights, set_lr


def log0(hvd, *args) -> None:
    if hvd.rank() == 0:
        print(*args, flush=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def pick_device(cfg, hvd) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda but CUDA is not available")
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_optimizer(cfg, model: nn.Module, hvd):
    o = cfg.optim
    base = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)
    compression = hvd.Compression.fp16 if cfg.horovod.fp16_allreduce else hvd.Compression.none
    return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                    compression=compression)


def mixup(x, y, alpha: float):
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(x.size(0), device=x.device)
    return lam * x + (1 - lam) * x[perm], y[perm], lam


@torch.no_grad()
def evaluate(model, loader, device, hvd, skip_unreadable: bool = False, watchdog=None) -> Dict[str, float]:
    """Top-1 and loss over the whole evaluation set: per-rank sums, then one allreduce.

    Unreadable images (marker labels < 0) are left out with ``skip_unreadable``; otherwise every rank
    stops with exit code 2 and the files' paths.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    bad: List[str] = []
    for x, y in loader:
        if watchdog is not None:
            watchdog.beat("an evaluation batch")
        if (y < 0).any():
            keep = y >= 0
            sums[3] += int((~keep).sum())
            if not skip_unreadable:
                bad += unreadable_paths(loader.dataset, y)
            x, y = x[keep], y[keep]
            if y.numel() == 0:
                continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        sums[0] += F.cross_entropy(out, y, reduction="sum").item()
        sums[1] += (out.argmax(1) == y).sum().item()
        sums[2] += y.numel()
    model.train()
    sums = hvd.allreduce(sums, op=hvd.Sum, name="eval.sums")
    if sums[3].item() > 0 and not skip_unreadable:
        stop_for_unreadable(hvd, bad, "data.val_dir")
    n = max(sums[2].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": sums[1].item() / n, "images": int(sums[2].item()),
            "skipped_images": int(sums[3].item())}


def stop_for_unreadable(hvd, local: List[str], key: str) -> None:
    """Collective (every rank knows that some rank found unreadable images): stop with their paths."""
    found = [p for paths in hvd.allgather_object(local) for p in paths]
    first = found[0] if found else "an image"
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    raise RunStop(EXIT_INPUT, f"data error: {key}: unreadable image {first}{more}; "
                              f"set data.skip_unreadable=true to skip unreadable images")


def run(cfg, resume_candidates: List[str]) -> int:
    t_start = time.time()
    # The data first: a folder or file that cannot be read ends every rank alike before Horovod starts.
    train_ds, val_ds = build_datasets(cfg)

    hvd, how = init_horovod(cfg.horovod)
    rank, size = hvd.rank(), hvd.size()
    setup_logging(rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg, hvd)
    code_digest, code_detail = code_fingerprint()
    layout = world_layout(hvd, str(device), {"config": config_fingerprint(cfg), "code": code_digest})
    check_agreement(hvd, cfg, layout, code_detail)        # every rank stops alike on a mismatch
    log0(hvd, describe_layout(layout, how, controller_name(hvd)))
    if cfg.train.world_size is not None and cfg.train.world_size != size:
        log0(hvd, f"warning: train.world_size is {cfg.train.world_size} but {size} rank(s) were launched; "
                  f"global batch is {cfg.data.batch_size * size}, not {cfg.data.batch_size * cfg.train.world_size}")
    faults = Faults(cfg.debug, rank, size)

    # Same initial weights everywhere (also broadcast below); distinct data randomness per rank.
    seed_everything(cfg.train.seed)
    model = build_model(cfg).to(device)
    seed_everything(cfg.train.seed + 1000 * rank + 1)

    train_loader, val_loader, sampler = build_loaders(cfg, train_ds, val_ds, rank, size, device.type == "cuda")
    spe = len(train_loader)
    if spe == 0:
        raise cfg.error("data.batch_size", f"no full batch of {cfg.data.batch_size} per rank: "
                                           f"{len(train_ds)} training images over {size} rank(s)")

    optimizer = build_optimizer(cfg, model, hvd)
    kfac = None
    if cfg.optim.method == "kfac":
        import kfac_hvd
        kfac = kfac_hvd.KFAC(model, **kfac_kwargs(cfg))
    weights = rescalable_weights(model) if cfg.optim.weight_rescaling else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = BufferGuard(model)

    step, start_epoch, skip_batches = 0, 0, 0
    history = []          # per-epoch evaluation results
    resume_path = None
    # Only rank 0 reads checkpoints (other nodes need not see the folder): its list decides for all.
    resume_candidates = hvd.broadcast_object(resume_candidates if rank == 0 else None, root_rank=0,
                                             name="ckpt.candidates")
    if resume_candidates:
        try:
            resume_path, state = ckpt_mod.load_checkpoint(hvd, resume_candidates)
            ckpt_mod.restore(state, hvd, model=model, optimizer=optimizer, kfac=kfac, seed=cfg.train.seed)
        except ckpt_mod.CheckpointError as exc:
            raise cfg.error("checkpoint.resume", str(exc)) from None
        except ValueError as exc:
            raise cfg.error("checkpoint.resume", f"{resume_path} does not fit this run: {exc}") from None
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        if skip_batches >= spe:
            start_epoch, skip_batches = start_epoch + 1, 0
        history = list(state.get("extra", {}).get("history", []))
        log0(hvd, f"resumed from {resume_path}: step {step}, epoch {start_epoch}, batch {skip_batches}")
        del state
    else:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    out = RunOutputs(cfg, step if resume_path else None) if rank == 0 else None
    total_steps = spe * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    log0(hvd, f"training: {cfg.optim.method}, {size} rank(s) x {cfg.data.batch_size} = "
              f"{size * cfg.data.batch_size} images per step, {spe} steps per epoch, {total_steps} steps")

    bar = None
    if rank == 0 and cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0)

    ckpt_every_steps = cfg.checkpoint.every_steps
    ckpt_enabled = cfg.checkpoint.every_epochs > 0 or ckpt_every_steps is not None
    watchdog = Watchdog(cfg.train.watchdog_s, rank)

    def save(epoch: int, batch_in_epoch: int) -> None:
        watchdog.beat(f"the checkpoint of step {step}")
        if out is not None:
            out.flush()                   # the metrics up to this step are on disk before the checkpoint
        ckpt_mod.save_checkpoint(hvd, cfg.checkpoint.dir, model=model, optimizer=optimizer, kfac=kfac,
                                 epoch=epoch, step=step, batch_in_epoch=batch_in_epoch, config=cfg.to_dict(),
                                 keep_last=cfg.checkpoint.keep_last, keep_all=cfg.checkpoint.keep_all,
                                 extra={"history": history})
        watchdog.beat(f"the checkpoint of step {step}")

    train_time = 0.0
    images_done = 0
    last_eval: Dict[str, Any] = {}
    kfac_seconds: Dict[str, float] = {}
    skipped_steps: List[int] = []
    kfac_events = 0
    bad_in_a_row = 0
    done = step >= total_steps
    epoch = start_epoch
    last_saved_step = step if resume_path else -1
    while not done and epoch < cfg.train.epochs:
        start_epoch_data(train_loader, sampler, cfg.train.seed, rank, epoch, skip_batches, cfg.data.batch_size)
        batch_in_epoch = skip_batches
        skip_batches = 0
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)      # loss*n, correct, n over this epoch (this rank)
        t_epoch = t_ready = time.perf_counter()
        watchdog.beat(f"the start of epoch {epoch + 1}")
        for x, y in train_loader:
            t0 = t_ready          # step time includes loading this batch, not logging or checkpoints
            watchdog.beat(f"step {step + 1}")
            faults.hang(step + 1)
            unreadable: List[str] = []
            if (y < 0).any():     # unreadable images (data.skip_unreadable is off): stop after this step
                unreadable = unreadable_paths(train_loader.dataset, y)
                y = y.clamp(min=0)
            x = faults.poison(step + 1, x)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = learning_rate(cfg.optim, step / spe)
            set_lr(optimizer, lr, cfg.optim.momentum_correction)
            optimizer.zero_grad()
            buffers.save()
            if cfg.data.mixup_alpha > 0:
                xm, y2, lam = mixup(x, y, cfg.data.mixup_alpha)
                output = model(xm)
                loss = lam * criterion(output, y) + (1 - lam) * criterion(output, y2)
            else:
                output = model(x)
                loss = criterion(output, y)
            loss.backward()
            optimizer.synchronize()                          # gradients averaged over ranks
            record = kfac.step(lr=lr) if kfac is not None else None
            loss_value = loss.item()                         # also waits for the device
            loss_ok = math.isfinite(loss_value)
            grads_ok = all_finite([p.grad for p in params])
            # One small allreduce decides for every rank: skip this update, or stop on bad data.
            status = hvd.allreduce(torch.tensor([float(not loss_ok), float(not grads_ok), float(len(unreadable))],
                                                dtype=torch.float64), op=hvd.Sum, name="train.status")
            bad_loss_ranks, bad_grad_ranks, unreadable_total = (int(v) for v in status.tolist())
            if unreadable_total:
                stop_for_unreadable(hvd, unreadable, "data.train_dir")
            skipped = bool(bad_loss_ranks or bad_grad_ranks)
            if skipped:
                buffers.restore()                            # BatchNorm statistics from before the batch
                skipped_steps.append(step + 1)
                bad_in_a_row += 1
                if not loss_ok:
                    logger.warning("step %d: non-finite loss (%r) on this rank", step + 1, loss_value)
                if rank == 0:
                    logger.warning("step %d: optimiser step skipped on every rank (non-finite loss on %d "
                                   "rank(s), non-finite gradients: %s)", step + 1, bad_loss_ranks,
                                   "yes" if bad_grad_ranks else "no")
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise RunStop(EXIT_DIVERGED,
                                  f"error: training diverged: {bad_in_a_row} consecutive steps (up to step "
                                  f"{step + 1}) with a non-finite loss or gradient (train.max_bad_steps = "
                                  f"{cfg.train.max_bad_steps}); the last checkpoint is in {cfg.checkpoint.dir}")
            else:
                bad_in_a_row = 0
                with optimizer.skip_synchronize():
                    optimizer.step()
                if weights is not None:
                    rescale_weights(weights)
            step += 1
            batch_in_epoch += 1
            correct = (output.argmax(1) == y).sum().item()
            dt = time.perf_counter() - t0
            train_time += dt
            images_done += x.size(0) * size
            if not skipped:
                sums += torch.tensor([loss_value * y.numel(), correct, y.numel()], dtype=torch.float64)
            if record is not None:
                for k, v in kfac.collect_times().items():
                    kfac_seconds[k] = kfac_seconds.get(k, 0.0) + float(v or 0.0)
                kfac_events += len(record.get("numerics") or {})

            if out is not None and (step % cfg.log.every_steps == 0 or step == total_steps or skipped):
                entry = {"step": step, "epoch": epoch + batch_in_epoch / spe, "lr": lr, "loss": loss_value,
                         "acc": correct / y.numel(), "step_time": dt, "images_per_s": x.size(0) * size / dt}
                if skipped:
                    entry["skipped"] = {"nonfinite_loss_ranks": bad_loss_ranks,
                                        "nonfinite_gradients": bool(bad_grad_ranks)}
                scal = {"train/loss": loss_value, "train/acc": entry["acc"], "train/lr": lr}
                if kfac is not None:
                    stats = kfac.comm_stats()
                    entry["fisher"] = {k: stats.get(k) for k in ("payload_bytes", "wire_bytes",
                                                                 "every_step_payload_bytes",
                                                                 "every_step_wire_bytes", "ratio")}
                    entry["mean_interval"] = kfac.mean_interval()
                    if cfg.log.layer_records:
                        entry["kfac"] = record
                    else:
                        entry["kfac"] = {k: v for k, v in record.items() if k != "layers"}
                        entry["kfac"]["due_layers"] = sum(1 for e in record["layers"].values() if e["due"])
                    scal.update({"fisher/payload_bytes": stats.get("payload_bytes"),
                                 "fisher/wire_bytes": stats.get("wire_bytes"),
                                 "fisher/ratio": stats.get("ratio"),
                                 "kfac/mean_interval": entry["mean_interval"]})
                out.record(entry)
                out.scalars(step, scal)
            if bar is not None:
                post = {"epoch": epoch, "loss": f"{loss_value:.3f}", "lr": f"{lr:.3g}"}
                if kfac is not None:
                    post["interval"] = f"{kfac.mean_interval():.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            faults.kill(step)

            done = step >= total_steps
            # Mid-epoch checkpoints; the last batch of an epoch is checkpointed after its evaluation.
            if (ckpt_every_steps and step % ckpt_every_steps == 0 and not done and batch_in_epoch < spe):
                save(epoch, batch_in_epoch)
                last_saved_step = step
            if done:
                break
            t_ready = time.perf_counter()
        epoch_time = time.perf_counter() - t_epoch

        # End of epoch (or of the run): train averages over ranks, evaluation, checkpoint.
        sums = hvd.allreduce(sums, op=hvd.Sum, name="train.sums")
        n = max(sums[2].item(), 1.0)
        epoch_complete = batch_in_epoch >= spe
        last_epoch = epoch + 1 >= cfg.train.epochs or done
        every = cfg.train.eval_every
        if last_epoch or (every and (epoch + 1) % every == 0 and epoch_complete):
            last_eval = evaluate(model, val_loader, device, hvd, cfg.data.skip_unreadable, watchdog)
            entry = {"epoch": epoch + 1 if epoch_complete else epoch + batch_in_epoch / spe, "step": step,
                     "train_loss": sums[0].item() / n, "train_acc": sums[1].item() / n,
                     "val_loss": last_eval["loss"], "val_top1": last_eval["top1"], "epoch_time": epoch_time}
            if last_eval.get("skipped_images"):
                entry["val_skipped_images"] = last_eval["skipped_images"]
            history.append(entry)
            if out is not None:
                out.record({"eval": entry, "step": step})
                out.scalars(step, {"val/top1": last_eval["top1"], "val/loss": last_eval["loss"],
                                   "train/epoch_loss": entry["train_loss"], "train/epoch_acc": entry["train_acc"]})
                out.flush()
            msg = (f"epoch {entry['epoch']:g}: train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.4f}"
                   f" | val loss {last_eval['loss']:.4f} top-1 {last_eval['top1']:.4f} | {epoch_time:.1f}s")
            if bar is not None:
                bar.write(msg)
            else:
                log0(hvd, msg)
        step_due = bool(ckpt_every_steps and step % ckpt_every_steps == 0)
        if ckpt_enabled and ((cfg.checkpoint.every_epochs and epoch_complete
                              and (epoch + 1) % cfg.checkpoint.every_epochs == 0) or done or last_epoch
                             or step_due):
            if last_saved_step != step:
                save(epoch, batch_in_epoch)
                last_saved_step = step
        epoch += 1

    if bar is not None:
        bar.close()
    if not last_eval:        # nothing left to train (a finished run resumed): still report accuracy
        last_eval = evaluate(model, val_loader, device, hvd, cfg.data.skip_unreadable, watchdog)
    watchdog.stop()
    # Data parallelism keeps every rank's weights identical: record one checksum per rank.
    with torch.no_grad():
        checksum = float(sum(p.double().sum() + (p.double() ** 2).sum() for p in model.parameters()))
        state_finite = all_finite(list(model.parameters()) + list(model.buffers()))
    per_rank = hvd.allgather_object((checksum, state_finite))
    summary: Dict[str, Any] = {
        "config": cfg.path,
        "method": cfg.optim.method,
        "world_size": size,
        "batch_per_rank": cfg.data.batch_size,
        "global_batch": cfg.data.batch_size * size,
        "steps": step,
        "epochs": history[-1]["epoch"] if history else None,
        "final_top1": last_eval.get("top1"),
        "best_top1": max((h["val_top1"] for h in history), default=None),
        "final_val_loss": last_eval.get("loss"),
        "history": history,
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "images_per_s": images_done / train_time if train_time > 0 else None,
        "resumed_from": resume_path,
        "rank_weight_checksums": [c for c, _ in per_rank],
        "rank_state_finite": [f for _, f in per_rank],
        "skipped_steps": skipped_steps[:1000],
        "skipped_step_count": len(skipped_steps),
    }
    if kfac is not None:
        stats = kfac.comm_stats()
        summary["kfac"] = {
            "update_threshold": cfg.kfac.update_threshold,
            "update_interval": cfg.kfac.update_interval,
            "interval_policy": cfg.kfac.interval_policy,
            "layers": len(kfac.layer_names),
            "mean_interval": kfac.mean_interval(),
            "seconds": kfac_seconds,
            "numerics_events": kfac_events,
        }
        summary["fisher"] = {k: v for k, v in stats.items() if k != "per_layer"}
    if out is not None:
        path = out.summary(summary)
        out.close()
        log0(hvd, f"summary: {path}")
        log0(hvd, format_summary(summary))
    return 0


def format_summary(s: Dict[str, Any]) -> str:
    top1 = s.get("final_top1")
    lines = [f"  final top-1        {top1 * 100:.2f}%" if top1 is not None else "  final top-1        -"]
    f = s.get("fisher")
    if f:
        ratio = f.get("ratio")
        lines.append(f"  Fisher traffic     {_bytes(f.get('wire_bytes'))} per rank (wire model), "
                     f"{_bytes(f.get('payload_bytes'))} payload"
                     + (f" = {ratio * 100:.1f}% of every step" if ratio is not None else ""))
        lines.append(f"  mean interval      {s['kfac']['mean_interval']:.2f}")
    lines.append(f"  wall time          {s['wall_time_s']:.1f} s ({s['steps']} steps, "
                 f"{s['images_per_s'] or 0:.0f} images/s)")
    return "\n".join(lines)
