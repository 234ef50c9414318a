"""Shared building blocks of the zoo: norm/activation factories, DCGAN init, conv encoder and
decoder, MLP, PatchGAN discriminator.

The conv encoder/decoder follow DCGAN (Radford et al., 2016): stride-2 4x4 convolutions, batch
norm, LeakyReLU in the encoder and ReLU in the decoder, weights from N(0, 0.02).

Example::

    enc = ConvEncoder(in_channels=1, image_size=64, latent_dim=32)
    dec = ConvDecoder(latent_dim=32, out_channels=1, image_size=64)
    x_hat = dec(enc(torch.rand(8, 1, 64, 64)))   # (8, 1, 64, 64), values in [0, 1]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "norm_layer",
    "activation",
    "init_dcgan",
    "num_downsamplings",
    "ConvEncoder",
    "ConvDecoder",
    "UPSAMPLES",
    "up_layers",
    "MLP",
    "PatchDiscriminator",
    "one_hot",
    "label_planes",
    "label_vector",
]


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Return a 2-D normalisation layer by name: ``batch``, ``instance``, ``group`` or ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected batch, instance, group or none")


def activation(kind: str) -> nn.Module:
    """Return an activation by name: ``relu``, ``lrelu`` (slope 0.2), ``tanh``, ``sigmoid``, ``none``."""
    table = {
        "relu": lambda: nn.ReLU(inplace=True),
        "lrelu": lambda: nn.LeakyReLU(0.2, inplace=True),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "none": nn.Identity,
    }
    if kind not in table:
        raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(table)}")
    return table[kind]()


def init_dcgan(module: nn.Module, std: float = 0.02) -> None:
    """DCGAN initialisation: conv/linear weights ~ N(0, std), norm weights ~ N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def num_downsamplings(image_size: int, min_size: int = 4) -> int:
    """Number of stride-2 stages from ``image_size`` down to ``min_size`` (both powers of two)."""
    if image_size < min_size or image_size & (image_size - 1) or min_size & (min_size - 1):
        raise ValueError(
            f"image_size must be a power of two >= {min_size}, got {image_size}"
        )
    return int(math.log2(image_size // min_size))


def _channels(base: int, i: int, max_channels: int) -> int:
    return min(base * 2**i, max_channels)


class ConvEncoder(nn.Module):
    """DCGAN-style encoder ``(N, C, S, S) -> (N, out_features)``.

    Args:
        in_channels: image channels C (plus any condition planes the caller concatenates).
        image_size: S, a power of two.
        latent_dim: output width; ``0`` returns the flattened features ``(N, C' * 4 * 4)``.
        base_channels, max_channels: width of the first stage and the cap.
        norm: norm of every stage but the first (as in DCGAN).
        min_size: spatial size of the last feature map.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        latent_dim: int,
        base_channels: int = 32,
        max_channels: int = 256,
        norm: str = "batch",
        min_size: int = 4,
    ) -> None:
        super().__init__()
        n = num_downsamplings(image_size, min_size)
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(n):
            c_out = _channels(base_channels, i, max_channels)
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=(i == 0 or norm == "none")),
                norm_layer("none" if i == 0 else norm, c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c_in, min_size, min_size)
        flat = c_in * min_size * min_size
        self.head = nn.Linear(flat, latent_dim) if latent_dim > 0 else nn.Identity()
        self.out_features = latent_dim if latent_dim > 0 else flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


UPSAMPLES = ("deconv4", "deconv2", "nearest")


def up_layers(kind: str, c_in: int, c_out: int, *, bias: bool) -> list[nn.Module]:
    """Layers that map ``(N, c_in, H, W)`` to ``(N, c_out, 2H, 2W)``; ``kind`` in :data:`UPSAMPLES`."""
    if kind == "deconv4":
        return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias)]
    if kind == "deconv2":
        return [nn.ConvTranspose2d(c_in, c_out, 2, 2, 0, bias=bias)]
    if kind == "nearest":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias)]
    raise ValueError(f"unknown upsample {kind!r}; expected one of {UPSAMPLES}")


class ConvDecoder(nn.Module):
    """DCGAN-style decoder/generator ``(N, latent_dim) -> (N, out_channels, S, S)``.

    Args:
        latent_dim: input width (the caller concatenates any condition to z).
        out_channels: image channels.
        image_size: S, a power of two.
        base_channels, max_channels: width of the last stage and the cap (mirrors the encoder).
        norm: norm of the hidden stages.
        out_activation: ``sigmoid`` for images in [0, 1] (our preprocessing's range).
        upsample: how each stage doubles the resolution (see :data:`UPSAMPLES`): ``deconv4`` is
            DCGAN's 4x4 stride-2 transposed convolution; ``deconv2`` a 2x2 stride-2 one (each
            input pixel paints its own 2x2 block: a quarter of the multiply-adds, and a plain
            matrix product in onnxruntime, whose 4x4 ConvTranspose is its slowest CPU kernel);
            ``nearest`` is nearest-neighbour resize then a 3x3 convolution (Odena et al., 2016:
            no checkerboard artefacts, 2.25x the multiply-adds of ``deconv4``).
    """

    def __init__(
        self,
        *,
        latent_dim: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 32,
        max_channels: int = 256,
        norm: str = "batch",
        out_activation: str = "sigmoid",
        min_size: int = 4,
        upsample: str = "deconv4",
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLES:
            raise ValueError(f"unknown upsample {upsample!r}; expected one of {UPSAMPLES}")
        n = num_downsamplings(image_size, min_size)
        c0 = _channels(base_channels, n - 1, max_channels)
        self.start_shape = (c0, min_size, min_size)
        self.fc = nn.Linear(latent_dim, c0 * min_size * min_size)
        layers: list[nn.Module] = [norm_layer(norm, c0), nn.ReLU(inplace=True)]
        c_in = c0
        for i in reversed(range(n - 1)):
            c_out = _channels(base_channels, i, max_channels)
            layers += [
                *up_layers(upsample, c_in, c_out, bias=(norm == "none")),
                norm_layer(norm, c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        layers += [*up_layers(upsample, c_in, out_channels, bias=True), activation(out_activation)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], *self.start_shape)
        return self.net(h)


class MLP(nn.Module):
    """Fully connected stack ``(N, dims[0]) -> (N, dims[-1])`` with LeakyReLU between layers.

    Used as the latent discriminator of the AAE and the GAN families of the seeds.
    """

    def __init__(self, dims: Sequence[int], *, hidden_activation: str = "lrelu", dropout: float = 0.0,
                 out_activation: str = "none") -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError("MLP needs at least an input and an output width")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(activation(hidden_activation))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        layers.append(activation(out_activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al., 2017): ``(N, C, H, W) -> (N, 1, H', W')`` logits,
    one per overlapping patch, so the adversarial signal is about local texture.

    Args:
        in_channels: channels of the image it judges.
        base_channels: width of the first layer.
        n_layers: stride-2 stages (3 gives a 70x70 receptive field).
        norm: norm of the hidden layers.
    """

    def __init__(self, *, in_channels: int, base_channels: int = 64, n_layers: int = 3, norm: str = "instance") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = base_channels
        for i in range(1, n_layers + 1):
            c_out = base_channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=norm == "none"), norm_layer(norm, c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def one_hot(cond: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels ``(N,)`` -> float one-hot ``(N, num_classes)``.

    Written as a comparison with ``arange`` (``Equal`` + ``Cast`` in ONNX) rather than
    ``F.one_hot``, so the exported graph needs no ``OneHot`` op and no int64 arithmetic.
    """
    classes = torch.arange(num_classes, device=cond.device)
    return (cond.long().reshape(-1, 1) == classes).to(torch.float32)


def label_planes(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One-hot ``(N, K)`` -> constant planes ``(N, K, H, W)`` to concatenate to an image."""
    return y[:, :, None, None].expand(-1, -1, height, width)


def label_vector(cond: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """The one-hot condition ``(N, num_classes)`` of a conditional model, ``None`` for an
    unconditional one (``num_classes == 0``); a conditional model without ``cond`` is an error."""
    if num_classes == 0:
        return None
    if cond is None:
        raise ValueError("this model is conditional: pass cond, an integer label tensor of shape (N,)")
    return one_hot(cond, num_classes)
