"""The paper's analytical denoiser ``masked``, the Wiener-masked local denoiser (docs/DESIGN.md §2.5),
exact and fast.

For each output pixel i a binary mask ``S_i(t)`` is read from the Wiener gain (:mod:`.masks`); then, per
pixel, a softmax over the training images

    w_{k,i} ∝ exp(-sum_{m in S_i} (x_t[m] - a y_k[m])^2 / (2 b2 T)),      x0_hat[i] = sum_k w_{k,i} y_k[i].

How it is computed: :mod:`.masked_plan` cuts the output pixels into tiles and picks the tiling per
timestep; :mod:`.masked_kernel` streams the training set against every tile with exact max-shifted
softmax states (worker threads on the CPU, merged at the end). This module holds the model: options,
per-timestep caches (masks, plans and the query-independent term Q), the plainly written
differentiable path used under autograd, and the closed-form Jacobian. In a torchrun job each rank
streams its shard of the training set and the partial sums are merged over the ranks
(:func:`localdiff.distributed.merge_ranks`) before the output is formed, so every rank holds the same
x0_hat; the masks come from the merged statistics, identical on every rank.

Exactness: the default float32 products evaluate the logit in its expanded form, whose terms are
``O(|S_i| / b2)`` while differences between images can be O(1): the absolute logit error is about
``eps32 |S_i| / b2``. It only matters between near-tied images, which agree at pixel i to within
~sqrt(b2), so x0_hat stays within ~1e-5: on 10,000 MNIST images, float32 vs float64 differ by at
most 4.4e-5 (mean 1e-6) at every t from 900 to 0. ``dtype="float64"`` agrees with a float64
brute-force reference to 1e-9 (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ...data.shards import total_images
from ...errors import ConfigError
from ...schedules import NoiseLevel
from ...stats import Spectrum, data_spectrum
from ..base import Capabilities
from ..stream import ColumnBlocks, SoftmaxState, StreamedDenoiser, StreamOptions, merge
from .kernel import CHUNK_AVERAGE_EPS, LOG2E, KernelInputs, Partial, QOperator, run_workers, stream
from .masks import Normalization, default_tau, masked_logits, pixels_outside_own_mask, wiener_masks
from .official import (OFFICIAL_BATCH, OfficialStatistics, lost_pixels, official_alpha_bar, official_level,
                       official_masks, official_statistics, warn_lost)
from .plan import MaskPlan, PlanPath, plan_masks
from .schedule import MaskedSchedule, PerLevelTau, read_masked_schedule

BLOCK_ELEMENTS = 450_000  # CPU: a tile's gathered rows plus logits per block of training images (~1.8 MB)


@dataclass
class MaskedConfig(StreamOptions):
    tau: float | None = None  # mask threshold, a fraction of max |normalised G_t|; None = by image shape
    temperature: float = 1.0  # softmax temperature T
    tau_schedule: str | None = None  # JSON file timestep -> tau and temperature (localdiff calibrate-masked);
    # overrides tau and temperature
    normalize: Normalization = "diag"  # mask normalisation: "diag" (official, row by its diagonal) or "sym"
    chunk: int | None = None  # training images per streamed block (None: per timestep on the CPU); exact mode
    # does not depend on it
    chunk_average: int | None = None  # compatibility: the official chunk-normalised softmax, chunks of N
    # (None: none in exact mode, 512 with compat=official)
    compat: Literal["exact", "official"] = "exact"  # "official": the published code's numbers (.official):
    # float32 sample-covariance statistics and masks, chunk-normalised softmax in chunks of chunk_average
    dtype: Literal["float32", "float64"] = "float32"  # arithmetic of the big products; softmax states are float64
    path: PlanPath = "auto"  # "auto" (tiles and cores chosen from the masks by a cost model), "grouped"
    # (tiles, every non-empty core used) or "dense" (tiles read every pixel: no use of sparsity)
    tile: tuple[int, int] | None = None  # output tile shape (rows, columns), e.g. (2, 4) or --opt tile=2x4;
    # None: chosen per timestep
    threads: int | None = None  # CPU: worker threads, each streaming its share of the training blocks
    # with single-threaded torch ops (None: torch.get_num_threads()); ignored on a GPU
    cache_mb: int = 1024  # in-memory per-timestep cache (masks, plans, the query-independent Q)
    cache: bool = True  # reuse the on-disk statistics cache


class MaskedDenoiser(PerLevelTau, StreamedDenoiser):
    """Wiener-masked local denoiser: per pixel, the exact softmax average of the training images
    restricted to the pixel's Wiener mask (docs/DESIGN.md §2.5).

    ``chunk_average=N`` reproduces the official code's streaming instead: softmax normalised within
    each block of N consecutive training images, the blocks' weighted means averaged. It is not the
    default because its result depends on N (on 2,000 MNIST images, N=512 vs one block: final samples
    differ by up to 1.9 on the [-1, 1] scale); it is not the model the paper writes down.
    ``compat="official"`` goes further and reproduces the published code's numbers (:mod:`.official`):
    its float32 sample-covariance statistics and masks, bit for bit, and ``chunk_average`` (default 512,
    its data loader's batch size); a given ``spectrum`` is then not used.

    ``masks`` (a bool [n, n] tensor or a function t -> tensor, column i = S_i) replaces the Wiener
    masks, e.g. for square-window ablations; ``spectrum`` gives precomputed data statistics.
    """

    name = "masked"
    Config = MaskedConfig
    capabilities = Capabilities(closed_form_jacobian=True, slow_autograd=True, single_image_exact=True)
    uses_statistics = True
    merges_shards = True

    def __init__(self, data, config: MaskedConfig, schedule=None, *, spectrum: Spectrum | None = None,
                 masks: torch.Tensor | Callable[[int], torch.Tensor] | None = None):
        super().__init__(data, config, schedule)  # validates the options, builds the pixel-major set
        config = self.config
        if self.chunk_average is not None:  # the compatibility modes: autograd only
            self.capabilities = dataclasses.replace(self.capabilities, closed_form_jacobian=False)
        if config.tau is None:
            self.tau, self.tau_rule = default_tau(self.shape)
        else:
            self.tau, self.tau_rule = float(config.tau), "given"
        self.tau_schedule: MaskedSchedule | None = None
        if config.tau_schedule is not None:
            self.tau_schedule = read_masked_schedule(config.tau_schedule)
            self.tau_rule = "schedule"
        self._mask_override = masks
        self.official: OfficialStatistics | None = None
        if masks is None and self.official_mode:  # the published code's float32 statistics, its loader's batches
            self.official = official_statistics(data, self.chunk_average, self.device)
            self.spectrum = None
        elif masks is None:
            spec = spectrum if spectrum is not None else data_spectrum(data, device="cpu", cache=config.cache)
            self.spectrum = spec.to(self.device)
        else:
            self.spectrum = spectrum.to(self.device) if spectrum is not None else None
        self._fixed_width = config.chunk is not None or self.chunk_average is not None or self.device.type != "cpu"
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # per level (a, b2)
        self._plans: OrderedDict[tuple, MaskPlan] = OrderedDict()  # per level and batch size
        self._q: dict[tuple, torch.Tensor] = {}  # Q [n, K] per level

    @property
    def official_mode(self) -> bool:
        """Whether the model reproduces the published code's numbers (``compat="official"``)."""
        return self.config.compat == "official"

    @property
    def chunk_average(self) -> int | None:
        """Images per chunk of the chunk-normalised softmax: ``chunk_average``, else 512 with
        ``compat="official"``; None for the exact global softmax."""
        if self.config.chunk_average is not None:
            return self.config.chunk_average
        return OFFICIAL_BATCH if self.official_mode else None

    def training_set(self, data) -> ColumnBlocks:
        """The training images pixel-major, ``YT`` [n, K] (:class:`ColumnBlocks`), in blocks of ``chunk``
        images (``chunk_average``'s blocks; else about 8 MB (float32) on the CPU, 256 MB on a GPU: on the
        CPU the tiled path sizes its blocks per timestep instead, see :meth:`_block_width`)."""
        config = self.config
        if self.chunk_average is not None and total_images(data) != len(data):
            what = "compat=official" if self.official_mode else "chunk_average"
            raise ConfigError(f"masked: {what} (the official chunk-normalised softmax) depends on how the set "
                              f"is cut into blocks, so it runs in one process; drop {what} or run without torchrun")
        if self.chunk_average is not None:
            chunk = self.chunk_average
        elif config.chunk is not None:
            chunk = config.chunk
        else:
            budget = (64 << 20) if self.device.type == "cuda" else (2 << 20)  # elements
            chunk = max(256, min(total_images(data), budget // self.dim))  # the same on every rank: the plan
            # depends on it, and the ranks' states must have the same tiles
        return ColumnBlocks(data, device=self.device, dtype=self.dtype, chunk=chunk, resident=config.resident)

    @property
    def columns(self) -> ColumnBlocks:
        """The training set, pixel-major (one column per image)."""
        return self.train_set

    def validate(self) -> None:
        self._validate(self.config)
        c = self.config
        if c.compat == "official":
            if type(self) is not MaskedDenoiser:  # a variant computes another model: nothing to be compatible with
                raise ConfigError(f"{self.name}: compat=official exists only for the masked model (the one the "
                                  "published code implements); drop it")
            if c.normalize != "diag":
                raise ConfigError("masked: compat=official normalises the gain as the published code does (row by "
                                  f"its diagonal); drop normalize={c.normalize} or use compat=exact")
            if c.tau == 0:
                raise ConfigError("masked: compat=official needs tau > 0: with tau = 0 the published code skips the "
                                  "threshold and weighs pixels by the normalised gain, another model; use compat=exact")

    @staticmethod
    def _validate(c: MaskedConfig) -> None:
        if c.tau is not None and not (0.0 <= c.tau <= 1.0):
            raise ConfigError(f"tau must lie in [0, 1] (a fraction of the largest normalised gain), got {c.tau}")
        if not (c.temperature > 0 and math.isfinite(c.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {c.temperature}")
        for key in ("chunk", "chunk_average"):
            v = getattr(c, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be a positive number of images, got {v}")
        if c.tile is not None and min(c.tile) < 1:
            raise ConfigError(f"tile must be two positive integers (rows x columns of output pixels), got {c.tile}")
        if c.threads is not None and c.threads < 1:
            raise ConfigError(f"threads must be a positive number of CPU worker threads, got {c.threads}")
        if c.cache_mb < 0:
            raise ConfigError(f"cache_mb must be >= 0, got {c.cache_mb}")

    def settings(self) -> dict:
        out = super().settings()
        out.update(tau=self.tau, tau_rule=self.tau_rule,
                   tau_schedule_params=self.tau_schedule.to_dict() if self.tau_schedule is not None else None,
                   chunk=self.columns.chunk if self._fixed_width else "per timestep",
                   masks="given" if self._mask_override is not None else "wiener", chunk_average=self.chunk_average)
        if self.official is not None:
            out["official_statistics"] = self.official.record()
        return out

    # -- masks and plans ------------------------------------------------------------------------
    def masks(self, t) -> torch.Tensor:
        """The masks at the level ``t`` (a timestep or a NoiseLevel), bool [n, n] on the device; column i is
        S_i (cached per level)."""
        level = self.schedule.at(t)
        if level.key in self._masks:
            self._masks.move_to_end(level.key)
            return self._masks[level.key]
        m = self._compute_masks(level)
        self._masks[level.key] = m
        self._trim(self._masks, self._cache_bytes() // 4)
        return m

    def _compute_masks(self, level: NoiseLevel) -> torch.Tensor:
        """The masks at timestep t: the given ones, or the Wiener masks (warning when they degenerate)."""
        if self._mask_override is not None:
            arg = level.t if level.t is not None else level  # a function of the timestep (or of the level)
            m = self._mask_override(arg) if callable(self._mask_override) else self._mask_override
            m = torch.as_tensor(m).to(device=self.device, dtype=torch.bool)
            if m.shape != (self.dim, self.dim):
                raise ConfigError(f"masks must have shape [{self.dim}, {self.dim}], got {tuple(m.shape)}")
            return m
        if self.official is not None:  # the published code's float32 masks
            alpha_bar, tau = official_alpha_bar(level, self.schedule), self.tau_at(level)
            m = official_masks(self.official, alpha_bar, tau)
            warn_lost(self.name, level.label, *lost_pixels(m, self.official, alpha_bar), tau)
            return m
        a, b2, tau = level.a, level.b2, self.tau_at(level)
        m = wiener_masks(self.spectrum, a, b2, tau, self.config.normalize)
        lost, varying = pixels_outside_own_mask(m, self.spectrum, a, b2)
        if lost:
            warnings.warn(
                f"{self.name}: at {level.label}, {lost} of {varying} varying pixels are missing from their own "
                f"mask (normalize='{self.config.normalize}', tau={tau}); a nearly constant pixel dominates "
                "the threshold and the outputs collapse towards the mean image. Use normalize=sym (well "
                "conditioned) or more training images.", RuntimeWarning, stacklevel=3)
        return m

    def mask_density(self, t) -> float:
        """Fraction of ones in the masks at timestep t."""
        return float(self.masks(t).double().mean())

    def plan(self, t, batch: int = 8) -> MaskPlan:
        """The tiling used at the level ``t`` for ``batch`` queries (cached)."""
        level = self.schedule.at(t)
        key = (level.key, int(batch))
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        p = self._make_plan(self.masks(level), int(batch))
        self._plans[key] = p
        self._trim(self._plans, self._cache_bytes() // 4)
        return p

    def _make_plan(self, masks: torch.Tensor, batch: int) -> MaskPlan:
        return plan_masks(masks, self.shape, batch, path=self.config.path, chunk=self.columns.chunk,
                          tile=self.config.tile)

    def clear_cache(self) -> None:
        """Forget the cached masks, plans and query-independent terms."""
        self._masks.clear()
        self._plans.clear()
        self._q.clear()

    def _cache_bytes(self) -> int:
        return int(self.config.cache_mb) << 20

    @staticmethod
    def _nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, MaskPlan):
            return MaskedDenoiser._nbytes(obj.masks) + sum(
                sum(MaskedDenoiser._nbytes(v) for v in (tl.out, tl.core, tl.resid, tl.sub_t)) for tl in obj.tiles)
        return sum(MaskedDenoiser._nbytes(v) for v in obj)

    def _trim(self, store: OrderedDict, budget: int) -> None:
        """Drop least recently used entries beyond ``budget`` bytes, always keeping the newest."""
        while len(store) > 1 and sum(self._nbytes(v) for v in store.values()) > budget:
            store.popitem(last=False)

    def _q_may_cache(self) -> bool:
        """Whether one more timestep of Q [n, K] fits the budget (kept entries are never evicted:
        the sampler visits timesteps cyclically, so keeping the first ones beats LRU)."""
        per_t = self.dim * len(self.columns) * torch.finfo(self.dtype).bits // 8
        used = sum(self._nbytes(v) for v in self._q.values())
        return used + per_t <= self._cache_bytes() * 3 // 4

    # -- the denoiser ---------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        x = x_t.reshape(x_t.shape[0], -1)  # [B, n]
        if torch.is_grad_enabled() and x.requires_grad:
            out = self._denoise_differentiable(x.to(torch.float64), level)
        else:
            out = self._denoise_tiled(x.to(self.dtype), level)
        return out.reshape(x_t.shape)

    def level_coefficients(self, level: NoiseLevel) -> tuple[float, float]:
        """``(a, b2)`` of the logits at ``level``: the level's own, or with ``compat="official"`` the float32
        values the published code uses (from diffusers' float32 alpha_bar)."""
        if self.official_mode:
            return official_level(official_alpha_bar(level, self.schedule))
        return level.a, level.b2

    def _coefficients(self, level: NoiseLevel) -> tuple[float, float]:
        """``alpha``, ``beta`` of the log2-unit logit ``alpha x.y - beta Q``."""
        (a, b2), T = self.level_coefficients(level), self.temperature_at(level)
        return a * LOG2E / (b2 * T), a * a * LOG2E / (2.0 * b2 * T)

    def _workers(self) -> int:
        """Worker threads of the tiled path: on the CPU ``threads`` (default: torch's intra-op thread
        count), on a GPU one."""
        if self.device.type != "cpu":
            return 1
        return max(1, int(self.config.threads or torch.get_num_threads()))

    @torch.no_grad()
    def _denoise_tiled(self, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """The fast exact path: ``x`` [B, n] -> x0_hat [B, n] (float64).

        The training blocks are shared out among the worker threads (:func:`.masked_kernel.stream`);
        each keeps its own softmax state per tile and the states are merged here. On a CPU every worker
        runs torch single-threaded: the products of a tile are small ([k, ~400] x [~400, B*g]), and
        splitting each of them over the cores wastes much of the time in synchronisation
        (bench_masked.py on 2 cores: two workers are 1.5x (t = 900) to 3.2x (t = 0) faster than one
        stream using both cores for every product).
        """
        B, n = x.shape
        plan = self.plan(level, B)
        alpha, beta = self._coefficients(level)
        q_cached = self._q.get(level.key)
        store = q_cached is None and self._q_may_cache()
        workers = self._workers()
        # blocks as asked (chunk, chunk_average), else in a number the workers share evenly
        bounds = self.columns.bounds(self._block_width(plan, B), 1 if self._fixed_width else workers)
        workers = min(workers, len(bounds))
        inputs = KernelInputs.build(
            plan, x, alpha, beta, q_cached=q_cached,
            q_op=self._q_operator(plan) if q_cached is None else None,
            q_store=torch.empty((n, len(self.columns)), device=self.device, dtype=self.dtype) if store else None,
            workers=workers, chunk_average=self.chunk_average is not None)
        shares = [bounds[w::workers] for w in range(workers)]
        parts = run_workers(lambda share: stream(inputs, self.columns, share), shares)
        if store:
            self._q[level.key] = inputs.q_store
        part = self.merge_ranks(functools.reduce(Partial.merge, parts))  # every rank's images
        return part.finish(plan, B, self.columns.total)

    def _q_operator(self, plan: MaskPlan) -> QOperator:
        """How the query-independent term ``Q = M^T (Y*Y)`` of this plan is computed on a cache miss."""
        return QOperator.of(plan, self.shape, self.dtype)

    def _block_width(self, plan: MaskPlan, B: int) -> int:
        """Training images per block for this plan: the given ``chunk``, or on the CPU as many as keep a
        tile's working set (gathered rows [u, k] and logits [k, B*g]) near ``BLOCK_ELEMENTS``. Measured
        on MNIST: ~750 at high noise (u ~ 450, B*g = 128) is 10-15% faster than 2,500, while at low noise
        (u < 100) wide blocks win, the per-call overheads dominating."""
        if self._fixed_width or not plan.tiles:
            return self.columns.chunk
        rows = sum(B + 1 + len(tl.out) + len(tl.resid) + len(tl.core) for tl in plan.tiles) / len(plan.tiles)
        cols = max(B * len(tl.out) for tl in plan.tiles)
        return int(min(max(BLOCK_ELEMENTS / (rows + cols), 512), 8192))

    def _denoise_differentiable(self, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """The same model written plainly (``masked_logits``, autograd-friendly, float64), block by block
        [B, k, n]; used when ``x_t`` requires a gradient. Meant for small sets: autograd keeps every block."""
        M = self.masks(level)
        (a, b2), T = self.level_coefficients(level), self.temperature_at(level)
        x = self.rank_input(x)
        state = mean_sum = None
        blocks = 0
        for yt in self.columns:
            y = yt.T.to(torch.float64)  # [k, n]
            logits = masked_logits(x, y, M, a, b2, T)  # [B, k, n]: one softmax over k per query and pixel
            part = SoftmaxState.from_logits(logits, 1, lambda e: (e * y[None]).sum(dim=1))
            if self.chunk_average is not None:  # official: each block's own mean, the means averaged
                mean_sum = part.mean() if mean_sum is None else mean_sum + part.mean()
            else:
                state = merge(state, part)
            blocks += 1
        if state is None:
            return mean_sum / (blocks + CHUNK_AVERAGE_EPS)
        return self.merge_ranks(state).mean()

    # -- closed-form Jacobian -------------------------------------------------------------------
    @torch.no_grad()
    def why_no_closed_form(self) -> str:
        return ("the closed-form Jacobian needs the exact softmax; drop chunk_average (and compat=official) or use "
                "autograd")

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` at each input, [B, Q, n], float64.

        Closed form (docs/DESIGN.md §3): ``d x0_hat_i / d x_t[m] = (a / (b2 T)) 1[m in S_i] Cov_{w_i}(y[i], y[m])``,
        streamed over the training set with a max-shifted softmax per query and row (exact mode only).
        """
        a, b2, T = level.a, level.b2, self.temperature_at(level)
        x = x_t.reshape(x_t.shape[0], -1).to(device=self.device, dtype=torch.float64)
        Mq = self.masks(level)[:, index]  # [n, Q]: the masks S_i of the requested rows
        state = None
        for yt in self.columns:
            y = yt.T.to(torch.float64)  # [k, n]
            logits = masked_logits(x, y, Mq, a, b2, T).transpose(1, 2)  # [B, Q, k]: one softmax per query and row
            state = merge(state, SoftmaxState.moments(logits, y, index))
        state = self.merge_ranks(state)
        return (a / (b2 * T)) * state.covariance_rows(index) * Mq.T[None].to(torch.float64)


__all__ = ["MaskedDenoiser", "MaskedConfig"]
