"""Longer versions of ``tests/test_zoo_behaviour.py``: what the zoo's generative families learn on
sklearn's digits (8x8 upscaled to 16x16), printed as a table. Not a test; it asserts nothing.

Measures:
    conditional accuracy  samples for label k (cgan, cvae, cond_aae) classified as k by a logistic
                          regression fitted on real digits (chance 0.1); cGAN sampled with G in
                          eval() (what export uses) and in train() mode (batch statistics).
    prior MMD^2           AAE codes vs N(0, I), with and without the adversarial term.
    InfoGAN NMI           NMI(argmax Q_cat(real digit), label), trained vs untrained.

Example::

    python benchmarks/zoo_behaviour.py --epochs 40 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.nn import functional as F

from anomaly.registry import create_model
from anomaly.training.generative import mmd2, train_in_memory

log = logging.getLogger("zoo_behaviour")
SIZE = 16


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """``(1797, 1, 16, 16)`` in [0, 1] and labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1), torch.tensor(d.target)


def train(name: str, data, epochs: int, model_kwargs: dict, objective_kwargs: dict | None = None, seed: int = 0,
          batch_size: int = 64) -> torch.nn.Module:
    """Train through the project's :class:`Trainer` step loop; returns the model in ``eval()``."""
    x, y = data
    return train_in_memory(name, x, y, epochs=epochs, model_kwargs=model_kwargs, objective_kwargs=objective_kwargs,
                           seed=seed, batch_size=batch_size)


def conditional_accuracy(model: torch.nn.Module, clf, train_mode: bool = False) -> float:
    labels = torch.arange(10).repeat_interleave(50)
    torch.manual_seed(1)
    model.train(train_mode)
    with torch.no_grad():
        if hasattr(model, "sample_code"):
            samples = model.generate(model.sample_code(len(labels)).code, labels)
        elif getattr(model, "variational", False):
            samples = model.decode(torch.randn(len(labels), model.latent_dim), labels)
        else:
            samples = model.decode(model.sample_prior(len(labels), labels), labels)
    model.eval()
    return float((clf.predict(samples.flatten(1).numpy()) == labels.numpy()).mean())


def main(argv: list[str] | None = None) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import normalized_mutual_info_score

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    data = load_digits_tensor()
    x, y = data
    clf = LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy())
    rows: list[tuple[str, int, str, float, float]] = []
    for seed in args.seeds:
        t = time.monotonic()
        cgan = train("cgan", data, args.epochs, dict(num_classes=10, latent_dim=16, base_channels=16), seed=seed)
        rows.append(("cgan accuracy (G eval / train mode)", seed, "", conditional_accuracy(cgan, clf),
                     conditional_accuracy(cgan, clf, train_mode=True)))
        cvae = train("cvae", data, args.epochs, dict(num_classes=10, latent_dim=8, base_channels=16), seed=seed)
        rows.append(("cvae accuracy", seed, "", conditional_accuracy(cvae, clf), float("nan")))
        caae = train("cond_aae", data, args.epochs,
                     dict(num_classes=10, latent_dim=8, base_channels=16, disc_hidden=64), dict(lr=1e-3), seed=seed)
        rows.append(("cond_aae accuracy", seed, "", conditional_accuracy(caae, clf), float("nan")))
        mmd = []
        for w in (1.0, 0.0):
            aae = train("aae", data, args.epochs, dict(latent_dim=8, base_channels=16, disc_hidden=64),
                        dict(adv_weight=w, lr=1e-3), seed=seed)
            with torch.no_grad():
                codes = aae.encode(x[:600])
            torch.manual_seed(5)
            mmd.append(mmd2(codes, aae.sample_prior(600)))
        rows.append(("aae MMD^2 to prior (adversarial / none)", seed, "", mmd[0], mmd[1]))
        kw = dict(latent_dim=16, base_channels=16, n_categorical=10, n_continuous=2, q_hidden=64)
        nmi = []
        torch.manual_seed(seed)
        trained = train("infogan", data, args.epochs, kw, dict(generator_lr=1e-3), seed=seed, batch_size=32)
        for model in (trained, create_model("infogan", in_channels=1, image_size=SIZE, **kw)):
            with torch.no_grad():
                cat = model.eval().predict_codes(x)[0].argmax(1)
            nmi.append(float(normalized_mutual_info_score(y.numpy(), cat.numpy())))
        rows.append(("infogan NMI (trained / untrained)", seed, "", nmi[0], nmi[1]))
        log.info("seed %d done in %.0f s", seed, time.monotonic() - t)
    log.info("\n%-42s %5s %9s %9s", "measure", "seed", "value", "reference")
    for name, seed, _, a, b in rows:
        log.info("%-42s %5d %9.3f %9.3f", name, seed, a, b)


if __name__ == "__main__":
    main()
