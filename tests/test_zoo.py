"""Registry-parametrized tests of the model zoo: every model in ``list_models()`` (plus a few
variants) gets forward shapes, determinism, per-step gradient isolation, per-step progress,
checkpoint round-trip, ONNX parity of the exported scoring graph, and a sample grid.

Models are tiny (width 8, 32x32, batch 4) so the file runs in about a minute on one core.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from anomaly.registry import create_model, get_spec, list_models
from anomaly.scoring import ReconstructionScorer, Scorer
from anomaly.training.objectives import create_objective

SIZE = 32
BATCH = 4
NUM_CLASSES = 3

# Tiny widths per family; a model missing here gets only ``base_channels=8`` (or nothing).
TINY: dict[str, dict] = {
    "ae": dict(base_channels=8, latent_dim=16),
    "vae": dict(base_channels=8, latent_dim=16),
    "cvae": dict(base_channels=8, latent_dim=16, num_classes=NUM_CLASSES),
    "aae": dict(base_channels=8, latent_dim=16, disc_hidden=32),
    "cond_aae": dict(base_channels=8, latent_dim=16, disc_hidden=32, num_classes=NUM_CLASSES),
    "gan": dict(latent_dim=16, hidden_dim=32),
    "dcgan": dict(base_channels=8, latent_dim=16),
    "cgan": dict(base_channels=8, latent_dim=16, num_classes=NUM_CLASSES),
    "infogan": dict(base_channels=8, latent_dim=8, n_categorical=4, n_continuous=2, q_hidden=16),
    "cyclegan": dict(base_channels=8, disc_channels=8, n_blocks=1),
}

# (model name, extra model kwargs, objective kwargs): the registry, plus variants worth covering.
CASES = [(name, {}, {}) for name in list_models()] + [
    ("cyclegan", {"generator": "unet"}, {}),
    ("cyclegan", {"generator": "unet", "segmenter": True, "segmenter_channels": 8}, {}),  # DRAEM-style segmenter
    # the segmenter reading |x - x_hat| too, trained jointly with the repair
    ("cyclegan", {"generator": "unet", "segmenter": True, "segmenter_channels": 8, "segmenter_input": "pair_diff"},
     {"lambda_seg": 1.0}),
    ("cgan", {"arch": "mlp", "hidden_dim": 32}, {}),
    ("dcgan", {}, {"gan_mode": "wgan", "n_critic": 1}),
    ("ae", {}, {"recon_loss": "ssim"}),
    ("aae", {"upsample": "deconv2"}, {}),  # decoder upsampling variants (anomaly.zoo.layers.UPSAMPLES)
    ("ae", {"upsample": "nearest"}, {}),
]


# Parameters whose gradient is zero by construction in a case: the WGAN critic loss
# E[D(fake)] - E[D(real)] (and its gradient penalty) is invariant to a constant added to D's output.
ZERO_GRAD_OK = {"dcgan-gan_mode=wgan-n_critic=1": {("D", "discriminator.head.bias")}}


def _case_id(case) -> str:
    name, extra, obj = case
    return "-".join([name, *(f"{k}={v}" for k, v in {**extra, **obj}.items())])


def _build(name: str, extra: dict | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "image_size": SIZE, **TINY.get(name, {"base_channels": 8}), **(extra or {})}
    return create_model(name, **kwargs)


def _batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish images in [0, 1] so reconstructions have structure to learn.
    base = torch.rand(BATCH, 1, SIZE // 4, SIZE // 4, generator=g)
    x = torch.nn.functional.interpolate(base, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    batch = {"image": x}
    if get_spec(name).conditional:
        batch["label"] = torch.arange(BATCH) % NUM_CLASSES
    return batch


def _cond(name: str, batch: dict) -> torch.Tensor | None:
    return batch.get("label") if get_spec(name).conditional else None


def _set_trainable(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """As the trainer does: only the step's group requires grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def _seeded_loss(objective, step: str, batch: dict) -> torch.Tensor:
    torch.manual_seed(123)  # same noise / prior samples / corruptions at every evaluation
    return objective.loss(step, batch)[0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_shape_and_range(case):
    name, extra, _ = case
    model = _build(name, extra)
    batch = _batch(name)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            x_hat = model(batch["image"], _cond(name, batch))
        assert x_hat.shape == batch["image"].shape
        assert torch.isfinite(x_hat).all()
        assert x_hat.min() >= 0 and x_hat.max() <= 1


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("name", list_models())
def test_other_sizes_and_rgb(name, size):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, image_size=size, **TINY.get(name, {"base_channels": 8})).eval()
    x = torch.rand(2, 3, size, size)
    cond = torch.tensor([0, 1]) if get_spec(name).conditional else None
    with torch.no_grad():
        assert model(x, cond).shape == x.shape


