"""ConfusionMatrix / SegMetrics against torchmetrics and hand-computed cases."""

import json
import math

import pytest
import torch
import torch.distributed as dist
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from leanseg.engine.metrics import ConfusionMatrix, SegMetrics

IGNORE = 255


def _batches(k: int, present: list[int], n_batches: int = 4, seed: int = 0):
    """Random (pred, target) batches: targets drawn from `present` plus ~10% ignore pixels,
    predictions right ~60% of the time, else uniform over all k classes."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor(present)
    for _ in range(n_batches):
        target = classes[torch.randint(len(present), (2, 9, 11), generator=g)]
        target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
        pred = torch.randint(k, target.shape, generator=g)
        right = (torch.rand(target.shape, generator=g) < 0.6) & (target != IGNORE)
        pred[right] = target[right]
        yield pred, target


def _reference(k: int, batches):
    """Our metrics and torchmetrics' accumulated over the same batches."""
    ours = ConfusionMatrix(k, ignore_index=IGNORE)
    tm = {
        "iou": MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average=None),
        "miou": MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average="macro"),
        "fwiou": MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE, average="weighted"),
        "acc": MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average=None),
        "mean_acc": MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="macro"),
        "all_acc": MulticlassAccuracy(num_classes=k, ignore_index=IGNORE, average="micro"),
    }
    for pred, target in batches:
        ours.update(pred, target)
        for metric in tm.values():
            metric.update(pred, target)
    return ours.compute(), {name: metric.compute().double() for name, metric in tm.items()}


def test_matches_torchmetrics_all_classes_present():
    k = 7
    m, ref = _reference(k, _batches(k, present=list(range(k))))
    assert torch.allclose(torch.tensor(m.iou, dtype=torch.float64), ref["iou"], atol=1e-6)
    assert torch.allclose(torch.tensor(m.acc, dtype=torch.float64), ref["acc"], atol=1e-6)
    for name in ("miou", "mean_acc", "all_acc", "fwiou"):  # "weighted" IoU weights by support
        assert getattr(m, name) == pytest.approx(ref[name].item(), abs=1e-6), name


def test_absent_classes_vs_torchmetrics():
    """Class 3 is predicted but never in the ground truth; class 4 appears nowhere.

    torchmetrics writes 0 (zero_division) for undefined per-class values. Its macro IoU skips
    classes with row + col == 0, which is our nanmean. Its macro accuracy only skips classes
    with tp + fp + fn == 0, so class 3 (fp > 0, no gt) counts as accuracy 0; our mAcc is the
    nanmean of H_ii / row_i (deeplab.md section 7), which leaves class 3 out: intended.
    """
    k = 5
    batches = [(p.clamp(max=3), t) for p, t in _batches(k, present=[0, 1, 2])]
    m, ref = _reference(k, batches)

    assert math.isnan(m.iou[4]) and m.iou[3] == 0.0
    assert math.isnan(m.acc[3]) and math.isnan(m.acc[4])
    assert ref["iou"][3:].tolist() == [0.0, 0.0] and ref["acc"][3:].tolist() == [0.0, 0.0]
    assert torch.allclose(torch.tensor(m.iou[:4], dtype=torch.float64), ref["iou"][:4], atol=1e-6)
    assert torch.allclose(torch.tensor(m.acc[:3], dtype=torch.float64), ref["acc"][:3], atol=1e-6)

    assert m.miou == pytest.approx(ref["miou"].item(), abs=1e-6)  # same: both skip class 4 only
    assert m.all_acc == pytest.approx(ref["all_acc"].item(), abs=1e-6)
    assert m.fwiou == pytest.approx(ref["fwiou"].item(), abs=1e-6)
    # mAcc differs: torchmetrics divides the same sum by 4 classes (0..3), we by 3 (0..2).
    assert m.mean_acc == pytest.approx(sum(m.acc[:3]) / 3, abs=1e-12)
    assert ref["mean_acc"].item() == pytest.approx(sum(m.acc[:3]) / 4, abs=1e-6)


def _small() -> ConfusionMatrix:
    # H = [[3, 1, 0], [0, 2, 0], [0, 0, 0]]; plus ignored and out-of-range labels.
    cm = ConfusionMatrix(3)
    cm.update(
        torch.tensor([[0, 0, 0, 1], [1, 1, 2, 0]]), torch.tensor([[0, 0, 0, 0], [1, 1, 255, 7]])
    )
    cm.update(torch.tensor([2]), torch.tensor([-1]))
    return cm


def test_hand_computed_small_case():
    cm = _small()
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert cm.matrix.dtype == torch.int64
    m = cm.compute()
    assert m.iou[:2] == pytest.approx([3 / 4, 2 / 3]) and math.isnan(m.iou[2])
    assert m.acc[:2] == pytest.approx([3 / 4, 1.0]) and math.isnan(m.acc[2])
    assert m.all_acc == pytest.approx(5 / 6)
    assert m.mean_acc == pytest.approx(7 / 8)
    assert m.miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m.fwiou == pytest.approx(4 / 6 * 3 / 4 + 2 / 6 * 2 / 3)


def test_table_and_dict():
    m = _small().compute()
    table = m.format_table(["road", "car", "sky"])
    lines = table.splitlines()
    sky = next(line for line in lines if "sky" in line)
    assert [c.strip() for c in sky.split("|")[2:4]] == ["-", "-"]
    road = next(line for line in lines if "road" in line)
    assert "75.00" in road and "75.00" in road.split("|")[3]
    assert "66.67" in next(line for line in lines if "car" in line)
    for header in ("allAcc", "mAcc", "mIoU", "FreqW IoU"):
        assert header in table
    for value in ("83.33", "87.50", "70.83", "72.22"):
        assert value in lines[-2]
    assert len({len(line) for line in lines[1:6]}) == 1  # box lines of equal width
    with pytest.raises(ValueError):
        m.format_table(["a", "b"])

    d = m.to_dict(["road", "car", "sky"])
    assert d["iou"]["sky"] is None and d["acc"]["car"] == 1.0
    json.dumps(d, allow_nan=False)
    assert m.to_dict()["iou"][2] is None


def test_ignore_index_reset_and_checks():
    cm = ConfusionMatrix(4, ignore_index=0)  # an ignore id inside [0, K) is skipped too
    cm.update(torch.tensor([1, 2, 3, 3]), torch.tensor([0, 2, 3, 255]))
    assert cm.matrix.sum() == 2 and cm.matrix[2, 2] == 1 and cm.matrix[3, 3] == 1
    cm.reset()
    assert cm.matrix.sum() == 0
    with pytest.raises(ValueError):
        cm.update(torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(TypeError):
        cm.update(torch.tensor([1.0]), torch.tensor([1]))


def test_empty_matrix_is_nan():
    m = ConfusionMatrix(2).compute()
    assert isinstance(m, SegMetrics)
    assert all(math.isnan(v) for v in (m.all_acc, m.mean_acc, m.miou, m.fwiou))


def test_all_reduce(tmp_path):
    cm = _small()
    cm.all_reduce()  # no process group: no-op
    assert cm.matrix.sum() == 6
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 2, 0], [0, 0, 0]]
