"""Training the U-Net baseline: v- or epsilon-prediction MSE on the DDPM forward process (Ho et al. 2020,
Alg. 1; v-prediction: Salimans & Ho 2022, ``v = a eps - sqrt(b2) x0``).

A run is either a number of steps (``fit(steps)``) or a wall-clock budget (``fit(budget_s=...)``): the
budget mode trains for a few seconds to measure throughput, writes a checkpoint (timing it), fixes the
run's total number of steps so that it ends inside the budget, and fits the learning-rate schedule
(warm-up, then cosine decay to zero) to that total. The plan is state like any other: it is saved in
every checkpoint, so a resumed budget run continues the same schedule.

Everything that makes a run reproducible is explicit state, saved in every checkpoint
(:mod:`.checkpoints`): the weights, AdamW's state, the EMA weights, the data order ``(seed, epoch,
position)``, the states of the two ``torch.Generator`` s that draw timesteps, noise, flips and dropout
seeds, and the step. A run resumed from a checkpoint therefore continues exactly as the uninterrupted
run would have. Over the processes of a torchrun job, :mod:`.distributed` trains the same recipe with
DistributedDataParallel (global batch = processes x ``batch_size``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..schedules import DEFAULT_SCHEDULE, Schedule
from ..errors import ConfigError, LocaldiffError
from .checkpoints import (CheckpointError, find_checkpoint, join_optimizer_state, list_checkpoints, load_tensors,
                          read_checkpoint, remove_stale_partials, sha256_file, split_optimizer_state,
                          verify_checkpoint, write_checkpoint)
from ..device import device_name
from .configs import TrainConfig, UNetConfig, build_unet, schedule_record
from .recipe import DataOrder, ema_decay_at, lr_at, mix_seed, warmup_for
from .signals import TrainingInterrupted, deferred_signals

from .files import LOSS_EMA_DECAY, MANIFEST_FORMAT, MANIFEST_NAME, WEIGHTS_NAME  # noqa: F401 (public here too)
LOG_EVERY = 50  # steps per entry of the loss history (and per device sync on CUDA)

__all__ = ["UNetTrainer", "TrainingInterrupted", "DataOrder", "CheckpointError", "find_checkpoint",
           "list_checkpoints", "verify_checkpoint", "remove_stale_partials", "sha256_file", "lr_at", "warmup_for",
           "split_optimizer_state", "join_optimizer_state", "schedule_record", "device_name", "MANIFEST_NAME",
           "WEIGHTS_NAME"]


# -- the trainer -----------------------------------------------------------------------------------

class UNetTrainer:
    """Trains a diffusers ``UNet2DModel`` on ``E ||target - net(x_t, t)||^2`` with ``t ~ U{0..T-1}``,
    ``x_t = a x0 + sqrt(b2) eps`` from :class:`~localdiff.diffusion.Schedule` and target ``v = a eps -
    sqrt(b2) x0`` (``prediction="v"``) or ``eps`` (``prediction="epsilon"``).

    AdamW with linear warm-up, global-norm gradient clipping and an EMA of the weights; on CUDA bf16
    autocast, channels-last and optionally ``torch.compile``. The training images stay resident on the
    device in their compact form (uint8) and are converted per batch.
    """

    def __init__(self, data, model_config: UNetConfig, train_config: TrainConfig | None = None,
                 schedule: Schedule = DEFAULT_SCHEDULE):
        from ..device import resolve_device

        cfg = train_config if train_config is not None else TrainConfig()
        cfg.validate()
        model_config.validate()
        self.data, self.model_config, self.config, self.schedule = data, model_config, cfg, schedule
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.amp = cfg.amp and self.cuda
        self.channels_last = cfg.channels_last and self.cuda

        # Initial weights from the seed, without touching (or depending on) the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(cfg.seed, 0))
            model = build_unet(model_config, data.shape)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        kwargs = {"fused": True} if self.cuda else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=lr_at(0, cfg), weight_decay=cfg.weight_decay, **kwargs)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

        self.images = torch.from_numpy(np.asarray(data.raw)).to(self.device)  # [N, C, H, W] uint8 or float32,
        # resident (a store is read whole here, within its memory cap)
        self.order = DataOrder(len(data), seed=cfg.seed)
        self.rank, self.world_size = 0, 1  # this process's rows of each global batch (see unet/distributed.py)
        self.gen = torch.Generator(device=self.device).manual_seed(mix_seed(cfg.seed, 1))  # t, noise, flips
        self.cpu_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 2))  # dropout seeds
        self.sqrt_ab = schedule.alpha_bar.sqrt().to(self.device, torch.float32)  # [T] a_t
        self.sqrt_1m_ab = (1.0 - schedule.alpha_bar).sqrt().to(self.device, torch.float32)  # [T] sqrt(b2_t)

        self.step = 0
        self.loss_ema: float | None = None
        self.loss_log: list[list[float]] = []  # [step, mean loss over the LOG_EVERY steps ending there]
        self._block = [0.0, 0]  # running sum and count of the current loss-log block
        self._pending: list[torch.Tensor] = []  # per-step losses not yet read back from the device
        self.history: list[dict] = []  # one record per fit() segment
        self._saved_step: int | None = None  # step of the last checkpoint written or loaded
        # The run's length as the learning-rate schedule sees it: None until fit() fixes it from
        # its steps or plans it from a budget; saved in checkpoints, so a resumed run keeps its schedule.
        self.total_steps: int | None = None
        self.warmup_steps: int = cfg.warmup
        self.plan: dict | None = None  # how a budget run chose total_steps (throughput, budget, reserve)
        self.clock: Callable[[], float] = time.perf_counter  # wall clock of fit() (a test can pass a fake one)

    # -- one optimisation step ------------------------------------------------------------------
    def _mine(self, draw: torch.Tensor) -> torch.Tensor:
        """This process's rows of a draw for the global batch (``world_size`` equal parts, in rank order)."""
        b = draw.shape[0] // self.world_size
        return draw[self.rank * b:(self.rank + 1) * b]

    def _batch(self) -> torch.Tensor:
        G = self.config.batch_size * self.world_size  # the global batch: every process draws all of it
        idx = self._mine(self.order.take(G)).to(self.device, non_blocking=True)
        x0 = self.images[idx]
        x0 = x0.to(torch.float32) / 127.5 - 1.0 if x0.dtype == torch.uint8 else x0.to(torch.float32)
        if self.config.hflip:
            flip = self._mine(torch.rand(G, generator=self.gen, device=self.device)) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        return x0  # [B, C, H, W] on [-1, 1]

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """The v- or epsilon-prediction loss on a batch ``x0`` [B, C, H, W] (draws t and eps from ``self.gen``)."""
        B, dev = x0.shape[0], self.device
        G = B * self.world_size  # t and eps are drawn for the global batch
        t = self._mine(torch.randint(0, self.schedule.num_train_timesteps, (G,), generator=self.gen, device=dev))
        eps = self._mine(torch.randn((G, *x0.shape[1:]), generator=self.gen, device=dev, dtype=torch.float32))
        a, s = self.sqrt_ab[t].view(B, 1, 1, 1), self.sqrt_1m_ab[t].view(B, 1, 1, 1)
        x_t = a * x0 + s * eps  # q(x_t | x0)
        target = a * eps - s * x0 if self.config.prediction == "v" else eps  # [B, C, H, W]
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.forward(x_t, t, return_dict=False)[0]
        return F.mse_loss(out.float(), target)

    @contextlib.contextmanager
    def _seeded_global_rng(self):
        """Dropout draws from the global RNG: fork it and seed it from ``cpu_gen`` for this step only."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.cpu_gen))
        seed = mix_seed(seed, self.rank) if self.rank else seed  # each process its own dropout masks
        if self.cuda:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            with torch.random.fork_rng(devices=[index], device_type="cuda"):
                torch.default_generator.manual_seed(seed)
                torch.cuda.default_generators[index].manual_seed(seed)
                yield
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                yield

    def train_step(self) -> torch.Tensor:
        """One step of AdamW + clipping + EMA update; returns the (device) loss."""
        with self._seeded_global_rng():
            x0 = self._batch()
            loss = self.loss(x0)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config, self.total_steps, self.warmup_steps)
        self.optimizer.step()
        self.step += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params],
                                 1.0 - ema_decay_at(self.step, self.config.ema_decay))
        loss = loss.detach()
        self._pending.append(loss)
        if len(self._pending) >= 4 * LOG_EVERY:  # callers driving train_step themselves
            self._flush_losses()
        return loss

    def _flush_losses(self) -> None:
        """Read pending losses back (one device sync) and update the loss EMA and history in step order."""
        if not self._pending:
            return
        values = torch.stack(self._pending).cpu().tolist()
        first = self.step - len(values) + 1
        self._pending = []
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise LocaldiffError(f"the training loss became {v} at step {first + i}; lower --lr or check the data")
            self.loss_ema = v if self.loss_ema is None else LOSS_EMA_DECAY * self.loss_ema + (1 - LOSS_EMA_DECAY) * v
            self._block[0] += v
            self._block[1] += 1
            if (first + i) % LOG_EVERY == 0:
                self.loss_log.append([first + i, self._block[0] / self._block[1]])
                self._block = [0.0, 0]

    # -- the loop -------------------------------------------------------------------------------
    def signal_flag(self, enabled: bool):
        """The flag fit() checks between steps, set by the first Ctrl-C or SIGTERM (:mod:`.signals`)."""
        return deferred_signals(enabled)

    def set_total_steps(self, total: int) -> None:
        """Fix the run's length for the learning-rate schedule (and the warm-up that goes with it).

        Changing it after training started (a resumed run extended with more --steps) re-fits the
        cosine from the current step on, so the run no longer equals an uninterrupted one: warned.
        """
        total = int(total)
        if self.total_steps == total:
            return
        if self.total_steps is not None and self.step > 0 and self.config.lr_decay == "cosine":
            warnings.warn(f"the learning-rate schedule was fitted to {self.total_steps} steps; it is re-fitted to "
                          f"{total} steps from step {self.step}, so this run will not equal an uninterrupted "
                          f"{total}-step run", RuntimeWarning)
        self.total_steps = total
        self.warmup_steps = warmup_for(self.config, total)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def fit(self, steps: int | None = None, *, budget_s: float | None = None, total_steps: int | None = None,
            checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 1000,
            keep_checkpoints: int = 1, progress: bool = True, handle_signals: bool = True,
            label: str | None = None, callback: Callable[["UNetTrainer"], None] | None = None) -> "UNetTrainer":
        """Train until ``self.step == steps``, or for at most ``budget_s`` seconds of wall time, or both.

        ``total_steps`` is the run's planned length (the end of the cosine learning-rate decay);
        default ``steps``, or the length already planned for a resumed run. With ``budget_s`` and no
        planned length, the first seconds (5% of the budget, 2-60 s) measure throughput, a checkpoint
        is written and timed, and the total is fixed so that training and its checkpoints end inside the
        budget (capped at ``steps`` when given); ``self.plan`` records how. With a planned length
        ``budget_s`` is a deadline only. Training that reaches the deadline early stops there
        (recorded as ``stopped_early``). Checkpoints every ``checkpoint_every`` steps and at the end.

        With ``handle_signals`` (main thread only) the first Ctrl-C or SIGTERM lets the current step
        finish, writes a checkpoint (when ``checkpoint_dir`` is set) and raises :class:`TrainingInterrupted`.
        ``callback(trainer)`` runs after every step.
        """
        from ..distributed import tqdm

        if steps is None and budget_s is None and total_steps is None and self.total_steps is None:
            raise ConfigError("fit() needs steps, a time budget (budget_s), or both")
        if steps is not None and steps < self.step:
            raise ConfigError(f"the run is already at step {self.step}; --steps must be at least that, got {steps}")
        if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
            raise ConfigError(f"the time budget must be a positive number of seconds, got {budget_s}")
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every}")
        start_step, t0 = self.step, self.clock()
        planning = budget_s is not None and self.total_steps is None and total_steps is None
        if not planning:
            self.set_total_steps(total_steps or steps or self.total_steps)
        target = steps if steps is not None else self.total_steps  # None until a budget run is planned
        record = {"label": label, "start_step": start_step, "end_step": start_step, "wall_s": 0.0,
                  "device": str(self.device), "device_name": device_name(self.device),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget_s,
                  "total_steps": self.total_steps, "stopped_early": False}
        self.history.append(record)
        bar = tqdm(total=target, initial=self.step, desc="train-unet", unit="step", disable=not progress,
                   dynamic_ncols=True)
        rate_mark = [self.clock(), self.step]

        def sync_record():
            now = self.clock()
            record["end_step"], record["wall_s"] = self.step, now - t0
            return now

        def advance(flag) -> None:
            """One step with its bookkeeping: progress, callback, loss log, Ctrl-C, periodic checkpoint."""
            self.train_step()
            bar.update(1)
            if callback is not None:
                callback(self)
            at_ckpt = checkpoint_dir is not None and self.step % checkpoint_every == 0
            if self.step % LOG_EVERY == 0 or self.step == target or at_ckpt or flag["sig"]:
                self._flush_losses()
                now = self.clock()
                rate = (self.step - rate_mark[1]) * self.config.batch_size / max(now - rate_mark[0], 1e-9)
                rate_mark[:] = [now, self.step]
                bar.set_postfix(loss=f"{self.loss_ema:.4f}", img_s=f"{rate:.0f}", refresh=False)
            if flag["sig"]:
                sync_record()
                path = None
                if checkpoint_dir is not None:
                    path = self.save_checkpoint(checkpoint_dir, keep=keep_checkpoints)
                raise TrainingInterrupted(self.step, path, flag["sig"])
            if at_ckpt and self.step != target:
                sync_record()
                self.save_checkpoint(checkpoint_dir, keep=keep_checkpoints)

        ckpt_s = 0.0  # measured cost of one checkpoint (0 without checkpoints)
        try:
            with self.signal_flag(handle_signals) as flag:
                if planning:
                    self._plan_budget(budget_s, steps, t0, lambda: advance(flag), checkpoint_dir,
                                      checkpoint_every, keep_checkpoints)
                    ckpt_s = self.plan["checkpoint_s"]
                    target = self.total_steps
                    record["total_steps"] = target
                    bar.total = target
                    bar.refresh()
                elif budget_s is not None:
                    ckpt_s = (self.plan or {}).get("checkpoint_s", 0.0) if checkpoint_dir is not None else 0.0
                # Leave the time of the final checkpoint (and a little more) before the deadline.
                stop_at = None if budget_s is None else t0 + budget_s - 1.2 * ckpt_s - 0.01 * budget_s
                while self.step < target:
                    if stop_at is not None and self.clock() > stop_at:
                        record["stopped_early"] = True
                        break
                    advance(flag)
            self._flush_losses()
            sync_record()
            if checkpoint_dir is not None and self._saved_step != self.step:
                self.save_checkpoint(checkpoint_dir, keep=keep_checkpoints)
        finally:
            bar.close()
            sync_record()
        return self

    def _plan_budget(self, budget_s: float, cap: int | None, t0: float, advance: Callable[[], None],
                     checkpoint_dir, checkpoint_every: int, keep: int) -> None:
        """Measure throughput for the first seconds, time one checkpoint, then fix ``total_steps``."""
        calib_s = min(max(2.0, 0.05 * budget_s), 60.0)
        chunk = 10 if self.cuda else 1  # steps between device syncs while measuring
        marks = [(self.clock(), self.step)]
        while self.clock() < t0 + calib_s and (cap is None or self.step < cap):
            for _ in range(chunk):
                if cap is not None and self.step >= cap:
                    break
                advance()
            self._sync()
            marks.append((self.clock(), self.step))
        # Throughput from the marks after the first 30% of the window (start-up, compilation, cudnn
        # autotuning); from all of them when the steps are too slow for that.
        late = [m for m in marks[1:] if m[0] >= t0 + 0.3 * calib_s]
        first, last = (late[0], late[-1]) if len(late) >= 2 else (marks[0], marks[-1])
        rate = (last[1] - first[1]) / max(last[0] - first[0], 1e-9)  # steps per second
        ckpt_s = 0.0
        if checkpoint_dir is not None:  # a first checkpoint, early: it also prices the ones to come
            start = self.clock()
            self.save_checkpoint(checkpoint_dir, keep=keep)
            ckpt_s = self.clock() - start
        now = self.clock()
        margin = 0.02 * budget_s + 1.2 * ckpt_s  # drift, and the final checkpoint
        more = 0
        for _ in range(3):  # periodic checkpoints cost time too: settle their count
            periodic = more // checkpoint_every if checkpoint_dir is not None else 0
            left = t0 + budget_s - now - margin - periodic * ckpt_s
            more = max(0, int(rate * left))
        total = self.step + more
        if cap is not None:
            total = min(total, cap)
        self.plan = {"budget_s": budget_s, "calibration_s": now - t0 - ckpt_s, "calibration_steps": self.step,
                     "steps_per_s": rate, "images_per_s": rate * self.config.batch_size,
                     "checkpoint_s": ckpt_s, "planned_steps": total, "cap": cap}
        self.set_total_steps(total)

    @property
    def total_wall_s(self) -> float:
        return sum(r["wall_s"] for r in self.history)

    @property
    def images_per_s(self) -> float | None:
        """Training images per second of wall time over every fit() segment (checkpoints included)."""
        steps = sum(r["end_step"] - r["start_step"] for r in self.history)
        return steps * self.config.batch_size / self.total_wall_s if self.total_wall_s > 0 else None

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, root: str | os.PathLike, *, keep: int = 1) -> Path:
        """Write the complete training state to ``root/step-N`` atomically; keep the newest ``keep``."""
        self._flush_losses()
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        opt_tensors, opt_rest = split_optimizer_state(self.optimizer.state_dict())
        tensors = {"model": self.model.state_dict(), "ema": dict(zip(names, self.ema)), "optimizer": opt_tensors,
                   "rng": {"device": self.gen.get_state(), "cpu": self.cpu_gen.get_state()}}
        final = write_checkpoint(root, self.step, tensors, {
            "data_order": self.order.state(),
            "device_type": self.device.type,
            "loss_ema": self.loss_ema,
            "loss_block": self._block,
            "loss_log": self.loss_log,
            "history": self.history,
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "schedule": schedule_record(self.schedule, self.config.prediction),
            "lr_schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
            "plan": self.plan,
            "world_size": self.world_size,  # processes: the global batch is world_size x batch_size
            "data": {"name": self.data.name, "fingerprint": self.data.fingerprint, "num": len(self.data),
                     "shape": list(self.data.shape)},
            "optimizer": opt_rest,
        }, keep=keep)
        self._saved_step = self.step
        return final

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, data, *, device: str | None = None,
                        amp: bool | None = None, channels_last: bool | None = None, compile: bool | None = None,
                        schedule: Schedule = DEFAULT_SCHEDULE) -> "UNetTrainer":
        """Rebuild a trainer from a checkpoint (see :func:`find_checkpoint`) on the same ``data``.

        Only the runtime choices (device, amp, channels_last, compile) may change on resume.
        """
        ckpt, state = read_checkpoint(path)
        want = state["data"]
        if data.fingerprint != want["fingerprint"]:
            raise ConfigError(
                f"--resume: the data differ from the checkpoint's ({data.name}, {len(data)} images, fingerprint "
                f"{data.fingerprint[:12]} vs {want['name']}, {want['num']} images, {want['fingerprint'][:12]}); "
                "pass the same data options as the original run")
        tc = state["train_config"]
        # checkpoints from before v-prediction and the cosine decay trained epsilon, at a constant rate
        tc.setdefault("prediction", "epsilon")
        tc.setdefault("lr_decay", "constant")
        if state["schedule"] != schedule_record(schedule, tc["prediction"]):
            raise ConfigError(f"--resume: the checkpoint was trained with schedule {state['schedule']}")
        for key, value in (("device", device), ("amp", amp), ("channels_last", channels_last), ("compile", compile)):
            if value is not None:
                tc[key] = value
        trainer = cls(data, UNetConfig.from_dict(state["model_config"]), TrainConfig.from_dict(tc), schedule)
        procs = state.get("world_size", 1)
        if procs != trainer.world_size:  # the global batch (procs x batch size) is part of the recipe
            raise ConfigError(f"--resume: the checkpoint was trained by {procs} process(es) (global batch "
                              f"{procs * tc['batch_size']}); resume it with {procs} (torchrun --nproc-per-node), not "
                              f"{trainer.world_size}")
        trainer._load_state(ckpt, state)
        return trainer

    def _load_state(self, ckpt: Path, state: dict) -> None:
        weights = load_tensors(ckpt / "model.safetensors")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint {ckpt} does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        ema = load_tensors(ckpt / "ema.safetensors")
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if sorted(ema) != sorted(names):
            raise ConfigError(f"checkpoint {ckpt}: EMA weights do not match the model's parameters")
        with torch.no_grad():
            for e, n in zip(self.ema, names):
                e.copy_(ema[n])
        sd = join_optimizer_state(load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
        self.optimizer.load_state_dict(sd)
        for p in self.params:  # keep the optimizer state in the parameters' memory format
            st = self.optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        rng = load_tensors(ckpt / "rng.safetensors")
        self.cpu_gen.set_state(rng["cpu"])
        if state["device_type"] == self.device.type:
            self.gen.set_state(rng["device"])
        else:
            warnings.warn(f"resuming a {state['device_type']} run on {self.device.type}: timesteps and noise now come "
                          "from a fresh stream, so the result will differ from an uninterrupted run", RuntimeWarning)
            self.gen.manual_seed(mix_seed(self.config.seed, 1, state["step"]))
        order = state["data_order"]
        self.order = DataOrder(order["num"], order["seed"], order["epoch"], order["position"])
        self.step = int(state["step"])
        self.loss_ema = state["loss_ema"]
        self._block = list(state["loss_block"])
        self.loss_log = [list(x) for x in state["loss_log"]]
        self.history = list(state["history"])
        self._saved_step = self.step
        lr_schedule = state.get("lr_schedule") or {}
        self.total_steps = lr_schedule.get("total_steps")
        self.warmup_steps = lr_schedule.get("warmup_steps", self.config.warmup)
        self.plan = state.get("plan")

    # -- export ---------------------------------------------------------------------------------
    def ema_model(self, dtype: torch.dtype = torch.float32):
        """A fresh ``UNet2DModel`` (CPU, eval mode) holding the EMA weights."""
        from .export import ema_model

        return ema_model(self, dtype)

    def export(self, out: str | os.PathLike, *, dtype: str = "fp32", extra: dict | None = None) -> Path:
        """Write the EMA network in diffusers format and its manifest into ``out`` (:mod:`.export`)."""
        from .export import export

        self._flush_losses()
        return export(self, out, dtype=dtype, extra=extra)
