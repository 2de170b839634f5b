"""The research multi-task THz network in PyTorch, plus its deploy graphs.

Layer for layer the architecture of research-model.md §5 (backbone 'custom'): a ResNet-style
encoder with four stride-2 stages, a 4×4 stride-4 spatial reduction to a 512-d latent, an
L2-normalised verification embedding, a posture head, and one U-Net decoder per posture with a
residual dense bottleneck and PixelShuffle upsamplers ending in a Sigmoid.

Module names reproduce the state-dict keys of the research THz-only checkpoint
(checkpoint-layouts.md, layout 1) with the decoders keyed by 0-based class index, so a research
checkpoint loads with a plain `load_state_dict` once `export.checkpoint` has normalised its keys.

`width` scales every channel count (1.0 = the research widths) so small models train fast;
nothing else differs. The embedding size and posture count come from the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

# Research constants (research-model.md §5); channel counts below are scaled by `width`.
BASE_CHANNELS = 64
LATENT_CHANNELS = 512  # feat4 and the pooled latent at width 1
VERIFICATION_HIDDEN = 256
DECODER_BOTTLENECK = 256
RDB_GROWTH = 32
RDB_LAYERS = 5
RDB_WEIGHT = 0.5
LEAKY_SLOPE = 0.2
DROPOUT = 0.5
INPUT_SIZE = 64


def scaled(channels: int, width: float) -> int:
    """Return a research channel count scaled by `width` (round half up, at least 1)."""
    return max(1, int(math.floor(channels * width + 0.5)))


@dataclass(frozen=True)
class NetworkConfig:
    """What fixes the network's shapes: embedding size, posture count and width multiplier."""

    embedding_dim: int = 128
    num_postures: int = 5
    width: float = 1.0
    dropout: float = DROPOUT

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.num_postures < 1:
            raise ValueError(f"num_postures must be >= 1, got {self.num_postures}")
        base = self.width * BASE_CHANNELS
        # The width is recovered from the first conv's channel count on import, so it must be
        # a whole number of base channels over 64 (e.g. 0.25 -> 16): then every scaled count
        # below is reproducible from the checkpoint alone.
        if base < 1 or abs(base - round(base)) > 1e-9:
            raise ValueError(f"width * {BASE_CHANNELS} must be a whole number >= 1, got width={self.width}")

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channel counts of feat1..feat4."""
        return tuple(scaled(c, self.width) for c in (64, 128, 256, 512))  # type: ignore[return-value]


class ResNetDownsampleBlock(nn.Module):
    """Conv3x3/2-BN-LReLU-Conv3x3-BN plus a shortcut (1x1/2 conv+BN, or 2x2 avg pool), add, LReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class MultiScaleResNetEncoder(nn.Module):
    """The custom THz backbone: initial conv, then four stages giving feat1..feat4 (32..4 px)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in (64, 128, 256, 512))
        self.initial_conv = nn.Sequential(nn.Conv2d(1, c1, 3, stride=1, padding=1), nn.LeakyReLU(LEAKY_SLOPE))
        self.stage1 = ResNetDownsampleBlock(c1, c1)
        self.stage2 = ResNetDownsampleBlock(c1, c2)
        self.stage3 = ResNetDownsampleBlock(c2, c3)
        self.stage4 = ResNetDownsampleBlock(c3, c4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.initial_conv(x)
        feat1 = self.stage1(x)
        feat2 = self.stage2(feat1)
        feat3 = self.stage3(feat2)
        feat4 = self.stage4(feat3)
        return feat1, feat2, feat3, feat4


class BackboneEncoder(nn.Module):
    """Wrapper that holds the custom backbone (kept for the research key prefix `backbone.backbone`)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.backbone = MultiScaleResNetEncoder(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.backbone(x)


class EncoderOutputs(NamedTuple):
    """One encoder pass: unit-norm embedding, posture logits and the four skip features."""

    embedding: torch.Tensor
    posture_logits: torch.Tensor
    feat1: torch.Tensor
    feat2: torch.Tensor
    feat3: torch.Tensor
    feat4: torch.Tensor


class SharedEncoder(nn.Module):
    """Backbone, 4x4/4 spatial reduction, verification head (L2-normalised) and posture head."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        c4 = config.channels[3]
        hidden = scaled(VERIFICATION_HIDDEN, config.width)
        self.backbone = BackboneEncoder(config.width)
        self.spatial_reduction = nn.Sequential(
            nn.Conv2d(c4, c4, kernel_size=4, stride=4, padding=0, bias=False),
            nn.BatchNorm2d(c4),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.verification_head = nn.Sequential(
            nn.Linear(c4, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, config.embedding_dim),
        )
        self.classification_head = nn.Linear(c4, config.num_postures)

    def forward(self, x: torch.Tensor) -> EncoderOutputs:
        feat1, feat2, feat3, feat4 = self.backbone(x)
        latent = self.dropout(self.spatial_reduction(feat4).flatten(1))
        embedding = F.normalize(self.verification_head(latent), p=2, dim=1)
        logits = self.classification_head(latent)
        return EncoderOutputs(embedding, logits, feat1, feat2, feat3, feat4)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (growth g), 1x1 local fusion, 0.5·fused + 0.5·input."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels + i * growth, growth, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE))
            for i in range(RDB_LAYERS)
        )
        self.local_fusion = nn.Conv2d(channels + RDB_LAYERS * growth, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        fused = self.local_fusion(torch.cat(feats, dim=1))
        return fused * RDB_WEIGHT + x * RDB_WEIGHT


class PixelShuffleUpsampler(nn.Module):
    """3x3 conv to 4·out channels, then PixelShuffle ×2 (no activation, as in the research code)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels * 4, 3, 1, 1)
        self.pixelshuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixelshuffle(self.conv(x))


