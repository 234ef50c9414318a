"""AAE objective: the seeds' three-step loop (Makhzani et al., 2016, §2).

1. ``recon``    (encoder + decoder):  L_rec = ||x - Dec(Enc(x))||  (+ lambda_img * GAN(D_img(x_hat), real))
2. ``D_latent`` (latent discriminator): L_D = GAN(D_z(z ~ p(z)), real) + GAN(D_z(Enc(x)), fake)
3. ``G_latent`` (encoder):             L_G = lambda_adv * GAN(D_z(Enc(x)), real)   — the encoder fools D_z
4. ``D_image``  (image discriminator, only when the model has one):
                                      GAN(D_img(x), real) + GAN(D_img(x_hat), fake)

When the batch carries a ``target`` (clean image behind a synthetic defect), the reconstruction
is compared against it: the model then learns to *repair*, not just to copy.
"""
from __future__ import annotations

import torch

from anomaly.training.losses import GANLoss, reconstruction_loss
from anomaly.training.objectives.base import Batch, Objective, Step, register_objective


@register_objective("aae")
class AAEObjective(Objective):
    """Args:
        recon_loss: ``l1`` or ``l2``.
        ssim_weight: weight of the (1 - SSIM) term in the reconstruction loss.
        adv_weight: lambda_adv of the encoder's fooling step.
        image_adv_weight: lambda_img of the image discriminator term (if the model has one).
        gan_mode: ``bce`` (the seeds), ``lsgan``, ``hinge`` or ``wgan``.
        lr: learning rate of every step.
    """

    def __init__(
        self,
        model,
        *,
        recon_loss: str = "l2",
        ssim_weight: float = 0.0,
        adv_weight: float = 1.0,
        image_adv_weight: float = 0.01,
        gan_mode: str = "bce",
        lr: float = 2e-4,
    ) -> None:
        super().__init__(model)
        self.recon_kind = recon_loss
        self.ssim_weight = ssim_weight
        self.adv_weight = adv_weight
        self.image_adv_weight = image_adv_weight
        self.gan = GANLoss(gan_mode)
        steps = [
            Step("recon", ("encoder", "decoder"), lr=lr, betas=(0.5, 0.999)),
            Step("D_latent", ("latent_discriminator",), lr=lr, betas=(0.5, 0.999)),
            Step("G_latent", ("encoder",), lr=lr, betas=(0.5, 0.999)),
        ]
        if getattr(model, "image_discriminator", None) is not None:
            steps.append(Step("D_image", ("image_discriminator",), lr=lr, betas=(0.5, 0.999)))
        self.steps = tuple(steps)

    def loss(self, step: str, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        x, y = batch["image"], batch.get("label")
        target = batch.get("target", x)
        if step == "recon":
            x_hat = m.decode(m.encode(x, y), y)
            loss = reconstruction_loss(x_hat, target, self.recon_kind, self.ssim_weight)  # ||x - Dec(Enc(x))||
            logs = {"recon": loss.item()}
            if m.image_discriminator is not None:
                adv = self.gan(m.image_discriminator(x_hat), True, for_discriminator=False)
                loss = loss + self.image_adv_weight * adv
                logs["G_image"] = adv.item()
            return loss, logs
        if step == "D_latent":
            z_fake = m.encode(x, y).detach()
            z_real = m.sample_prior(x.shape[0], y, device=x.device)
            # D_z learns: prior samples are "real", encoder codes are "fake"
            loss = 0.5 * (self.gan(m.discriminate_latent(z_real, y), True) + self.gan(m.discriminate_latent(z_fake, y), False))
            return loss, {"D_latent": loss.item()}
        if step == "G_latent":
            # the encoder fools D_z: its codes should be judged as prior samples
            loss = self.adv_weight * self.gan(m.discriminate_latent(m.encode(x, y), y), True, for_discriminator=False)
            return loss, {"G_latent": loss.item()}
        if step == "D_image":
            with torch.no_grad():
                x_hat = m(x, y)
            loss = 0.5 * (self.gan(m.image_discriminator(target), True) + self.gan(m.image_discriminator(x_hat), False))
            return loss, {"D_image": loss.item()}
        raise KeyError(f"AAE objective has no step {step!r}")
