"""Bring your own model: BackRazor, ACoSP + shrink, distillation and the Trainer on a UNet
defined here (skip concatenations, transposed-conv upsampling, BatchNorm, a residual block),
not on a leanseg model. docs/own_model.md states the contract these tests check."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import leanseg
from leanseg.checkpoint import load_checkpoint
from leanseg.config import load_config
from leanseg.engine.losses import distillation_loss
from leanseg.engine.teacher import freeze, teacher_logits
from leanseg.errors import ConfigError, LeansegError
from leanseg.methods import acosp, backrazor
from leanseg.methods.acosp.fold import FoldedConvTranspose2d
from leanseg.models.registry import list_models, register_builder

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_model.md"
MODEL_NAME = "test_own_unet"


# -- the user's model -----------------------------------------------------------------------
def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ResidualBlock(nn.Module):
    """A custom block: two 3x3 convs and an identity add (the add ties the channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyUNet(nn.Module):
    """Two-level UNet: encoder, bottleneck, ConvTranspose2d up-sampling, torch.cat skips."""

    def __init__(
        self, num_classes: int = 3, width: int = 8, dict_output: bool = False, up: str = "transpose"
    ) -> None:
        super().__init__()
        w = width
        self.dict_output = dict_output
        self.enc1 = nn.Sequential(conv_bn_relu(3, w), ResidualBlock(w))
        self.enc2 = nn.Sequential(conv_bn_relu(w, 2 * w), ResidualBlock(2 * w))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_bn_relu(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)  # reads BN-shifted constants
        if up == "upsample":  # the other common decoder: interpolate, then a 1x1 conv
            self.up2 = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(4 * w, 2 * w, 1)
            )
        self.dec2 = conv_bn_relu(4 * w, 2 * w)
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 2, stride=2, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.dec1 = conv_bn_relu(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)
        self.head.unprunable = True  # ACoSP: never mask the logits

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        logits = self.head(d1)
        return {"out": logits} if self.dict_output else logits


