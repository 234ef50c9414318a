"""GAN families: GAN (MLP), DCGAN, conditional GAN and InfoGAN — each with an inverting encoder.

- ``gan``: Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014 — MLP generator and
  discriminator on flattened images, as in the classic seed scripts (small images only: the
  generator's last layer has ``C * S * S`` outputs).
- ``dcgan``: Radford et al., "Unsupervised Representation Learning with Deep Convolutional GANs",
  ICLR 2016 — transposed-conv generator, strided-conv discriminator, batch norm, N(0, 0.02) init.
- ``cgan``: Mirza & Osindero, "Conditional Generative Adversarial Nets", 2014 — generator sees
  ``[z, one_hot(y)]``, discriminator sees the image with one-hot label planes (DCGAN backbone by
  default; ``arch="mlp"`` gives the paper's MLP version).
- ``infogan``: Chen et al., "InfoGAN: Interpretable Representation Learning by Information
  Maximizing GANs", NeurIPS 2016 — DCGAN whose generator input is ``[z, c_cat, c_cont]``; a Q head
  on the discriminator's features predicts the codes (the mutual-information lower bound).

A GAN maps noise to images, not images to images. For anomaly detection every family here also
has an ``encoder`` trained to invert the (frozen) generator as in f-AnoGAN's *izif* training
(Schlegl et al., "f-AnoGAN: Fast unsupervised anomaly detection with generative adversarial
networks", Medical Image Analysis 2019): ``x_hat = G(E(x))`` with the loss
``||x - G(E(x))||^2 + kappa * ||f_D(x) - f_D(G(E(x)))||^2`` (f_D: discriminator features). So
``forward(x, cond=None) = G(E(x))`` is a reconstruction like any other family's. The losses live
in :mod:`anomaly.training.objectives.gan`.

Example::

    from anomaly.registry import create_model
    model = create_model("dcgan", in_channels=1, image_size=32, latent_dim=64)
    fakes = model.sample(16)                        # (16, 1, 32, 32) from z ~ N(0, I)
    x_hat = model.eval()(torch.rand(4, 1, 32, 32))  # G(E(x)), (4, 1, 32, 32)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from anomaly.registry import register_model
from anomaly.zoo.autoencoder import sample_labels
from anomaly.zoo.layers import MLP, ConvDecoder, ConvEncoder, init_dcgan, label_planes, label_vector, one_hot

__all__ = ["GAN", "Discriminator", "MLPGenerator", "LatentCode"]

_ARCHS = ("mlp", "conv")


class LatentCode(NamedTuple):
    """A generator input and the structured codes in it (InfoGAN's ``c``; ``None`` otherwise).

    Attributes:
        code: ``(N, code_dim)`` = ``[z, one_hot(c_cat), c_cont]``.
        categorical: ``(N,)`` int64 index of the categorical code, or ``None``.
        continuous: ``(N, n_continuous)`` uniform codes in [-1, 1], or ``None``.
    """

    code: torch.Tensor
    categorical: torch.Tensor | None
    continuous: torch.Tensor | None


class MLPGenerator(nn.Module):
    """Fully connected generator ``(N, in_features) -> (N, C, S, S)`` (Linear, BatchNorm1d, LeakyReLU).

    Args:
        in_features: noise (+ code, + label) width.
        out_channels, image_size: the image it produces.
        hidden_dims: widths of the hidden layers (the seeds use 128, 256, 512, 1024).
    """

    def __init__(self, *, in_features: int, out_channels: int, image_size: int,
                 hidden_dims: Sequence[int] = (128, 256, 512, 1024)) -> None:
        super().__init__()
        self.out_shape = (out_channels, image_size, image_size)
        layers: list[nn.Module] = []
        c = in_features
        for i, h in enumerate(hidden_dims):
            # No batch norm on the first layer (as in the seeds); Linear bias is dead under BN.
            layers += [nn.Linear(c, h, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c = h
        layers += [nn.Linear(c, out_channels * image_size * image_size), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class Discriminator(nn.Module):
    """Feature body + linear real/fake head. ``forward`` gives logits ``(N, 1)``; ``features``
    gives the body's ``(N, F)`` output, used by the f-AnoGAN feature residual and InfoGAN's Q head.

    Args:
        body: module ``(N, C', S, S) -> (N, F)`` (the caller concatenates label planes).
        feature_dim: F.
    """

    def __init__(self, body: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, 1)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _mlp_body(in_features: int, hidden_dim: int) -> nn.Module:
    # The seeds' discriminator: flatten -> 2h -> h with LeakyReLU(0.2).
    return nn.Sequential(
        nn.Flatten(1),
        nn.Linear(in_features, 2 * hidden_dim), nn.LeakyReLU(0.2, inplace=True),
        nn.Linear(2 * hidden_dim, hidden_dim), nn.LeakyReLU(0.2, inplace=True),
    )


class GAN(nn.Module):
    """Generator + discriminator (+ Q head) + inverting encoder; ``forward(x) = G(E(x))``.

    Args:
        in_channels: image channels C.
        image_size: S, a power of two (16 … 256; ``arch="mlp"`` is meant for S <= 64).
        latent_dim: width of the noise z.
        arch: ``conv`` (DCGAN backbones) or ``mlp`` (flattened images, as the original GAN).
        base_channels, max_channels, norm: conv widths / normalisation (``arch="conv"``).
        hidden_dim: MLP width (``arch="mlp"``; the generator uses hidden_dim/2 … 4*hidden_dim).
        num_classes: > 0 conditions G, D and E on an integer label (cGAN).
        n_categorical: InfoGAN categorical code size (0: none).
        n_continuous: InfoGAN continuous codes (uniform on [-1, 1]).
        q_hidden: hidden width of the Q head.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 64,
        latent_dim: int = 64,
        arch: str = "conv",
        base_channels: int = 32,
        max_channels: int = 256,
        norm: str = "batch",
        hidden_dim: int = 256,
        num_classes: int = 0,
        n_categorical: int = 0,
        n_continuous: int = 0,
        q_hidden: int = 128,
    ) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {_ARCHS}")
        if min(num_classes, n_categorical, n_continuous) < 0:
            raise ValueError("num_classes, n_categorical and n_continuous must be >= 0")
        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.arch = arch
        self.num_classes = num_classes
        self.n_categorical = n_categorical
        self.n_continuous = n_continuous
        self.code_dim = latent_dim + n_categorical + n_continuous
        k = num_classes
        if arch == "conv":
            self.generator = ConvDecoder(
                latent_dim=self.code_dim + k, out_channels=in_channels, image_size=image_size,
                base_channels=base_channels, max_channels=max_channels, norm=norm,
            )
            body = ConvEncoder(in_channels=in_channels + k, image_size=image_size, latent_dim=0,
                               base_channels=base_channels, max_channels=max_channels, norm=norm)
            self.discriminator = Discriminator(body, body.out_features)
            self.encoder = ConvEncoder(in_channels=in_channels + k, image_size=image_size,
                                       latent_dim=self.code_dim, base_channels=base_channels,
                                       max_channels=max_channels, norm=norm)
        else:
            flat = in_channels * image_size * image_size
            h = hidden_dim
            self.generator = MLPGenerator(in_features=self.code_dim + k, out_channels=in_channels,
                                          image_size=image_size, hidden_dims=(h // 2, h, 2 * h, 4 * h))
            self.discriminator = Discriminator(_mlp_body(flat + k, h), h)
            self.encoder = nn.Sequential(nn.Flatten(1), MLP([flat + k, 2 * h, h, self.code_dim]))
        n_codes = n_categorical + n_continuous
        self.q_head = MLP([self.discriminator.feature_dim, q_hidden, n_codes]) if n_codes > 0 else None
        if arch == "conv":
            init_dcgan(self)  # N(0, 0.02) as DCGAN; the MLP GAN keeps PyTorch's default init, as the
            # seeds do: with 0.02 its five linear layers shrink the signal to nothing.

    # -- conditioning --------------------------------------------------------------------------
    def _label(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        return label_vector(cond, self.num_classes)

    def _with_label(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Image ``(N, C, S, S)`` -> the D/E input: label planes appended (conv) or flattened + one-hot (mlp)."""
        y = self._label(cond)
        if y is None:
            return x
        if self.arch == "conv":
            return torch.cat([x, label_planes(y, x.shape[-2], x.shape[-1]).to(x)], 1)
        return torch.cat([torch.flatten(x, 1), y.to(x)], 1)

    # -- generator -----------------------------------------------------------------------------
    def sample_code(self, n: int, device: torch.device | str | None = None) -> LatentCode:
        """Draw generator inputs: ``z ~ N(0, I)``, ``c_cat ~ Cat(1/K)``, ``c_cont ~ U(-1, 1)``."""
        device = device if device is not None else next(self.parameters()).device
        parts = [torch.randn(n, self.latent_dim, device=device)]
        cat = cont = None
        if self.n_categorical:
            cat = torch.randint(0, self.n_categorical, (n,), device=device)
            parts.append(one_hot(cat, self.n_categorical))
        if self.n_continuous:
            cont = torch.rand(n, self.n_continuous, device=device) * 2 - 1
            parts.append(cont)
        return LatentCode(torch.cat(parts, 1), cat, cont)

    def generate(self, code: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """G: ``(N, code_dim) -> (N, C, S, S)`` in [0, 1]; conditional models append the one-hot label."""
        y = self._label(cond)
        return self.generator(code if y is None else torch.cat([code, y.to(code)], 1))

    decode = generate

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | int | None = None) -> torch.Tensor:
        """``n`` generated images ``(n, C, S, S)``; conditional models draw uniform labels when ``cond`` is None."""
        code = self.sample_code(n).code
        return self.generate(code, sample_labels(cond, n, self.num_classes, code.device))

    # -- discriminator and Q head (objectives only) --------------------------------------------
    def discriminate(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Real/fake logits ``(N, 1)``."""
        return self.discriminator(self._with_label(x, cond))

    def discriminator_features(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The discriminator body's features ``(N, F)`` (f-AnoGAN's f(.))."""
        return self.discriminator.features(self._with_label(x, cond))

    def discriminate_with_codes(
        self, x: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass through D's body: ``(logits (N, 1), cat_logits (N, K), cont_mean (N, n_continuous))``."""
        if self.q_head is None:
            raise ValueError("this GAN has no latent codes (n_categorical = n_continuous = 0)")
        f = self.discriminator.features(self._with_label(x, cond))
        q = self.q_head(f)
        return self.discriminator.head(f), q[:, : self.n_categorical], q[:, self.n_categorical:]

    def predict_codes(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Q's estimate of the codes of ``x``: ``(cat_logits (N, K), cont_mean (N, n_continuous))``."""
        _, cat, cont = self.discriminate_with_codes(x, cond)
        return cat, cont

    # -- encoder (inference) ------------------------------------------------------------------
    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """E: ``(N, C, S, S) -> (N, code_dim)``; the categorical slice is a softmax (a soft one-hot)."""
        h = self.encoder(self._with_label(x, cond))
        if not self.n_categorical:
            return h
        lo, hi = self.latent_dim, self.latent_dim + self.n_categorical
        return torch.cat([h[:, :lo], F.softmax(h[:, lo:hi], dim=1), h[:, hi:]], 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``G(E(x))`` ``(N, C, S, S)`` in [0, 1]."""
        return self.generate(self.encode(x, cond), cond)


_IZIF = "G(E(x)), E trained to invert the frozen G (f-AnoGAN izif: image + D-feature residual)"


@register_model(
    "gan", objective="gan", family="GAN (MLP)",
    paper="Goodfellow et al., Generative Adversarial Nets, 2014; encoder: Schlegl et al., f-AnoGAN, 2019",
    reconstruction=_IZIF, latent_dim=64,
)
def gan(**kwargs) -> GAN:
    """The original fully connected GAN on flattened images (for small images)."""
    return GAN(**{**kwargs, "arch": "mlp", "num_classes": 0, "n_categorical": 0, "n_continuous": 0})


@register_model(
    "dcgan", objective="gan", family="DCGAN",
    paper="Radford et al., Unsupervised Representation Learning with Deep Convolutional GANs, 2016",
    reconstruction=_IZIF, latent_dim=64,
)
def dcgan(**kwargs) -> GAN:
    """Convolutional GAN (transposed-conv G, strided-conv D) with a conv encoder."""
    return GAN(**{**kwargs, "arch": "conv", "num_classes": 0, "n_categorical": 0, "n_continuous": 0})


@register_model(
    "cgan", objective="cgan", family="Conditional GAN",
    paper="Mirza & Osindero, Conditional Generative Adversarial Nets, 2014",
    conditional=True, reconstruction="G(E(x, label), label), conditional encoder (izif)",
    latent_dim=64, num_classes=2,
)
def cgan(**kwargs) -> GAN:
    """Label-conditioned GAN (DCGAN backbone by default, ``arch="mlp"`` for the paper's MLP)."""
    if kwargs.get("num_classes", 0) < 1:
        raise ValueError("cgan needs num_classes >= 1")
    return GAN(**{**kwargs, "n_categorical": 0, "n_continuous": 0})


@register_model(
    "infogan", objective="infogan", family="InfoGAN",
    paper="Chen et al., InfoGAN: Interpretable Representation Learning by Information Maximizing GANs, 2016",
    reconstruction="G(E(x)), E predicts (z, c_cat, c_cont) (izif)",
    latent_dim=62, n_categorical=10, n_continuous=2,
)
def infogan(**kwargs) -> GAN:
    """DCGAN + Q head; generator input ``[z, one_hot(c_cat), c_cont]``."""
    kwargs = {**kwargs, "arch": "conv", "num_classes": 0}
    if kwargs.get("n_categorical", 0) + kwargs.get("n_continuous", 0) < 1:
        raise ValueError("infogan needs n_categorical + n_continuous >= 1")
    return GAN(**kwargs)
