"""Train the multi-task THz network on a research-format dataset (the demo model's recipe).

Objectives (export.losses): SupCon on L2-normalised embeddings of anchor / positive / negative,
label-smoothed cross-entropy for posture on all three images, Charbonnier + (1 − SSIM) for the
reconstruction of the unconcealed positive through the decoder of the anchor's true posture.
AdamW with gradient clipping, a short linear warm-up then cosine decay (the research plateau
schedule needs far more epochs than a CPU demo can afford), the best epoch by validation SSIM,
non-finite losses skipped.

Validation is identity-disjoint: a fixed share (default 10 %) of the training identities
(split seed 42, the research split seed) is held out, so model selection and the verification threshold are
measured on people the network has not seen — which is how the demo model is used.

Deterministic for a seed on CPU: one torch.Generator drives shuffling, negatives and
augmentation; deterministic algorithms and a fixed thread count are set for the run and
restored afterwards.

The checkpoint is the research THz-only layout: {"model_state_dict", "epoch", "config",
"best_val_ssim", ...}; `export.checkpoint.import_checkpoint` reads it unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge import __version__
from edge.runner import Runner
from export.bundle_writer import set_threshold
from scanner_io.choices import Choice
from scanner_io.errors import DataError, ThzEdgeError

# torch, and the modules that read crops with cv2 (scanner_io.dataset, edge.evaluation), are
# imported where used: `thzedge --help` imports this module through its CLI.
if TYPE_CHECKING:
    import torch

    from export.model import MTLNetwork

log = logging.getLogger(__name__)

TRAIN_VAL_CSV = "train_val.csv"
SPLIT_SEED = 42  # research split seed; fixed so runs with different training seeds share a split


class Augmentation(Choice):
    """Input augmentation profile of training (encoder inputs only, never the targets)."""

    gentle = "gentle"
    none = "none"


class Sampler(Choice):
    """How batches are drawn: random triplets, or runs of one identity (pk)."""

    random = "random"
    pk = "pk"


class Positives(Choice):
    """SupCon positives of each anchor: its own unconcealed crop, or also another capture of its person.

    "capture" is the research triplet (concealed crop vs the unconcealed crop of the same
    capture). "cross" adds, per anchor, a concealed crop of another sample of the same person and
    posture (another pose jitter, cloth and speckle): the pairing a gallery makes in the field.
    """

    capture = "capture"
    cross = "cross"


class Selection(Choice):
    """Which epoch's weights are kept: best validation SSIM, or best cross-capture validation EER."""

    ssim = "ssim"
    cross_eer = "cross-eer"


class ThresholdPairs(Choice):
    """Pairs a threshold is chosen on: same-capture triplets, or a gallery of other captures."""

    capture = "capture"
    gallery = "gallery"


