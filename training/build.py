"""`oodflow build`: one dataset spec in, a served, calibrated OOD detector out.

    oodflow build folder:./my-images --name my-detector

1. **Inspect** the data (headers only for image folders) and choose one input spec for both
   models (the policy, also printed by every build):
   - channels: 1 (greyscale) when every image is greyscale (PIL modes 1, L, LA, I;16, I and
     palettes of greys), otherwise 3 (RGB; greyscale images are replicated);
   - size: the most common (height, width) among the images, each side capped at 32 and rounded
     down to a multiple of 4 (at least 8) so the pixel flow can squeeze twice; a side is halved
     (not below 16) when the measured training speed would give the pixel flow fewer than 300
     steps within `--minutes`. Images of any other size are resized to it (PIL bilinear, aspect
     ratio not kept), exactly as the service resizes with `?resize=true`.
   - files without an image extension are skipped and counted; an image file that cannot be
     decoded stops the build with a one-line error naming it (remove or repair it);
   - labels (first-level subfolders) are not used: the flows are unsupervised, so one class or
     no class folders at all is fine;
   - at least `MIN_IMAGES` images are needed (each model's threshold rests on its own
     held-out half of the calibration split; fewer gives a threshold on a handful of scores).
2. **Split** (seeded): calibration 20% (at most 5,000), halved into the members' calibration
   split and the ensemble's combination split; with no `--test`, a test split as large again;
   validation (model selection) from the rest; the remainder trains.
3. **Train** the embedding flow then the pixel flow within the `--minutes` budget: the fixed
   stages (feature extraction, scoring, export) are estimated from timed probes on this machine,
   the pixel flow's step count is sized from a measured step time, and training stops early if
   a stage runs slow.
4. **Calibrate, evaluate** (on every `--ood` set; none is fine), **export** both models and
   **combine** them into the ensemble `<name>`, all staged in a hidden folder of the repository
   and moved into place only when everything succeeded: a failed build leaves nothing that
   `oodflow serve` would load.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.artifact import (
    ArtifactError,
    ensemble_path,
    find_versions,
    load_ensemble,
    mkdir_readable,
    verify_artifact,
)
from models.config import EmbeddingFlowConfig, PixelFlowConfig
from training.config import CalibrationConfig, DataConfig, RunConfig, TrainConfig
from training.data import IMAGE_EXTENSIONS, DatasetError, ImageSet, load_dataset
from training.runs import Splits, load_splits, resolve_device, splits_record
from training.scoring import inner_progress

if TYPE_CHECKING:  # the steps themselves are imported inside `build`
    from training.calibrate import CalibrationRecord

__all__ = [
    "DEFAULT_MINUTES",
    "MIN_IMAGES",
    "BuildError",
    "BuildResult",
    "DataSurvey",
    "InputChoice",
    "build",
    "choose_input",
    "survey_data",
]

MIN_IMAGES = 200
MAX_SIDE = 32
MIN_SIDE = 8
MIN_PIXEL_STEPS = 300
# The embedding flow's steps (cosine schedule); --minutes may stop it earlier, the best validation
# step is kept either way.
EMBEDDING_STEPS = 2000
EMBEDDING_PATIENCE = 5  # validations (every 100 steps) without a new best before the flow stops
MAX_PIXEL_STEPS = 4000
# The pixel flow's validation pass every this many steps (and at the last): the best step is kept,
# so a flow whose validation loss blows up late is caught (issue 12: a seed-2 default-recipe flow
# ended at 7.70 validation bits/dim against 3.52 on training, and nothing noticed).
PIXEL_EVAL_EVERY = 200
DEFAULT_MINUTES = 8.0
Profile = Literal["default", "tiny"]
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,50}$")
_GREY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16B", "I;16L", "I"})
# Seconds on the 2-core CPU (measured, with margin): ONNX + TorchScript export and the parity check
# of each model; the report's PNG figures per model.
_EXPORT_SECONDS = {"pixel": 10.0, "embedding": 20.0}
_REPORT_SECONDS = 8.0


class BuildError(ValueError):
    """Bad input to `oodflow build`; the message is one line and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- inspecting the data


@dataclass
class DataSurvey:
    """What the in-distribution data holds, read before anything is trained."""

    spec: str
    count: int
    grey: int
    colour: int
    sizes: Counter[tuple[int, int]]
    classes: tuple[str, ...] = ()
    skipped: Counter[str] = field(default_factory=Counter)  # extension -> files not read
    folder: Path | None = None
    examples: dict[tuple[int, int], Path] = field(default_factory=dict)  # a real file per size


def _folder_of(spec: str) -> Path | None:
    kind, _, rest = spec.partition(":")
    if kind == "folder" and rest:
        return Path(rest).expanduser()
    if ":" not in spec and Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    return None


def _is_grey(image: Image.Image) -> bool:
    if image.mode in _GREY_MODES:
        return True
    if image.mode == "P":
        palette = image.getpalette()
        if not palette:
            return True
        rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
        return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))
    return False


