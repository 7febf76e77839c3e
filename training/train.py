"""`oodflow train`: the training loop, checkpoints, resume and time budgets.

Repeatable by construction: batches and dequantization noise come from seeded generators whose
states are checkpointed with the model and optimiser, and the learning-rate schedule is a
function of the step alone, so a run resumed after `kill -9` ends where an uninterrupted run
would.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from models.flows import EmbeddingFlow, PixelFlow, build_model
from models.layers import ActNorm, initialize_actnorm
from models.scores import bits_per_dim, discrete_log_likelihood
from training.config import RunConfig
from training.data import ImageSet
from training.runs import Run, Splits, load_splits, resolve_device
from training.scoring import cached_features

__all__ = [
    "DIVERGENCE_MARGIN_BITS_PER_DIM",
    "TRAIN_REFERENCE_RECORDS",
    "TrainResult",
    "check_divergence",
    "learning_rate",
    "train",
]

# A saved model whose validation bits/dim exceeds the training bits/dim by more than this has
# diverged from what its training loss says (fixed a priori; a healthy flow's gap is a few tenths).
DIVERGENCE_MARGIN_BITS_PER_DIM = 1.0
# The training reference is the mean of the last this-many logged training-batch bits/dim up to the
# saved (selected) step: one batch is noisy, and a few records still describe the model that is
# saved. (Against the last steps instead, a flow that overfits after an early best step would be
# compared with batches it has memorised: a digits embedding flow kept at step 100, 1.7 bits/dim on
# validation, ends at -1.5 on its training batches.)
TRAIN_REFERENCE_RECORDS = 5


@dataclass
class TrainResult:
    """`validation_bits_per_dim` is the saved (selected) model's, `final_validation_bits_per_dim`
    the last step's; `diverged` is `check_divergence` on the saved model (see train_summary.json)."""

    run_dir: Path
    steps: int
    completed: bool
    seconds: float
    final_bits_per_dim: float
    validation_bits_per_dim: float
    selected_step: int
    final_validation_bits_per_dim: float
    train_reference_bits_per_dim: float
    validation_gap_bits_per_dim: float
    diverged: bool
    stopped_early: bool = False


def check_divergence(
    validation_bits_per_dim: float,
    train_bits_per_dim: Sequence[float],
    margin: float = DIVERGENCE_MARGIN_BITS_PER_DIM,
) -> tuple[float, float, bool]:
    """`(train reference, gap, diverged)`: the reference is the mean of the finite values of
    `train_bits_per_dim` (the last logged training batches), the gap is validation minus reference,
    and `diverged` is `gap > margin`. Without a finite validation figure or reference the gap is
    NaN and `diverged` is False (nothing to compare; not a verdict)."""
    finite = [float(b) for b in train_bits_per_dim if math.isfinite(b)]
    reference = sum(finite) / len(finite) if finite else float("nan")
    gap = validation_bits_per_dim - reference
    return reference, gap, bool(math.isfinite(gap) and gap > margin)


def _logged_train_bits_per_dim(log_path: Path, count: int, up_to_step: int | None = None) -> list[float]:
    """The training-batch bits/dim of the last `count` records of `metrics.jsonl` (all sessions)
    whose step is at most `up_to_step` (None: every record)."""
    if not log_path.is_file():
        return []
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if up_to_step is not None:
        records = [r for r in records if int(r["step"]) <= up_to_step]
    return [float(r["bits_per_dim"]) for r in records[-count:]]


def learning_rate(config: RunConfig, step: int) -> float:
    t = config.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.min_lr_fraction
    return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


