"""Autoencoders: the plain convolutional AE, the VAE and the conditional VAE.

- ``ae``: deterministic ``x_hat = decoder(encoder(x))`` trained on a pixel/SSIM reconstruction
  loss (the baseline of reconstruction-based anomaly detection; e.g. Bergmann et al., "Improving
  unsupervised defect segmentation by applying structural similarity to autoencoders", 2019).
- ``vae``: Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014. The encoder outputs a
  diagonal Gaussian q(z|x) = N(mu, diag(exp(logvar))); training samples
  ``z = mu + exp(logvar / 2) * eps`` (the reparameterisation trick), inference decodes ``mu``
  (deterministic, exportable).
- ``cvae``: Sohn et al., "Learning Structured Output Representation using Deep Conditional
  Generative Models", NeurIPS 2015. Encoder q(z|x, y) sees the image with one-hot label planes
  concatenated as extra channels; decoder p(x|z, y) sees ``[z, one_hot(y)]``.

The losses live in :mod:`anomaly.training.objectives.autoencoder`.

Example::

    from anomaly.registry import create_model
    vae = create_model("vae", in_channels=1, image_size=32, latent_dim=16).eval()
    x_hat = vae(torch.rand(4, 1, 32, 32))                   # (4, 1, 32, 32), decodes mu
    cvae = create_model("cvae", in_channels=1, image_size=32, num_classes=10).eval()
    samples = cvae.sample(8, cond=torch.full((8,), 3))      # eight "3"s
"""
from __future__ import annotations

import torch
from torch import nn

from anomaly.registry import register_model
from anomaly.zoo.layers import ConvDecoder, ConvEncoder, init_dcgan, label_planes, label_vector, one_hot

__all__ = ["AutoEncoder", "one_hot", "label_planes", "sample_labels"]


class AutoEncoder(nn.Module):
    """Convolutional (variational, optionally conditional) autoencoder ``(N, C, S, S) -> (N, C, S, S)``.

    Args:
        in_channels: image channels C.
        image_size: S, a power of two (16 … 256).
        latent_dim: width of z.
        upsample: the decoder's upsampling (:data:`anomaly.zoo.layers.UPSAMPLES`).
        base_channels, max_channels, norm: encoder/decoder width and normalisation (DCGAN-style).
        variational: Gaussian encoder (``mu``, ``logvar``) instead of a point code.
        num_classes: 0 for unconditional models; > 0 conditions encoder (label planes) and
            decoder (one-hot appended to z) on an integer label ``cond``.
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
        variational: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.variational = variational
        self.num_classes = num_classes
        # The variational encoder emits [mu, logvar] side by side: one module, one step group.
        self.encoder = ConvEncoder(
            in_channels=in_channels + num_classes, image_size=image_size,
            latent_dim=2 * latent_dim if variational else latent_dim,
            base_channels=base_channels, max_channels=max_channels, norm=norm,
        )
        self.decoder = ConvDecoder(
            latent_dim=latent_dim + num_classes, out_channels=in_channels, image_size=image_size,
            base_channels=base_channels, max_channels=max_channels, norm=norm, upsample=upsample,
        )
        init_dcgan(self)

    # -- conditioning --------------------------------------------------------------------------
    def _label(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        return label_vector(cond, self.num_classes)

    # -- inference -----------------------------------------------------------------------------
    def encode_stats(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, logvar)``, each ``(N, latent_dim)``.

        For the deterministic AE, ``logvar`` is all zeros and ``mu`` is the code.
        """
        y = self._label(cond)
        if y is not None:
            x = torch.cat([x, label_planes(y, x.shape[-2], x.shape[-1]).to(x)], 1)
        h = self.encoder(x)
        if not self.variational:
            return h, torch.zeros_like(h)
        mu, logvar = h.chunk(2, dim=1)
        # Bounded log-variance keeps exp() finite early in training.
        return mu, logvar.clamp(-10.0, 10.0)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``z = mu + sigma * eps``, ``eps ~ N(0, I)`` (Kingma & Welling, 2014, eq. 10)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, S, S) -> (N, latent_dim)``: the code (``mu`` for variational models)."""
        return self.encode_stats(x, cond)[0]

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, latent_dim) -> (N, C, S, S)`` in [0, 1]; conditional models append the one-hot label."""
        y = self._label(cond)
        return self.decoder(z if y is None else torch.cat([z, y.to(z)], 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x_hat`` of ``x``. VAEs sample z in ``train()`` and decode ``mu`` in ``eval()``."""
        mu, logvar = self.encode_stats(x, cond)
        z = self.reparameterize(mu, logvar) if (self.variational and self.training) else mu
        return self.decode(z, cond)

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | int | None = None) -> torch.Tensor:
        """Decode ``n`` prior samples ``z ~ N(0, I)`` -> ``(n, C, S, S)`` (variational models only).

        ``cond``: labels ``(n,)`` or one int; conditional models draw uniform labels when ``None``.
        """
        if not self.variational:
            raise ValueError("a plain autoencoder has no prior to sample; use a vae/cvae "
                             "(anomaly.training.generative.save_sample_grid fits a Gaussian to AE codes instead)")
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device)
        return self.decode(z, sample_labels(cond, n, self.num_classes, device))


def sample_labels(
    cond: torch.Tensor | int | None, n: int, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    """Normalise a sampling condition to ``(n,)`` int64 labels (uniform draws when ``None``)."""
    if num_classes == 0:
        return None
    if cond is None:
        return torch.randint(0, num_classes, (n,), device=device)
    if isinstance(cond, int):
        return torch.full((n,), cond, dtype=torch.long, device=device)
    return cond.long().to(device).reshape(n)


@register_model(
    "ae", objective="ae", family="Convolutional autoencoder",
    paper="Bergmann et al., Improving Unsupervised Defect Segmentation by Applying Structural "
          "Similarity to Autoencoders, 2019 (convolutional AE baseline)",
    reconstruction="decoder(encoder(x))",
)
def ae(**kwargs) -> AutoEncoder:
    """Plain convolutional autoencoder (deterministic code)."""
    return AutoEncoder(**{**kwargs, "variational": False, "num_classes": 0})


@register_model(
    "vae", objective="vae", family="Variational autoencoder",
    paper="Kingma & Welling, Auto-Encoding Variational Bayes, 2014",
    reconstruction="decoder(mu(x))",
)
def vae(**kwargs) -> AutoEncoder:
    """VAE with a Gaussian encoder; inference decodes the posterior mean."""
    return AutoEncoder(**{**kwargs, "variational": True, "num_classes": 0})


@register_model(
    "cvae", objective="cvae", family="Conditional variational autoencoder",
    paper="Sohn et al., Learning Structured Output Representation using Deep Conditional "
          "Generative Models, 2015",
    conditional=True, reconstruction="decoder(mu(x, label), label)", num_classes=2,
)
def cvae(**kwargs) -> AutoEncoder:
    """Conditional VAE: encoder and decoder see the one-hot label."""
    if kwargs.get("num_classes", 0) < 1:
        raise ValueError("cvae needs num_classes >= 1")
    return AutoEncoder(**{**kwargs, "variational": True})
