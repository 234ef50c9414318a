"""The trainer loop and the AAE objective on real (generated) images."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomaly.registry import create_model
from training.config import TrainConfig
from training.objectives import create_objective
from training.run import split_normals, train
from training.trainer import Trainer, load_checkpoint


def _batch(n: int = 8, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = 0.5 + 0.25 * torch.sin(xx / 3.0) * torch.cos(yy / 4.0)
    x = (base + 0.02 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)
    return {"image": x}


def test_training_steps_lower_the_reconstruction_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("aae", in_channels=1, image_size=32, latent_dim=16, base_channels=8)
    objective = create_objective("aae", model)
    trainer = Trainer(objective, out_dir=tmp_path, epochs=1, device="cpu")
    batch = _batch()
    before = objective.loss("recon", batch)[0].item()
    for _ in range(30):
        logs = trainer.train_batch(batch)
    assert set(logs) >= {"recon", "D_latent", "G_latent"}
    after = objective.loss("recon", batch)[0].item()
    assert after < 0.75 * before, (before, after)  # measured: 0.0156 -> 0.0094 after 30 steps


def test_each_step_updates_only_its_group(tmp_path: Path) -> None:
    model = create_model("aae", in_channels=1, image_size=32, latent_dim=16, base_channels=8)
    objective = create_objective("aae", model)
    trainer = Trainer(objective, out_dir=tmp_path, device="cpu")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.steps = tuple(s for s in objective.steps if s.name == "D_latent")
    trainer.train_batch(_batch())
    changed = {k.split(".")[0] for k, v in model.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, snapshot[k]) and "running" not in k}
    assert changed == {"latent_discriminator"}


def test_split_is_deterministic_and_disjoint(mvtec_dir: Path) -> None:
    from data.folder import discover

    samples = discover(mvtec_dir).train
    a = split_normals(samples, 0.25, seed=3)
    b = split_normals(samples, 0.25, seed=3)
    assert a == b and len(a[1]) == 3
    assert not {s.path for s in a[0]} & {s.path for s in a[1]}


def test_train_writes_checkpoints_log_and_resumes(mvtec_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(mvtec_dir), out=str(tmp_path / "run"), image_size=32, epochs=2, batch_size=4,
                      model_kwargs={"latent_dim": 8, "base_channels": 8})
    result = train(cfg)
    run = tmp_path / "run"
    assert result.epochs_done == 2 and result.stopped == "epochs"
    for f in ("config.json", "split.json", "losses.csv", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "losses.csv")))
    assert len(rows) == 2 and {"recon", "D_latent", "G_latent", "val_error"} <= set(rows[0])
    assert np.isfinite(float(rows[-1]["val_error"]))
    cfg.epochs = 3
    result = train(cfg, resume=True)
    assert result.epochs_done == 3
    assert len(list(csv.DictReader(open(run / "losses.csv")))) == 3
    assert load_checkpoint(run / "checkpoints/last.pt")["epoch"] == 3


def test_time_budget_stops_cleanly_with_usable_checkpoint(mvtec_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(mvtec_dir), out=str(tmp_path / "run"), image_size=32, epochs=1000, batch_size=4,
                      max_minutes=1e-6, model_kwargs={"latent_dim": 8, "base_channels": 8})
    result = train(cfg)
    assert result.stopped == "time" and result.epochs_done == 1
    ckpt = load_checkpoint(result.last_checkpoint)
    model = create_model("aae", in_channels=1, image_size=32, latent_dim=8, base_channels=8)
    model.load_state_dict(ckpt["model_state"])


def test_repair_training_with_synthetic_defects(mvtec_dir: Path, tmp_path: Path) -> None:
    """With synthetic defects the objective sees (defective image, clean target) pairs."""
    from data.folder import ImageDataset, discover
    from data.preprocess import Preprocess
    from data.synthetic import DefectSynthesizer, SyntheticDefectDataset

    ds = SyntheticDefectDataset(ImageDataset(discover(mvtec_dir).train, Preprocess(32)), DefectSynthesizer(p_defect=1.0))
    item = ds[0]
    assert item["mask"].sum() > 0 and not np.array_equal(item["image"], item["target"])
    cfg = TrainConfig(data=str(mvtec_dir), out=str(tmp_path / "run"), image_size=32, epochs=1, batch_size=4,
                      synthetic_defects=0.5, model_kwargs={"latent_dim": 8, "base_channels": 8})
    assert train(cfg).epochs_done == 1
    # DRAEM-style fills from a folder of other images; the folder is recorded with the run
    sources = tmp_path / "sources"
    sources.mkdir()
    cv2.imwrite(str(sources / "a.png"), (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    cfg2 = TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "run2"), "defect_sources": str(sources)})
    assert train(cfg2).epochs_done == 1
    assert TrainConfig.load(tmp_path / "run2" / "config.json").defect_sources == str(sources)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "run3"), "defect_sources": str(tmp_path / "nope")}))
    assert not (tmp_path / "run3").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="synthetic_defects"):
        TrainConfig(data=str(mvtec_dir), defect_sources=str(sources))


def test_config_lr_overrides_objective_and_zero_is_honoured(mvtec_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(mvtec_dir), out=str(tmp_path / "run"), image_size=32, epochs=1, batch_size=4, lr=0.0,
                      augment="none", model_kwargs={"latent_dim": 8, "base_channels": 8})
    torch.manual_seed(cfg.seed)
    train(cfg)
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model_state"]
    torch.manual_seed(cfg.seed)
    init = create_model("aae", in_channels=1, image_size=32, latent_dim=8, base_channels=8).state_dict()
    weights = [k for k in init if k.endswith("weight")]
    assert weights and all(torch.equal(init[k], trained[k]) for k in weights)


def test_segmenter_learns_to_localise_synthetic_defects(tmp_path: Path) -> None:
    """DRAEM's segmenter step (``S``) alone, on the no-target fallback's rectangles: pixel AUROC of its
    map on held-out corrupted images goes from chance to > 0.85 in 300 steps
    (measured 0.50 -> 0.95; 0.87 after 150 steps)."""
    from sklearn.metrics import roc_auc_score

    from training.objectives.cyclegan import corrupt

    torch.manual_seed(0)
    model = create_model("cyclegan", in_channels=1, image_size=32, generator="unet", base_channels=8,
                         disc_channels=8, segmenter=True, segmenter_channels=8)
    objective = create_objective("cyclegan", model)
    assert [s.name for s in objective.steps] == ["G", "D", "S"]
    trainer = Trainer(objective, out_dir=tmp_path, epochs=1, device="cpu")
    trainer.steps = tuple(s for s in objective.steps if s.name == "S")
    test_x, test_mask = corrupt(_batch(16)["image"], return_mask=True)

    def auroc() -> float:
        model.eval()
        with torch.no_grad():
            prob = model.defect_map(test_x, model(test_x))
        model.train()
        return roc_auc_score(test_mask.flatten().numpy(), prob.flatten().numpy())

    assert auroc() < 0.6
    for i in range(300):
        g = torch.Generator().manual_seed(100 + i)
        logs = trainer.train_batch({"image": (_batch()["image"] + 0.05 * torch.randn(8, 1, 32, 32, generator=g)).clamp(0, 1)})
    assert set(logs) == {"S"}
    after = auroc()
    assert after > 0.85, after
    # with a repair target the objective needs the synthetic mask
    with pytest.raises(ValueError, match="mask"):
        objective.loss("S", {"image": test_x, "target": test_x})


def test_focal_loss_is_bce_at_gamma_zero_and_discounts_easy_pixels() -> None:
    from torch.nn import functional as F

    from training.losses import focal_loss

    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 1, 8, 8, generator=g) * 0.98 + 0.01
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    torch.testing.assert_close(focal_loss(prob, target, gamma=0.0), F.binary_cross_entropy(prob, target))
    easy, hard = torch.full((1, 1, 2, 2), 0.1), torch.full((1, 1, 2, 2), 0.9)  # normal pixels (target 0)
    zero = torch.zeros(1, 1, 2, 2)
    # gamma 2 scales each pixel's BCE by (1 - p_t)^2: 0.01 for the easy pixel, 0.81 for the hard one
    torch.testing.assert_close(focal_loss(easy, zero), 0.01 * F.binary_cross_entropy(easy, zero))
    torch.testing.assert_close(focal_loss(hard, zero), 0.81 * F.binary_cross_entropy(hard, zero))
