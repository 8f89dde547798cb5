"""loss.name = ce | ohem | dice | focal | ce+dice, loss.class_weights, loss.focal_gamma and
loss.dice_weight: each loss against a direct reference computation, ignore pixels, the fused
upsampling path against upsampling first, bf16 autocast, aux outputs and the config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanseg.config import load_config
from leanseg.engine.dry_run import GeneratedDataset
from leanseg.engine.losses import dice_loss, focal_loss, segmentation_loss
from leanseg.engine.objective import loss_criterion
from leanseg.engine.trainer import Trainer
from leanseg.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

C, IGNORE = 5, 255
WEIGHTS = [0.5, 2.0, 1.0, 0.0, 3.0]
NEW_LOSSES = ["dice", "focal", "ce+dice"]


def _data(seed: int = 0, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, size, size, generator=g) * 2
    target = torch.randint(0, C, (2, size, size), generator=g)
    target[:, :3] = IGNORE  # ignored rows
    target[0, 5:9, 5:9] = IGNORE
    return logits, target


def _criterion(*overrides: str, align_corners: bool = False):
    return loss_criterion(load_config(None, list(overrides)), align_corners)


def _ref_dice(logits, target, weight=None, smooth=1.0):
    """1 - weighted mean over classes of (2 |P.Y| + s) / (|P| + |Y| + s), valid pixels only."""
    prob = logits.double().softmax(1)
    valid = target != IGNORE
    dices = []
    for c in range(logits.shape[1]):
        p = prob[:, c][valid]
        y = (target[valid] == c).double()
        dices.append((2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth))
    dice = torch.stack(dices)
    w = torch.ones(len(dices), dtype=torch.float64) if weight is None else torch.tensor(weight)
    return 1 - (w.double() * dice).sum() / w.double().sum()


def _ref_focal(logits, target, gamma, weight=None):
    """sum over valid pixels of -a_t (1 - p_t)^gamma log p_t, divided by sum a_t."""
    prob = logits.double().softmax(1)
    total = norm = 0.0
    for b, i, j in (target != IGNORE).nonzero().tolist():
        t = int(target[b, i, j])
        p = prob[b, t, i, j]
        a = 1.0 if weight is None else weight[t]
        total += -a * (1 - p) ** gamma * torch.log(p)
        norm += a
    return total / norm


# ------------------------------------------------------------------ against references


def test_class_weighted_ce_equals_torch_weighted_cross_entropy():
    logits, target = _data()
    weights = ", ".join(map(str, WEIGHTS))
    crit = _criterion(f"loss.class_weights=[{weights}]")
    expected = F.cross_entropy(logits, target, weight=torch.tensor(WEIGHTS), ignore_index=IGNORE)
    torch.testing.assert_close(crit(logits, target, ignore_index=IGNORE), expected)
    plain = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert not torch.allclose(plain, expected)  # the weights do change the loss
    # feature-resolution logits: the fused upsampling CE applies the same weights
    small = logits[:, :, ::2, ::2].contiguous()
    up = F.interpolate(small, size=target.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, target, weight=torch.tensor(WEIGHTS), ignore_index=IGNORE)
    torch.testing.assert_close(crit(small, target, ignore_index=IGNORE), expected)


def test_weighted_ohem_weights_the_kept_pixels():
    logits, target = _data(1)
    weights = ", ".join(map(str, WEIGHTS))
    crit = _criterion("loss.name=ohem", "loss.ohem_min_kept=50", f"loss.class_weights=[{weights}]")
    prob = logits.softmax(1).gather(1, target.clamp(max=C - 1).unsqueeze(1)).squeeze(1)
    valid = target != IGNORE
    threshold = max(0.7, float(prob[valid].kthvalue(50).values))
    hard = torch.where(valid & (prob <= threshold), target, IGNORE)
    expected = F.cross_entropy(logits, hard, weight=torch.tensor(WEIGHTS), ignore_index=IGNORE)
    torch.testing.assert_close(crit(logits, target, ignore_index=IGNORE), expected)


def test_dice_equals_a_per_class_reference():
    logits, target = _data(2)
    got = _criterion("loss.name=dice")(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(got.double(), _ref_dice(logits, target))
    weighted = dice_loss(logits, target, ignore_index=IGNORE, weight=torch.tensor(WEIGHTS))
    torch.testing.assert_close(weighted.double(), _ref_dice(logits, target, WEIGHTS))
    assert got.dtype == torch.float32
    absent = torch.where(target == 3, 0, target)  # class 3 absent: still in the class mean
    got = dice_loss(logits, absent, ignore_index=IGNORE)
    torch.testing.assert_close(got.double(), _ref_dice(logits, absent))


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
def test_focal_equals_the_direct_formula(gamma):
    logits, target = _data(3, size=10)
    crit = _criterion("loss.name=focal", f"loss.focal_gamma={gamma}")
    got = crit(logits, target, ignore_index=IGNORE)
    close = dict(rtol=1e-6, atol=1e-7)  # float32 against a float64 reference
    torch.testing.assert_close(got.double(), _ref_focal(logits, target, gamma), **close)
    weighted = focal_loss(
        logits, target, ignore_index=IGNORE, gamma=gamma, weight=torch.tensor(WEIGHTS)
    )
    expected = _ref_focal(logits, target, gamma, WEIGHTS)
    torch.testing.assert_close(weighted.double(), expected, **close)
    if gamma == 0:  # focal with gamma 0 is cross-entropy
        torch.testing.assert_close(got, F.cross_entropy(logits, target, ignore_index=IGNORE))


def test_ce_plus_dice_is_their_weighted_sum():
    logits, target = _data(4)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    dice = _criterion("loss.name=dice")(logits, target, ignore_index=IGNORE)
    both = _criterion("loss.name=ce+dice")(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(both, ce + dice)
    half = _criterion("loss.name=ce+dice", "loss.dice_weight=0.5")
    torch.testing.assert_close(half(logits, target, ignore_index=IGNORE), ce + 0.5 * dice)


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_ignored_pixels_get_no_gradient_and_all_ignored_is_zero(name):
    """(All ignored: zero for dice and focal; ce+dice keeps plain CE's behaviour there, which
    is torch's NaN, unless class weights are given.)"""
    logits, target = _data(5)
    logits.requires_grad_(True)
    crit = _criterion(f"loss.name={name}")
    crit(logits, target, ignore_index=IGNORE).backward()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().max() > 0
    # changing the logits of ignored pixels changes nothing
    other = logits.detach().clone()
    other[ignored] = torch.randn(int(ignored.sum()))
    torch.testing.assert_close(
        crit(other, target, ignore_index=IGNORE), crit(logits.detach(), target, ignore_index=IGNORE)
    )
    nothing = torch.full_like(target, IGNORE)
    if name == "ce+dice":
        crit = _criterion(f"loss.name={name}", "loss.class_weights=[1, 1, 1, 1, 1]")
    zero = crit(logits, nothing, ignore_index=IGNORE)
    assert zero.item() == 0 and zero.requires_grad


# ------------------------------------------------------------------ fused upsampling, autocast


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("name", ["ce", "ohem", *NEW_LOSSES])
def test_fused_upsampling_equals_upsampling_first(name, align_corners):
    """The criterion given feature-resolution logits = the criterion of the logits upsampled
    as the model upsamples them (value and gradient), with class weights."""
    weights = ", ".join(map(str, WEIGHTS))
    crit = _criterion(
        f"loss.name={name}",
        "loss.ohem_min_kept=300",
        f"loss.class_weights=[{weights}]",
        align_corners=align_corners,
    )
    _, target = _data(6, size=32)
    small = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(7)) * 2
    fused_in, plain_in = small.clone().requires_grad_(True), small.clone().requires_grad_(True)
    fused = crit(fused_in, target, ignore_index=IGNORE)
    up = F.interpolate(plain_in, size=(32, 32), mode="bilinear", align_corners=align_corners)
    plain = crit(up, target, ignore_index=IGNORE)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_bf16_autocast_logits_give_a_float32_loss(name):
    logits, target = _data(8)
    crit = _criterion(f"loss.name={name}")
    reference = crit(logits.bfloat16().float(), target, ignore_index=IGNORE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(logits.bfloat16()[:, :, ::2, ::2], target, ignore_index=IGNORE)
        full = crit(logits.bfloat16(), target, ignore_index=IGNORE)
    assert got.dtype == full.dtype == torch.float32
    torch.testing.assert_close(full, reference)


def test_aux_outputs_are_summed_with_their_weights():
    logits, target = _data(9)
    aux = logits.flip(1)
    crit = _criterion("loss.name=ce+dice")
    total = segmentation_loss(
        {"out": logits, "aux": aux[:, :, ::4, ::4]},
        target,
        ignore_index=IGNORE,
        weights={"out": 1.0, "aux": 0.4},
        criterion=crit,
    )
    expected = crit(logits, target, ignore_index=IGNORE) + 0.4 * crit(
        aux[:, :, ::4, ::4], target, ignore_index=IGNORE
    )
    torch.testing.assert_close(total, expected)


RUN = [
    "data.workers=0",
    "train.loggers=[]",
    "train.sample_images=0",
    "data.batch_size=2",
    "data.crop_size=32",
    "train.precision=fp32",
    "train.channels_last=false",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.warmup_iters=0",
    "model.options.width_mult=0.25",
    "model.options.channels=16",
    "loss.class_weights=[1, 2, 0.5, 1, 1, 3, 1]",
]


@pytest.mark.parametrize("name", ["focal", "ce+dice"])
def test_a_fused_training_step_equals_model_upsampling(name, tmp_path):
    """A whole Trainer step (DeepLabV3+, its own upsampling) with and without fusion."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    masks = torch.randint(0, 7, (2, 32, 32), generator=generator)
    masks[:, :4] = IGNORE
    losses, states = {}, {}
    for fused in (False, True):
        cfg = load_config(None, [*RUN, f"loss.name={name}", f"loss.fused_upsampling={fused}"])
        shape = dict(size=(32, 32), num_classes=7)
        datasets = GeneratedDataset(2, **shape), GeneratedDataset(1, **shape)
        trainer = Trainer(cfg, tmp_path, progress=False, datasets=datasets)
        torch.manual_seed(0)
        losses[fused] = trainer.train_step(images, masks)
        states[fused] = trainer.model.state_dict()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------ config errors


def test_class_weights_of_the_wrong_length_is_a_one_line_error():
    cfg = load_config(None, ["loss.class_weights=[1, 2, 3]"])
    with pytest.raises(ConfigError) as info:
        loss_criterion(cfg, num_classes=7)
    message = str(info.value)
    assert "\n" not in message
    assert "'loss.class_weights'" in message and "3 weights for 7 classes" in message
    assert "give one weight per class" in message
    crit = loss_criterion(cfg)  # the class count unknown yet: checked at the first call
    logits, target = _data()
    with pytest.raises(ConfigError, match="3 weights for 5 classes"):
        crit(logits, target, ignore_index=IGNORE)
    loss_criterion(cfg, num_classes=3)  # the right count passes


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.class_weights=[1, -1]"], "'loss.class_weights[1]': must be >= 0"),
        (["loss.name=tversky"], "'loss.name': 'tversky' is not one of"),
        (["loss.focal_gamma=-1"], "'loss.focal_gamma': must be >= 0"),
        (["loss.dice_weight=-0.5"], "'loss.dice_weight': must be >= 0"),
    ],
)
def test_bad_loss_keys_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)