def _survey_folder(spec: str, folder: Path) -> DataSurvey:
    if not folder.is_dir():
        raise BuildError(f"image folder {folder} does not exist or is not a folder")
    images: list[Path] = []
    skipped: Counter[str] = Counter()
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            skipped[path.suffix.lower() or "(no extension)"] += 1
    if not images:
        found = f" (it holds {sum(skipped.values())} other files)" if skipped else " (it is empty)"
        raise BuildError(
            f"no image files under {folder}{found}: put PNG/JPEG/BMP/TIFF/WebP images there, "
            "optionally in one subfolder per class"
        )
    sizes: Counter[tuple[int, int]] = Counter()
    examples: dict[tuple[int, int], Path] = {}
    grey = colour = 0
    bad: list[tuple[Path, str]] = []
    for path in images:
        try:
            with Image.open(path) as image:
                width, height = image.size
                is_grey = _is_grey(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            bad.append((path, str(error)))
            continue
        sizes[(height, width)] += 1
        examples.setdefault((height, width), path)
        grey, colour = (grey + 1, colour) if is_grey else (grey, colour + 1)
    if bad:
        first, why = bad[0]
        raise BuildError(
            f"{len(bad)} of {len(images)} image files under {folder} cannot be decoded "
            f"(first: {first.relative_to(folder)}: {why}): remove or repair them and run again"
        )
    relative = [p.relative_to(folder) for p in images]
    classes = tuple(sorted({r.parts[0] for r in relative})) if all(len(r.parts) > 1 for r in relative) else ()
    return DataSurvey(spec, len(images), grey, colour, sizes, classes, skipped, folder, examples)


def survey_data(spec: str) -> DataSurvey:
    """Count, modes and sizes of a dataset spec's images (headers only for image folders)."""
    folder = _folder_of(spec)
    if folder is not None:
        return _survey_folder(spec, folder)
    try:
        dataset = load_dataset(spec)
    except DatasetError as error:
        if "different sizes" not in str(error):
            raise
        # Mixed-size built-ins (photos): the size policy cannot see them, so they take the cap.
        dataset = load_dataset(spec, shape=(3, MAX_SIDE, MAX_SIDE))
    c, h, w = dataset.shape
    classes = dataset.class_names if dataset.labels is not None else ()
    n = len(dataset)
    return DataSurvey(spec, n, n if c == 1 else 0, 0 if c == 1 else n, Counter({(h, w): n}), classes)


@dataclass
class InputChoice:
    shape: tuple[int, int, int]
    policy: str


def _side(value: int) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, value - value % 4))


def choose_input(survey: DataSurvey) -> InputChoice:
    """The one input spec both models take (module docstring, step 1)."""
    channels = 1 if survey.colour == 0 else 3
    (height, width), common = max(survey.sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1]))
    shape = (channels, _side(height), _side(width))
    colour = (
        "every image is greyscale -> 1 channel"
        if channels == 1
        else f"{survey.colour} of {survey.count} images are colour -> RGB (greyscale images replicated)"
    )
    sizes = (
        f"most common size {height}x{width} ({common} of {survey.count} images"
        + (f", {len(survey.sizes)} sizes in all" if len(survey.sizes) > 1 else "")
        + ")"
    )
    resized = (
        ""
        if (shape[1], shape[2]) == (height, width) and len(survey.sizes) == 1
        else ("; other sizes resized (PIL bilinear, aspect not kept)")
    )
    policy = (
        f"input {shape[0]}x{shape[1]}x{shape[2]}: {colour}; {sizes}; sides capped at {MAX_SIDE}, "
        f"rounded down to a multiple of 4{resized}"
    )
    return InputChoice(shape, policy)


# --------------------------------------------------------------------------- planning


def _pixel_model(shape: tuple[int, int, int], profile: Profile) -> PixelFlowConfig:
    if profile == "tiny":
        return PixelFlowConfig(
            architecture="realnvp",
            input_shape=shape,
            width=8,
            depth=1,
            num_scales=2,
            couplings_per_scale=2,
            channel_couplings=1,
            final_couplings=2,
        )
    # The default pixel model's architecture (preset fmnist-pixel-realnvp).
    return PixelFlowConfig(architecture="realnvp", input_shape=shape, width=32, depth=2)


