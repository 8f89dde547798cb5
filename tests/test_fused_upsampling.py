"""loss.fused_upsampling: models hand the loss feature-resolution training logits and the loss
upsamples them, giving the same training step as upsampling in the model while saving no
full-resolution tensor; eval outputs stay input-size."""

from __future__ import annotations

import pytest
import torch

from leanseg.config import load_config
from leanseg.engine.dry_run import GeneratedDataset
from leanseg.engine.trainer import Trainer
from leanseg.methods import backrazor

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [
    "data.workers=0",
    "train.loggers=[]",
    "train.sample_images=0",
    "data.batch_size=2",
    "data.crop_size=48",
    "train.precision=fp32",
    "train.channels_last=false",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.warmup_iters=0",
]
MODELS = {
    "deeplabv3plus": ["model.options.width_mult=0.25", "model.options.channels=16"],
    "pspnet_aux": [
        "model.name=pspnet50",
        "model.aux=true",
        "model.options.width_mult=0.125",
    ],
    "fasterseg_ohem": [
        "model.name=fasterseg_student",
        "model.aux=true",
        "model.options.width_mult=0.25",
        "loss.name=ohem",
        "loss.ohem_min_kept=1000",
        "loss.weights={out: 1.0, aux16: 0.2, aux32: 0.2}",
    ],
}


def _trainer(tmp_path, overrides: list[str], fused: bool) -> Trainer:
    cfg = load_config(None, [*RUN, *overrides, f"loss.fused_upsampling={str(fused).lower()}"])
    shape = dict(size=(48, 48), num_classes=7)
    datasets = GeneratedDataset(4, **shape), GeneratedDataset(2, **shape)
    return Trainer(cfg, tmp_path, progress=False, datasets=datasets)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 48, 48, generator=generator)
    masks = torch.randint(0, 7, (2, 48, 48), generator=generator)
    masks[:, :5] = 255  # some ignored pixels
    return images, masks


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fused_training_step_equals_upsampling_in_the_model(name, tmp_path):
    images, masks = _batch()
    trainers = {fused: _trainer(tmp_path, MODELS[name], fused) for fused in (False, True)}
    losses = {}
    for fused, trainer in trainers.items():
        torch.manual_seed(0)  # the same dropout masks
        losses[fused] = trainer.train_step(images, masks)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    plain, fused = (t.model.state_dict() for t in trainers.values())
    for key, value in plain.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=1e-6, msg=key)
    model = trainers[True].model
    with torch.no_grad():
        outputs = model.train()(images)
        assert all(o.shape[-1] < 48 for o in outputs.values())  # training: feature resolution
        assert model.eval()(images)["out"].shape[-2:] == (48, 48)  # eval: input size


def test_fused_upsampling_saves_no_full_resolution_tensor(tmp_path):
    images, masks = _batch()
    saved = {}
    for fused in (False, True):
        trainer = _trainer(tmp_path, MODELS["deeplabv3plus"], fused)
        trainer.model.train()

        def step(trainer=trainer):
            outputs = trainer.net(images)
            return trainer.criterion(outputs["out"].float(), masks, ignore_index=255)

        saved[fused] = backrazor.saved_tensor_bytes(step, exclude_parameters=True)
    full_resolution = 2 * 7 * 48 * 48 * 4  # the log-probabilities of one output, fp32
    assert saved[False] - saved[True] >= full_resolution


def test_distillation_keeps_input_size_logits(tmp_path):
    cfg = load_config(None, [*RUN, *MODELS["deeplabv3plus"]])
    from leanseg.engine.objective import loss_upsamples

    assert loss_upsamples(cfg)
    cfg.distill.teacher = "teacher.pt"
    assert not loss_upsamples(cfg)