class UNetDecoder(nn.Module):
    """One posture expert: feat4 bottleneck + RDB, three skip-joined up stages, Sigmoid 1x64x64."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in (64, 128, 256, 512))
        d4, d3, d2, d1, d0 = (scaled(c, width) for c in (256, 128, 64, 32, 16))
        self.channel_reduction = nn.Conv2d(c4, d4, kernel_size=1, stride=1, padding=0)
        self.bottleneck_rdb = ResidualDenseBlock(d4, scaled(RDB_GROWTH, width))
        self.up4 = PixelShuffleUpsampler(d4, d3)
        self.conv4 = nn.Sequential(nn.Conv2d(d3 + c3, d3, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE))
        self.up3 = PixelShuffleUpsampler(d3, d2)
        self.conv3 = nn.Sequential(nn.Conv2d(d2 + c2, d2, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE))
        self.up2 = PixelShuffleUpsampler(d2, d1)
        self.conv2 = nn.Sequential(nn.Conv2d(d1 + c1, d1, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE))
        self.up1 = PixelShuffleUpsampler(d1, d0)
        self.final_conv = nn.Sequential(nn.Conv2d(d0, 1, 3, 1, 1), nn.Sigmoid())

    def forward(
        self, feat4: torch.Tensor, feat3: torch.Tensor, feat2: torch.Tensor, feat1: torch.Tensor
    ) -> torch.Tensor:
        x = self.bottleneck_rdb(self.channel_reduction(feat4))
        x = self.conv4(torch.cat([self.up4(x), feat3], dim=1))
        x = self.conv3(torch.cat([self.up3(x), feat2], dim=1))
        x = self.conv2(torch.cat([self.up2(x), feat1], dim=1))
        return self.final_conv(self.up1(x))


class MTLOutput(NamedTuple):
    """Training/eager forward result: embedding [N,D], posture logits [N,K], reconstruction [N,1,64,64]."""

    embedding: torch.Tensor
    posture_logits: torch.Tensor
    reconstruction: torch.Tensor | None


class MTLNetwork(nn.Module):
    """The unified multi-task network: shared encoder plus one reconstruction expert per posture."""

    def __init__(
        self,
        embedding_dim: int = 128,
        num_postures: int = 5,
        width: float = 1.0,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.config = NetworkConfig(embedding_dim, num_postures, width, dropout)
        self.encoder = SharedEncoder(self.config)
        # Keyed by the 0-based class index as a string, like the research ModuleDict.
        self.reconstruction_decoders = nn.ModuleDict(
            {str(k): UNetDecoder(width) for k in range(num_postures)}
        )

    @classmethod
    def from_config(cls, config: NetworkConfig) -> MTLNetwork:
        """Build an (untrained) network with the shapes `config` fixes."""
        return cls(config.embedding_dim, config.num_postures, config.width, config.dropout)

    def encode(self, x: torch.Tensor) -> EncoderOutputs:
        """Run the encoder once: embedding, posture logits, feat1..feat4."""
        return self.encoder(x)

    def decode(self, enc: EncoderOutputs, postures: torch.Tensor) -> torch.Tensor:
        """Reconstruct each sample with the expert of its posture (0-based class index)."""
        postures = postures.to(device=enc.feat4.device, dtype=torch.long).reshape(-1)
        if postures.numel() != enc.feat4.shape[0]:
            raise ValueError(f"{postures.numel()} postures for a batch of {enc.feat4.shape[0]}")
        n = enc.feat4.shape[0]
        out = enc.feat4.new_zeros((n, 1, INPUT_SIZE, INPUT_SIZE))
        for k in torch.unique(postures).tolist():
            if not 0 <= k < self.config.num_postures:
                raise ValueError(f"posture {k} out of range 0..{self.config.num_postures - 1}")
            mask = postures == k
            out[mask] = self.reconstruction_decoders[str(k)](
                enc.feat4[mask], enc.feat3[mask], enc.feat2[mask], enc.feat1[mask]
            )
        return out

    def forward(
        self, x: torch.Tensor, postures: torch.Tensor | None = None, reconstruct: bool = True
    ) -> MTLOutput:
        """Encode `x` once and reconstruct with the experts of `postures` (predicted ones if None)."""
        enc = self.encode(x)
        recon = None
        if reconstruct:
            route = enc.posture_logits.argmax(dim=1) if postures is None else postures
            recon = self.decode(enc, route)
        return MTLOutput(enc.embedding, enc.posture_logits, recon)

    def encoder_graph(self) -> EncoderGraph:
        """The deploy encoder (shares this network's weights); put it in eval mode before export."""
        return EncoderGraph(self.encoder)

    def decoder_graph(self, posture: int) -> DecoderGraph:
        """The deploy decoder of one posture (0-based class index), sharing this network's weights."""
        if not 0 <= posture < self.config.num_postures:
            raise ValueError(f"posture {posture} out of range 0..{self.config.num_postures - 1}")
        return DecoderGraph(cast(UNetDecoder, self.reconstruction_decoders[str(posture)]))


class EncoderGraph(nn.Module):
    """Deploy graph: thz [N,1,64,64] -> embedding, posture_logits, feat1, feat2, feat3, feat4."""

    output_names = ("embedding", "posture_logits", "feat1", "feat2", "feat3", "feat4")

    def __init__(self, encoder: SharedEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, thz: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder(thz))


class DecoderGraph(nn.Module):
    """Deploy graph of one posture expert: feat1..feat4 -> reconstruction [N,1,64,64] in [0,1]."""

    input_names = ("feat1", "feat2", "feat3", "feat4")

    def __init__(self, decoder: UNetDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(
        self, feat1: torch.Tensor, feat2: torch.Tensor, feat3: torch.Tensor, feat4: torch.Tensor
    ) -> torch.Tensor:
        return self.decoder(feat4, feat3, feat2, feat1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
