"""The training loop every learning stage shares: feature distillation from a dense teacher.

- Loss on final features: per-sample relative MSE of the token features (when student and teacher
  keep the same tokens) plus 1 − cosine of the pooled features, each averaged over samples — a mean
  of per-sample terms, so sharding the batch over processes changes nothing but float rounding.
  Optionally (``hidden_weight``) the output of every kept block is matched to the teacher's block
  it descends from (``EncoderConfig.block_ids``).
- Unlabeled images, reshuffled every epoch, with random horizontal flips; read through an
  :class:`~mimc.train.images.IndexedImages`, each rank loading only its shard of each step's batch,
  the next steps prefetched by ``DataLoader`` workers (:mod:`mimc.train.images`). ``epochs`` gives
  the length in passes over the images instead of steps.
- DDP or FSDP2 over torchrun ranks, activation checkpointing, bf16 autocast on CUDA
  (:mod:`mimc.train.parallel`).
- Optional MAE-style input masking (DMAE): teacher and student see the same random visible patches
  only. The patches are gathered after the encoder's own ``embed`` (position embeddings included)
  and run through its ``blocks`` and ``norm``; at 75 % masking a step costs about a quarter.
- AdamW, linear warm-up then cosine decay, gradient clipping.
- Every random choice of step s (the batch, the flips, the visible patches, a stage's own noise)
  comes from a generator seeded by (seed, s): a resumed run and a run sharded over torchrun ranks
  draw exactly what an uninterrupted single process draws.
- Checkpoints every N steps (see :mod:`mimc.train.checkpoint`); only rank 0 writes.

References:
- Bai et al., "Masked Autoencoders Enable Efficient Knowledge Distillers" (DMAE), CVPR 2023 —
  github.com/UCSC-VLAA/DMAE
- He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 —
  github.com/facebookresearch/mae
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mimc.errors import ConfigError, MimcError
from mimc.train import checkpoint as ckpt
from mimc.train.config import TrainConfig, TrainRun
from mimc.train.dist import DistContext, context
from mimc.train.images import IndexedImages, StepBatches, as_indexed, default_workers, step_loader
from mimc.train.parallel import autocast, check_run, checkpointed_blocks, full, shard, shard_like, shard_optimizer_state
from mimc.train.schedule import warmup_cosine


@dataclass(frozen=True)
class FeatureLoss:
    """Weights of the distillation loss terms (see :func:`distill_loss`)."""

    token_weight: float = 1.0
    pooled_weight: float = 1.0
    hidden_weight: float = 0.0  # > 0: also match each kept block's output to the teacher's same block


@dataclass
class TrainResult:
    steps: int
    steps_run: int  # in this process (fewer when resumed)
    resumed_from: int
    seconds: float
    steps_per_second: float
    final_loss: float
    world_size: int
    epochs: float  # passes over the images the whole run makes (steps × batch / images)
    parallel: str  # none (one process), ddp or fsdp
    losses: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("losses")
        return {**d, "seconds": round(self.seconds, 3), "steps_per_second": round(self.steps_per_second, 4),
                "final_loss": round(self.final_loss, 6), "epochs": round(self.epochs, 6)}


def supports_masking(encoder: nn.Module) -> bool:
    """Input masking gathers tokens; a relative position bias or a token schedule needs them all."""
    cfg = encoder.config
    return cfg.rel_pos_bias == "none" and cfg.token_schedule is None


class FeatureModel(nn.Module):
    """``forward(pixels, keep)`` -> (token features, pooled[, block outputs]), ``keep`` the visible patches."""

    def __init__(self, encoder: nn.Module, hidden: bool = False):
        super().__init__()
        self.encoder = encoder
        self.hidden = hidden

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None):
        enc = self.encoder
        if keep is None:
            out = enc(pixels, output_hidden_states=self.hidden)
            x, pooled, blocks_out = out.last_hidden_state, out.pooled, out.hidden_states
            return (x, pooled, blocks_out[1:]) if self.hidden else (x, pooled)
        x = enc.embed(pixels)
        prefix = enc.config.num_prefix_tokens
        patches = torch.gather(x[:, prefix:], 1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1)
        blocks_out = []
        for block in enc.blocks:
            x = block(x, None)
            blocks_out.append(x)
        x = enc.norm(x)
        return (x, enc.pool(x), tuple(blocks_out)) if self.hidden else (x, enc.pool(x))


def block_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs that descend from the same source block."""
    teacher_ids = teacher.config.kept_block_ids()
    return [(i, teacher_ids.index(bid)) for i, bid in enumerate(student.config.kept_block_ids()) if bid in teacher_ids]


