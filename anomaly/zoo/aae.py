"""Adversarial autoencoders: AAE and conditional AAE.

Makhzani et al., "Adversarial Autoencoders", ICLR-W 2016. A deterministic encoder q(z|x) is
trained to reconstruct x through the decoder, and *adversarially* so that the aggregated
posterior q(z) matches a chosen prior p(z): a latent discriminator tells encoder codes from prior
samples and the encoder learns to fool it. The conditional variant gives the latent
discriminator the label as well, with one prior cluster per class, so one model can serve
several product categories.

Inference is ``x_hat = decoder(encoder(x))`` (deterministic in ``eval()``). The latent and the
optional image discriminator (PatchGAN, for sharper reconstructions) are touched only by
:mod:`anomaly.training.objectives.aae`.

Example::

    from anomaly.registry import create_model
    model = create_model("aae", in_channels=1, image_size=64, latent_dim=32).eval()
    x_hat = model(torch.rand(4, 1, 64, 64))   # (4, 1, 64, 64)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from anomaly.registry import register_model
from anomaly.zoo.layers import MLP, ConvDecoder, ConvEncoder, PatchDiscriminator, init_dcgan, label_vector

__all__ = ["AAE"]

_PRIORS = ("gaussian", "mixture")


class AAE(nn.Module):
    """Adversarial autoencoder ``(N, C, S, S) -> (N, C, S, S)``.

    Args:
        in_channels: image channels C.
        image_size: S, a power of two.
        latent_dim: width of z.
        upsample: the decoder's upsampling (:data:`anomaly.zoo.layers.UPSAMPLES`).
        base_channels, max_channels, norm: encoder/decoder width and normalisation.
        prior: ``gaussian`` (N(0, I)) or ``mixture`` (``n_components`` Gaussians on a circle in
            the first two latent dimensions, as in the paper's Fig. 4).
        n_components: clusters of the mixture prior; with ``num_classes`` > 0 it is set to
            ``num_classes`` (one cluster per class).
        num_classes: 0 for the unconditional AAE; > 0 makes the latent discriminator and the
            decoder see a one-hot label.
        disc_hidden: width of the latent discriminator's two hidden layers.
        image_discriminator: add a PatchGAN on reconstructions (trained by the objective).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 64,
        latent_dim: int = 64,
        base_channels: int = 32,
        max_channels: int = 256,
        norm: str = "batch",
        upsample: str = "deconv4",
        prior: str = "gaussian",
        n_components: int = 10,
        num_classes: int = 0,
        disc_hidden: int = 256,
        image_discriminator: bool = False,
    ) -> None:
        super().__init__()
        if prior not in _PRIORS:
            raise ValueError(f"unknown prior {prior!r}; expected one of {_PRIORS}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.prior = prior
        self.num_classes = num_classes
        self.n_components = num_classes if num_classes > 0 else n_components
        self.encoder = ConvEncoder(
            in_channels=in_channels, image_size=image_size, latent_dim=latent_dim,
            base_channels=base_channels, max_channels=max_channels, norm=norm,
        )
        self.decoder = ConvDecoder(
            latent_dim=latent_dim + num_classes, out_channels=in_channels, image_size=image_size,
            base_channels=base_channels, max_channels=max_channels, norm=norm, upsample=upsample,
        )
        self.latent_discriminator = MLP([latent_dim + num_classes, disc_hidden, disc_hidden, 1])
        self.image_discriminator = (
            PatchDiscriminator(in_channels=in_channels, base_channels=32, n_layers=3) if image_discriminator else None
        )
        init_dcgan(self)

    # -- inference -----------------------------------------------------------------------------
    def _one_hot(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        return label_vector(cond, self.num_classes)

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, S, S) -> (N, latent_dim)``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, latent_dim) -> (N, C, S, S)``; conditional models append the one-hot label."""
        y = self._one_hot(cond)
        return self.decoder(z if y is None else torch.cat([z, y], 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x_hat`` of ``x``, same shape, values in [0, 1]."""
        return self.decode(self.encode(x, cond), cond)

    # -- what the objective needs --------------------------------------------------------------
    def discriminate_latent(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Latent discriminator logits ``(N, 1)``; the conditional model sees the label too."""
        y = self._one_hot(cond)
        return self.latent_discriminator(z if y is None else torch.cat([z, y], 1))

    def sample_prior(self, n: int, cond: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Draw ``(n, latent_dim)`` samples of p(z) (of cluster ``cond`` for conditional models)."""
        z = torch.randn(n, self.latent_dim, device=device)
        if self.prior == "gaussian" and self.num_classes == 0:
            return z
        # Mixture: cluster k has mean on a circle of radius 4 in dims (0, 1), small spread there.
        if cond is None:
            k = torch.randint(0, self.n_components, (n,), device=device)
        else:
            k = cond.long().to(device).view(n)
        angle = 2 * math.pi * k.float() / self.n_components
        z = z.clone()
        z[:, 0] = 0.5 * z[:, 0] + 4.0 * torch.cos(angle)
        if self.latent_dim > 1:
            z[:, 1] = 0.5 * z[:, 1] + 4.0 * torch.sin(angle)
        return z


@register_model(
    "aae", objective="aae", family="Adversarial autoencoder",
    paper="Makhzani et al., Adversarial Autoencoders, 2016", conditional=False,
    reconstruction="decoder(encoder(x))",
)
def aae(**kwargs) -> AAE:
    """Unconditional AAE (Gaussian prior by default)."""
    return AAE(**{**kwargs, "num_classes": 0})


@register_model(
    "cond_aae", objective="aae", family="Conditional adversarial autoencoder",
    paper="Makhzani et al., Adversarial Autoencoders, 2016 (label-conditioned prior)", conditional=True,
    reconstruction="decoder(encoder(x), label)", num_classes=2,
)
def cond_aae(**kwargs) -> AAE:
    """Conditional AAE: one prior cluster per class; decoder and latent discriminator see the label."""
    if kwargs.get("num_classes", 0) < 1:
        raise ValueError("cond_aae needs num_classes >= 1")
    return AAE(**kwargs)
