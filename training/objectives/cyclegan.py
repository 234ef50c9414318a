"""CycleGAN objective (Zhu et al., 2017, eq. 3) with identity and paired-repair terms.

Domains: A = ``batch["image"]`` (may carry defects), B = ``batch["target"]`` (clean) when present.
``G_r`` = ``generator_repair`` (A -> B), ``G_d`` = ``generator_defect`` (B -> A), ``D_B`` =
``discriminator_normal``, ``D_A`` = ``discriminator_defect``.

Steps, every batch:

1. ``G`` (both generators)::

       L_G = GAN(D_B(G_r(A)), real) + GAN(D_A(G_d(B)), real)                  # least squares
           + lambda_cyc * (||G_d(G_r(A)) - A||_1 + ||G_r(G_d(B)) - B||_1)     # cycle consistency
           + lambda_cyc * lambda_id * (||G_r(B) - B||_1 + ||G_d(A) - A||_1)   # identity (Taesung Park's term)
           + lambda_pair * ||G_r(A) - B||_1                                   # only when A and B are pairs
           + lambda_seg * Focal(S(cat[A, G_r(A)]), M)                         # only with a segmenter, lambda_seg > 0

2. ``D`` (both discriminators)::

       L_D = 1/2 [GAN(D_B(B), real) + GAN(D_B(G_r(A)), fake)] + 1/2 [GAN(D_A(A), real) + GAN(D_A(G_d(B)), fake)]

3. ``S`` (only when the model has a ``segmenter``; DRAEM's discriminative loss)::

       L_S = Focal(S(cat[A, sg(G_r(A))]), M)      # M = the synthetic defect mask, sg = stop-gradient

   The repair is detached: the segmenter learns to read the generator. With ``lambda_seg > 0`` the
   generator also learns from the segmenter (step 1's last term, the segmenter frozen there), which
   is DRAEM's joint training split into alternating updates: the repair is pushed to leave
   residuals the segmenter can find.

Fallback without ``target`` (a folder of normal images only): B = ``image`` and A = ``image`` with a
light synthetic corruption made here (:func:`corrupt`: one random rectangle per image filled with a
random grey level, plus faint Gaussian noise). A and B are then pairs, so the paired term applies.
A richer defect generator lives in ``data`` (the lead can pass its output as ``image``/``target``).

Example::

    objective = create_objective("cyclegan", model, lambda_cyc=10.0)
    loss, logs = objective.loss("G", {"image": defective, "target": clean})
"""
from __future__ import annotations

import torch

from anomaly.training.losses import GANLoss, focal_loss
from anomaly.training.objectives.base import Batch, Objective, Step, register_objective

__all__ = ["CycleGANObjective", "corrupt"]


