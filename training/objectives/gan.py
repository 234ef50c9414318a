"""Objectives of the GAN families: ``gan`` (GAN, DCGAN), ``cgan`` and ``infogan``.

Every batch runs three steps (all in one trainer loop, no phases):

1. ``D`` (discriminator [+ q_head]):
   ``L_D = GAN(D(x, y), real) + GAN(D(G(z, y), y), fake)``   (Goodfellow et al., 2014, eq. 1)
   with ``gan_mode="wgan"`` plus ``gp_weight * E[(||grad D(x_mix)|| - 1)^2]`` (Gulrajani et al., 2017).
2. ``G`` (generator [+ q_head]), every ``n_critic`` batches:
   ``L_G = GAN(D(G(z, y), y), real)`` — the non-saturating ``-log D(G(z))`` for ``bce``.
3. ``E`` (encoder), with G and D frozen *and in eval mode* (so E inverts exactly the generator
   used at inference), f-AnoGAN's izif loss (Schlegl et al., 2019, eq. 7)::

       L_izif = 1/n ||x - G(E(x))||^2 + kappa * 1/n_d ||f(x) - f(G(E(x)))||^2

   where f is the discriminator's feature body. Running E from the first batch wastes a little
   work while G is still moving but needs no schedule; E keeps tracking G as it converges.

InfoGAN (Chen et al., 2016, eq. 5) adds ``-lambda * L_I(G, Q)`` to both the D and G steps, with the
mutual-information lower bound
``L_I = E[log Q(c | G(z, c))] + H(c)``: for the categorical code this is ``-CE(Q_cat, c) + log K``;
continuous codes use a fixed-variance Gaussian, i.e. ``-1/2 ||Q_cont - c_cont||^2`` (+ const). Q
shares D's body; in the ``D`` step the bound is taken on detached fakes (trains D's body and Q),
in the ``G`` step through G (trains G and Q).

cGAN (Mirza & Osindero, 2014): G, D and E all see the batch's ``label``; fakes are generated for the
real batch's labels so both terms of ``L_D`` see the same label distribution.

When the batch carries a ``target`` (clean image behind a synthetic defect), D's real samples and
the encoder's reconstruction target are the clean images.

Example::

    objective = create_objective("gan", model, gan_mode="bce")
    for step in objective.steps:        # D, G, E
        loss, logs = objective.loss(step.name, batch)
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from anomaly.training.losses import GANLoss, gradient_penalty
from anomaly.training.objectives.base import Batch, Objective, Step, register_objective

if TYPE_CHECKING:
    from anomaly.zoo.gan import LatentCode

__all__ = ["GANObjective", "CGANObjective", "InfoGANObjective", "eval_mode"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in ``eval()`` for the block, then restore each one's previous mode."""
    previous = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, was_training in zip(modules, previous):
            m.train(was_training)


