"""The trainer loop and the AAE objective on real (generated) images."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomaly.registry import create_model
from anomaly.training.config import AUGMENTS, TrainConfig
from anomaly.training.objectives import create_objective
from anomaly.training.run import _AUGMENT_FNS, flip_rot90_augment, split_normals, train
from anomaly.training.trainer import Trainer, load_checkpoint


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
    from anomaly.data.folder import discover

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
    from anomaly.data.folder import ImageDataset, discover
    from anomaly.data.preprocess import Preprocess
    from anomaly.data.synthetic import DefectSynthesizer, SyntheticDefectDataset

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


def test_lr_decay_follows_cyclegans_schedule_and_resumes_from_the_base_rate(mvtec_dir: Path, tmp_path: Path) -> None:
    def last_lrs() -> list[float]:
        opts = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["optimizers"]
        return [g["lr"] for name in sorted(opts) for g in opts[name]["param_groups"]]

    cfg = TrainConfig(data=str(mvtec_dir), out=str(tmp_path / "run"), image_size=32, epochs=3, batch_size=4,
                      lr_decay_from=0.5, model_kwargs={"latent_dim": 8, "base_channels": 8})
    train(cfg)
    first = last_lrs()  # decay from epoch round(1.5) = 2: the third and last epoch ran at 1 - 1/2 of the base
    cfg.epochs = 4
    train(cfg, resume=True)
    second = last_lrs()  # now the fourth epoch ran at 1 - 2/3: from the base rate, not the saved (halved) one
    assert len(first) == len(second) >= 3
    assert all(b / a == pytest.approx((1 / 3) / (1 / 2)) for a, b in zip(first, second))
    t = Trainer(create_objective("aae", create_model("aae", in_channels=1, image_size=32, latent_dim=8, base_channels=8)),
                out_dir=tmp_path / "t", epochs=30, lr_decay_from=0.5, device="cpu")
    factors = [t.lr_factor(e) for e in range(30)]
    assert factors[:15] == [1.0] * 15 and factors[15] == pytest.approx(15 / 16) and factors[-1] == pytest.approx(1 / 16)
    assert all(a > b for a, b in zip(factors[14:], factors[15:]))
    with pytest.raises(ValueError, match="lr_decay_from"):
        TrainConfig(data=str(mvtec_dir), lr_decay_from=1.0)


def test_flip_rot90_augment_draws_the_eight_orientations_evenly() -> None:
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)  # two channels must move together
    counts = {np.ascontiguousarray(np.rot90(m, k, axes=(1, 2))).tobytes(): 0
              for m in (image, image[:, :, ::-1]) for k in range(4)}
    assert len(counts) == 8
    rng = np.random.default_rng(0)
    for _ in range(4000):  # a KeyError means an output that is no symmetry of the square
        counts[np.ascontiguousarray(flip_rot90_augment(image, rng)).tobytes()] += 1
    assert all(400 < n < 600 for n in counts.values()), counts  # 500 each expected, sd 21
    with pytest.raises(ValueError, match="square"):
        flip_rot90_augment(np.zeros((1, 4, 6), np.float32), rng)
    with pytest.raises(ValueError, match="flip_rot90"):
        TrainConfig(data="unused", augment="rot90")
    assert sorted(_AUGMENT_FNS) == sorted(AUGMENTS)  # every value the config accepts has its function


def test_segmenter_learns_to_localise_synthetic_defects(tmp_path: Path) -> None:
    """DRAEM's segmenter step (``S``) alone, on the no-target fallback's rectangles: pixel AUROC of its
    map on held-out corrupted images goes from chance to > 0.85 in 300 steps
    (measured 0.50 -> 0.95; 0.87 after 150 steps)."""
    from sklearn.metrics import roc_auc_score

    from anomaly.training.objectives.cyclegan import corrupt

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


def test_joint_segmenter_loss_trains_the_repair_generator() -> None:
    """``lambda_seg``: the generators' step adds ``lambda_seg * Focal(S(cat[A, G_r(A)]), M)``, and its
    gradient reaches the repair generator through the (frozen) segmenter."""
    from anomaly.training.losses import focal_loss
    from anomaly.training.objectives.cyclegan import corrupt

    kw = dict(in_channels=1, image_size=32, generator="unet", base_channels=8, disc_channels=8)
    with pytest.raises(ValueError, match="needs a model with a segmenter"):
        create_objective("cyclegan", create_model("cyclegan", **kw), lambda_seg=1.0)
    with pytest.raises(ValueError, match="lambda_seg"):
        create_objective("cyclegan", create_model("cyclegan", segmenter=True, **kw), lambda_seg=-1.0)
    torch.manual_seed(0)
    model = create_model("cyclegan", segmenter=True, segmenter_channels=8, **kw)
    clean = _batch(4)["image"]
    image, mask = corrupt(clean, return_mask=True)
    batch = {"image": image, "target": clean, "mask": mask}
    plain, joint = create_objective("cyclegan", model), create_objective("cyclegan", model, lambda_seg=10.0)
    loss0, logs0 = plain.loss("G", batch)
    loss1, logs1 = joint.loss("G", batch)
    want_seg = focal_loss(model.defect_map(image, model.generator_repair(image)), mask)
    assert "G_seg" not in logs0 and logs1["G_seg"] == pytest.approx(want_seg.item(), rel=1e-5)
    torch.testing.assert_close(loss1, loss0 + 10.0 * want_seg)
    # the focal term alone moves the repair generator's weights
    model.zero_grad()
    (loss1 - loss0).backward()
    grads = [p.grad for p in model.generator_repair.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match="mask"):
        joint.loss("G", {"image": image, "target": clean})


def test_repair_epochs_leave_later_epochs_to_the_segmenter(tmp_path: Path) -> None:
    """``repair_epochs=1``: epoch 1 trains G, D and S; epoch 2 trains S alone (``Step.until_epoch``)."""
    kw = dict(in_channels=1, image_size=32, generator="unet", base_channels=8, disc_channels=8)
    with pytest.raises(ValueError, match="repair_epochs"):
        create_objective("cyclegan", create_model("cyclegan", **kw), repair_epochs=1)
    with pytest.raises(ValueError, match="repair_epochs"):
        create_objective("cyclegan", create_model("cyclegan", segmenter=True, **kw), repair_epochs=0)
    torch.manual_seed(0)
    model = create_model("cyclegan", segmenter=True, segmenter_channels=8, **kw)
    objective = create_objective("cyclegan", model, repair_epochs=1)
    trainer = Trainer(objective, out_dir=tmp_path, epochs=2, device="cpu")
    batches = [_batch(4)] * 2

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}

    def changed(a: dict, b: dict, prefix: str) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    start = snapshot()
    trainer.fit(batches, val_loader=[_batch(4)])
    assert trainer.epoch == 2
    # losses.csv: epoch 1 logs every step; epoch 2 only the segmenter's
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["G"] and rows[0]["D"] and rows[0]["S"]
    assert not rows[1]["G"] and not rows[1]["D"] and rows[1]["S"]
    # a second fit of one more epoch moves the segmenter only
    after_two = snapshot()
    assert changed(start, after_two, "generator_repair") and changed(start, after_two, "segmenter")
    trainer.epochs = 3
    trainer.fit(batches, val_loader=[_batch(4)])
    after_three = snapshot()
    for name in ("generator_repair", "generator_defect", "discriminator_normal", "discriminator_defect"):
        assert not changed(after_two, after_three, name), name
    assert changed(after_two, after_three, "segmenter")
    # the validation error cannot rank the segmenter-only epochs: best.pt is the latest state
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model_state"]
    assert all(torch.equal(best[k], v) for k, v in after_three.items())


def test_focal_loss_is_bce_at_gamma_zero_and_discounts_easy_pixels() -> None:
    from torch.nn import functional as F

    from anomaly.training.losses import focal_loss

    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 1, 8, 8, generator=g) * 0.98 + 0.01
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.8).float()
    torch.testing.assert_close(focal_loss(prob, target, gamma=0.0), F.binary_cross_entropy(prob, target))
    easy, hard = torch.full((1, 1, 2, 2), 0.1), torch.full((1, 1, 2, 2), 0.9)  # normal pixels (target 0)
    zero = torch.zeros(1, 1, 2, 2)
    # gamma 2 scales each pixel's BCE by (1 - p_t)^2: 0.01 for the easy pixel, 0.81 for the hard one
    torch.testing.assert_close(focal_loss(easy, zero), 0.01 * F.binary_cross_entropy(easy, zero))
    torch.testing.assert_close(focal_loss(hard, zero), 0.81 * F.binary_cross_entropy(hard, zero))


def test_resume_keeps_the_recorded_split_refuses_other_settings_and_draws_as_uninterrupted(
        mvtec_dir: Path, tmp_path: Path) -> None:
    """Two epochs, or one then a resume to two, give bit-identical weights (the loader's shuffling,
    torch's, NumPy's and Python's random states come back from the checkpoint); images added in
    between stay out of the recorded split; a changed setting is refused by name."""
    import json
    import shutil

    from anomaly.training.run import ResumeError

    kw = dict(data=str(mvtec_dir), image_size=32, batch_size=4, augment="none",
              model_kwargs={"latent_dim": 8, "base_channels": 8})
    train(TrainConfig(out=str(tmp_path / "full"), epochs=2, **kw))
    cfg = TrainConfig(out=str(tmp_path / "res"), epochs=1, **kw)
    train(cfg)
    split = (tmp_path / "res" / "split.json").read_bytes()
    shutil.copy(mvtec_dir / "train" / "good" / "000.png", mvtec_dir / "train" / "good" / "new.png")
    with pytest.raises(ResumeError, match=r"batch_size 4 -> 8; lr None -> 0\.001\. Only epochs, max_minutes, device may change"):
        train(TrainConfig(**{**cfg.to_dict(), "lr": 1e-3, "batch_size": 8}), resume=True)
    cfg.epochs = 2  # the budget may change
    train(cfg, resume=True)
    assert (tmp_path / "res" / "split.json").read_bytes() == split  # not recomputed from the folder
    assert not any("new.png" in p for p in json.loads(split)["train"] + json.loads(split)["val"])
    assert TrainConfig.load(tmp_path / "res" / "config.json").epochs == 2
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model_state"]
    resumed = load_checkpoint(tmp_path / "res" / "checkpoints" / "last.pt")["model_state"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_checkpoints_load_with_weights_only_and_other_pickles_are_refused(tmp_path: Path, capsys) -> None:
    """A checkpoint holding an arbitrary object (unpickling one can run code) is refused with a
    clear error, by the loader and by `anomaly export`; what the trainer writes loads."""
    import argparse

    from anomaly.cli import main
    from anomaly.training.trainer import CheckpointError, rng_state, save_checkpoint

    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model_state": {"w": torch.zeros(2)}, "config": {"lr": None}, "rng": rng_state(
        {"loader": torch.Generator().manual_seed(1)})})
    assert load_checkpoint(good)["rng"]["generators"]["loader"].dtype == torch.uint8
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model_state": {}, "config": argparse.Namespace(lr=1)}, run / "checkpoints" / "best.pt")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*Namespace"):
        load_checkpoint(run / "checkpoints" / "best.pt")
    (run / "checkpoints" / "last.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "could run code" in capsys.readouterr().err


def test_image_cache_holds_the_source_pixel_type_within_a_size_limit(mvtec_dir: Path, caplog) -> None:
    """8-bit images are cached as uint8 (a quarter of float32) and served as float32 within half a
    grey level of the uncached preprocessing; past ``cache_bytes`` images are read again, logged once."""
    import logging

    from anomaly.data.folder import ImageDataset, discover
    from anomaly.data.preprocess import Preprocess

    samples, pre = discover(mvtec_dir).train, Preprocess(32, 1)
    plain, cached = ImageDataset(samples, pre), ImageDataset(samples, pre, cache=True)
    for _ in range(2):  # the second pass reads from the cache
        for i in range(len(samples)):
            got = cached[i]["image"]
            assert got.dtype == np.float32 and np.abs(got - plain[i]["image"]).max() <= 0.5 / 255 + 1e-7
    assert cached.cached_bytes == len(samples) * 32 * 32  # one byte per pixel
    assert all(a.dtype == np.uint8 for a in cached._cached.values())
    with caplog.at_level(logging.WARNING):
        small = ImageDataset(samples, pre, cache=True, cache_bytes=2 * 32 * 32)
        for i in list(range(len(samples))) * 2:
            small[i]
    assert small.cached_bytes == 2 * 32 * 32
    assert [r.getMessage() for r in caplog.records if "cache full" in r.getMessage()][0].startswith("image cache full at 2 of")
    assert len([r for r in caplog.records if "cache full" in r.getMessage()]) == 1


def test_tensorboard_events_hold_every_step_loss_the_validation_error_lr_and_a_grid(trained_bundle: dict) -> None:
    """The shared run (AAE, 3 epochs of 2 steps, 4 validation images of 32 px) wrote TensorBoard
    events by default: each objective step's losses at every global step, per-epoch means,
    validation error and learning rates, and the inputs / reconstructions / residuals grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_bundle["run"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    steps = {"recon/recon", "D_latent/D_latent", "G_latent/G_latent"}
    assert steps | {"epoch/recon", "val/error", "lr/recon", "lr/D_latent", "lr/G_latent"} <= scalars
    for tag in steps:
        assert [e.step for e in acc.Scalars(tag)] == list(range(6))
    with open(trained_bundle["run"] / "losses.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))  # losses.csv stays, and agrees with the events
    assert [e.value for e in acc.Scalars("val/error")] == pytest.approx([float(r["val_error"]) for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr/recon")] == pytest.approx([2e-4] * 3)
    images = acc.Images("val/reconstructions")
    assert [e.step for e in images] == [1, 2, 3]
    assert (images[-1].width, images[-1].height) == (4 * 32 + 5 * 2, 3 * 32 + 4 * 2)


def test_reconstruction_grid_rows_are_inputs_reconstructions_and_scaled_residuals() -> None:
    from anomaly.training.trainer import reconstruction_grid

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_hat = x.clone()
    x_hat[1, 0, 2, 5] += 0.5
    grid = reconstruction_grid(x, x_hat.clamp(0, 1), pad=2)
    assert grid.shape == (1, 3 * 8 + 4 * 2, 3 * 8 + 4 * 2)
    tile = lambda row, i: grid[0, 2 + row * 10: 2 + row * 10 + 8, 2 + i * 10: 2 + i * 10 + 8]  # noqa: E731
    assert torch.equal(tile(0, 2), x[2, 0]) and torch.equal(tile(1, 1), x_hat.clamp(0, 1)[1, 0])
    residual = tile(2, 1)
    assert residual[2, 5] == 1.0 and residual.sum() == 1.0  # the one changed pixel, at full scale
    assert tile(2, 0).abs().sum() == 0