class _Trainer:
    """Shared loop; subclasses give the batch source and the loss."""

    def __init__(self, run: Run, model: PixelFlow | EmbeddingFlow, splits: Splits, device: torch.device):
        self.run, self.model, self.splits, self.device = run, model, splits, device
        self.config = run.config
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params, lr=self.config.train.lr, weight_decay=self.config.train.weight_decay
        )
        self.batch_generator = torch.Generator().manual_seed(self.config.train.seed)
        self.noise_generator = torch.Generator().manual_seed(self.config.train.seed + 1)
        self.step = 0
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.last_validation: tuple[int, float] | None = None  # (step, bits/dim) this session
        self.since_best = 0  # validations in a row that did not beat the best (this session)

    # hooks
    def prepare(self) -> None: ...
    def loss(self) -> torch.Tensor:  # bits/dim of one batch
        raise NotImplementedError

    def validation_bits_per_dim(self) -> float:
        raise NotImplementedError

    def select_best(self) -> bool:
        return False

    def evaluate_now(self, logged: bool) -> bool:
        """Whether to validate (and track the best step) after the current step; `logged`: the
        step is a log step. Validation runs on log steps that are multiples of `eval_every`
        (`log_every` when 0)."""
        t = self.config.train
        return logged and self.select_best() and self.step % (t.eval_every or t.log_every) == 0

    # checkpointing
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "batch_generator": self.batch_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "best": self.best,
            "config": self.config.model_dump_json(),
        }

    def restore(self, payload: dict[str, Any]) -> None:
        if payload["config"] != self.config.model_dump_json():
            raise ValueError(
                f"{self.run.checkpoint_path}: checkpoint was made with another config; not resuming"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = int(payload["step"])
        self.batch_generator.set_state(payload["batch_generator"])
        self.noise_generator.set_state(payload["noise_generator"])
        self.best = payload["best"]

    def fit(
        self,
        *,
        resume: bool,
        max_minutes: float | None,
        progress: bool,
        on_step: Callable[[int], None] | None = None,
    ) -> TrainResult:
        t = self.config.train
        log_path = self.run.dir / "metrics.jsonl"
        if resume and self.run.checkpoint_path.is_file():
            self.restore(torch.load(self.run.checkpoint_path, map_location=self.device, weights_only=False))
        else:
            self.prepare()
            log_path.write_text("")
        start = time.monotonic()
        images_seen = 0
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not progress,
            desc=self.config.name,
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        last_bpd = float("nan")
        completed = True
        stopped_early = False
        with open(log_path, "a") as log:
            while self.step < t.max_steps:
                if max_minutes is not None and time.monotonic() - start > max_minutes * 60:
                    completed = False
                    break
                self.model.train()
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate(self.config, self.step)
                bpd = self.loss()
                self.optimizer.zero_grad(set_to_none=True)
                bpd.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], t.grad_clip
                )
                self.optimizer.step()
                self.step += 1
                images_seen += t.batch_size
                last_bpd = float(bpd.detach())
                if not math.isfinite(last_bpd):
                    raise FloatingPointError(f"loss became {last_bpd} at step {self.step}; lower train.lr")
                rate = images_seen / max(1e-9, time.monotonic() - start)
                logged = self.step % t.log_every == 0 or self.step == t.max_steps
                evaluate = self.evaluate_now(logged)
                if logged or evaluate:
                    record = {
                        "step": self.step,
                        "bits_per_dim": round(last_bpd, 5),
                        "lr": learning_rate(self.config, self.step - 1),
                        "images_per_s": round(rate, 1),
                        "elapsed_s": round(time.monotonic() - start, 2),
                    }
                    if evaluate:
                        record["validation_bits_per_dim"] = round(self.track_best(), 5)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if evaluate and t.patience and self.since_best >= t.patience:
                        # the best step is `patience` validations old: more steps only fit the
                        # training images further (the selected model is kept either way)
                        stopped_early = True
                        bar.update(1)
                        break
                if self.step % t.checkpoint_every == 0:
                    _save_checkpoint(self.run.checkpoint_path, self.checkpoint_payload())
                bar.set_postfix(bpd=f"{last_bpd:.3f}", img_s=f"{rate:.0f}")
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
        bar.close()
        _save_checkpoint(self.run.checkpoint_path, self.checkpoint_payload())
        final_val_bpd = float("nan")
        if self.select_best():
            last = self.last_validation
            final_val_bpd = last[1] if last is not None and last[0] == self.step else self.track_best()
            assert self.best is not None
            self.model.load_state_dict(self.best[2])
        self.model.eval()
        val_bpd = self.validation_bits_per_dim()
        if not self.select_best():
            final_val_bpd = val_bpd  # the saved model is the last step's
        selected_step = self.best[1] if self.best else self.step
        reference, gap, diverged = check_divergence(
            val_bpd, _logged_train_bits_per_dim(log_path, TRAIN_REFERENCE_RECORDS, up_to_step=selected_step)
        )
        save_file(
            {k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}, str(self.run.weights_path)
        )
        seconds = time.monotonic() - start
        summary = {
            "steps": self.step,
            "completed": completed,
            "seconds_this_session": round(seconds, 1),
            "final_train_bits_per_dim": last_bpd,
            "validation_bits_per_dim": val_bpd,
            "selected_step": selected_step,
            "final_validation_bits_per_dim": final_val_bpd,
            "train_reference_bits_per_dim": reference,
            "validation_gap_bits_per_dim": gap,
            "divergence_margin_bits_per_dim": DIVERGENCE_MARGIN_BITS_PER_DIM,
            "diverged": diverged,
            "stopped_early": stopped_early,
            "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }
        self.run.write_json("train_summary.json", summary)
        return TrainResult(
            self.run.dir,
            self.step,
            completed,
            seconds,
            last_bpd,
            val_bpd,
            selected_step,
            final_val_bpd,
            reference,
            gap,
            diverged,
            stopped_early,
        )

    def track_best(self) -> float:
        val = self.validation_bits_per_dim()
        self.last_validation = (self.step, val)
        if self.best is None or val < self.best[0]:
            self.best = (val, self.step, _state_copy(self.model))
            self.since_best = 0
        else:
            self.since_best += 1
        return val


class _PixelTrainer(_Trainer):
    """With `perturbation_rate` μ > 0 every batch is corrupted afresh at every step: each pixel is
    replaced, with probability μ, by a uniform random value in 0..255 (the background flow of
    Ren et al. 2019, who draw new noise for every minibatch).

    With `train.eval_every` > 0 the step with the best validation bits/dim (every `eval_every`
    steps and the last) is kept; with 0 the last step is."""

    model: PixelFlow

    def __init__(
        self, run: Run, model: PixelFlow, splits: Splits, device: torch.device, perturbation_rate: float = 0.0
    ):
        super().__init__(run, model, splits, device)
        self.train_images = torch.from_numpy(splits.train.images)
        if not 0.0 <= perturbation_rate < 1.0:
            raise ValueError(f"perturbation_rate must be in [0, 1), got {perturbation_rate}")
        self.perturbation_rate = perturbation_rate
        self.perturb_generator = torch.Generator().manual_seed(self.config.train.seed + 3)

    def checkpoint_payload(self) -> dict[str, Any]:
        return {**super().checkpoint_payload(), "perturb_generator": self.perturb_generator.get_state()}

    def restore(self, payload: dict[str, Any]) -> None:
        super().restore(payload)
        if "perturb_generator" in payload:
            self.perturb_generator.set_state(payload["perturb_generator"])

    def select_best(self) -> bool:
        return self.config.train.eval_every > 0 and len(self.splits.validation.images) > 0

    def evaluate_now(self, logged: bool) -> bool:
        """Every `eval_every` steps, logged or not (a pass over the validation images costs far
        more than a training step, so not at every log step); the last step is validated after
        the loop. Not at step 0: the untrained flow is never worth keeping."""
        return self.select_best() and self.step % self.config.train.eval_every == 0

    def perturb(self, batch: torch.Tensor) -> torch.Tensor:
        """`batch: (B, C, H, W) uint8` -> a fresh perturbation of it (unchanged when μ = 0)."""
        if self.perturbation_rate == 0.0:
            return batch
        g = self.perturb_generator
        replace = torch.rand(batch.shape, generator=g) < self.perturbation_rate
        noise = torch.randint(0, 256, batch.shape, generator=g, dtype=torch.uint8)
        return torch.where(replace, noise, batch)

    def prepare(self) -> None:
        if any(isinstance(m, ActNorm) for m in self.model.modules()):
            # Explicit data-dependent ActNorm initialisation (Glow §3.1), on a fixed batch.
            g = torch.Generator().manual_seed(self.config.train.seed + 2)
            idx = torch.randperm(len(self.train_images), generator=g)[:512]
            initialize_actnorm(self.model, self.train_images[idx].to(self.device))

    def loss(self) -> torch.Tensor:
        idx = torch.randint(
            0, len(self.train_images), (self.config.train.batch_size,), generator=self.batch_generator
        )
        batch = self.perturb(self.train_images[idx])
        noise = torch.rand(batch.shape, generator=self.noise_generator)
        y = ((batch.float() + noise) / 256.0).to(self.device)
        log_density = self.model.log_density_unit(y)
        return bits_per_dim(
            discrete_log_likelihood(log_density.mean(), self.model.num_dims), self.model.num_dims
        )

    @torch.inference_mode()
    def validation_bits_per_dim(self) -> float:
        self.model.eval()
        images = torch.from_numpy(self.splits.validation.images)
        if len(images) == 0:
            return float("nan")
        bpd = [self.model(images[i : i + 256].to(self.device))[1] for i in range(0, len(images), 256)]
        return float(torch.cat(bpd).mean())


def symmetric_images(dataset: ImageSet, name: str) -> ImageSet:
    """`dataset` under the declared symmetry `name` (a benchmark near-OOD transform), same order.

    Raises:
        ValueError: `name` is not a known transform, or it changes the image shape (a quarter turn
            of non-square images cannot be a symmetry of a model with one input shape).
    """
    from training.benchmark.sets import NEAR_TRANSFORMS

    if name not in NEAR_TRANSFORMS:
        raise ValueError(f"unknown symmetry {name!r}: expected one of {', '.join(NEAR_TRANSFORMS)}")
    images = np.ascontiguousarray(NEAR_TRANSFORMS[name][1](dataset.images, 0))
    if images.shape != dataset.images.shape:
        raise ValueError(
            f"symmetry {name} changes the image shape {dataset.images.shape[1:]}: not a symmetry"
        )
    return ImageSet(f"{dataset.name}-{name}", images, dataset.labels, f"{name} of {dataset.source}")


class _EmbeddingTrainer(_Trainer):
    """Trains the vector flow on cached backbone features; the projection is fitted first.
    Model selection keeps the step with the best held-out validation NLL, step 0 included
    (where the flow is the identity and the model is exactly the whitened Gaussian)."""

    model: EmbeddingFlow

    def __init__(self, run: Run, model: EmbeddingFlow, splits: Splits, device: torch.device):
        super().__init__(run, model, splits, device)
        cache = run.dir / "features"
        train = [cached_features(model, splits.train, cache, "train")]
        for name in run.config.data.symmetries:
            train.append(cached_features(model, symmetric_images(splits.train, name), cache, f"train-{name}"))
        self.train_features = torch.from_numpy(np.concatenate(train))
        self.val_features = torch.from_numpy(cached_features(model, splits.validation, cache, "validation"))

    def prepare(self) -> None:
        self.model.projection.fit(self.train_features, self.model.config.shrinkage)
        if any(isinstance(m, ActNorm) for m in self.model.modules()):
            initialize_actnorm(
                self.model.flow, self.model.projection(self.train_features[:2048].to(self.device))
            )
        self.track_best()

    def select_best(self) -> bool:
        return True

    def loss(self) -> torch.Tensor:
        idx = torch.randint(
            0, len(self.train_features), (self.config.train.batch_size,), generator=self.batch_generator
        )
        ll = self.model.log_likelihood_features(self.train_features[idx].to(self.device))
        return bits_per_dim(ll.mean(), self.model.num_dims)

    @torch.inference_mode()
    def validation_bits_per_dim(self) -> float:
        self.model.eval()
        ll = self.model.log_likelihood_features(self.val_features.to(self.device))
        return float(bits_per_dim(ll.mean(), self.model.num_dims))


def train(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    max_minutes: float | None = None,
    device: str = "auto",
    progress: bool = True,
    splits: Splits | None = None,
    on_step: Callable[[int], None] | None = None,
    perturbation_rate: float = 0.0,
) -> TrainResult:
    """Train `config` into `run_dir`. With `resume`, continue from the last checkpoint.

    `perturbation_rate` > 0 (pixel flows only) corrupts every training batch afresh at every
    step, as for the likelihood-ratio background flow (`training.background`)."""
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)
    run = Run(run_dir, config)
    if not resume and run.checkpoint_path.exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir"
        )
    run.write_config()
    dev = resolve_device(device)
    splits = splits or load_splits(config, with_eval_sets=False)
    model = build_model(config.model).to(dev)
    if isinstance(model, PixelFlow):
        trainer: _Trainer = _PixelTrainer(run, model, splits, dev, perturbation_rate)
    else:
        if perturbation_rate:
            raise ValueError("perturbation_rate is for pixel flows (the likelihood-ratio background)")
        trainer = _EmbeddingTrainer(run, model, splits, dev)
    threads = torch.get_num_threads()
    if isinstance(trainer, _EmbeddingTrainer) and dev.type == "cpu":
        # The vector flow's matmuls are tiny: one thread is as fast, and a second thread only
        # waits at every op's barrier when the machine is busy (measured 100x slower).
        torch.set_num_threads(1)
    try:
        return trainer.fit(resume=resume, max_minutes=max_minutes, progress=progress, on_step=on_step)
    finally:
        torch.set_num_threads(threads)