def _relative_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖s − t‖² / ‖t‖² (means over tokens and channels), averaged over samples."""
    return (((s - t) ** 2).flatten(1).mean(1) / (t**2).flatten(1).mean(1).clamp_min(1e-12)).mean()


def distill_loss(student: tuple, teacher: tuple, weights: FeatureLoss, pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    s_tok, s_pool = student[0], student[1]
    t_tok, t_pool = teacher[0], teacher[1]
    loss = weights.pooled_weight * (1.0 - F.cosine_similarity(s_pool, t_pool, dim=-1)).mean()
    if weights.token_weight and s_tok.shape == t_tok.shape:
        loss = loss + weights.token_weight * _relative_mse(s_tok, t_tok)
    if weights.hidden_weight and pairs:
        # Blocks whose token counts differ (token reduction) have no token-wise counterpart: skipped.
        terms = [_relative_mse(student[2][i], teacher[2][j]) for i, j in pairs if student[2][i].shape == teacher[2][j].shape]
        if terms:
            loss = loss + weights.hidden_weight * torch.stack(terms).mean()
    return loss


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _param_groups(params: dict[str, nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: decaying norms and biases pulls them toward 0, which no one wants.
    decay = [p for p in params.values() if p.ndim >= 2]
    other = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups


def _recorded(config: TrainConfig) -> dict[str, Any]:
    """The shared options a checkpoint's meta holds (the later ones only when set: older checkpoints still match)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in values.items() if k not in TrainConfig.recorded_when_set or v != TrainConfig.recorded_when_set[k]}