class LabelScheme(Choice):
    """SupCon labels: true identities, or one class per triplet (the research code)."""

    identity = "identity"
    triplet = "triplet"


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; stored in the checkpoint under "config"."""

    width: float = 0.125
    embedding_dim: int = 128
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_fraction: float = 0.05
    seed: int = 0
    val_fraction: float = 0.1
    # Choices held as plain strings: the checkpoint stores this config and loads with
    # weights_only=True, which refuses enum objects. __post_init__ checks them against the enums.
    augment: str = Augmentation.gentle.value
    label_scheme: str = LabelScheme.identity.value
    sampler: str = Sampler.random.value
    samples_per_identity: int = 4
    threads: int = 1
    # The research network uses 0.5; at demo widths the latent is 64-d and 0.5 collapsed the
    # embedding (validation EER 0.32 against 0.03 with 0.1; docs/demo-model.md).
    dropout: float = 0.1
    w_verification: float = 1.0
    w_posture: float = 1.0
    w_charbonnier: float = 1.0
    w_ssim: float = 0.8
    max_steps: int | None = None  # stop early after this many optimiser steps (tests, trials)
    positives: str = Positives.capture.value
    select: str = Selection.ssim.value

    def __post_init__(self) -> None:
        object.__setattr__(self, "positives", Positives.parse(self.positives, "positives").value)
        object.__setattr__(self, "select", Selection.parse(self.select, "model selection").value)
        if self.positives == Positives.cross.value and self.label_scheme != LabelScheme.identity.value:
            raise ThzEdgeError(
                "cross-capture positives need identity SupCon labels (--supcon-labels identity)"
            )
        object.__setattr__(self, "augment", Augmentation.parse(self.augment, "augmentation").value)
        object.__setattr__(self, "sampler", Sampler.parse(self.sampler, "sampler").value)
        object.__setattr__(
            self, "label_scheme", LabelScheme.parse(self.label_scheme, "SupCon label scheme").value
        )
        if self.samples_per_identity < 1:
            raise ThzEdgeError(f"samples per identity must be >= 1, got {self.samples_per_identity}")
        if self.epochs < 1 or self.batch_size < 2 or self.threads < 1:
            raise ThzEdgeError("epochs must be >= 1, batch size >= 2 and threads >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ThzEdgeError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ThzEdgeError(f"learning rate must be a positive number, got {self.lr}")
        if abs(self.width * 64 - round(self.width * 64)) > 1e-9 or self.width * 64 < 1:
            raise ThzEdgeError(f"width x 64 must be a whole number (e.g. 0.125, 0.25), got {self.width}")


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class TripletData:
    """A triplet CSV loaded into memory: distinct images once, triplets as index arrays."""

    images: np.ndarray  # [M, 1, 64, 64] float32 in [0, 1]
    names: list[str]  # path of each image relative to the data directory
    identity: np.ndarray  # [M] int64 identity index (into `identity_names`)
    posture: np.ndarray  # [M] int64 posture class
    concealed: np.ndarray  # [M] bool
    triplets: np.ndarray  # [T, 3] (anchor, positive, negative) image indices
    identity_names: list[str]

    def subset(self, keep: np.ndarray) -> np.ndarray:
        """Triplet rows whose anchor identity is in the boolean identity mask `keep`."""
        return np.flatnonzero(keep[self.identity[self.triplets[:, 0]]])


def load_triplet_data(data_dir: Path, csv_path: Path) -> TripletData:
    """Load every image named in a triplet CSV once; DataError names a missing file or bad name."""
    from scanner_io.dataset import load_crop, parse_crop_name, read_triplets

    rows = read_triplets(csv_path, data_dir=data_dir)  # names the CSV line of a bad row or missing file
    index: dict[Path, int] = {}
    for t in rows:
        for p in (t.anchor, t.positive, t.negative):
            index.setdefault(p, len(index))
    paths = list(index)
    crops = [parse_crop_name(p.name) for p in paths]
    id_names = sorted({str(c.identity) for c in crops}, key=_natural_key)
    id_index = {n: i for i, n in enumerate(id_names)}
    images = np.stack([np.asarray(load_crop(p), dtype=np.float32) for p in paths])[:, None]
    triplets = np.array(
        [[index[t.anchor], index[t.positive], index[t.negative]] for t in rows],
        dtype=np.int64,
    )
    return TripletData(
        images=images,
        names=[str(p.relative_to(data_dir)) if p.is_relative_to(data_dir) else str(p) for p in paths],
        identity=np.array([id_index[str(c.identity)] for c in crops], dtype=np.int64),
        posture=np.array([int(c.posture) for c in crops], dtype=np.int64),
        concealed=np.array([bool(c.concealed) for c in crops], dtype=bool),
        triplets=triplets,
        identity_names=id_names,
    )


def _natural_key(s: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def split_identities(identity_names: Sequence[str], val_fraction: float, seed: int = SPLIT_SEED) -> list[str]:
    """Return the identities held out for validation: a seeded, reproducible share of them."""
    names = sorted(identity_names, key=_natural_key)
    n_val = max(1, int(round(len(names) * val_fraction)))
    if n_val >= len(names):
        raise DataError(f"only {len(names)} identities: too few to hold some out for validation")
    order = np.random.default_rng(seed).permutation(len(names))
    return sorted((names[i] for i in order[:n_val]), key=_natural_key)


def write_triplet_csv(data: TripletData, rows: np.ndarray, path: Path) -> Path:
    """Write the selected triplets as a research-format CSV (anchor, positive, negative paths)."""
    from scanner_io.dataset import write_triplets

    path.parent.mkdir(parents=True, exist_ok=True)
    write_triplets(path, [(data.names[a], data.names[p], data.names[n]) for a, p, n in data.triplets[rows]])
    return path


# ---------------------------------------------------------------------------------------------
# augmentation ("gentle" profile of research-model.md §2, on whole batches)


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Return a gently augmented copy of encoder inputs [N, 1, H, W] (never used on targets).

    Rotation ±10° and scale 0.9–1.1 (bilinear, zero fill), up to three 2–4 px stripes blanked
    with probability 0.2, additive Gaussian noise σ ∈ [0.05, 0.1], clipped to [0, 1].
    """
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape

    def u(lo: float, hi: float, size: int = n) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=gen)

    angle = u(-10.0, 10.0) * math.pi / 180.0
    scale = u(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Stripe masking: a scanned sensor loses whole rows or columns.
    stripe = torch.rand(n, generator=gen) < 0.2
    for i in torch.nonzero(stripe).flatten().tolist():
        k = int(torch.randint(1, 4, (1,), generator=gen))
        for _ in range(k):
            width = int(torch.randint(2, 5, (1,), generator=gen))
            start = int(torch.randint(0, h - width, (1,), generator=gen))
            if bool(torch.rand(1, generator=gen) < 0.5):
                out[i, :, start : start + width, :] = 0.0
            else:
                out[i, :, :, start : start + width] = 0.0
    sigma = u(0.05, 0.1).view(n, 1, 1, 1)
    out = out + sigma * torch.randn(out.shape, generator=gen)
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class EpochRecord:
    """Mean training losses and validation metrics of one epoch."""

    epoch: int
    train: dict[str, float]
    val: dict[str, float]
    seconds: float
    skipped_steps: int = 0


@dataclass
class TrainResult:
    """What a run produced: the checkpoint, its epoch and metrics, the history and the time."""

    checkpoint: Path
    best_epoch: int
    best_val: dict[str, float]
    history: list[EpochRecord]
    seconds: float
    val_identities: list[str]
    steps: int
    skipped_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def _sample_negatives(
    data: TripletData, anchors: np.ndarray, pool: np.ndarray, gen: torch.Generator
) -> np.ndarray:
    """Draw, for each anchor, a concealed training image of another identity in the same posture."""
    import torch

    out = np.empty(len(anchors), dtype=np.int64)
    for k in np.unique(data.posture[anchors]):
        cand = pool[data.posture[pool] == k]
        rows = np.flatnonzero(data.posture[anchors] == k)
        picks = cand[torch.randint(0, len(cand), (len(rows),), generator=gen).numpy()]
        # Redraw the few that hit the anchor's own identity (bounded: identities are many).
        for _ in range(20):
            clash = data.identity[picks] == data.identity[anchors[rows]]
            if not clash.any():
                break
            picks[clash] = cand[torch.randint(0, len(cand), (int(clash.sum()),), generator=gen).numpy()]
        out[rows] = picks
    return out


def capture_groups(data: TripletData, pool: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The images of `pool` grouped by (identity, posture): each group's images are distinct captures."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in pool.tolist():
        groups.setdefault((int(data.identity[i]), int(data.posture[i])), []).append(i)
    return {k: np.array(v, dtype=np.int64) for k, v in groups.items()}


def _sample_other_captures(
    data: TripletData,
    anchors: np.ndarray,
    groups: dict[tuple[int, int], np.ndarray],
    gen: torch.Generator,
) -> np.ndarray:
    """Draw, for each anchor, another concealed capture of its identity in its posture (itself if none)."""
    import torch

    out = anchors.copy()
    for j, a in enumerate(anchors.tolist()):
        others = groups.get((int(data.identity[a]), int(data.posture[a])))
        if others is None:
            continue
        others = others[others != a]
        if len(others):
            out[j] = others[int(torch.randint(0, len(others), (1,), generator=gen))]
    return out


def epoch_batches(
    data: TripletData, rows: np.ndarray, config: TrainConfig, gen: torch.Generator
) -> list[np.ndarray]:
    """Split training triplet rows into one epoch's batches of `config.batch_size` rows.

    sampler "random": a plain shuffle. sampler "pk": rows come in runs of `samples_per_identity`
    triplets of one identity in one posture, so each anchor meets several images of its own
    person (SupCon positives) besides the same-posture negative of every triplet. Leftover rows
    that fill no batch are dropped.
    """
    import torch

    def perm(n: int) -> np.ndarray:
        return torch.randperm(n, generator=gen).numpy()

    b = config.batch_size
    if config.sampler == "random":
        order = rows[perm(len(rows))]
        return [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
    k = config.samples_per_identity
    anchors = data.triplets[rows, 0]
    # Runs of k triplets sharing identity and posture, shuffled together across postures: a
    # batch of one posture only would let BatchNorm's batch statistics erase the posture.
    key = data.identity[anchors] * 1000 + data.posture[anchors]
    chunks: list[np.ndarray] = []
    for g in np.unique(key):
        mine = rows[key == g]
        mine = mine[perm(len(mine))]
        chunks.extend(mine[j : j + k] for j in range(0, len(mine), k))
    flat = np.concatenate([chunks[j] for j in perm(len(chunks))])
    return [flat[i : i + b] for i in range(0, len(flat) - b + 1, b)]


def _forward_triplets(
    model: MTLNetwork,
    a: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    anchor_posture: torch.Tensor,
    *more: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One encoder pass over (anchors, positives, negatives, more views) and the anchors' reconstructions."""
    import torch

    from export.model import EncoderOutputs

    b = a.shape[0]
    enc = model.encode(torch.cat([a, p, n, *more], dim=0))
    anchor_enc = EncoderOutputs(*(t[:b] for t in enc))
    recon = model.decode(anchor_enc, anchor_posture)
    return enc.embedding, enc.posture_logits, recon


def evaluate_split(
    model: MTLNetwork, data: TripletData, rows: np.ndarray, batch_size: int = 128
) -> dict[str, float]:
    """Validation metrics of the torch model on triplet rows (eval mode, true-posture routing).

    Returns mean losses, SSIM, posture accuracy (over the rows' distinct images), triplet
    accuracy, EER and the distance threshold at the EER point.
    """
    import torch

    from edge.evaluation import equal_error_rate, pair_distances, threshold_at_eer
    from export.losses import LossWeights, mtl_loss

    model.eval()
    tri = data.triplets[rows]
    used = np.unique(tri)
    emb = {}
    ssims: list[float] = []
    losses = {"total": 0.0, "verification": 0.0, "posture": 0.0, "reconstruction": 0.0}
    n_batches = 0
    correct = 0
    with torch.no_grad():
        # Embeddings and posture predictions once per distinct image.
        for s in range(0, len(used), batch_size):
            idx = used[s : s + batch_size]
            enc = model.encode(torch.from_numpy(data.images[idx]))
            for i, e in zip(idx.tolist(), enc.embedding.numpy(), strict=True):
                emb[i] = e
            correct += int((enc.posture_logits.argmax(1).numpy() == data.posture[idx]).sum())
        for s in range(0, len(tri), batch_size):
            t = tri[s : s + batch_size]
            a, p, n = (torch.from_numpy(data.images[t[:, j]]) for j in range(3))
            post = torch.from_numpy(data.posture[t[:, 0]])
            e, logits, recon = _forward_triplets(model, a, p, n, post)
            ids = torch.from_numpy(data.identity[t.T.copy()])
            postures = torch.from_numpy(data.posture[t.T.copy()])
            out = mtl_loss(e, logits, recon, ids, postures, p, LossWeights())
            from export.losses import ssim as ssim_t

            ssims.extend(ssim_t(recon, p).tolist())
            for k in losses:
                losses[k] += float(getattr(out, k))
            n_batches += 1
    ea = np.stack([emb[i] for i in tri[:, 0]])
    d_pos = pair_distances(ea, np.stack([emb[i] for i in tri[:, 1]]))
    d_neg = pair_distances(ea, np.stack([emb[i] for i in tri[:, 2]]))
    cross_gen, cross_imp = cross_capture_distances(
        np.stack([emb[i] for i in np.unique(tri[:, 0])]),
        data.identity[np.unique(tri[:, 0])],
        data.posture[np.unique(tri[:, 0])],
    )
    cross = (
        {
            "cross_eer": equal_error_rate(cross_gen, cross_imp),
            "cross_threshold_eer": threshold_at_eer(cross_gen, cross_imp),
        }
        if len(cross_gen) and len(cross_imp)
        else {"cross_eer": float("nan"), "cross_threshold_eer": float("nan")}
    )
    return {
        **cross,
        **{f"loss_{k}": v / max(n_batches, 1) for k, v in losses.items()},
        "ssim": float(np.mean(ssims)),
        "posture_accuracy": correct / len(used),
        "triplet_accuracy": float(np.mean(d_pos < d_neg)),
        "eer": equal_error_rate(d_pos, d_neg),
        "d_pos_mean": float(d_pos.mean()),
        "d_neg_mean": float(d_neg.mean()),
        "threshold_eer": threshold_at_eer(d_pos, d_neg),
    }


def cross_capture_distances(
    emb: np.ndarray, identity: np.ndarray, posture: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor distances between distinct captures in the same posture (a gallery's pairs).

    `emb` [N, D] are embeddings of distinct concealed captures; genuine pairs are two captures of
    one identity, impostor pairs two identities; pairs across postures are left out (the gallery
    matches the reference of the probe's posture).
    """
    e = np.asarray(emb, np.float64)
    sq = np.sum(e * e, axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 0.0))
    upper = np.triu(np.ones(d.shape, bool), 1)
    same_p = posture[:, None] == posture[None, :]
    same_i = identity[:, None] == identity[None, :]
    return d[upper & same_p & same_i], d[upper & same_p & ~same_i]


class _Progress:
    """A rich progress bar on a terminal; one log line per epoch otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[losses]}"),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, losses="")

    def step(self, epoch: int, losses: dict[str, float]) -> None:
        if self._bar is not None:
            short = {"total": "loss", "verification": "ver", "posture": "pos", "reconstruction": "rec"}
            text = " ".join(f"{short.get(k, k)} {v:.3f}" for k, v in losses.items())
            self._bar.update(self._task, advance=1, description=f"epoch {epoch}", losses=text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def train(
    data_dir: str | Path,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    progress: bool | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train on `data_dir/train_val.csv` and save the best checkpoint (validation SSIM) to `out`.

    progress None shows a bar only when stderr is a terminal.
    """

    data_dir = Path(data_dir)
    csv_path = data_dir / TRAIN_VAL_CSV
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path} not found; make a dataset with `thzedge sim dataset --out {data_dir}` first"
        )
    t_start = time.perf_counter()
    data = load_triplet_data(data_dir, csv_path)
    log.info(
        "loaded %d images, %d triplets in %.1fs",
        len(data.images),
        len(data.triplets),
        time.perf_counter() - t_start,
    )
    return train_on(data, out, config, progress=progress, on_epoch=on_epoch, t_start=t_start)


def train_on(
    data: TripletData,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    progress: bool | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    t_start: float | None = None,
) -> TrainResult:
    """Train on triplets already in memory (see `train`) and save the best checkpoint to `out`."""
    import torch

    from export.losses import LossWeights, mtl_loss
    from export.model import MTLNetwork

    out = Path(out)
    t_start = time.perf_counter() if t_start is None else t_start
    val_names = split_identities(data.identity_names, config.val_fraction)
    is_val = np.isin(np.array(data.identity_names), val_names)
    val_rows = data.subset(is_val)
    train_rows = data.subset(~is_val)
    if len(train_rows) < config.batch_size:
        raise DataError(
            f"{len(train_rows)} training triplets is fewer than one batch of {config.batch_size}; "
            "make a bigger dataset or lower --batch-size"
        )
    if config.select == Selection.cross_eer.value and len(val_names) < 2:
        raise DataError(
            "selecting on the cross-capture EER needs at least two validation identities "
            "(impostor pairs); raise the validation share or use --select ssim"
        )
    # Negatives are redrawn each epoch from concealed training images, so no validation identity
    # ever reaches the optimiser (the CSV's negatives may belong to held-out people).
    neg_pool = np.flatnonzero(data.concealed & ~is_val[data.identity])
    cross_groups = capture_groups(data, neg_pool)
    log.info(
        "training on %d triplets of %d identities, validating on %d triplets of %d held-out identities",
        len(train_rows),
        int((~is_val).sum()),
        len(val_rows),
        len(val_names),
    )

    saved = _set_determinism(config.threads)
    try:
        gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        model = MTLNetwork(config.embedding_dim, 5, config.width, config.dropout)
        weights = LossWeights(config.w_verification, config.w_posture, config.w_charbonnier, config.w_ssim)
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for _name, param in model.named_parameters():
            # Norm scales and biases are not weight-decayed (the usual AdamW practice).
            (no_decay if param.ndim <= 1 else decay).append(param)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, 0.999),
        )
        # Batch counts per epoch are fixed by the data and the sampler, not by the draw.
        steps_per_epoch = len(epoch_batches(data, train_rows, config, torch.Generator().manual_seed(0)))
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        warmup = max(1, int(total_steps * config.warmup_fraction))

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            frac = (step - warmup) / max(1, total_steps - warmup)
            return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

        def set_lr(step: int) -> None:
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_at(step)

        show = sys.stderr.isatty() if progress is None else progress
        bar = _Progress(show, total_steps)
        history: list[EpochRecord] = []
        best: tuple[float, int, dict[str, float]] | None = None
        step = 0
        skipped_total = 0
        images = torch.from_numpy(data.images)
        try:
            for epoch in range(1, config.epochs + 1):
                if step >= total_steps:
                    break
                model.train()
                t0 = time.perf_counter()
                batches = epoch_batches(data, train_rows, config, gen)
                run = {"total": 0.0, "verification": 0.0, "posture": 0.0, "reconstruction": 0.0, "ssim": 0.0}
                n_ok = 0
                skipped = 0
                for rows in batches:
                    if step >= total_steps:
                        break
                    set_lr(step)
                    t = data.triplets[rows]
                    anchors, positives = t[:, 0], t[:, 1]
                    negatives = _sample_negatives(data, anchors, neg_pool, gen)
                    a, p, n = images[anchors], images[positives], images[negatives]
                    views = [anchors, positives, negatives]
                    more: list[torch.Tensor] = []
                    if config.positives == "cross":
                        cross = _sample_other_captures(data, anchors, cross_groups, gen)
                        views.append(cross)
                        more.append(images[cross])
                    target = p
                    if config.augment == "gentle":
                        # Encoder inputs are augmented; the reconstruction target never is.
                        p = augment_batch(p, gen)
                        n = augment_batch(n, gen)
                        a = _photometric(a, gen)
                        more = [augment_batch(m, gen) for m in more]
                    post = torch.from_numpy(data.posture[anchors])
                    # BatchNorm updates its running statistics in the forward pass, before the loss
                    # is known: keep a copy so a skipped step leaves the model exactly as it was.
                    buffers = [b.detach().clone() for b in model.buffers()]
                    emb, logits, recon = _forward_triplets(model, a, p, n, post, *more)
                    ids = torch.from_numpy(np.stack([data.identity[v] for v in views]))
                    postures = torch.from_numpy(np.stack([data.posture[v] for v in views]))
                    loss = mtl_loss(emb, logits, recon, ids, postures, target, weights, config.label_scheme)
                    step += 1
                    opt.zero_grad(set_to_none=True)
                    ok = bool(torch.isfinite(loss.total))
                    if ok:
                        loss.total.backward()
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                        ok = bool(torch.isfinite(norm))
                    if ok:
                        opt.step()
                        n_ok += 1
                        for k in run:
                            run[k] += float(getattr(loss, k).detach())
                    else:
                        # A non-finite loss or gradient: drop this step, keep the weights.
                        skipped += 1
                        opt.zero_grad(set_to_none=True)
                        with torch.no_grad():
                            for b, saved_b in zip(model.buffers(), buffers, strict=True):
                                b.copy_(saved_b)
                    bar.step(epoch, {k: v / max(n_ok, 1) for k, v in run.items()})
                skipped_total += skipped
                train_means = {k: v / max(n_ok, 1) for k, v in run.items()}
                val = evaluate_split(model, data, val_rows)
                rec = EpochRecord(epoch, train_means, val, time.perf_counter() - t0, skipped)
                history.append(rec)
                log.info(
                    "epoch %d/%d  loss %.3f (ver %.3f pos %.3f rec %.3f)  val ssim %.3f posture %.3f "
                    "triplet %.3f eer %.3f cross-capture eer %.3f  %.0fs%s",
                    epoch,
                    config.epochs,
                    train_means["total"],
                    train_means["verification"],
                    train_means["posture"],
                    train_means["reconstruction"],
                    val["ssim"],
                    val["posture_accuracy"],
                    val["triplet_accuracy"],
                    val["eer"],
                    val["cross_eer"],
                    rec.seconds,
                    f"  ({skipped} non-finite steps skipped)" if skipped else "",
                )
                if on_epoch is not None:
                    on_epoch(rec)
                # Higher is better: SSIM, or minus the cross-capture EER (ties: the later epoch).
                score = val["ssim"] if config.select == "ssim" else -val["cross_eer"]
                if best is None or score > best[0] or (config.select != "ssim" and score == best[0]):
                    best = (score, epoch, val)
                    _save_checkpoint(out, model, epoch, config, val, val_names, history)
        finally:
            bar.close()
    finally:
        _restore_determinism(saved)
    assert best is not None
    # Rewrite with the full history (the best epoch's weights are already in the file).
    _update_history(out, history)
    return TrainResult(
        checkpoint=out,
        best_epoch=best[1],
        best_val=best[2],
        history=history,
        seconds=time.perf_counter() - t_start,
        val_identities=val_names,
        steps=step,
        skipped_steps=skipped_total,
        config=asdict(config),
    )


def _photometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and stripes only for the anchor: geometry must stay aligned with its target."""
    import torch

    n = x.shape[0]
    sigma = (0.05 + 0.05 * torch.rand(n, generator=gen)).view(n, 1, 1, 1)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp_(0.0, 1.0)


def _set_determinism(threads: int) -> tuple[int, bool]:
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return saved


def _restore_determinism(saved: tuple[int, bool]) -> None:
    import torch

    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])


def _history_dicts(history: list[EpochRecord]) -> list[dict[str, Any]]:
    return [
        {
            "epoch": r.epoch,
            "train": dict(r.train),
            "val": dict(r.val),
            "seconds": r.seconds,
            "skipped_steps": r.skipped_steps,
        }
        for r in history
    ]


def _save_checkpoint(
    out: Path,
    model: MTLNetwork,
    epoch: int,
    config: TrainConfig,
    val: dict[str, float],
    val_identities: list[str],
    history: list[EpochRecord],
) -> None:
    """Write the research THz-only layout; only plain types so `weights_only` loading accepts it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "model_state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "config": {**asdict(config), "num_postures": 5, "backbone_type": "custom"},
        "best_val_ssim": float(val["ssim"]),
        "best_val_loss": float(val["loss_total"]),
        "val_metrics": {k: float(v) for k, v in val.items()},
        "val_identities": list(val_identities),
        "history": _history_dicts(history),
        "trainer": f"thzedge {__version__} export.train",
    }
    _save_atomic(obj, out)


def _update_history(out: Path, history: list[EpochRecord]) -> None:
    import torch

    obj = torch.load(out, map_location="cpu", weights_only=True)
    obj["history"] = _history_dicts(history)
    _save_atomic(obj, out)


def _save_atomic(obj: dict[str, Any], out: Path) -> None:
    """torch.save via a temporary file and a rename, so a crash never leaves half a checkpoint."""
    import torch

    tmp = out.with_name(out.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(out)


# ---------------------------------------------------------------------------------------------
# verification threshold of an exported bundle


@dataclass(frozen=True)
class ThresholdResult:
    """A threshold chosen on the validation identities and stored in a bundle's manifest."""

    threshold: float
    precision: str
    method: str
    eer: float
    n_pairs: int
    identities: int
    bundle_id: str


def validation_rows(data: TripletData, val_identities: Sequence[str]) -> np.ndarray:
    """Triplet rows whose anchor is one of `val_identities` (as stored in a checkpoint)."""
    missing = sorted(set(val_identities) - set(data.identity_names))
    if missing:
        raise DataError(
            f"validation identities {', '.join(missing[:3])} are not in this dataset; use the dataset "
            "the checkpoint was trained on"
        )
    return data.subset(np.isin(np.array(data.identity_names), list(val_identities)))


def calibrate_threshold(
    bundle_dir: str | Path,
    data_dir: str | Path,
    checkpoint: str | Path,
    precision: str = "fp32",
    backend: str = "auto",
    target_far: float | None = None,
    roc_png: str | Path | None = None,
    pairs: str = ThresholdPairs.capture.value,
) -> ThresholdResult:
    """Store the EER-point (or target-FAR) distance threshold, measured on the validation identities.

    `target_far` picks the threshold with the highest TAR at FAR <= target instead of the EER
    point; `roc_png` also draws the ROC with that operating point marked (edge.roc_plot).

    `pairs` "capture" scores the validation triplets (a concealed crop against the unconcealed
    crop of the same capture); "gallery" scores what a gallery sees (`gallery_pairs`): the first
    half of each validation person's samples enrolled, the other half probed, all concealed.

    The bundle itself (ONNX Runtime, `precision`) embeds the held-out identities' triplets of
    `data_dir/train_val.csv`; the threshold where FAR = FRR on those pairs
    (`edge.evaluation.threshold_at_eer`) goes into the manifest with how it was chosen.
    """
    from edge.evaluation import collect_outputs, equal_error_rate, threshold_at_eer, threshold_at_far
    from export.checkpoint import load_raw

    data_dir = Path(data_dir)
    obj = load_raw(Path(checkpoint))
    val_ids = obj.get("val_identities") if isinstance(obj, dict) else None
    if not val_ids:
        raise ThzEdgeError(
            f"{checkpoint} records no validation identities (not made by `thzedge train`); "
            "cannot choose a threshold on held-out people"
        )
    pairs = ThresholdPairs.parse(pairs, "threshold pairs").value
    data = load_triplet_data(data_dir, data_dir / TRAIN_VAL_CSV)
    rows = validation_rows(data, val_ids)
    if pairs == ThresholdPairs.gallery.value:
        with Runner.from_bundle(Path(bundle_dir), backend=backend, precision=precision) as runner:
            d_pos, d_neg = gallery_pairs(runner, data, rows)
    else:
        with tempfile.TemporaryDirectory(prefix="thzedge-val-") as tmp:
            csv_path = write_triplet_csv(data, rows, Path(tmp) / "validation.csv")
            with Runner.from_bundle(Path(bundle_dir), backend=backend, precision=precision) as runner:
                out = collect_outputs(runner, data_dir, csv_path, routing="predicted")
        d_pos, d_neg = out.d_pos, out.d_neg
    method = "eer" if target_far is None else "far"
    t = threshold_at_eer(d_pos, d_neg) if target_far is None else threshold_at_far(d_pos, d_neg, target_far)
    eer = equal_error_rate(d_pos, d_neg)
    if roc_png is not None:
        from edge.roc_plot import plot_roc

        label = "EER" if target_far is None else f"FAR <= {target_far:g}"
        plot_roc(d_pos, d_neg, t, roc_png, title=f"{precision} validation ROC", method=label)
    chosen_on = {
        "dataset": _dataset_description(data_dir),
        "split": "validation: identities held out from training (recorded in the checkpoint)",
        "pairs_kind": (
            "gallery: first half of each person's samples enrolled, the rest probed (concealed, "
            "nearest reference of the probe's predicted posture)"
            if pairs == ThresholdPairs.gallery.value
            else "capture: concealed vs unconcealed crop of one capture (research triplets)"
        ),
        "identities": len(val_ids),
        "pairs": int(len(d_pos) + len(d_neg)),
        "eer": round(float(eer), 6),
    }
    if target_far is not None:
        chosen_on["target_far"] = float(target_far)
    bundle = set_threshold(bundle_dir, precision, t, method, chosen_on)
    return ThresholdResult(
        threshold=float(t),
        precision=precision,
        method=method,
        eer=float(eer),
        n_pairs=int(len(d_pos) + len(d_neg)),
        identities=len(val_ids),
        bundle_id=str(getattr(bundle, "id", getattr(bundle, "sha256", ""))),
    )


def gallery_pairs(runner: Runner, data: TripletData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor distances of a gallery made from the concealed anchors of triplet `rows`.

    Per person, the anchors of the lower half of the sample numbers (at least one) are enrolled
    through edge.gallery.Gallery (each reference with its predicted posture); the others are
    probed, each against every enrolled person with the shipped rule (nearest reference of the
    probe's predicted posture). Genuine: a probe against its own person; impostor: against the others.
    """
    from edge.gallery import Gallery
    from scanner_io.dataset import parse_crop_name

    anchors = np.unique(data.triplets[rows, 0])
    sample = np.array([parse_crop_name(data.names[i]).sample for i in anchors])
    ident = data.identity[anchors]
    out = runner.infer(data.images[anchors], reconstruct=False)
    emb, post = np.asarray(out.embedding, np.float32), np.asarray(out.posture)
    enrolled = np.zeros(len(anchors), bool)
    for k in np.unique(ident):
        mine = np.flatnonzero(ident == k)
        samples = np.unique(sample[mine])
        if len(samples) < 2:
            raise DataError(
                f"validation identity {data.identity_names[k]} has one sample; a gallery threshold "
                "needs at least two samples per person (`thzedge sim dataset --samples 2` or more)"
            )
        cut = samples[max(1, len(samples) // 2) - 1]
        enrolled[mine[sample[mine] <= cut]] = True
    if len(np.unique(ident)) < 2:
        raise DataError("a gallery threshold needs at least two validation identities (impostors)")
    g = Gallery(encoder_sha256="validation", embedding_dim=emb.shape[1])
    names = [data.identity_names[k] for k in np.unique(ident)]
    for name, k in zip(names, np.unique(ident), strict=True):
        m = enrolled & (ident == k)
        g.enroll(name, emb[m], postures=post[m])
    order = np.array([g.identities.index(n) for n in names])
    col = {int(k): j for j, k in enumerate(np.unique(ident))}
    gen: list[float] = []
    imp: list[float] = []
    for i in np.flatnonzero(~enrolled):
        d = g.distances(emb[i], posture=int(post[i]))[order]
        j = col[int(ident[i])]
        gen.append(float(d[j]))
        imp.extend(float(v) for v in np.delete(d, j))
    return np.array(gen), np.array(imp)


def _dataset_description(data_dir: Path) -> dict[str, Any]:
    """What a manifest should say about the data a threshold came from (not where it lay)."""
    desc: dict[str, Any] = {"name": data_dir.name}
    meta_path = data_dir / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return desc
        for key in ("format", "seed", "identities", "samples", "split", "profile_id"):
            if key in meta:
                desc[key] = meta[key]
    return desc
