"""Loss terms shared by objectives: adversarial losses by mode, reconstruction losses.

``GANLoss(mode)`` follows pytorch-CycleGAN-and-pix2pix: the choice between the original
non-saturating BCE loss (Goodfellow et al., 2014), least squares (Mao et al., 2017), hinge
(Lim & Ye, 2017) and Wasserstein (Arjovsky et al., 2017; with gradient penalty, Gulrajani et
al., 2017) is a parameter, not a new model.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["GANLoss", "GAN_MODES", "reconstruction_loss", "gradient_penalty", "focal_loss"]

GAN_MODES = ("bce", "lsgan", "hinge", "wgan")


class GANLoss:
    """Adversarial loss on discriminator logits.

    ``loss(logits, target_is_real, for_discriminator)``: for ``bce``,
    ``-log sigmoid(l)`` for real targets and ``-log(1 - sigmoid(l))`` for fake ones (the
    generator uses the non-saturating ``-log D(G(z))``); ``lsgan`` ``(l - t)^2``; ``hinge``
    ``relu(1 - l)`` / ``relu(1 + l)`` for the discriminator and ``-l`` for the generator;
    ``wgan`` ``-l`` / ``l``.
    """

    def __init__(self, mode: str = "bce") -> None:
        if mode not in GAN_MODES:
            raise ValueError(f"unknown GAN loss {mode!r}; expected one of {GAN_MODES}")
        self.mode = mode

    def __call__(self, logits: torch.Tensor, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        if self.mode == "bce":
            target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
            return F.binary_cross_entropy_with_logits(logits, target)
        if self.mode == "lsgan":
            return ((logits - (1.0 if target_is_real else 0.0)) ** 2).mean()
        if self.mode == "hinge":
            if not for_discriminator:
                return -logits.mean()
            return F.relu(1.0 - logits).mean() if target_is_real else F.relu(1.0 + logits).mean()
        # wgan: the critic maximises D(real) - D(fake)
        return -logits.mean() if target_is_real else logits.mean()


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP term ``E[(||grad_x D(x_mix)||_2 - 1)^2]`` on random interpolates of real/fake."""
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device)
    mix = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = critic(mix)
    (grad,) = torch.autograd.grad(out.sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "l2", ssim_weight: float = 0.0) -> torch.Tensor:
    """Mean reconstruction error between ``(N, C, H, W)`` tensors.

    Args:
        kind: ``l1`` or ``l2`` pixel loss.
        ssim_weight: if > 0, adds ``ssim_weight * mean(1 - SSIM)`` (structure, not just intensity).
    """
    if kind == "l1":
        loss = (x_hat - x).abs().mean()
    elif kind == "l2":
        loss = ((x_hat - x) ** 2).mean()
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; expected l1 or l2")
    if ssim_weight > 0:
        from anomaly.scoring import ssim_map

        loss = loss + ssim_weight * (1.0 - ssim_map(x_hat, x)).mean()
    return loss


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) on probabilities, as DRAEM trains its segmenter.

    ``mean(-(1 - p_t)^gamma * log(p_t))`` with ``p_t = p`` where ``target`` is 1 and ``1 - p``
    where it is 0. Defect pixels are a few percent of an image; the ``(1 - p_t)^gamma`` factor
    keeps the many easy normal pixels from drowning them. ``gamma = 0`` is binary cross-entropy.

    Args:
        prob: ``(N, 1, H, W)`` predicted defect probability in [0, 1].
        target: same shape, the defect mask in {0, 1}.
    """
    p_t = (prob * target + (1.0 - prob) * (1.0 - target)).clamp(eps, 1.0)
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()
