"""Build small random MTL networks and research-style checkpoints in code, for tests.

Checkpoints are written the way the research trainer writes them (checkpoint-layouts.md):
`torch.save` of a dict with 'model_state_dict' (research key names, either layout, either
decoder key set), optimizer and scheduler state, config, and metric histories holding numpy
scalars. Weights are random with non-trivial BatchNorm running statistics, so an import that
ignored BN stats or mixed up keys would show in the outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


def random_network(
    width: float = 0.125,
    embedding_dim: int = 32,
    num_postures: int = 5,
    seed: int = 0,
    spread_postures: bool = True,
) -> Any:
    """An eval-mode MTLNetwork with random weights and random BatchNorm running statistics."""
    import torch

    from export.model import MTLNetwork

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MTLNetwork(embedding_dim=embedding_dim, num_postures=num_postures, width=width)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    with torch.no_grad():
        # Running statistics as a trained network has them: measured on data (a probe batch),
        # so activations stay well scaled, then perturbed so they differ from batch statistics.
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.8 + 0.6)
            bn.bias.copy_(torch.rand(bn.num_features, generator=gen) * 0.2 - 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the probe pass
        model.train()
        model.encoder(torch.from_numpy(probe_frames(32, seed=seed + 7)))
        for bn in bns:
            c = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn(c, generator=gen))
            bn.running_var.mul_(torch.rand(c, generator=gen) * 0.7 + 0.7)
            bn.num_batches_tracked.fill_(1234)
            bn.momentum = 0.1
        if spread_postures:
            # Default init gives near-equal logits; a larger head spreads the predicted postures
            # so routing by prediction exercises several decoders.
            model.encoder.classification_head.weight.mul_(4.0)
    return model.eval()


def probe_frames(n: int, seed: int = 0) -> np.ndarray:
    """n varied frames [n,1,64,64] in [0,1]: brightness ramps, gradients and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    patterns = np.stack([(xx, yy, xx * yy, 1 - xx)[i % 4] for i in range(n)])[:, None]
    level = rng.random((n, 1, 1, 1))
    x = 0.5 * level + 0.4 * patterns * rng.random((n, 1, 1, 1)) + 0.1 * rng.random((n, 1, 64, 64))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _research_names(sd: dict[str, Any], layout: str, decoder_ids: str) -> OrderedDict[str, Any]:
    shift = 1 if decoder_ids == "1..5" else 0
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in sd.items():
        if key.startswith("reconstruction_decoders."):
            _, k, rest = key.split(".", 2)
            key = f"reconstruction_decoders.{int(k) + shift}.{rest}"
        if layout == "distilled":
            key = (
                key.replace("encoder.backbone.backbone.", "model.thz_encoder.backbone.")
                .replace("encoder.spatial_reduction.", "model.student_spatial_reduction.")
                .replace("encoder.verification_head.", "model.student_verification_head.")
                .replace("encoder.classification_head.", "model.student_classification_head.")
            )
            if key.startswith("reconstruction_decoders."):
                key = "model." + key
        out[key] = value.clone()
    return out


def _training_only_parts(sd: dict[str, Any], seed: int) -> OrderedDict[str, Any]:
    """Teacher, cross-attention and distillation tensors of the distilled layout (dropped on import)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    extra: OrderedDict[str, Any] = OrderedDict()
    for key, value in sd.items():
        if key.startswith("encoder.backbone.backbone."):
            extra[key.replace("encoder.backbone.backbone.", "model.vis_encoder.backbone.")] = value.clone()
    c4 = sd["encoder.spatial_reduction.0.weight"].shape[0]
    hidden = sd["encoder.verification_head.0.weight"].shape[0]

    def rnd(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen)

    for name in ("visible_guided_cross_attention", "thz_guided_cross_attention"):
        extra[f"model.{name}.in_proj_weight"] = rnd(3 * c4, c4)
        extra[f"model.{name}.in_proj_bias"] = rnd(3 * c4)
        extra[f"model.{name}.out_proj.weight"] = rnd(c4, c4)
        extra[f"model.{name}.out_proj.bias"] = rnd(c4)
    extra["model.attention_fusion.0.weight"] = rnd(c4, 2 * c4)
    extra["model.attention_fusion.0.bias"] = rnd(c4)
    extra["model.attention_fusion.1.weight"] = rnd(c4)
    extra["model.attention_fusion.1.bias"] = rnd(c4)
    for key, value in sd.items():
        for old, new in (
            ("encoder.spatial_reduction.", "model.teacher_spatial_reduction."),
            ("encoder.verification_head.", "model.teacher_verification_head."),
            ("encoder.classification_head.", "model.teacher_classification_head."),
        ):
            if key.startswith(old):
                extra[new + key[len(old) :]] = value.clone()
    for who in ("student", "teacher"):
        extra[f"model.{who}_distill_projection.weight"] = rnd(hidden, c4)
        extra[f"model.{who}_distill_projection.bias"] = rnd(hidden)
    return extra


def research_state_dict(
    model: Any, layout: str = "thz-only", decoder_ids: str = "0..4", seed: int = 0
) -> Any:
    """The model's state dict under research key names ("thz-only" or "distilled" layout)."""
    if layout not in ("thz-only", "distilled"):
        raise ValueError(layout)
    sd = model.state_dict()
    out = _research_names(sd, layout, decoder_ids)
    if layout == "distilled":
        out.update(_training_only_parts(sd, seed))
    return out


def save_research_checkpoint(
    path: Path,
    model: Any,
    layout: str = "thz-only",
    decoder_ids: str = "0..4",
    bare: bool = False,
    state_dict: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """torch.save a checkpoint as the research trainer does (or a bare state dict if `bare`)."""
    import torch

    sd = state_dict if state_dict is not None else research_state_dict(model, layout, decoder_ids)
    if bare:
        torch.save(sd, path)
        return path
    # Optimizer state as after a few AdamW steps, scheduler state as after a validation step.
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999))
    for _ in range(2):
        (params[0].sum() + params[1].pow(2).sum() + 1).backward()
        opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=10)
    sched.step(np.float64(0.75))
    ckpt = {
        "epoch": 12,
        "model_state_dict": sd,
        "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": sched.state_dict(),
        "best_val_loss": np.float64(0.75),
        "best_val_ssim": np.float64(0.61),
        "config": {
            "num_classes": 5,
            "embed_dim": int(model.config.embedding_dim),
            "backbone_type": "custom",
            "posture_ids": [0, 1, 2, 3, 4],
            "loss_weights": {"verification": 1.0, "classification": 1.0, "reconstruction": 1.0},
            "learning_rate": 1e-4,
            "betas": (0.9, 0.999),
            "input_size": 64,
        },
        "train_losses": {"total_loss": [np.float64(2.5), np.float64(1.9)]},
        "val_losses": {"total_loss": [np.float64(0.9), np.float64(0.75)]},
        "val_metrics": {
            "ssim": [np.float64(0.55), np.float64(0.61)],
            "recon_hardest_posture_id": [np.int64(3), np.int64(2)],
            "confusion": [np.eye(5, dtype=np.int64)],
            "cls_conf_correct": [np.float32(0.8)],
        },
    }
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


def write_tiny_bundle(out_dir: Path, model: Any, max_batch: int = 4) -> Path:
    """Export `model` through the real exporter into a bundle at `out_dir`."""
    from export.bundle_writer import write_bundle

    write_bundle(
        model, out_dir, variant="test-random", max_batch=max_batch, source={"note": "random test weights"}
    )
    return out_dir