def test_defaults_build():
    """``create_model(name, in_channels=1, image_size=32)`` works for every registered model."""
    for name in list_models():
        model = create_model(name, in_channels=1, image_size=32).eval()
        cond = torch.zeros(2, dtype=torch.long) if get_spec(name).conditional else None
        with torch.no_grad():
            assert model(torch.rand(2, 1, 32, 32), cond).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_eval_is_deterministic(case):
    name, extra, _ = case
    model = _build(name, extra).eval()
    batch = _batch(name)
    with torch.no_grad():
        a = model(batch["image"], _cond(name, batch))
        torch.manual_seed(999)
        b = model(batch["image"], _cond(name, batch))
    assert torch.equal(a, b)


def test_unknown_upsample_is_refused():
    with pytest.raises(ValueError, match="unknown upsample 'bicubic'"):
        _build("aae", {"upsample": "bicubic"})


def test_conditional_models_need_a_label():
    for name in list_models():
        if get_spec(name).conditional:
            model = _build(name).eval()
            with pytest.raises(ValueError, match="cond"):
                model(_batch(name)["image"])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_step_updates_only_its_group(case):
    name, extra, obj_kwargs = case
    model = _build(name, extra).train()
    objective = create_objective(get_spec(name).objective, model, **obj_kwargs)
    batch = _batch(name)
    assert objective.steps, "an objective must declare steps"
    for step in objective.steps:
        group = objective.parameters(step)
        assert group, f"step {step.name} updates no parameters"
        in_group = {id(p) for p in group}
        model.zero_grad(set_to_none=True)
        _set_trainable(model, group)
        loss, logs = objective.loss(step.name, batch)
        assert loss.dim() == 0 and torch.isfinite(loss), step.name
        assert all(isinstance(v, float) for v in logs.values()), logs
        loss.backward()
        names = {id(p): n for n, p in model.named_parameters()}
        for p in group:
            assert p.grad is not None, f"{step.name}: {names[id(p)]} got no gradient"
            if (step.name, names[id(p)]) not in ZERO_GRAD_OK.get(_case_id(case), ()):
                assert p.grad.abs().sum() > 0, f"{step.name}: {names[id(p)]} got a zero gradient"
        for p in model.parameters():
            if id(p) not in in_group:
                assert p.grad is None, f"{step.name}: {names[id(p)]} is outside the group but got a gradient"
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.optim.Adam(group, lr=1e-3, betas=step.betas).step()
        changed = False
        for n, p in model.named_parameters():
            if id(p) in in_group:
                changed |= not torch.equal(p, before[n])
            else:
                assert torch.equal(p, before[n]), f"{step.name}: {n} changed but is not in the step's group"
        assert changed, f"{step.name}: no parameter of its group changed"
    for p in model.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_step_lowers_its_loss(case):
    """Training one step's group alone on a fixed batch (fixed noise) lowers that step's loss:
    the reconstruction for AE-like steps, D's loss with G fixed, G's loss with D fixed, E's izif loss."""
    name, extra, obj_kwargs = case
    template = _build(name, extra).train()
    batch = _batch(name)
    for step in create_objective(get_spec(name).objective, template, **obj_kwargs).steps:
        model = copy.deepcopy(template)
        objective = create_objective(get_spec(name).objective, model, **obj_kwargs)
        group = objective.parameters(step)
        _set_trainable(model, group)
        opt = torch.optim.Adam(group, lr=1e-3, betas=step.betas)
        start = _seeded_loss(objective, step.name, batch).item()
        for _ in range(8):
            opt.zero_grad(set_to_none=True)
            _seeded_loss(objective, step.name, batch).backward()
            opt.step()
        end = _seeded_loss(objective, step.name, batch).item()
        assert end < start, f"{name} step {step.name}: loss {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_checkpoint_round_trip(case, tmp_path):
    name, extra, obj_kwargs = case
    model = _build(name, extra).train()
    objective = create_objective(get_spec(name).objective, model, **obj_kwargs)
    batch = _batch(name)
    for step in objective.steps:  # one update per step, so weights and BN statistics move
        group = objective.parameters(step)
        _set_trainable(model, group)
        opt = torch.optim.Adam(group, lr=1e-3)
        objective.loss(step.name, batch)[0].backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = _build(name, extra, seed=1)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(batch["image"], _cond(name, batch)), fresh(batch["image"], _cond(name, batch)))