@register_objective("gan")
class GANObjective(Objective):
    """Args:
        gan_mode: ``bce`` (non-saturating, the default), ``lsgan``, ``hinge`` or ``wgan`` (with GP;
            Gulrajani et al. advise a critic without batch norm: build the model with
            ``norm="group"`` or ``"none"`` then).
        lr: learning rate of ``D`` and ``G`` (Adam, betas (0.5, 0.999) as DCGAN).
        generator_lr: learning rate of ``G`` (``None``: ``lr``; the InfoGAN paper uses 1e-3 for G
            and 2e-4 for D).
        encoder_lr: learning rate of ``E`` (``None``: ``lr``).
        kappa: weight of the discriminator-feature residual in the izif loss.
        n_critic: ``G`` runs every ``n_critic`` batches (``None``: 5 for ``wgan``, else 1).
        gp_weight: gradient-penalty weight (``wgan`` only).
    """

    requires_label = False

    def __init__(self, model, *, gan_mode: str = "bce", lr: float = 2e-4, generator_lr: float | None = None,
                 encoder_lr: float | None = None, kappa: float = 1.0, n_critic: int | None = None,
                 gp_weight: float = 10.0) -> None:
        super().__init__(model)
        self.gan = GANLoss(gan_mode)
        self.gan_mode = gan_mode
        self.kappa = kappa
        self.gp_weight = gp_weight
        n_critic = n_critic if n_critic is not None else (5 if gan_mode == "wgan" else 1)
        has_q = getattr(model, "q_head", None) is not None
        extra = ("q_head",) if has_q else ()
        self.steps = (
            Step("D", ("discriminator", *extra), lr=lr, betas=(0.5, 0.999)),
            Step("G", ("generator", *extra), lr=generator_lr or lr, betas=(0.5, 0.999), every=n_critic),
            Step("E", ("encoder",), lr=encoder_lr or lr, betas=(0.5, 0.999)),
        )

    # -- pieces shared with the subclasses ------------------------------------------------------
    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x, y = batch["image"], batch.get("label")
        if self.requires_label and y is None:
            raise ValueError(f"the {self.name} objective needs batch['label'] (an int64 tensor of shape (N,))")
        if not self.requires_label:
            y = None if getattr(self.model, "num_classes", 0) == 0 else y
        return x, y, batch.get("target", x)

    def _info_loss(self, cat_logits: torch.Tensor, cont_mean: torch.Tensor,
                   code: LatentCode) -> tuple[torch.Tensor, dict[str, float]]:
        """``-L_I`` without the constant ``H(c)``; the InfoGAN subclass overrides the weights."""
        return cat_logits.new_zeros(()), {}

    def _discriminator_loss(self, real: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        code = m.sample_code(real.shape[0], real.device)
        with torch.no_grad():
            fake = m.generate(code.code, y)  # G is not updated by this step
        logs: dict[str, float] = {}
        if m.q_head is not None:
            real_logits = m.discriminate(real, y)
            fake_logits, cat_logits, cont_mean = m.discriminate_with_codes(fake, y)
        else:
            real_logits, fake_logits = m.discriminate(real, y), m.discriminate(fake, y)
        # L_D = GAN(D(x), real) + GAN(D(G(z)), fake)
        loss_real, loss_fake = self.gan(real_logits, True), self.gan(fake_logits, False)
        loss = loss_real + loss_fake
        logs.update(D_real=loss_real.item(), D_fake=loss_fake.item())
        if self.gan_mode == "wgan" and self.gp_weight > 0:
            gp = gradient_penalty(lambda t: m.discriminate(t, y), real, fake)  # E[(||grad D(x_mix)|| - 1)^2]
            loss = loss + self.gp_weight * gp
            logs["gp"] = gp.item()
        if m.q_head is not None:
            info, info_logs = self._info_loss(cat_logits, cont_mean, code)
            loss = loss + info
            logs.update({f"D_{k}": v for k, v in info_logs.items()})
        logs["D"] = loss.item()
        return loss, logs

    def _generator_loss(self, real: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        code = m.sample_code(real.shape[0], real.device)
        fake = m.generate(code.code, y)
        logs: dict[str, float] = {}
        if m.q_head is not None:
            fake_logits, cat_logits, cont_mean = m.discriminate_with_codes(fake, y)
        else:
            fake_logits = m.discriminate(fake, y)
        loss = self.gan(fake_logits, True, for_discriminator=False)  # non-saturating: -log D(G(z))
        logs["G_adv"] = loss.item()
        if m.q_head is not None:
            info, info_logs = self._info_loss(cat_logits, cont_mean, code)  # - lambda * L_I(G, Q)
            loss = loss + info
            logs.update(info_logs)
        logs["G"] = loss.item()
        return loss, logs

    def _encoder_loss(self, x: torch.Tensor, y: torch.Tensor | None,
                      target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        with eval_mode(m.generator, m.discriminator):
            x_hat = m.generate(m.encode(x, y), y)                      # G(E(x))
            img = F.mse_loss(x_hat, target)                            # 1/n ||x - G(E(x))||^2
            with torch.no_grad():
                f_real = m.discriminator_features(target, y)
            feat = F.mse_loss(m.discriminator_features(x_hat, y), f_real)  # 1/n_d ||f(x) - f(G(E(x)))||^2
        loss = img + self.kappa * feat
        return loss, {"E": loss.item(), "E_image": img.item(), "E_feature": feat.item()}

    # -- the contract ---------------------------------------------------------------------------
    def loss(self, step: str, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, y, target = self._inputs(batch)
        if step == "D":
            return self._discriminator_loss(target, y)
        if step == "G":
            return self._generator_loss(target, y)
        if step == "E":
            return self._encoder_loss(x, y, target)
        raise KeyError(f"{self.name} objective has no step {step!r}")


@register_objective("cgan")
class CGANObjective(GANObjective):
    """Conditional GAN loss: as ``gan`` with ``label`` given to G, D and E (required in batches)."""

    requires_label = True


@register_objective("infogan")
class InfoGANObjective(GANObjective):
    """GAN loss ``- lambda * L_I`` (InfoGAN). Arguments of ``gan`` (but ``generator_lr`` defaults to
    1e-3, the paper's MNIST setting, D keeping 2e-4) plus:

    Args:
        info_weight: lambda of the categorical code (1 in the paper).
        continuous_weight: lambda of the continuous codes (0.1 in common implementations).
    """

    def __init__(self, model, *, info_weight: float = 1.0, continuous_weight: float = 0.1, **kwargs) -> None:
        if getattr(model, "q_head", None) is None:
            raise TypeError("the infogan objective needs a model with a q_head (n_categorical or n_continuous > 0)")
        kwargs.setdefault("generator_lr", 1e-3)
        super().__init__(model, **kwargs)
        self.info_weight = info_weight
        self.continuous_weight = continuous_weight

    def _info_loss(self, cat_logits: torch.Tensor, cont_mean: torch.Tensor,
                   code: LatentCode) -> tuple[torch.Tensor, dict[str, float]]:
        loss = cat_logits.new_zeros(())
        logs: dict[str, float] = {}
        if code.categorical is not None:
            ce = F.cross_entropy(cat_logits, code.categorical)       # -E[log Q(c_cat | G(z, c))]
            loss = loss + self.info_weight * ce
            k = cat_logits.shape[1]
            logs["mi_cat"] = math.log(k) - ce.item()                 # L_I = H(c) - CE
        if code.continuous is not None:
            mse = 0.5 * (cont_mean - code.continuous).pow(2).sum(1).mean()  # -log N(c | Q_cont, I) + const
            loss = loss + self.continuous_weight * mse
            logs["info_cont"] = mse.item()
        return loss, logs
