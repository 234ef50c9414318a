"""Objectives of the autoencoder families: ``ae`` (reconstruction), ``vae`` and ``cvae`` (ELBO).

- ``ae`` — one step ``recon`` (encoder + decoder): ``L = ||x - Dec(Enc(x))||`` in L1, L2 or SSIM
  (Bergmann et al., 2019), optionally plus ``ssim_weight * (1 - SSIM)``.
- ``vae`` — one step ``elbo`` (encoder + decoder), the negative evidence lower bound of Kingma &
  Welling (2014, eq. 3) with the beta weighting of Higgins et al. (2017)::

      L = E_q[-log p(x | z)] + beta * KL(q(z | x) || N(0, I)),
      KL = -1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))          (Kingma & Welling, App. B)

  ``-log p(x|z)`` is Bernoulli (``bce``) or, up to constants, Gaussian (``l2``) / Laplace (``l1``),
  summed over pixels. The total is divided by the number of pixels so learning rates do not
  depend on the image size (the optimum is unchanged). ``kl_warmup_epochs`` ramps beta up
  linearly (Bowman et al., 2016) to avoid early posterior collapse.
- ``cvae`` — the conditional ELBO (Sohn et al., 2015): the same with q(z|x, y) and p(x|z, y);
  the batch must carry ``label``.

When the batch carries a ``target`` (the clean image behind a synthetic defect), the likelihood
is that of the target: the model learns to repair, not to copy.

Example::

    from anomaly.training.objectives import create_objective
    objective = create_objective("vae", model, beta=1.0, recon_loss="bce")
    loss, logs = objective.loss("elbo", {"image": x})
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from anomaly.training.losses import reconstruction_loss
from anomaly.training.objectives.base import Batch, Objective, Step, register_objective

__all__ = ["AEObjective", "VAEObjective", "CVAEObjective"]


@register_objective("ae")
class AEObjective(Objective):
    """Args:
        recon_loss: ``l1``, ``l2`` or ``ssim`` (``1 - SSIM`` alone).
        ssim_weight: weight of an extra ``(1 - SSIM)`` term on top of ``l1``/``l2``.
        lr: learning rate of the ``recon`` step.
    """

    def __init__(self, model, *, recon_loss: str = "l2", ssim_weight: float = 0.0, lr: float = 1e-3) -> None:
        super().__init__(model)
        if recon_loss not in ("l1", "l2", "ssim"):
            raise ValueError(f"unknown recon_loss {recon_loss!r}; expected l1, l2 or ssim")
        self.recon_kind = recon_loss
        self.ssim_weight = ssim_weight
        self.steps = (Step("recon", ("encoder", "decoder"), lr=lr, betas=(0.9, 0.999)),)

    def loss(self, step: str, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if step != "recon":
            raise KeyError(f"AE objective has no step {step!r}")
        x, y = batch["image"], batch.get("label")
        target = batch.get("target", x)
        x_hat = self.model(x, y)
        if self.recon_kind == "ssim":
            from anomaly.scoring import ssim_map

            loss = (1.0 - ssim_map(x_hat, target)).mean()  # L_SSIM = mean(1 - SSIM(x, x_hat))
        else:
            loss = reconstruction_loss(x_hat, target, self.recon_kind, self.ssim_weight)  # ||x - Dec(Enc(x))||
        return loss, {"recon": loss.item()}


@register_objective("vae")
class VAEObjective(Objective):
    """Args:
        beta: KL weight (1 = the ELBO; > 1 = beta-VAE).
        recon_loss: ``bce`` (Bernoulli likelihood), ``l2`` (Gaussian) or ``l1`` (Laplace).
        kl_warmup_epochs: epochs over which beta ramps from 0 to ``beta`` (0: no warm-up).
        lr: learning rate of the ``elbo`` step.
    """

    requires_label = False

    def __init__(self, model, *, beta: float = 1.0, recon_loss: str = "bce", kl_warmup_epochs: int = 0,
                 lr: float = 1e-3) -> None:
        super().__init__(model)
        if recon_loss not in ("bce", "l1", "l2"):
            raise ValueError(f"unknown recon_loss {recon_loss!r}; expected bce, l1 or l2")
        if not getattr(model, "variational", False):
            raise TypeError(f"the {self.name} objective needs a variational model (vae/cvae), "
                            f"got {type(model).__name__}")
        self.beta = beta
        self.recon_kind = recon_loss
        self.kl_warmup_epochs = kl_warmup_epochs
        self.kl_scale = 0.0 if kl_warmup_epochs > 0 else 1.0
        self.steps = (Step("elbo", ("encoder", "decoder"), lr=lr, betas=(0.9, 0.999)),)

    def on_epoch_end(self, epoch: int) -> None:
        if self.kl_warmup_epochs > 0:
            self.kl_scale = min(1.0, epoch / self.kl_warmup_epochs)

    def _neg_log_likelihood(self, x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-log p(x | z)`` per image, summed over pixels (constants dropped) -> ``(N,)``."""
        if self.recon_kind == "bce":
            nll = F.binary_cross_entropy(x_hat.clamp(1e-6, 1 - 1e-6), target, reduction="none")
        elif self.recon_kind == "l2":
            nll = 0.5 * (x_hat - target) ** 2 / 0.1**2  # Gaussian, sigma = 0.1
        else:
            nll = (x_hat - target).abs() / 0.1  # Laplace, b = 0.1
        return nll.flatten(1).sum(1)

    def loss(self, step: str, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if step != "elbo":
            raise KeyError(f"{self.name} objective has no step {step!r}")
        m = self.model
        x, y = batch["image"], batch.get("label")
        if self.requires_label and y is None:
            raise ValueError(f"the {self.name} objective needs batch['label'] (an int64 tensor of shape (N,))")
        target = batch.get("target", x)
        mu, logvar = m.encode_stats(x, y)
        z = m.reparameterize(mu, logvar)                          # z = mu + sigma * eps
        x_hat = m.decode(z, y)
        nll = self._neg_log_likelihood(x_hat, target)             # E_q[-log p(x|z)], one sample
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # KL(q(z|x) || N(0, I))
        beta = self.beta * self.kl_scale
        n_pixels = x[0].numel()
        loss = (nll + beta * kl).mean() / n_pixels                # -ELBO per pixel
        return loss, {"nll": nll.mean().item() / n_pixels, "kl": kl.mean().item(), "elbo": -loss.item() * n_pixels}


@register_objective("cvae")
class CVAEObjective(VAEObjective):
    """Conditional ELBO (Sohn et al., 2015): same arguments as ``vae``; batches need ``label``."""

    requires_label = True