def train(student: nn.Module, teacher: nn.Module, images: IndexedImages | torch.Tensor, config: TrainConfig,
          run: TrainRun | None = None, *, meta: dict[str, Any] | None = None, loss_weights: FeatureLoss = FeatureLoss(),
          prepare_step: Callable[[nn.Module, int, torch.Generator], None] | None = None,
          penalty: Callable[[nn.Module], torch.Tensor | None] | None = None,
          project: Callable[[nn.Module], None] | None = None) -> TrainResult:
    """Distill ``teacher`` into the trainable parameters of ``student`` (in place) on ``images``.

    ``images``: an :class:`~mimc.train.images.IndexedImages` (each step loads only this rank's shard
    of its batch) or a tensor. A stage adds what only it does as plain functions, each given the
    student being trained (under FSDP a sharded copy of ``student``): ``prepare_step(model, step,
    generator)`` runs after the step's batch is drawn (it may draw more from the same generator),
    ``penalty(model)`` is added to the loss after the forward, ``project(model)`` runs after every
    optimizer step.
    """
    run = run if run is not None else TrainRun()
    images = as_indexed(images)
    count = len(images)
    if count == 0:
        raise ConfigError("no training images: give data with at least one image", option="data")
    config = config.for_images(count)
    check_run(config, run)  # the batch splits over the ranks, among others
    ctx: DistContext = context()
    if config.mask_ratio > 0 and not supports_masking(student):
        raise ConfigError("input masking needs absolute position embeddings and all tokens (no relative position bias, no token schedule): "
                          "set mask_ratio 0", option="mask_ratio")
    if not any(p.requires_grad for p in student.parameters()):
        raise ConfigError("the student has nothing trainable")
    meta = {**(meta or {}), "settings": {**_recorded(config), "warmup": config.warmup, **dataclasses.asdict(loss_weights)},
            "n_images": int(count)}

    teacher.eval().requires_grad_(False)
    student.eval()  # no dropout in the canonical encoder; eval keeps it deterministic
    device = torch.device(ctx.device)
    hidden = loss_weights.hidden_weight > 0
    pairs = block_pairs(student, teacher) if hidden else None
    sharded = run.fsdp
    # FSDP changes a module's class and parameters in place: it shards copies
    live, live_teacher = (copy.deepcopy(student), copy.deepcopy(teacher)) if sharded else (student, teacher)
    model = FeatureModel(live, hidden)
    teacher_model = FeatureModel(live_teacher, hidden)
    runner: nn.Module = model
    if sharded:
        shard(model, live, ctx.world_size, device)
        shard(teacher_model, live_teacher, ctx.world_size, device)
    else:
        student.to(device)
        teacher.to(device)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    params = {name: p for name, p in live.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(_param_groups(params, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))

    start, losses = 0, []
    if run.resume and run.run_dir is not None:
        saved = ckpt.load_checkpoint(run.run_dir)
        ckpt.check_meta(run.run_dir, saved.meta, meta)
        missing = sorted(set(params) - set(saved.trainable))
        if missing:
            raise ConfigError(f"checkpoint in {run.run_dir} lacks {missing[:3]}: start a fresh run with another -o")
        misfit = _misfit(params, optimizer, saved)  # a checkpoint altered by hand: refused here, not as a tensor error mid-copy or mid-step
        if misfit:
            raise ConfigError(f"checkpoint in {run.run_dir} does not fit this run ({misfit}): start a fresh run with another -o")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(shard_like(saved.trainable[name], p) if sharded else saved.trainable[name].to(device))
        try:
            optimizer.load_state_dict(shard_optimizer_state(saved.optimizer, optimizer) if sharded else saved.optimizer)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"checkpoint in {run.run_dir} does not fit this run (optimizer state: {exc}): start a fresh run "
                              "with another -o") from None
        start, losses = saved.step, saved.losses

    num_patches = teacher.config.num_patches
    visible = max(1, round(num_patches * (1.0 - config.mask_ratio)))
    shard_of = ctx.shard(config.batch_size)
    workers = run.workers if run.workers is not None else default_workers(images)
    loader = step_loader(StepBatches(images, config.seed, config.batch_size, shard_of, start, config.steps), workers,
                         pin_memory=device.type == "cuda")
    bar = _progress() if run.show_progress and ctx.is_main else None
    t0 = time.perf_counter()
    with bar or contextlib.nullcontext(), checkpointed_blocks(live) if run.checkpoint_activations else contextlib.nullcontext():
        task = bar.add_task("training", total=config.steps, completed=start) if bar is not None else None
        for step, local in zip(range(start, config.steps), loader):
            # Every random draw is of the whole global batch, then cut to this rank's shard: the
            # same numbers whatever the number of ranks.
            gen = _step_generator(config.seed, step)
            if config.flip:
                flips = (torch.rand(config.batch_size, generator=gen) < 0.5)[shard_of]
                local = torch.where(flips.view(-1, *([1] * (local.ndim - 1))), local.flip(-1), local)
            local_keep = None
            if config.mask_ratio > 0:
                noise = torch.rand(config.batch_size, num_patches, generator=gen)
                local_keep = noise.argsort(dim=1)[:, :visible].sort(dim=1).values[shard_of].to(device)
            if prepare_step is not None:
                prepare_step(live, step, gen)
            lr = warmup_cosine(step, config.steps, config.lr, config.warmup, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            local = local.to(device, non_blocking=True)
            with autocast(config.precision, device):
                with torch.no_grad():
                    target = teacher_model(local, local_keep)
                output = runner(local, local_keep)
            if config.precision != "fp32":
                output, target = _as_float(output), _as_float(target)
            loss = distill_loss(output, target, loss_weights, pairs)
            extra = penalty(live) if penalty is not None else None
            total = loss + extra if extra is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip_grad)
            optimizer.step()
            if project is not None:
                project(live)
            losses.append(ctx.all_reduce_mean(float(loss.detach())))
            done = step + 1
            if not math.isfinite(losses[-1]):  # every rank sees the same mean: all stop together
                raise MimcError(f"training diverged (the loss is {losses[-1]} at step {done}): no artifact written; lower lr "
                                f"(it was {config.lr:g})", option="lr")
            if run.run_dir is not None and run.checkpoint_every > 0 and done % run.checkpoint_every == 0 and done < config.steps:
                _save(run, done, params, optimizer, meta, losses, ctx, sharded)
            if task is not None:
                bar.update(task, completed=done, description=f"training  loss {losses[-1]:.4f}")
            if run.on_step is not None:
                run.on_step(done, losses[-1])
    seconds = time.perf_counter() - t0
    if sharded:  # the learned values back into the caller's plain student (every rank gathers)
        own = dict(student.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                own[name].copy_(full(p.detach(), True))
    ctx.barrier()
    student.to("cpu")
    teacher.to("cpu")
    ran = config.steps - start
    tail = losses[-10:] if losses else [float("nan")]
    return TrainResult(config.steps, ran, start, seconds, ran / seconds if seconds > 0 else 0.0,
                       sum(tail) / len(tail), ctx.world_size, config.steps * config.batch_size / count,
                       "fsdp" if sharded else "ddp" if ctx.distributed else "none", losses)


def _misfit(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, saved: ckpt.Checkpoint) -> str | None:
    """What of a checkpoint's tensors does not fit the parameters being trained (shapes), or None."""
    for name, p in params.items():
        if tuple(saved.trainable[name].shape) != tuple(p.shape):
            return f"{name} has shape {list(saved.trainable[name].shape)}, not {list(p.shape)}"
    order = [p for group in optimizer.param_groups for p in group["params"]]  # what the state's indices count
    for index, entry in saved.optimizer["state"].items():
        param = order[index] if isinstance(index, int) and 0 <= index < len(order) else None
        if param is None or not isinstance(entry, dict):
            return f"optimizer state of parameter {index!r}, of {len(order)}"
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and tuple(value.shape) != tuple(param.shape):
                return f"optimizer {key} of parameter {index} has shape {list(value.shape)}, not {list(param.shape)}"
    return None


def _as_float(output: tuple) -> tuple:
    return tuple(_as_float(o) if isinstance(o, tuple) else o.float() for o in output)


def _save(run: TrainRun, done: int, params: dict[str, nn.Parameter], optimizer, meta, losses, ctx: DistContext, sharded: bool) -> None:
    """A checkpoint of step ``done``: sharded tensors are gathered by every rank, rank 0 writes."""
    if not (sharded or ctx.is_main):
        ctx.barrier()
        return
    trainable = full({k: v.detach() for k, v in params.items()}, sharded)
    state = full(optimizer.state_dict(), sharded)
    if ctx.is_main:
        ckpt.save_checkpoint(run.run_dir, done, trainable, state, meta, losses)
    ctx.barrier()  # no rank runs on (or resumes) before the checkpoint is on disk


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


__all__ = ["FeatureLoss", "FeatureModel", "TrainResult", "distill_loss", "train", "supports_masking"]