class Gate(nn.Module):
    """Data-dependent control flow: fine in eager mode, untraceable by torch.fx."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, 3, padding=1)  # masked, in a gate
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return torch.relu(y)
        return torch.relu(-y)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.gate = Gate(8)
        self.mid = conv_bn_relu(8, 8)
        self.tail = conv_bn_relu(8, 8)
        self.head = nn.Conv2d(8, 3, 1)
        self.head.unprunable = True

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.tail(self.mid(self.gate(self.stem(x)))))


class PairDataset(Dataset):
    """A user dataset: what the Trainer reads is ``__len__``, ``__getitem__`` -> (float image
    [3, H, W], int64 mask [H, W] with 255 = ignore), ``num_classes``, ``class_names`` and
    ``palette`` (num_classes x 3 uint8 colours)."""

    def __init__(self, length: int, size: int = 32, num_classes: int = 3, seed: int = 0) -> None:
        self.length, self.size, self.seed = length, size, seed
        self.num_classes = num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]
        self.palette = [[40 * i, 255 - 40 * i, 0] for i in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + index)
        image = torch.randn(3, self.size, self.size, generator=generator)
        mask = (image[0] > 0).long() + (image[1] > 0).long()  # learnable from the pixels
        mask[0] = 255
        if torch.rand(()) < 0.5:  # a random flip from the global generator, as users write it
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def build_tiny_unet(*, num_classes: int, width: int) -> nn.Module:
    return TinyUNet(num_classes, width)  # plain logits: the Trainer reads them as {"out": ...}


if MODEL_NAME not in list_models():
    register_builder(MODEL_NAME, build_tiny_unet, {"width": 8}, "TinyUNet of tests/test_own_model")


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affines, so pruned channels hold non-zero constants."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                m.weight.copy_(torch.randn(c, generator=generator))
                m.bias.copy_(torch.randn(c, generator=generator))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- BackRazor --------------------------------------------------------------------------------
def _backrazor_pair(ratio: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = TinyUNet()
    sparse = backrazor.apply(copy.deepcopy(dense), ratio, scope="all")  # no .backbone: "all"
    return dense, sparse


def _loss_and_grads(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, list[Tensor]]:
    model.train()
    out = model(x)
    F.cross_entropy(out, target).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_backrazor_replaces_the_user_layers_but_not_transposed_convs() -> None:
    dense, sparse = _backrazor_pair(0.5)
    stock = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)  # exact types are looked up
    wanted = [n for n, m in dense.named_modules() if type(m) in stock]
    rewritten = [n for n, m in sparse.named_modules() if isinstance(m, backrazor.BackRazorMixin)]
    assert len(wanted) > 20 and rewritten == wanted
    assert all(type(m) is nn.ConvTranspose2d for m in (sparse.up2, sparse.up1[0]))


def test_backrazor_on_user_unet_same_forward_exact_gradients_at_ratio_zero() -> None:
    dense, sparse = _backrazor_pair(0.0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    out_dense, grads_dense = _loss_and_grads(dense, x, target)
    out_sparse, grads_sparse = _loss_and_grads(sparse, x, target)
    assert torch.equal(out_sparse, out_dense)  # forward runs on the dense input
    for (name, _), a, b in zip(dense.named_parameters(), grads_dense, grads_sparse, strict=True):
        assert torch.equal(b, a), name  # bitwise: at R = 0 the backward sees the dense input


def test_backrazor_on_user_unet_prunes_saved_inputs_at_ratio_above_zero() -> None:
    dense, sparse = _backrazor_pair(0.7)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    out_dense, grads_dense = _loss_and_grads(dense, x, target)
    out_sparse, grads_sparse = _loss_and_grads(sparse, x, target)
    assert torch.equal(out_sparse, out_dense)
    conv = [i for i, (n, _) in enumerate(dense.named_parameters()) if n == "enc2.0.0.weight"][0]
    assert not torch.allclose(grads_sparse[conv], grads_dense[conv], rtol=1e-3, atol=1e-5)
    assert all(torch.isfinite(g).all() for g in grads_sparse)

    def forward() -> Tensor:
        return sparse(x)

    saved_sparse = backrazor.saved_tensor_bytes(forward, exclude_parameters=True)
    saved_dense = backrazor.saved_tensor_bytes(lambda: dense(x), exclude_parameters=True)
    assert saved_sparse < saved_dense


# -- ACoSP + shrink ---------------------------------------------------------------------------
def _hard_masked(seed: int, dict_output: bool = False, sparsity: float = 0.5) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyUNet(dict_output=dict_output)
    acosp.apply(model, sparsity, min_keep=1)
    acosp.harden(model)
    randomize_bn(model, seed)
    return model.eval()


def test_acosp_masks_convs_and_transposed_convs_but_not_the_marked_head() -> None:
    model = acosp.apply(TinyUNet(), 0.5, min_keep=1)
    masked = {name for name, _ in acosp.masked_convs(model)}
    assert {"up2", "up1.0", "enc1.1.conv2", "dec1.0"} <= masked
    assert "head" not in masked
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert masked == set(convs) - {"head"}


@pytest.mark.parametrize("dict_output", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_user_unet_matches_hard_masked_output(seed: int, dict_output: bool) -> None:
    model = _hard_masked(seed, dict_output)
    small, info = acosp.shrink_with_spec(model)
    assert n_params(small) < n_params(model)
    assert info["stats"]["removed_channels"] > 0
    assert info["layers"]["up2"]["type"] == "conv_transpose2d"
    assert small.up2.in_channels < model.up2.in_channels  # the transposed conv shrank too
    assert small.dec2[0].in_channels < model.dec2[0].in_channels  # the concat was sliced
    assert isinstance(small.up2, FoldedConvTranspose2d)  # BN-shifted constants folded in
    assert not any(hasattr(m, "acosp_score") for m in small.modules())
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(seed + 10))
    with torch.no_grad():
        expected, got = model(x), small(x)
    if dict_output:
        assert set(got) == {"out"}
        expected, got = expected["out"], got["out"]
    assert got.shape == expected.shape == (2, 3, 32, 40)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # fp32 fold rounding


def test_shrink_user_unet_with_upsample_modules() -> None:
    torch.manual_seed(3)
    model = acosp.apply(TinyUNet(up="upsample"), 0.5, min_keep=1)
    acosp.harden(model)
    randomize_bn(model, 3)
    model.eval()
    small = acosp.shrink(model)
    assert small.up2[1].in_channels < model.up2[1].in_channels  # through the Upsample
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_shrunk_user_unet_rebuilds_from_spec() -> None:
    model = _hard_masked(2)
    small, info = acosp.shrink_with_spec(model)
    fresh = acosp.rebuild(TinyUNet(), info)
    fresh.load_state_dict(small.state_dict())  # strict: the spec gives every shape
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), small(x), rtol=0, atol=0)


class RootGated(GatedNet):
    def forward(self, x: Tensor) -> Tensor:
        y = self.stem(x)
        return self.head(y if y.mean() > 0 else -y)


def test_untraceable_model_forward_is_one_line_leanseg_error() -> None:
    model = acosp.apply(RootGated(), 0.5, min_keep=1)
    acosp.harden(model)
    with pytest.raises(ConfigError, match=r"^acosp: torch.fx cannot trace") as info:
        acosp.shrink(model)
    assert "\n" not in str(info.value)
    assert "the model RootGated itself" in str(info.value) and "acosp_leaf" in str(info.value)


def test_untraceable_user_module_is_one_line_leanseg_error() -> None:
    model = acosp.apply(GatedNet(), 0.5, min_keep=1)
    acosp.harden(model)
    model(torch.randn(1, 3, 16, 16))  # eager mode works
    with pytest.raises(ConfigError) as info:
        acosp.shrink(model)
    message = str(info.value)
    assert isinstance(info.value, LeansegError)
    assert "\n" not in message
    assert "Gate 'gate'" in message
    assert "make that forward traceable" in message and "gate.acosp_leaf = True" in message
    assert message in DOC.read_text()  # the page quotes the real message
    assert model.training  # the model's mode is put back


@pytest.mark.parametrize("seed", [0, 1])
def test_opaque_user_module_is_kept_whole_and_the_rest_shrinks(seed: int) -> None:
    torch.manual_seed(seed)
    model = acosp.apply(GatedNet(), 0.5, min_keep=1)
    acosp.harden(model)
    randomize_bn(model, seed)
    model.gate.acosp_leaf = True  # not traced: its input and output channels stay
    model.eval()
    small = acosp.shrink(model)
    assert small.gate.conv.in_channels == small.gate.conv.out_channels == 8
    assert small.stem[0].out_channels == small.mid[0].in_channels == 8
    assert small.mid[0].out_channels < 8  # read by tail only: shrinks
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # the gate's masked conv got its pruned channels zeroed
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_doc_snippet_prunes_and_shrinks_a_user_model() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "acosp.shrink" in b)
    assert len(snippet.strip().splitlines()) <= 10
    torch.manual_seed(0)
    namespace: dict = {"MyUNet": TinyUNet}
    exec(compile(snippet, str(DOC), "exec"), namespace)
    small, model = namespace["small"], namespace["model"]
    assert n_params(small) < n_params(model)


# -- distillation -----------------------------------------------------------------------------
def test_distillation_loss_user_student_and_teacher_gradients_to_student_only() -> None:
    torch.manual_seed(0)
    student = TinyUNet(width=4)
    teacher = freeze(TinyUNet(width=8, dict_output=True), "cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    loss = distillation_loss(student(x), teacher_logits(teacher, x), temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# -- the Trainer ------------------------------------------------------------------------------
RUN = [
    f"model.name={MODEL_NAME}",
    "model.options.width=4",
    "data.crop_size=32",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.workers=0",
    "train.iterations=3",
    "train.val_interval=3",
    "train.log_interval=1",
    "train.loggers=[]",
    "train.sample_images=0",
    "train.device=cpu",
]


def _trainer(tmp_path: Path, *overrides: str, teacher: nn.Module | None = None):
    cfg = leanseg.load_config(None, [*RUN, *overrides])
    datasets = PairDataset(4, seed=0), PairDataset(2, seed=1)
    return leanseg.Trainer(cfg, tmp_path, progress=False, datasets=datasets, teacher=teacher)


def test_trainer_is_exported() -> None:
    from leanseg.engine.trainer import Trainer

    assert leanseg.Trainer is Trainer and leanseg.load_config is load_config


def _train_losses(tmp_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "train"]


def test_trainer_trains_a_registered_user_model_on_a_user_dataset(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert isinstance(trainer.model, TinyUNet)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.fit()
    assert trainer.iteration == 3
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["model"] == MODEL_NAME and last["model_options"] == {"width": 4}
    assert last["class_names"] == ["c0", "c1", "c2"]
    assert torch.equal(last["palette"][2], torch.tensor([80, 175, 0], dtype=torch.uint8))
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed
    assert set(last["state_dict"]) == set(before)
    losses = _train_losses(tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_a_user_dataset_with_global_rng_augmentation_resumes_exactly(tmp_path: Path) -> None:
    """The Trainer seeds the global generators per sample for a dataset that takes plain
    indices (leanseg.data.sampler.SeededItems), so its flips replay on --resume, also in
    worker processes (whose generators a resumed run starts afresh)."""
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    run = ["train.iterations=4", "train.val_interval=2", "data.workers=1"]
    straight = _trainer(tmp_path / "straight", *run)
    straight.fit()
    first = _trainer(tmp_path / "resumed", *run)
    first.fit(stop_at=2)
    resumed = _trainer(tmp_path / "resumed", *run)
    resumed.resume(tmp_path / "resumed" / "last.pt")
    resumed.fit()
    ours, theirs = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    flips = [PairDataset(4)[0][0].sum().item() for _ in range(8)]
    assert len(set(flips)) == 2, "the dataset does flip at random"


def test_trainer_distills_a_user_teacher_into_a_user_student(tmp_path: Path) -> None:
    torch.manual_seed(5)
    teacher = TinyUNet(width=8)
    saved = copy.deepcopy(teacher.state_dict())
    calls: list[bool] = []
    teacher.register_forward_pre_hook(lambda m, _args: calls.append(m.training))
    # distill.teacher must be set for KD to run; the given teacher replaces that checkpoint
    trainer = _trainer(tmp_path, "distill.teacher=unused.pt", "distill.weight=5", teacher=teacher)
    trainer.fit()
    assert calls == [False, False, False]  # once per step, in eval mode
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_ids & optimized
    assert (tmp_path / "last.pt").is_file()
    losses = _train_losses(tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_trainer_acosp_and_backrazor_on_a_user_model_then_shrink_checkpoint(
    tmp_path: Path,
) -> None:
    from leanseg.checkpoint import model_from_checkpoint
    from leanseg.methods.acosp import shrink_checkpoint

    prune = ["acosp.sparsity=0.5", "acosp.min_keep=1", "acosp.end=2"]
    trainer = _trainer(tmp_path, *prune, "backrazor.ratio=0.5", "backrazor.scope=all")
    assert isinstance(trainer.model.enc1[0][0], backrazor.SparseConv2d)
    trainer.fit()
    assert acosp.is_hard(trainer.model)
    report = shrink_checkpoint(tmp_path / "last.pt", tmp_path / "small.pt", say=lambda _: None)
    assert report.params_after < report.params_before
    payload = load_checkpoint(tmp_path / "last.pt")
    masked = model_from_checkpoint(payload, "last.pt").eval()  # rebuilt: registry + masks
    small = model_from_checkpoint(load_checkpoint(tmp_path / "small.pt"), "small.pt").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)