def corrupt(x: torch.Tensor, max_fraction: float = 0.25, noise_std: float = 0.02,
            return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Light synthetic defects for the no-target fallback: ``(N, C, H, W)`` -> same shape in [0, 1].

    Each image gets one axis-aligned rectangle (sides between 1/8 and ``max_fraction`` of the
    image) filled with a uniform random grey level, plus Gaussian noise of ``noise_std``. With
    ``return_mask`` also the rectangles, ``(N, 1, H, W)`` float in {0, 1}.
    """
    n, _, h, w = x.shape
    dev = x.device
    lo = 1.0 / 8
    rh = (lo + (max_fraction - lo) * torch.rand(n, device=dev)) * h
    rw = (lo + (max_fraction - lo) * torch.rand(n, device=dev)) * w
    top = torch.rand(n, device=dev) * (h - rh)
    left = torch.rand(n, device=dev) * (w - rw)
    yy = torch.arange(h, device=dev).view(1, h, 1).float()
    xx = torch.arange(w, device=dev).view(1, 1, w).float()
    inside = ((yy >= top.view(n, 1, 1)) & (yy < (top + rh).view(n, 1, 1))
              & (xx >= left.view(n, 1, 1)) & (xx < (left + rw).view(n, 1, 1))).unsqueeze(1)
    level = torch.rand(n, 1, 1, 1, device=dev).expand_as(x)
    out = (torch.where(inside, level, x) + noise_std * torch.randn_like(x)).clamp(0.0, 1.0)
    return (out, inside.float()) if return_mask else out


@register_objective("cyclegan")
class CycleGANObjective(Objective):
    """Args:
        gan_mode: adversarial loss (``lsgan`` as in the paper).
        lambda_cyc: cycle-consistency weight (10 in the paper).
        lambda_id: identity weight, relative to ``lambda_cyc`` (0.5 in the paper).
        lambda_pair: weight of the direct ``||G_r(A) - B||_1`` term when pairs are known (0 disables).
        lr: learning rate of the ``G`` and ``D`` steps (2e-4, Adam betas (0.5, 0.999) as in the paper).
        focal_gamma: focusing parameter of the segmenter's focal loss (2, as DRAEM).
        segmenter_lr: learning rate of the ``S`` step (1e-3; DRAEM uses 1e-4 for ~700 epochs, our budgets are
            30-100 epochs; Adam betas (0.9, 0.999)).
        lambda_seg: weight of the segmenter's focal loss in the generators' step (0: the repair
            ignores the segmenter; needs a model with a segmenter).
        repair_epochs: train the generators and discriminators (steps ``G``, ``D``) only in the first
            ``repair_epochs`` epochs; the remaining epochs train the segmenter alone on the finished
            repair, at a fraction of a full epoch's cost (``None``: every step in every epoch; needs a
            model with a segmenter).
    """

    def __init__(self, model, *, gan_mode: str = "lsgan", lambda_cyc: float = 10.0, lambda_id: float = 0.5,
                 lambda_pair: float = 10.0, lr: float = 2e-4, focal_gamma: float = 2.0,
                 segmenter_lr: float = 1e-3, lambda_seg: float = 0.0, repair_epochs: int | None = None) -> None:
        super().__init__(model)
        if repair_epochs is not None and (repair_epochs < 1 or not hasattr(model, "segmenter")):
            raise ValueError(f"repair_epochs needs a model with a segmenter and a value >= 1, got {repair_epochs}")
        if lambda_seg < 0:
            raise ValueError(f"lambda_seg must be >= 0, got {lambda_seg}")
        if lambda_seg > 0 and not hasattr(model, "segmenter"):
            raise ValueError("lambda_seg > 0 needs a model with a segmenter (segmenter=True)")
        self.lambda_seg = lambda_seg
        self.gan = GANLoss(gan_mode)
        self.lambda_cyc = lambda_cyc
        self.lambda_id = lambda_id
        self.lambda_pair = lambda_pair
        self.focal_gamma = focal_gamma
        self.steps = (
            Step("G", ("generator_repair", "generator_defect"), lr=lr, betas=(0.5, 0.999), until_epoch=repair_epochs),
            Step("D", ("discriminator_normal", "discriminator_defect"), lr=lr, betas=(0.5, 0.999),
                 until_epoch=repair_epochs),
        )
        if hasattr(model, "segmenter"):
            self.steps += (Step("S", ("segmenter",), lr=segmenter_lr, betas=(0.9, 0.999)),)

    @staticmethod
    def domains(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
        """``(A, B, paired, mask)`` from a batch (see the module docstring for the fallback); ``mask``
        ``(N, 1, H, W)`` is the defect mask when known, else None."""
        if "target" in batch:
            return batch["image"], batch["target"], True, batch.get("mask")
        b = batch["image"]
        a, mask = corrupt(b, return_mask=True)
        return a, b, True, mask

    def loss(self, step: str, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        if step == "S":
            return self._segmenter_loss(batch)
        real_a, real_b, paired, mask = self.domains(batch)
        if step == "G":
            fake_b = m.generator_repair(real_a)       # G_r(A)
            fake_a = m.generator_defect(real_b)       # G_d(B)
            adv = (self.gan(m.discriminator_normal(fake_b), True, for_discriminator=False)
                   + self.gan(m.discriminator_defect(fake_a), True, for_discriminator=False))
            cyc = ((m.generator_defect(fake_b) - real_a).abs().mean()     # || G_d(G_r(A)) - A ||
                   + (m.generator_repair(fake_a) - real_b).abs().mean())  # || G_r(G_d(B)) - B ||
            loss = adv + self.lambda_cyc * cyc
            logs = {"G_adv": adv.item(), "cycle": cyc.item()}
            if self.lambda_id > 0:
                idt = ((m.generator_repair(real_b) - real_b).abs().mean()    # || G_r(B) - B ||
                       + (m.generator_defect(real_a) - real_a).abs().mean())  # || G_d(A) - A ||
                loss = loss + self.lambda_cyc * self.lambda_id * idt
                logs["identity"] = idt.item()
            if paired and self.lambda_pair > 0:
                pair = (fake_b - real_b).abs().mean()                    # || G_r(A) - B ||
                loss = loss + self.lambda_pair * pair
                logs["repair"] = pair.item()
            if self.lambda_seg > 0:
                if mask is None:
                    raise ValueError("lambda_seg > 0 needs batch['mask'] with batch['target'] (the synthetic defect's mask)")
                seg = focal_loss(m.defect_map(real_a, fake_b), mask, gamma=self.focal_gamma)
                loss = loss + self.lambda_seg * seg
                logs["G_seg"] = seg.item()
            logs["G"] = loss.item()
            return loss, logs
        if step == "D":
            with torch.no_grad():
                fake_b = m.generator_repair(real_a)
                fake_a = m.generator_defect(real_b)
            d_b, d_a = m.discriminator_normal, m.discriminator_defect
            loss_b = 0.5 * (self.gan(d_b(real_b), True) + self.gan(d_b(fake_b), False))  # D_B: B real, G_r(A) fake
            loss_a = 0.5 * (self.gan(d_a(real_a), True) + self.gan(d_a(fake_a), False))  # D_A: A real, G_d(B) fake
            loss = loss_a + loss_b
            return loss, {"D_normal": loss_b.item(), "D_defect": loss_a.item(), "D": loss.item()}
        raise KeyError(f"cyclegan objective has no step {step!r}")

    def _segmenter_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Step ``S``: focal loss of the segmenter on the defect mask, the repair detached."""
        m = self.model
        if "mask" in batch:
            real_a, mask = batch["image"], batch["mask"]
        elif "target" in batch:
            raise ValueError("the segmenter step needs batch['mask'] with batch['target'] (the synthetic defect's mask)")
        else:
            real_a, mask = corrupt(batch["image"], return_mask=True)
        with torch.no_grad():
            repaired = m.generator_repair(real_a)   # sg(G_r(A))
        loss = focal_loss(m.defect_map(real_a, repaired), mask, gamma=self.focal_gamma)
        return loss, {"S": loss.item()}
