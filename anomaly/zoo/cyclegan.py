"""CycleGAN for defect repair: two generators, two PatchGAN discriminators.

Zhu et al., "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks",
ICCV 2017. Domain A holds images that may carry defects, domain B clean (normal) images.
``generator_repair`` maps A -> B and is the reconstruction at inference
(``x_hat = generator_repair(x)``: "what this part should look like"); ``generator_defect`` maps
B -> A and exists for the cycle-consistency loss. ``discriminator_normal`` judges domain B,
``discriminator_defect`` domain A (PatchGAN, Isola et al., 2017).

Generators (``generator=`` kwarg):
    ``resnet`` Johnson et al. (2016) as in CycleGAN: c7s1-F, two stride-2 downsamplings,
               ``n_blocks`` residual blocks, two upsamplings, c7s1-C.
    ``unet``   pix2pix's U-Net (Isola et al., 2017) down to a 2x2 bottleneck with skip connections.
Instance norm and reflection padding as in the reference code; the output is a sigmoid because
inputs are in [0, 1]. The losses live in :mod:`anomaly.training.objectives.cyclegan`.

Optional ``segmenter`` (DRAEM's discriminative sub-network, Zavrtanik et al., ICCV 2021): a U-Net
that reads the input and its repair side by side, ``cat([x, G_r(x)])`` ``(N, 2C, S, S)``, and
outputs the probability ``(N, 1, S, S)`` that each pixel is defective. It is trained on the
synthetic defects' masks and is what the ``learned`` residual of :mod:`anomaly.scoring` reads. A
residual only shows what the repair generator removed; the segmenter can also flag what the
generator copies but which does not belong (a foreign texture that passes through the repair).

Example::

    from anomaly.registry import create_model
    model = create_model("cyclegan", in_channels=3, image_size=64, generator="unet").eval()
    repaired = model(torch.rand(2, 3, 64, 64))     # (2, 3, 64, 64)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from anomaly.registry import register_model
from anomaly.zoo.layers import PatchDiscriminator, init_dcgan, norm_layer

__all__ = ["ReflectionPad", "ResnetGenerator", "UnetGenerator", "CycleGAN"]

_GENERATORS = ("resnet", "unet")
_SEGMENTER_INPUTS = ("pair", "pair_diff")


class ReflectionPad(nn.Module):
    """Reflection padding by ``p`` pixels on each side, written with slices and flips.

    Same values as ``nn.ReflectionPad2d(p)``, but the legacy ONNX exporter turns that into a
    ``Pad`` whose pads come from a non-foldable reversed ``Slice``, and ONNX shape inference then
    loses every output dimension (which breaks the scorer's depthwise convolutions downstream).
    Constant slices keep all shapes static.
    """

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = torch.cat([x[..., 1 : p + 1].flip(-1), x, x[..., -p - 1 : -1].flip(-1)], -1)
        return torch.cat([x[..., 1 : p + 1, :].flip(-2), x, x[..., -p - 1 : -1, :].flip(-2)], -2)


class _ResidualBlock(nn.Module):
    """``x + conv(norm(relu(conv(norm(x)))))`` with reflection padding (CycleGAN's R-block)."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.block = nn.Sequential(
            ReflectionPad(1), nn.Conv2d(channels, channels, 3, bias=bias), norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            ReflectionPad(1), nn.Conv2d(channels, channels, 3, bias=bias), norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """ResNet generator ``(N, C_in, H, W) -> (N, C_out, H, W)`` in [0, 1].

    Args:
        in_channels, out_channels: image channels.
        base_channels: width of the first layer (64 in CycleGAN).
        n_blocks: residual blocks at 1/4 resolution (6 for 128 px, 9 for 256 px in the paper).
        norm: normalisation (``instance`` in CycleGAN).
    """

    def __init__(self, *, in_channels: int, out_channels: int, base_channels: int = 64, n_blocks: int = 6,
                 norm: str = "instance") -> None:
        super().__init__()
        bias = norm == "none"
        f = base_channels
        layers: list[nn.Module] = [ReflectionPad(3), nn.Conv2d(in_channels, f, 7, bias=bias),
                                   norm_layer(norm, f), nn.ReLU(inplace=True)]
        for i in range(2):  # d2F, d4F
            layers += [nn.Conv2d(f * 2**i, f * 2 ** (i + 1), 3, 2, 1, bias=bias), norm_layer(norm, f * 2 ** (i + 1)),
                       nn.ReLU(inplace=True)]
        layers += [_ResidualBlock(4 * f, norm) for _ in range(n_blocks)]
        for i in reversed(range(2)):  # u2F, uF
            layers += [nn.ConvTranspose2d(f * 2 ** (i + 1), f * 2**i, 3, 2, 1, output_padding=1, bias=bias),
                       norm_layer(norm, f * 2**i), nn.ReLU(inplace=True)]
        layers += [ReflectionPad(3), nn.Conv2d(f, out_channels, 7), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _UnetBlock(nn.Module):
    """One level of pix2pix's U-Net: ``cat([x, up(inner(down(x)))])`` (outermost: no skip)."""

    def __init__(self, outer: int, inner: int, *, in_channels: int | None = None, submodule: nn.Module | None = None,
                 outermost: bool = False, innermost: bool = False, norm: str = "instance",
                 dropout: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        in_channels = in_channels or outer
        bias = norm == "none"
        down_conv = nn.Conv2d(in_channels, inner, 4, 2, 1, bias=bias or outermost or innermost)
        if outermost:
            down = [down_conv]
            up = [nn.ReLU(inplace=True), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.Sigmoid()]
        elif innermost:
            down = [nn.LeakyReLU(0.2), down_conv]
            up = [nn.ReLU(inplace=True), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias), norm_layer(norm, outer)]
        else:
            down = [nn.LeakyReLU(0.2), down_conv, norm_layer(norm, inner)]
            up = [nn.ReLU(inplace=True), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=bias),
                  norm_layer(norm, outer)]
            if dropout:
                up.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*down, *([submodule] if submodule is not None else []), *up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # Not in-place: pix2pix's in-place LeakyReLU also rewrites the skip tensor x.
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix U-Net ``(N, C_in, S, S) -> (N, C_out, S, S)`` in [0, 1].

    Args:
        in_channels, out_channels: image channels.
        image_size: S (power of two >= 16); the U-Net goes down to a 2x2 bottleneck.
        base_channels: width of the outermost level (64 in pix2pix); capped at 8x.
        norm: normalisation (``instance`` as CycleGAN's U-Net option; the 1x1 level is avoided so
            instance norm always sees >= 2x2 maps).
        dropout: dropout in the inner decoder levels (pix2pix uses it; off by default).
    """

    def __init__(self, *, in_channels: int, out_channels: int, image_size: int, base_channels: int = 64,
                 norm: str = "instance", dropout: bool = False) -> None:
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")
        num_downs = int(math.log2(image_size)) - 1  # S -> 2x2
        f = base_channels
        width = [min(f * 2**i, 8 * f) for i in range(num_downs)]  # channels after each downsampling
        block = _UnetBlock(width[-2], width[-1], innermost=True, norm=norm)
        for i in reversed(range(1, num_downs - 1)):
            block = _UnetBlock(width[i - 1], width[i], submodule=block, norm=norm,
                               dropout=dropout and width[i] == 8 * f)
        self.net = _UnetBlock(out_channels, width[0], in_channels=in_channels, submodule=block, outermost=True,
                              norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGAN(nn.Module):
    """Two generators and two PatchGAN discriminators; ``forward(x) = generator_repair(x)``.

    Args:
        in_channels: image channels (both domains).
        image_size: S, a power of two (16 … 256).
        generator: ``resnet`` or ``unet``.
        base_channels: generator width (64 in the paper).
        n_blocks: residual blocks of the ResNet generator.
        disc_channels: PatchGAN width (64 in the paper).
        disc_layers: PatchGAN stride-2 stages (default: 3, fewer for S < 32 so patches stay >= 1 px).
        norm: generator/discriminator normalisation (``instance``).
        dropout: U-Net dropout.
        segmenter: add the defect segmenter (see the module docstring); it learns from the masks of
            the synthetic defects (``--synthetic-defects``; without them, the objective's rectangles).
        segmenter_channels: width of the segmenter's U-Net.
        segmenter_input: what the segmenter reads: ``pair`` = ``cat[x, x_hat]`` (DRAEM), or
            ``pair_diff`` = ``cat[x, x_hat, |x - x_hat|]`` (the residual handed over explicitly, so the
            small U-Net need not learn the subtraction).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 128,
        generator: str = "resnet",
        base_channels: int = 64,
        n_blocks: int = 6,
        disc_channels: int = 64,
        disc_layers: int | None = None,
        norm: str = "instance",
        dropout: bool = False,
        segmenter: bool = False,
        segmenter_channels: int = 16,
        segmenter_input: str = "pair",
    ) -> None:
        super().__init__()
        if generator not in _GENERATORS:
            raise ValueError(f"unknown generator {generator!r}; expected one of {_GENERATORS}")
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")
        if segmenter_input not in _SEGMENTER_INPUTS:
            raise ValueError(f"unknown segmenter_input {segmenter_input!r}; expected one of {_SEGMENTER_INPUTS}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.segmenter_input = segmenter_input
        # PatchGAN output side is S / 2^n - 2; keep it >= 2.
        n_layers = disc_layers if disc_layers is not None else min(3, int(math.log2(image_size)) - 2)

        def make_generator() -> nn.Module:
            if generator == "resnet":
                return ResnetGenerator(in_channels=in_channels, out_channels=in_channels,
                                       base_channels=base_channels, n_blocks=n_blocks, norm=norm)
            return UnetGenerator(in_channels=in_channels, out_channels=in_channels, image_size=image_size,
                                 base_channels=base_channels, norm=norm, dropout=dropout)

        self.generator_repair = make_generator()   # A (maybe defective) -> B (normal)
        self.generator_defect = make_generator()   # B -> A
        self.discriminator_normal = PatchDiscriminator(in_channels=in_channels, base_channels=disc_channels,
                                                       n_layers=n_layers, norm=norm)  # judges domain B
        self.discriminator_defect = PatchDiscriminator(in_channels=in_channels, base_channels=disc_channels,
                                                       n_layers=n_layers, norm=norm)  # judges domain A
        if segmenter:  # (x, repair[, |x - repair|]) -> P(defect) per pixel
            parts = 3 if segmenter_input == "pair_diff" else 2
            self.segmenter = UnetGenerator(in_channels=parts * in_channels, out_channels=1, image_size=image_size,
                                           base_channels=segmenter_channels, norm=norm)
        init_dcgan(self)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Repaired image ``(N, C, S, S)`` in [0, 1] (``cond`` is ignored)."""
        return self.generator_repair(x)

    def defect_map(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Defect probability ``(N, 1, S, S)`` in [0, 1] from the input and its repair ``(N, C, S, S)``.

        Raises:
            ValueError: the model was built without ``segmenter=True``.
        """
        if not hasattr(self, "segmenter"):
            raise ValueError("this CycleGAN has no segmenter (build it with segmenter=True)")
        if self.segmenter_input == "pair_diff":
            return self.segmenter(torch.cat([x, x_hat, (x - x_hat).abs()], 1))
        return self.segmenter(torch.cat([x, x_hat], 1))

    @torch.no_grad()
    def translate(self, x: torch.Tensor, to: str = "normal") -> torch.Tensor:
        """Map ``x`` into domain ``normal`` (repair) or ``defect``."""
        if to not in ("normal", "defect"):
            raise ValueError(f"to must be 'normal' or 'defect', got {to!r}")
        return self.generator_repair(x) if to == "normal" else self.generator_defect(x)


@register_model(
    "cyclegan", objective="cyclegan", family="CycleGAN",
    paper="Zhu et al., Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks, 2017",
    reconstruction="generator_repair(x): translation into the normal domain",
)
def cyclegan(**kwargs) -> CycleGAN:
    """CycleGAN with ResNet (default) or U-Net (``generator="unet"``) generators."""
    return CycleGAN(**kwargs)