def _export(graph: torch.nn.Module, path, example: torch.Tensor, conditional: bool) -> None:
    """The deployment path (``anomaly.deploy.export.export_onnx``: dynamo, dynamic batch) when present;
    otherwise the legacy exporter with a dynamic batch axis."""
    try:
        from anomaly.deploy.export import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        export_onnx(graph, path, example, conditional)
        return
    names = ["image", "label"] if conditional else ["image"]
    args = (example, torch.zeros(example.shape[0], dtype=torch.int64)) if conditional else (example,)
    torch.onnx.export(graph, args, str(path), opset_version=17, dynamo=False, input_names=names,
                      output_names=["anomaly_map", "score", "reconstruction"],
                      dynamic_axes={n: {0: "batch"} for n in names})


# Objective-only variants export the same graph as their base case.
ONNX_CASES = [c for c in CASES if not c[2]]


@pytest.mark.parametrize("case", ONNX_CASES, ids=_case_id)
def test_onnx_parity(case, tmp_path):
    """torch and onnxruntime agree (max abs diff < 1e-4) on every output, at a batch size other
    than the one exported with. Models with a segmenter export its learned map."""
    ort = pytest.importorskip("onnxruntime")
    name, extra, _ = case
    model = _build(name, extra).eval()
    residual = "learned" if hasattr(model, "segmenter") else "l1"
    graph = ReconstructionScorer(model, Scorer(residual=residual, smoothing_sigma=1.0, aggregate="max",
                                               image_size=(SIZE, SIZE))).eval()
    conditional = get_spec(name).conditional
    _export(graph, tmp_path / "model.onnx", _batch(name, seed=5)["image"], conditional)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _batch(name, seed=6)["image"][:3]
    args = (x, torch.tensor([2, 0, 1])) if conditional else (x,)
    got = sess.run(None, {n: a.numpy() for n, a in zip(["image", "label"], args)})
    with torch.no_grad():
        want = graph(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list_models())
def test_sample_grid(name, tmp_path):
    from anomaly.training.generative import generate_samples, save_sample_grid

    model = _build(name).train()
    images = _batch(name)["image"]
    path = save_sample_grid(model, tmp_path / "grid.png", n=6, images=images)
    assert path.is_file() and path.stat().st_size > 0
    assert model.training, "sampling must restore the model's mode"
    samples = generate_samples(model, n=6, images=images)
    assert samples.shape[1:] == (1, SIZE, SIZE) and samples.shape[0] in (6, 2 * BATCH)


@pytest.mark.parametrize("name", [n for n in list_models() if n in ("gan", "dcgan", "cgan", "infogan", "vae", "cvae")])
def test_sample_method(name):
    model = _build(name).eval()
    cond = torch.tensor([0, 1]) if get_spec(name).conditional else None
    out = model.sample(2, cond)
    assert out.shape == (2, 1, SIZE, SIZE)