def _embedding_model(shape: tuple[int, int, int], n_train: int, profile: Profile) -> EmbeddingFlowConfig:
    if profile == "tiny":
        return EmbeddingFlowConfig(
            input_shape=shape,
            resolution=32,
            features="spatial",
            projection_dim=16,
            hidden=32,
            num_couplings=2,
        )
    # preset fmnist-embedding, its projection shrunk on small data (whitening needs samples)
    return EmbeddingFlowConfig(
        input_shape=shape,
        features="spatial",
        projection_dim=int(min(64, max(8, n_train // 8))),
        hidden=512,
        depth=2,
        num_couplings=8,
    )


def _check_symmetries(symmetries: Sequence[str]) -> tuple[str, ...]:
    from training.benchmark.sets import NEAR_TRANSFORMS

    names = tuple(dict.fromkeys(t.strip() for item in symmetries for t in item.split(",") if t.strip()))
    unknown = [t for t in names if t not in NEAR_TRANSFORMS]
    if unknown:
        raise BuildError(
            f"--symmetry {', '.join(unknown)}: unknown transform; expected one of {', '.join(NEAR_TRANSFORMS)}"
        )
    return names


def _calibration_size(n: int) -> int:
    return int(min(5000, max(40, round(0.2 * n))))


def _data_config(
    spec: str,
    test: str | None,
    ood: Sequence[str],
    n: int,
    profile: Profile,
    train_limit: int | None,
    symmetries: Sequence[str] = (),
) -> DataConfig:
    tiny = profile == "tiny"
    return DataConfig(
        in_distribution=spec,
        test_set=test,
        ood_sets=list(ood),
        train_limit=train_limit,
        calibration_size=_calibration_size(n),
        test_limit=200 if tiny else 10000,
        ood_limit=200 if tiny else 5000,
        symmetries=list(symmetries),
        seed=0,
    )


def _configs(
    name: str,
    spec: str,
    test: str | None,
    ood: Sequence[str],
    survey: DataSurvey,
    shape: tuple[int, int, int],
    profile: Profile,
    pixel_steps: int,
    symmetries: Sequence[str] = (),
) -> tuple[RunConfig, RunConfig]:
    n = survey.count
    tiny = profile == "tiny"
    n_train = n - 2 * _calibration_size(n) if test is None else n - _calibration_size(n)
    embedding = RunConfig(
        name=f"{name}-embedding",
        description=f"Flow on L2-normalised, whitened EfficientNet-Lite0 features of {spec}",
        model=_embedding_model(shape, n_train, profile),
        # the declared symmetries augment the embedding flow's training features only: the pixel
        # flow's statistics are local and the calibration splits must stay the data as it comes
        data=_data_config(spec, test, ood, n, profile, None if tiny else 20000, symmetries),
        train=TrainConfig(
            batch_size=int(min(64 if tiny else 256, max(8, n_train // 4))),
            lr=1e-3,
            weight_decay=0.0 if tiny else 1e-4,
            max_steps=30 if tiny else EMBEDDING_STEPS,
            warmup_steps=0 if tiny else 100,
            schedule="constant" if tiny else "cosine",
            eval_every=10 if tiny else 100,
            # on small folders the flow memorises its training features within a few hundred steps
            # (5,000 digits: best step 100, 134 validation bits/dim at step 2,000): stop 5 validations
            # after the best one instead of spending the rest of the budget
            patience=0 if tiny else EMBEDDING_PATIENCE,
            validation_size=64 if tiny else 2000,
            checkpoint_every=10 if tiny else 500,
            log_every=5 if tiny else 20,
        ),
    )
    pixel = RunConfig(
        name=f"{name}-pixel",
        description=f"RealNVP on the pixels of {spec} ({shape[0]}x{shape[1]}x{shape[2]})",
        model=_pixel_model(shape, profile),
        data=_data_config(spec, test, ood, n, profile, train_limit=None),
        train=TrainConfig(
            batch_size=32 if tiny else 64,
            lr=2e-3,
            max_steps=pixel_steps,
            warmup_steps=5 if tiny else 50,
            checkpoint_every=10 if tiny else 100,
            log_every=5 if tiny else 20,
            eval_every=10 if tiny else PIXEL_EVAL_EVERY,
            validation_size=64 if tiny else 1000,
        ),
        # chosen on validation data and OOD proxies only (training.selection), never on --ood sets
        calibration=CalibrationConfig(statistic="auto"),
    )
    return embedding, pixel


@dataclass
class Probe:
    pixel_step_s: float
    pixel_eval_img_s: float
    feature_img_s: float


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _probe(pixel: RunConfig | None, embedding: RunConfig, device: torch.device) -> Probe:
    """Timed forward/backward steps on random images at the chosen size (a few seconds)."""
    from models.flows import EmbeddingFlow, PixelFlow

    gen = torch.Generator().manual_seed(0)
    step_s = eval_rate = float("nan")
    if pixel is not None:
        model = PixelFlow(pixel.model).to(device)  # type: ignore[arg-type]
        batch = pixel.train.batch_size
        images = torch.randint(0, 256, (batch, *pixel.model.input_shape), generator=gen, dtype=torch.uint8)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step() -> None:
            y = ((images.float() + 0.5) / 256.0).to(device)
            loss = -model.log_density_unit(y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step_s = _time(step, 3)
        model.eval()
        with torch.inference_mode():
            eval_rate = batch / _time(lambda: model(images.to(device)), 2)
    emb = EmbeddingFlow(embedding.model).to(device).eval()  # type: ignore[arg-type]
    images = torch.randint(0, 256, (32, *embedding.model.input_shape), generator=gen, dtype=torch.uint8)
    with torch.inference_mode():
        feature_rate = 32 / _time(lambda: emb.features(images.to(device)), 1)
    return Probe(step_s, eval_rate, feature_rate)


# Scoring on a shared CPU runs slower than a short probe suggests (load comes and goes): the
# fixed stages are planned with this margin, so the training stages give way, not --minutes.
_SAFETY = 1.4


def _stage_estimates(
    splits: dict[str, Splits], probe: Probe, with_pixel: bool, symmetries: Sequence[str] = ()
) -> dict[str, float]:
    """Seconds of the stages whose work is fixed by the data (everything but the training steps).

    Embedding features: train + validation in its training stage, the calibration halves in
    calibration, test + OOD in evaluation. Pixel flow: validation + 4 proxies of its size
    (statistic selection) and the calibration halves in calibration, test + OOD in evaluation.
    """
    base = splits["embedding"]
    feature_s, pixel_s = 1.0 / probe.feature_img_s, 1.0 / probe.pixel_eval_img_s
    held = len(base.calibration) + len(base.combination or ())
    shown = len(base.test or ()) + sum(len(d) for d in base.ood.values())
    kinds = 2 if with_pixel else 1
    estimates = {
        "embedding features": (len(base.train) * (1 + len(symmetries)) + len(base.validation)) * feature_s,
        "calibrate": 3.0 + held * feature_s,
        "evaluate": _REPORT_SECONDS * kinds + shown * feature_s,
        "export": _EXPORT_SECONDS["embedding"] + (_EXPORT_SECONDS["pixel"] if with_pixel else 0.0),
    }
    if with_pixel:
        validation = len(splits["pixel"].validation)
        estimates["calibrate"] += (5 * validation + held) * pixel_s
        estimates["evaluate"] += shown * pixel_s
        # ensemble weights: half the combination images and 4 proxies of them, through both graphs
        weighed = 5 * (len(base.combination or ()) // 2)
        estimates["export"] += weighed * (feature_s + pixel_s)
    return {k: v * _SAFETY for k, v in estimates.items()}


# --------------------------------------------------------------------------- progress


class BuildProgress:
    """One display for the whole build: a tqdm bar over the planned seconds (stage name, ETA) on a
    terminal, plain stage lines otherwise."""

    def __init__(self, bars: bool, out: Callable[[str], None]) -> None:
        self.bars = bars and sys.stderr.isatty()
        self.out = out
        self.plan: dict[str, float] = {}
        self.labels: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.bar: Any = None
        self._stage_done = 0.0
        self._stage_key = ""
        self._quarter = 0
        self.start = time.monotonic()

    def set_plan(self, plan: dict[str, tuple[str, float]]) -> None:
        self.plan = {k: max(1.0, s) for k, (_, s) in plan.items()}
        self.labels = {k: label for k, (label, _) in plan.items()}
        if self.bars:
            self.bar = tqdm(
                total=round(sum(self.plan.values())),
                unit="s",
                bar_format="{desc} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]",
                dynamic_ncols=True,
            )

    def remaining_s(self, key: str) -> float:
        keys = list(self.plan)
        return sum(self.plan[k] for k in keys[keys.index(key) :])

    @contextmanager
    def stage(self, key: str) -> Iterator[None]:
        keys = list(self.plan)
        index = keys.index(key) + 1
        label = self.labels[key]
        self._stage_key, self._stage_done, self._quarter = key, 0.0, 0
        start = time.monotonic()
        if self.bar is not None:
            self.bar.set_description_str(f"[{index}/{len(keys)}] {label}")
        else:
            self.out(
                f"[{index}/{len(keys)}] {label} (planned {self.plan[key]:.0f} s; "
                f"build ETA {self.remaining_s(key) / 60:.1f} min)"
            )
        yield
        seconds = time.monotonic() - start
        self.timings[key] = round(seconds, 1)
        if self.bar is not None:
            self.bar.update(max(0, round(self.plan[key] - self._stage_done)))
        else:
            self.out(f"      done in {seconds:.1f} s")

    def fraction(self, value: float, note: str = "") -> None:
        """Progress within the current stage, 0..1."""
        target = self.plan[self._stage_key] * min(1.0, max(0.0, value))
        if self.bar is not None:
            step = round(target - self._stage_done)
            if step > 0:
                self.bar.update(step)
                self._stage_done += step
        elif int(value * 4) > self._quarter and value < 1:
            self._quarter = int(value * 4)
            self.out(f"      {self._quarter * 25}%{' ' + note if note else ''}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the build


@dataclass
class BuildResult:
    name: str
    repository: Path
    models: dict[str, Path]
    ensemble: Path | None
    report: Path
    curl: str
    timings: dict[str, float]
    summary: dict[str, Any]
    skipped: bool = False


def _say(line: str) -> None:
    print(line, flush=True)  # stage lines appear as they happen, also in a log file


def _default_name(spec: str) -> str:
    folder = _folder_of(spec)
    raw = (
        folder.resolve().name
        if folder is not None
        else spec.split(":")[0]
        if ":" in spec
        else Path(spec).stem
    )
    slug = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._")
    return (slug or "detector")[:40]


def _check_writable(folder: Path, what: str, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".oodflow-write-check-"):
            pass
    except OSError as error:
        raise BuildError(
            f"{what} {folder} is not writable ({error.strerror or error}): choose another {flag} "
            "or fix its permissions"
        ) from None


def _up_to_date(repository: Path, name: str, members: list[str]) -> bool:
    """Every member's latest version verifies and the ensemble lists exactly those versions."""
    versions = {}
    for model in members:
        found = find_versions(repository, model)
        if not found:
            return False
        try:
            verify_artifact(repository / model / str(found[-1]))
        except ArtifactError:
            return False
        versions[model] = found[-1]
    if len(members) < 2:
        return True
    try:
        ensemble = load_ensemble(ensemble_path(repository, name))
    except ArtifactError:
        return False
    return {(m.name, m.version) for m in ensemble.members} == set(versions.items())


def _example_image(survey: DataSurvey, shape: tuple[int, int, int], fallback: ImageSet, folder: Path) -> Path:
    """A real image of the user's data for the printed `curl` line."""
    if survey.folder is not None and survey.examples:
        best = (shape[1], shape[2]) if (shape[1], shape[2]) in survey.examples else None
        return (survey.examples[best] if best else next(iter(survey.examples.values()))).resolve()
    mkdir_readable(folder)
    path = folder / "example.png"
    image = fallback.images[0]
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
    return path.resolve()


def _curl_line(example: Path, models: list[str], resize: bool) -> str:
    query = f"models={','.join(models)}" + ("&resize=true" if resize else "")
    if len(models) == 1:
        return (
            f"curl -s -F images=@{shlex.quote(str(example))} "
            f"'http://127.0.0.1:8000/v1/models/{models[0]}/score{'?resize=true' if resize else ''}'"
        )
    return f"curl -s -F images=@{shlex.quote(str(example))} 'http://127.0.0.1:8000/v1/score?{query}'"


def build(
    data: str,
    *,
    repository: Path,
    name: str | None = None,
    test: str | None = None,
    ood: Sequence[str] = (),
    minutes: float = DEFAULT_MINUTES,
    device: str = "auto",
    pixel: bool = True,
    runs_dir: Path = Path("runs"),
    force: bool = False,
    progress: bool = True,
    profile: Profile = "default",
    skip_built: bool = False,
    shape: tuple[int, int, int] | None = None,
    symmetries: Sequence[str] = (),
    out: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build `<name>-embedding`, `<name>-pixel` and the ensemble `<name>` from dataset spec `data`.

    `skip_built`: return at once when the repository already holds verified models and an
    up-to-date ensemble of that name (`build-defaults`); otherwise an existing model name is an
    error unless `force` (then new versions are added). `shape`: pin the input spec `(C, H, W)`
    instead of choosing it (the default models keep Fashion-MNIST's 1x28x28 whatever the budget).
    `symmetries`: transforms (`training.benchmark.sets.NEAR_TRANSFORMS` names) that keep an image
    in-distribution, e.g. `hflip` for garments; the embedding flow trains on them too, and the
    benchmark reports them as a false-positive check. Raises `BuildError` (one line) for bad input
    before anything is trained or written to the repository.
    """
    began = time.monotonic()
    out = out or _say
    repository, runs_dir = Path(repository), Path(runs_dir)
    if not (isinstance(minutes, int | float) and math.isfinite(minutes) and minutes > 0):
        raise BuildError(f"--minutes must be a positive number, got {minutes!r}")
    symmetries = _check_symmetries(symmetries)
    name = name or _default_name(data)
    if not _NAME_RE.match(name):
        raise BuildError(
            f"--name {name!r}: use lowercase letters, digits, '.', '_' or '-' (at most 51 characters)"
        )
    dev = resolve_device(device)
    models = [f"{name}-embedding"] + ([f"{name}-pixel"] if pixel else [])
    if skip_built and not force and _up_to_date(repository, name, models):
        return BuildResult(
            name, repository, {m: repository / m for m in models}, None, Path(), "", {}, {}, skipped=True
        )
    _check_writable(repository, "model repository", "--repository")
    _check_writable(runs_dir, "runs folder", "--runs-dir")
    existing = [f"{m} v{find_versions(repository, m)[-1]}" for m in models if find_versions(repository, m)]
    if existing and not (force or skip_built):
        raise BuildError(
            f"{repository} already holds {', '.join(existing)}: pass --force to build new versions, "
            "or choose another --name"
        )
    progress_display = BuildProgress(progress, out)
    threads = torch.get_num_threads()  # `_build` may lower it on a busy machine; restored below
    try:
        with inner_progress(False):
            return _build(
                data, repository, name, test, list(ood), minutes, dev, device, pixel, runs_dir,
                profile, progress_display, began, out, shape, tuple(symmetries),
            )  # fmt: skip
    except (OSError, FloatingPointError) as error:
        # Disk full, permissions changed mid-build, a diverging flow: still one line, no traceback.
        raise BuildError(f"build of {name!r} failed: {type(error).__name__}: {error}") from error
    finally:
        progress_display.close()
        torch.set_num_threads(threads)


def _build(
    data: str,
    repository: Path,
    name: str,
    test: str | None,
    ood: list[str],
    minutes: float,
    dev: torch.device,
    device: str,
    with_pixel: bool,
    runs_dir: Path,
    profile: Profile,
    display: BuildProgress,
    began: float,
    out: Callable[[str], None],
    pinned: tuple[int, int, int] | None = None,
    symmetries: Sequence[str] = (),
) -> BuildResult:
    from training.calibrate import calibrate
    from training.evaluate import evaluate
    from training.pipeline import export_run
    from training.train import train

    # 1. inspect and load: every bad-input error happens here, before any training
    survey = survey_data(data)
    if survey.count < MIN_IMAGES:
        raise BuildError(
            f"{data} holds {survey.count} images; a build needs at least {MIN_IMAGES} in-distribution "
            "images (training, validation and two held-out calibration halves): add images"
        )
    if len(set(ood)) != len(ood):
        raise BuildError("--ood names the same set twice")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if dev.type == "cpu" and torch.get_num_threads() > 1 and load >= (os.cpu_count() or 1) - 0.5:
        # On a busy CPU torch's intra-op threads stall at every barrier (measured 10-40x slower
        # with 2 threads than with 1 on this 2-core machine at load 13): one thread is faster.
        torch.set_num_threads(1)
        out(f"  busy machine (load average {load:.1f} on {os.cpu_count()} cores): one torch thread")
    choice = choose_input(survey)
    if pinned is not None:
        choice = InputChoice(
            tuple(pinned),  # type: ignore[arg-type]
            f"input {pinned[0]}x{pinned[1]}x{pinned[2]}: fixed for this build (the data's own: "
            f"{choice.policy.removeprefix('input ')})",
        )
    shape = choice.shape
    turns = [t for t in symmetries if t in ("rot90", "rot270", "transpose")]
    if turns and shape[1] != shape[2]:
        raise BuildError(
            f"--symmetry {', '.join(turns)}: a quarter turn of {shape[1]}x{shape[2]} images changes their "
            "shape, so it cannot be a symmetry of one model; drop it"
        )
    datasets: dict[tuple[Any, ...], ImageSet] = {}
    nominal_steps = 30 if profile == "tiny" else 1000
    embedding_cfg, pixel_cfg = _configs(
        name, data, test, ood, survey, shape, profile, nominal_steps, symmetries
    )
    splits = {"embedding": load_splits(embedding_cfg, datasets=datasets)}
    if with_pixel:
        splits["pixel"] = load_splits(pixel_cfg, datasets=datasets)
    loaded_s = time.monotonic() - began

    # 2. plan the budget from timed probes
    total_s = minutes * 60.0
    if profile == "tiny":
        probe = Probe(0.05, 2000.0, 500.0)
    else:
        probe = _probe(pixel_cfg if with_pixel else None, embedding_cfg, dev)
    pixel_steps = nominal_steps
    estimates = _stage_estimates(splits, probe, with_pixel, symmetries)
    fixed = loaded_s + sum(estimates.values())
    train_s = total_s - fixed
    embedding_s = max(10.0, min(0.3 * train_s, 150.0))
    pixel_s = train_s - embedding_s
    if profile != "tiny":
        if train_s < 60:
            need = math.ceil((fixed + 120) / 60)
            raise BuildError(
                f"--minutes {minutes:g} is too short for {survey.count} images: loading, feature extraction, "
                f"scoring and export alone take about {fixed / 60:.1f} min here; give --minutes {need} or more"
            )
        if with_pixel:

            def affordable(probe: Probe, validation: int) -> int:
                # a step, plus its share of a validation pass every PIXEL_EVAL_EVERY steps
                step_s = probe.pixel_step_s + validation / (PIXEL_EVAL_EVERY * probe.pixel_eval_img_s)
                return int(0.9 * pixel_s / step_s)

            steps = affordable(probe, len(splits["pixel"].validation))
            while steps < MIN_PIXEL_STEPS and min(shape[1:]) > 16 and pinned is None:
                # Fewer pixels: a smaller flow input the budget can train.
                shape = (shape[0], max(16, _side(shape[1] // 2)), max(16, _side(shape[2] // 2)))
                choice = InputChoice(
                    shape, choice.policy + f"; reduced to {shape[1]}x{shape[2]} for the budget"
                )
                embedding_cfg, pixel_cfg = _configs(
                    name, data, test, ood, survey, shape, profile, 1000, symmetries
                )
                probe = _probe(pixel_cfg, embedding_cfg, dev)
                splits = {
                    "embedding": load_splits(embedding_cfg, datasets=datasets),
                    "pixel": load_splits(pixel_cfg, datasets=datasets),
                }
                steps = affordable(probe, len(splits["pixel"].validation))
            pixel_steps = int(min(MAX_PIXEL_STEPS, max(50, steps)))
        embedding_cfg, pixel_cfg = _configs(
            name, data, test, ood, survey, shape, profile, pixel_steps, symmetries
        )
    base = splits["embedding"]
    estimates = _stage_estimates(splits, probe, with_pixel, symmetries)
    plan: dict[str, tuple[str, float]] = {
        "embedding": (
            f"train {name}-embedding (features + flow)",
            estimates["embedding features"] + embedding_s,
        ),
    }
    if with_pixel:
        plan["pixel"] = (f"train {name}-pixel ({pixel_steps} steps)", pixel_s)
    plan["calibrate"] = (
        "calibrate" + (" and select the pixel statistic" if with_pixel else ""),
        estimates["calibrate"],
    )
    plan["evaluate"] = (
        "evaluate" + (f" on {', '.join(ood)}" if ood else " (no OOD set given)"),
        estimates["evaluate"],
    )
    plan["export"] = ("export" + (" and combine" if with_pixel else ""), estimates["export"])
    out(f"oodflow build {name}: {survey.count} images from {data}")
    if survey.skipped:
        kinds = ", ".join(f"{n} {ext}" for ext, n in survey.skipped.most_common())
        out(f"  warning: skipped {sum(survey.skipped.values())} files that are not images ({kinds})")
    out(f"  {choice.policy}")
    out(
        "  labels: "
        + (
            f"{len(survey.classes)} class{'es' if len(survey.classes) != 1 else ''}"
            f"{' (subfolders)' if survey.folder is not None else ''}: {', '.join(survey.classes[:5])}"
            f"{', ...' if len(survey.classes) > 5 else ''}; not used, the flows are unsupervised"
            if survey.classes
            else "none (no class subfolders); none needed"
        )
    )
    out(
        f"  symmetries: {', '.join(symmetries)} (declared, not measured; the embedding flow also trains "
        "on them)"
        if symmetries
        else "  symmetries: none declared (--symmetry hflip if a mirror image is still in-distribution)"
    )
    record = splits_record(base)
    out(
        f"  splits: train {record['train_size']}, validation {record['validation_size']}, calibration "
        f"{record['calibration_size']} (members) + {record['combination_size']} (ensemble), test "
        f"{len(base.test or ())} ({test or 'held out of ' + data})"
    )
    out(
        f"  OOD sets: {', '.join(f'{k} ({len(v)})' for k, v in base.ood.items())}"
        if ood
        else "  OOD sets: none given (the reports will have no OOD metrics; add --ood SPEC to measure)"
    )
    out(
        f"  budget {minutes:g} min on {dev.type}: "
        + ", ".join(f"{label} ~{s:.0f} s" for label, s in plan.values())
    )
    display.set_plan(plan)

    # 3. train, calibrate, evaluate (fresh run folders: the build is not a resume)
    run_dirs = {
        kind: runs_dir / cfg.name for kind, cfg in (("embedding", embedding_cfg), ("pixel", pixel_cfg))
    }
    configs = {"embedding": embedding_cfg, "pixel": pixel_cfg}
    kinds = ["embedding"] + (["pixel"] if with_pixel else [])
    deadline = began + total_s
    for kind in kinds:
        shutil.rmtree(run_dirs[kind], ignore_errors=True)
    for kind in kinds:
        cfg, run_dir = configs[kind], run_dirs[kind]
        with display.stage(kind):
            tail = sum(display.plan[k] for k in list(display.plan)[list(display.plan).index(kind) + 1 :])
            budget_s = embedding_s if kind == "embedding" else max(10.0, deadline - time.monotonic() - tail)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "splits.json").write_text(json.dumps(splits_record(splits[kind]), indent=2) + "\n")
            steps = cfg.train.max_steps

            def on_step(step: int, steps: int = steps) -> None:
                display.fraction(step / steps, f"({step}/{steps} steps)")

            result = train(
                cfg,
                run_dir,
                device=device,
                progress=False,
                splits=splits[kind],
                max_minutes=budget_s / 60.0,
                on_step=on_step,
            )
            if not result.completed:
                out(f"      stopped at the time budget after {result.steps} of {steps} steps")
            if result.stopped_early:
                out(
                    f"      stopped early after {result.steps} of {steps} steps: {cfg.train.patience} "
                    "validations in a row without a better one"
                )
            if result.selected_step != result.steps:
                out(
                    f"      kept step {result.selected_step} (best validation: {result.validation_bits_per_dim:.3f} "
                    f"bits/dim; last step {result.final_validation_bits_per_dim:.3f})"
                )
            if result.diverged:
                out(
                    f"  warning: {cfg.name} scores its validation images at {result.validation_bits_per_dim:.2f} "
                    f"bits/dim against {result.train_reference_bits_per_dim:.2f} on its training batches: it has "
                    "not learnt a density that holds beyond its training images. Its thresholds still hold "
                    "their false-positive rate, but expect weak detection; build again with more --minutes"
                )
    with display.stage("calibrate"):
        calibration = {k: calibrate(str(run_dirs[k]), device=device, splits=splits[k]) for k in kinds}
    with display.stage("evaluate"):
        evaluation = {k: evaluate(str(run_dirs[k]), device=device, splits=splits[k]) for k in kinds}

    # 4. export and combine in a hidden staging folder, then publish
    with display.stage("export"), warnings.catch_warnings():
        # torch's exporters warn about their own deprecations; the parity check is what counts.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        staging = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=repository))
        try:
            staged: dict[str, Path] = {}
            for kind in kinds:
                model = configs[kind].name
                version = (find_versions(repository, model) or [0])[-1] + 1
                staged[model] = export_run(
                    run_dirs[kind], staging, name=model, version=version, splits=splits[kind]
                )
            ensemble_staged = None
            if with_pixel:
                from training.ensemble import build_ensemble

                ensemble_staged, _ = build_ensemble(
                    [(run_dirs[k], staged[configs[k].name]) for k in kinds],
                    staging,
                    name,
                    description=f"combined verdict of {name}-embedding and {name}-pixel (built from {data})",
                    combination_images=splits[kinds[-1]].combination,
                    say=lambda line: out(f"  {line}"),
                )
            published: dict[str, Path] = {}
            for model, path in staged.items():
                target = repository / model / path.name
                mkdir_readable(target.parent)
                os.replace(path, target)
                published[model] = target
            ensemble_file = None
            if ensemble_staged is not None:
                ensemble_file = ensemble_path(repository, name)
                mkdir_readable(ensemble_file.parent)
                md = ensemble_staged.with_suffix(".md")
                if md.is_file():
                    os.replace(md, ensemble_file.with_suffix(".md"))
                os.replace(ensemble_staged, ensemble_file)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # 5. summary, build report, curl line
    example = _example_image(survey, shape, base.test or base.calibration, runs_dir / f"{name}-build")
    with Image.open(example) as image:
        resize = image.size != (shape[2], shape[1])
    curl = _curl_line(example, [configs[k].name for k in kinds], resize)
    summary = _summary(name, data, test, ood, choice, record, configs, kinds, evaluation, calibration,
                       published, ensemble_file, display.timings, time.monotonic() - began)  # fmt: skip
    report = _write_report(runs_dir / f"{name}-build", summary, curl)
    out("")
    for line in _summary_lines(summary):
        out(line)
    out(f"build report: {report}")
    for model, path in published.items():
        out(f"model report: {path / 'report' / 'report.md'}  ({model})")
    if ensemble_file is not None:
        out(f"ensemble report: {ensemble_file.with_suffix('.md')}")
    out(f"serve it:  oodflow serve --repository {shlex.quote(str(repository))}")
    out(f"score one of your images:  {curl}")
    return BuildResult(
        name, repository, published, ensemble_file, report, curl, dict(display.timings), summary
    )


def _summary(
    name: str,
    data: str,
    test: str | None,
    ood: list[str],
    choice: InputChoice,
    record: dict[str, Any],
    configs: dict[str, RunConfig],
    kinds: list[str],
    evaluation: dict[str, dict[str, Any]],
    calibration: dict[str, CalibrationRecord],
    published: dict[str, Path],
    ensemble_file: Path | None,
    timings: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for kind in kinds:
        ev, cal = evaluation[kind], calibration[kind]
        summary = json.loads((published[configs[kind].name] / "manifest.json").read_text())["training"][
            "summary"
        ]
        models[configs[kind].name] = {
            "kind": kind,
            "statistic": cal.statistic,
            "selection": None if cal.selection is None else cal.selection.model_dump(mode="json"),
            "steps": summary.get("steps"),
            "completed": summary.get("completed"),
            "selected_step": summary.get("selected_step"),
            "validation_bits_per_dim": summary.get("validation_bits_per_dim"),
            "diverged": summary.get("diverged"),
            "stopped_early": summary.get("stopped_early"),
            "threshold": cal.threshold,
            "target_fpr": cal.target_fpr,
            "calibration_size": cal.validation_size,
            "test_flagged_fraction": ev["in_distribution"]["flagged_fraction"],
            "test_size": ev["in_distribution"]["size"],
            "ood": {
                m["dataset"]: {"auroc": m["auroc"], "fpr_at_95_tpr": m["fpr_at_95_tpr"]} for m in ev["ood"]
            },
            "artifact": str(published[configs[kind].name]),
        }
    combined = None
    if ensemble_file is not None:
        ensemble = load_ensemble(ensemble_file)
        combined = {
            "name": ensemble.name,
            "rule": ensemble.rule,
            "threshold": ensemble.calibration.threshold,
            "calibration_size": ensemble.calibration.validation_size,
            "test_flagged_fraction": ensemble.in_distribution_test.get("flagged_fraction"),
            "ood": {
                m.dataset: {"auroc": m.auroc, "fpr_at_95_tpr": m.fpr_at_95_tpr} for m in ensemble.metrics
            },
            "path": str(ensemble_file),
        }
    return {
        "name": name,
        "data": data,
        "test": test or f"held out of {data}",
        "ood_sets": ood,
        "input": choice.policy,
        "splits": record,
        "models": models,
        "combined": combined,
        "timings_s": timings,
        "total_s": round(seconds, 1),
        "chosen_on": _chosen_on(models, ood),
    }


def _chosen_on(models: dict[str, Any], ood: list[str]) -> str:
    sets = f" ({', '.join(ood)})" if ood else ""
    for name, model in models.items():
        selection = model.get("selection")
        # only a statistic that a procedure chose on data (an embedding flow's is fixed by its config)
        if isinstance(selection, dict) and selection.get("by") == "selection":
            data = selection.get("data") or {}
            proxies = ", ".join(
                str(p.get("name", p)) if isinstance(p, dict) else str(p) for p in selection.get("proxies", [])
            )
            return (
                f"no --ood set{sets} played a part in any choice: {name}'s statistic "
                f"({selection.get('chosen')}, best mean AUROC over the proxies) was chosen on "
                f"{data.get('in_distribution')}, {data.get('size')} images, and OOD proxies made from it "
                f"({proxies}); the ensemble weights on proxies of half the combination split; thresholds "
                "on the calibration splits and the other half"
            )
    return (
        f"no --ood set{sets} played a part in any choice: fixed statistics "
        f"({', '.join(sorted({m['statistic'] for m in models.values()}))}), thresholds on the calibration "
        "and combination splits"
    )


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    ood = summary["ood_sets"]
    lines = [
        f"built {summary['name']} in {summary['total_s'] / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
        + ")",
    ]
    header = "  {:<28s} {:>22s}".format("model", "flagged on held-out ID") + "".join(
        f" {('AUROC/FPR95 ' + o)[:30]:>30s}" for o in ood
    )
    lines.append(header)
    rows = [(m, info) for m, info in summary["models"].items()]
    if summary["combined"] is not None:
        rows.append((f"combined ({summary['combined']['name']})", summary["combined"]))
    for model, info in rows:
        flagged = info.get("test_flagged_fraction")
        cells = "".join(
            f" {info['ood'][o]['auroc']:>14.4f} / {info['ood'][o]['fpr_at_95_tpr']:<13.4f}"
            if o in info["ood"]
            else f" {'-':>30s}"
            for o in ood
        )
        label = model if "statistic" not in info else f"{model} ({info['statistic']})"
        lines.append(f"  {label:<28s} {flagged if flagged is None else f'{flagged:.1%}':>22}" + cells)
    if not ood:
        lines.append("  no OOD set was given: the reports hold no OOD metrics (add --ood SPEC to measure)")
    return lines


def _write_report(folder: Path, summary: dict[str, Any], curl: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build.json").write_text(json.dumps({**summary, "curl": curl}, indent=2, default=str) + "\n")
    lines = [
        f"# Build {summary['name']}",
        "",
        f"- data: `{summary['data']}`; test: `{summary['test']}`",
        f"- {summary['input']}",
        "- splits: "
        + ", ".join(f"{k} {v}" for k, v in summary["splits"].items() if k != "train_fingerprint"),
        f"- {summary['chosen_on']}",
        "- convention: OpenOOD, OOD is the positive class (AUROC, FPR@95%TPR)",
        "",
        "```",
        *_summary_lines(summary),
        "```",
        "",
        "Score one image once `oodflow serve` runs:",
        "",
        "```bash",
        curl,
        "```",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
