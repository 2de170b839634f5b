"""Training objectives of the multi-task THz model (research-model.md §5).

- verification: supervised contrastive loss (SupCon, Khosla et al. 2020) on L2-normalised
  embeddings of anchor, positive and negative, temperature 0.07, base temperature 0.07;
- posture: label-smoothed cross-entropy (0.1) on all three triplet images;
- reconstruction: Charbonnier (ε = 1e-6) + (1 − SSIM) with an 11×11 Gaussian window, σ 1.5,
  data range 1 — the same SSIM definition `thzedge eval` reports.

torch is imported here at module level: this module is only imported by training code, which
already needs torch, never by the CLI at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPCON_TEMPERATURE = 0.07
SUPCON_BASE_TEMPERATURE = 0.07
LABEL_SMOOTHING = 0.1
CHARBONNIER_EPS = 1e-6
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms of the multi-task loss (research THz-only config, without LPIPS/Sobel)."""

    verification: float = 1.0
    posture: float = 1.0
    charbonnier: float = 1.0
    ssim: float = 0.8


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = SUPCON_TEMPERATURE,
    base_temperature: float = SUPCON_BASE_TEMPERATURE,
) -> torch.Tensor:
    """Return the supervised contrastive loss of L2-normalised embeddings [N, D] with labels [N].

    Every sample is an anchor; its positives are the other samples with the same label. Samples
    with no positive in the batch (a negative with a label of its own) still act as contrast in
    the denominators but contribute no term of their own; the loss is the mean over samples that
    have at least one positive (the research code averages a zero for them instead, which only
    rescales the loss).
    """
    if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    n = embeddings.shape[0]
    z = F.normalize(embeddings, dim=1)
    logits = z @ z.T / temperature
    # Subtracting the row max keeps exp() finite; it cancels in the log-softmax.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    n_pos = pos_mask.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return embeddings.sum() * 0.0
    mean_log_prob_pos = (log_prob * pos_mask).sum(dim=1)[has_pos] / n_pos[has_pos]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def triplet_labels(identities: torch.Tensor, scheme: str = "identity") -> torch.Tensor:
    """Return SupCon labels [KB] for a batch of B triplets ordered (anchors, positives, negatives, …).

    `identities` is [K, B]: the true identity of each anchor, positive and negative (K = 3), and
    of each further view of the anchor's person (K = 4: a concealed capture of another sample,
    the field's pairing; identity scheme only).
    scheme "identity": every image is labelled with its true identity, so two triplets of the
    same person in one batch are positives of each other and never pushed apart.
    scheme "triplet" (the research code): anchor and positive of triplet i get label i, each
    negative a label of its own, whoever it shows.
    """
    if identities.ndim != 2 or identities.shape[0] < 3:
        raise ValueError(f"need identities [K >= 3, B], got {tuple(identities.shape)}")
    b = identities.shape[1]
    if scheme == "identity":
        return identities.reshape(-1)
    if scheme == "triplet":
        if identities.shape[0] != 3:
            raise ValueError("the triplet label scheme has no label for a fourth view; use identity labels")
        idx = torch.arange(b, device=identities.device)
        return torch.cat([idx, idx, idx + b])
    raise ValueError(f"unknown SupCon label scheme {scheme!r}; use 'identity' or 'triplet'")


def posture_loss(
    logits: torch.Tensor, postures: torch.Tensor, smoothing: float = LABEL_SMOOTHING
) -> torch.Tensor:
    """Return the label-smoothed cross-entropy of posture logits [N, 5] against class indices [N]."""
    return F.cross_entropy(logits, postures, label_smoothing=smoothing)


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = CHARBONNIER_EPS) -> torch.Tensor:
    """Return the mean Charbonnier penalty sqrt((pred − target)² + ε²), a smooth L1."""
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


def _gaussian_window(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Return the SSIM of each image pair [N, C, H, W] → [N] (Gaussian window, valid region).

    Same definition as pytorch_msssim and `edge.evaluation.ssim`: separable 11×11 Gaussian,
    σ 1.5, K1 0.01, K2 0.03, no padding, mean over channels and the valid region.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"need two [N, C, H, W] tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    c = pred.shape[1]
    g = _gaussian_window(window, sigma, pred.device, pred.dtype)
    gh = g.view(1, 1, 1, window).expand(c, 1, 1, window)
    gv = g.view(1, 1, window, 1).expand(c, 1, window, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, gh, groups=c), gv, groups=c)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x * mu_x
    syy = blur(target * target) - mu_y * mu_y
    sxy = blur(pred * target) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (lum * cs).flatten(1).mean(dim=1)


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: LossWeights = LossWeights()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weighted Charbonnier + (1 − SSIM) loss, mean SSIM detached) for [N, 1, H, W] maps."""
    s = ssim(pred, target).mean()
    loss = weights.charbonnier * charbonnier_loss(pred, target) + weights.ssim * (1.0 - s)
    return loss, s.detach()


@dataclass
class MTLLoss:
    """The three terms and their weighted total for one batch (tensors; `total` carries gradients)."""

    total: torch.Tensor
    verification: torch.Tensor
    posture: torch.Tensor
    reconstruction: torch.Tensor
    ssim: torch.Tensor


def mtl_loss(
    embeddings: torch.Tensor,
    posture_logits: torch.Tensor,
    reconstruction: torch.Tensor,
    identities: torch.Tensor,
    postures: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights = LossWeights(),
    label_scheme: str = "identity",
) -> MTLLoss:
    """Return the multi-task loss of one batch of B triplets.

    embeddings [KB, D] and posture_logits [KB, 5] are for (anchors, positives, negatives[, other
    captures of the anchors' people]) in that order; identities and postures are [K, B];
    reconstruction and target are [B, 1, 64, 64]
    (the anchor's reconstruction through its posture's decoder, and the unconcealed positive).
    """
    l_ver = supcon_loss(embeddings, triplet_labels(identities, label_scheme))
    l_cls = posture_loss(posture_logits, postures.reshape(-1))
    l_rec, s = reconstruction_loss(reconstruction, target, weights)
    total = weights.verification * l_ver + weights.posture * l_cls + l_rec
    return MTLLoss(
        total=total,
        verification=l_ver.detach(),
        posture=l_cls.detach(),
        reconstruction=l_rec.detach(),
        ssim=s,
    )
