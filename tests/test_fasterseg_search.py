"""FasterSeg search: supernet latency vs. derived networks, decoupled gradients, the legacy
pricing, pure derivation, the teacher's rules, switchable BN, the A/B split, exact resume, the
sandwich rule, width sampling, the search CLI and lambda's adaptation.

Everything runs on a tiny space (8 layers, fch 3) with a fake LUT of random prices.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanseg.cli import main
from leanseg.config import load_config
from leanseg.data.build import build_datasets
from leanseg.data.synthetic import ensure_synthetic
from leanseg.engine.search import Searcher, split_halves
from leanseg.engine.search_run import start_search
from leanseg.errors import ConfigError
from leanseg.methods.fasterseg.derive import derive
from leanseg.methods.fasterseg.handover import derive_branches
from leanseg.methods.fasterseg.latency import LatencyTable, spec_latency
from leanseg.methods.fasterseg.lut_measure import write_lut
from leanseg.methods.fasterseg.slimmable import OPS, MixedOp, SlimConvBN
from leanseg.methods.fasterseg.supernet import SearchSpace, Supernet
from leanseg.methods.fasterseg.supernet_latency import (
    SupernetLatency,
    adapt_lambda,
    lut_keys,
    supernet_keys,
)
from leanseg.models import build_model
from leanseg.models.fasterseg.spec import load_spec

LAYERS, FCH, CLASSES = 8, 3, 7
SIZE = (64, 128)  # what the LUT's keys are for (independent of the training crop)
SCALES = (8, 16, 32)
ONNX_CPU = {"backend": "onnxruntime", "device": "cpu"}

# one intra-op thread (tests/conftest.py): on this shared 2-core machine two threads made the
# tiny searches ~30x slower
pytestmark = pytest.mark.usefixtures("one_thread")


def fake_entries(space: SearchSpace, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    return {k: rng.uniform(0.1, 1.0) for k in lut_keys(space, SIZE, CLASSES)}


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(layers=LAYERS, fch=FCH)


@pytest.fixture(scope="module")
def table(space) -> LatencyTable:
    return LatencyTable(fake_entries(space), dict(ONNX_CPU), "fake")


@pytest.fixture(scope="module")
def files(tmp_path_factory, space) -> dict[str, Path]:
    """The synthetic data cache and the fake LUT as a file."""
    root = tmp_path_factory.mktemp("search")
    ensure_synthetic(root / "cache", num_train=16, num_val=2)
    write_lut(root / "lut.json", fake_entries(space), dict(ONNX_CPU))
    return {"root": root, "cache": root / "cache", "lut": root / "lut.json"}


def search_args(files: dict[str, Path], work: Path, *extra: str, table: bool = True) -> list[str]:
    args = [
        f"search.layers={LAYERS}",
        f"search.fch={FCH}",
        "search.pretrain_epochs=1",
        "search.epochs=2",
        "search.iterations_per_epoch=2",
        "data.batch_size=2",
        "data.crop_size=32",
        "data.synthetic_train=16",
        "data.synthetic_val=2",
        "data.workers=0",
        f"data.root={files['cache']}",
        f"train.work_dir={work}",
        "train.loggers=[]",
        "search.fps_low=1",
        "search.fps_high=2",
        f"search.latency_size=[{SIZE[0]},{SIZE[1]}]",
    ]
    if table:
        args.append(f"search.latency_table={files['lut']}")
    return [*args, *extra]


def quiet(_message: str) -> None:
    pass


def randomize_(net: Supernet, seed: int) -> None:
    """Random, non-uniform architecture parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.arch_params.values():
            p.copy_(torch.randn(p.shape, generator=generator))


def one_hot_(param: torch.Tensor, columns: list[int]) -> None:
    """Row r: 0.0 at ``columns[r]``, -inf elsewhere (softmax exactly 0 / 1)."""
    assert len(columns) == param.shape[0]
    with torch.no_grad():
        param.fill_(-math.inf)
        param[torch.arange(len(columns)), torch.tensor(columns)] = 0.0


def family(name: str) -> str:
    return name.split("_")[0]  # alpha | beta | ratio


def grads(output: torch.Tensor, net: Supernet) -> dict[str, torch.Tensor | None]:
    names = list(net.arch_params)
    found = torch.autograd.grad(
        output, [net.arch_params[n] for n in names], allow_unused=True, retain_graph=True
    )
    return dict(zip(names, found, strict=True))


def nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def derive_direct(space: SearchSpace, arch: str, tensors: dict, branches: tuple[int, ...]):
    k = space.arch_index(arch)
    setting = space.archs[k]
    return derive(
        [tensors[f"alpha_{k}_{j}"] for j in range(3)],
        [tensors[f"beta_{k}_1"], tensors[f"beta_{k}_2"]],
        [tensors[f"ratio_{k}_{j}"] for j in range(3)],
        branches=branches,
        stem_width=setting.stem_width,
        head_width=setting.head_width,
        width_choices=space.width_choices,
        allow_skip=setting.allow_skip,
        supernet_layers=True,
        fch=space.fch,
    )


# ---------------------------------------------------------------- 1. one-hot latency == LUT sum


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_hot_supernet_latency_is_the_derived_networks_lut_sum(space, table, seed):
    rng = random.Random(seed)
    net = Supernet(CLASSES, space)
    for k in range(len(space.archs)):
        params = net.arch_params
        for j in range(3):
            rows = params[f"alpha_{k}_{j}"].shape[0]
            one_hot_(params[f"alpha_{k}_{j}"], [rng.randrange(1, len(OPS)) for _ in range(rows)])
            ratio = params[f"ratio_{k}_{j}"]
            one_hot_(ratio, [rng.randrange(ratio.shape[1]) for _ in range(ratio.shape[0])])
        beta16 = [1] * (LAYERS - 2)
        beta16[1] = 0  # 1/16 cell of layer 3 takes the down of layer 2
        beta32 = [1] * (LAYERS - 3)
        beta32[3] = 0  # 1/32 cell of layer 6 takes the down of layer 5
        one_hot_(params[f"beta_{k}_1"], beta16)
        one_hot_(params[f"beta_{k}_2"], beta32)
    latency = SupernetLatency(net, table, SIZE)
    expected_strides = {8: [], 16: [2], 32: [2, 5]}  # cells with stride 2
    for setting in space.archs:
        rows = latency.rows(setting.name, widths="argmax")
        tensors = net.arch_tensors(setting.name)
        for j, scale in enumerate(SCALES):
            spec = derive_direct(space, setting.name, tensors, (scale,))
            (branch,) = spec.branches
            assert len(branch.cells) == LAYERS  # no skip chosen: nothing removed
            assert [i for i, c in enumerate(branch.cells) if c.stride == 2] == expected_strides[
                scale
            ]
            priced = spec_latency(spec, table, size=SIZE, num_classes=CLASSES)
            assert rows[j].dtype == torch.float64
            assert rows[j].item() == pytest.approx(priced.stem + priced.cells, rel=1e-12, abs=0)
            handed = derive_branches(space, setting.name, tensors, (scale,))
            assert replace(handed, meta={}) == spec
        total = latency.total(setting.name, widths="argmax")
        assert total.item() == pytest.approx(sum(r.item() for r in rows), rel=1e-12)


# ---------------------------------------------------------------- 2. decoupled terms


def test_each_decoupled_term_reaches_only_its_own_family(space, table):
    net = Supernet(CLASSES, space)
    randomize_(net, 3)
    latency = SupernetLatency(net, table, SIZE)
    torch.manual_seed(0)  # the gamma term samples widths
    terms = latency.decoupled("student")
    student = {n for n in net.arch_params if n.split("_")[1] == "1"}
    for term, own in (("alpha", "alpha"), ("beta", "beta"), ("gamma", "ratio")):
        found = grads(getattr(terms, term), net)
        for name, grad in found.items():
            if name in student and family(name) == own:
                assert nonzero(grad), f"{term} term: no gradient to {name}"
            else:
                assert not nonzero(grad), f"{term} term: gradient to {name}"
    w1, w2, w3 = latency.weights
    assert terms.weighted.item() == pytest.approx(
        w1 * terms.alpha.item() + w2 * terms.beta.item() + w3 * terms.gamma.item()
    )


# ---------------------------------------------------------------- 3. the legacy flag


def test_legacy_recursion_ignores_beta_at_one_sixteenth(space, table):
    net = Supernet(CLASSES, space)
    randomize_(net, 4)
    beta = net.arch_params["beta_1_1"]
    (legacy,) = torch.autograd.grad(
        SupernetLatency(net, table, SIZE, legacy=True).total("student"), [beta], allow_unused=True
    )
    (fixed,) = torch.autograd.grad(
        SupernetLatency(net, table, SIZE).total("student"), [beta], allow_unused=True
    )
    assert not nonzero(legacy)  # the original's bug (fasterseg.md §11)
    assert nonzero(fixed)


def test_legacy_prices_zoomed_conv_x2_as_conv_x2(space, table):
    net = Supernet(CLASSES, space)
    randomize_(net, 5)

    def set_op(op: str) -> None:
        for k in range(len(space.archs)):
            for j in range(3):
                alpha = net.arch_params[f"alpha_{k}_{j}"]
                one_hot_(alpha, [OPS.index(op)] * alpha.shape[0])

    totals = {}
    for legacy in (False, True):
        latency = SupernetLatency(net, table, SIZE, legacy=legacy)
        for op in ("conv_x2", "zoomed_conv_x2"):
            set_op(op)
            totals[(legacy, op)] = latency.total("student").item()
    assert totals[(True, "zoomed_conv_x2")] == totals[(True, "conv_x2")]
    assert totals[(False, "zoomed_conv_x2")] != totals[(False, "conv_x2")]
    assert totals[(False, "zoomed_conv_x2")] != totals[(True, "zoomed_conv_x2")]
    # legacy pricing never reads a zoomed conv x2 entry; the fixed one needs them
    lacking = {k: v for k, v in table.entries.items() if "BasicResidual_downup_2x" not in k}
    assert len(lacking) < len(table.entries)
    bare = LatencyTable(lacking, dict(ONNX_CPU), "no zoomed x2")
    set_op("zoomed_conv_x2")
    unread = SupernetLatency(net, bare, SIZE, legacy=True).total("student").item()
    assert unread == totals[(True, "zoomed_conv_x2")]
    with pytest.raises(ConfigError, match="entries missing"):
        SupernetLatency(net, bare, SIZE)


# ---------------------------------------------------------------- 4. pure derivation


def test_derivation_is_pure_and_deterministic(space):
    net = Supernet(CLASSES, space)
    randomize_(net, 6)
    for arch in ("teacher", "student"):
        tensors = net.arch_tensors(arch)
        before = copy.deepcopy(tensors)
        first = derive_branches(space, arch, tensors, (32, 16))
        second = derive_branches(space, arch, tensors, (32, 16))
        assert first == second
        assert tensors == before
        assert derive_branches(space, arch, tensors, (32, 8)) == derive_branches(
            space, arch, copy.deepcopy(before), (32, 8)
        )
        assert tensors == before
        # the lists torch gives (.tolist() of the parameters) vs. copies of them: the same
        # spec, and the parameters are untouched
        k = space.arch_index(arch)
        mine = {n: p for n, p in net.arch_params.items() if n.split("_")[1] == str(k)}
        kept = {n: p.detach().clone() for n, p in mine.items()}
        from_torch = derive_direct(space, arch, {n: p.tolist() for n, p in mine.items()}, (32, 16))
        from_lists = derive_direct(space, arch, copy.deepcopy(before), (32, 16))
        assert from_torch == from_lists == replace(first, meta={})
        assert all(torch.equal(mine[n], kept[n]) for n in kept)


# ---------------------------------------------------------------- 5. the teacher's rules


def test_student_latency_has_no_path_to_the_teacher(space, table):
    net = Supernet(CLASSES, space)
    randomize_(net, 7)
    torch.manual_seed(1)
    terms = SupernetLatency(net, table, SIZE).decoupled("student")
    found = grads(terms.weighted, net)
    assert all(not nonzero(g) for n, g in found.items() if n.split("_")[1] == "0")
    assert all(found[n] is None for n in found if n.split("_")[1] == "0")
    assert any(nonzero(g) for n, g in found.items() if n.split("_")[1] == "1")


def test_arch_step_adds_only_the_students_latency(files, tmp_path, monkeypatch):
    cfg = load_config(None, search_args(files, tmp_path / "work"))
    datasets = build_datasets(cfg.data)
    searcher = Searcher(cfg, None, progress=False, datasets=datasets)
    net, latency = searcher.supernet, searcher.latency
    randomize_(net, 8)
    assert searcher.lam > 0
    # the search loss: zero, but connected to every architecture parameter
    monkeypatch.setattr(
        net, "search_loss", lambda *a: 0.0 * sum(p.sum() for p in net.arch_parameters())
    )
    priced = []
    decoupled = latency.decoupled
    monkeypatch.setattr(latency, "decoupled", lambda arch: priced.append(arch) or decoupled(arch))
    captured: dict[str, torch.Tensor | None] = {}

    def capture():
        for name, p in net.arch_params.items():
            captured.setdefault(name, None if p.grad is None else p.grad.clone())

    for optimizer in searcher.arch_optimizers.values():
        monkeypatch.setattr(optimizer, "step", capture)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, CLASSES, (2, 32, 32))
    record = searcher._arch_step(images, labels)
    assert priced == ["student"]
    assert "latency_loss_ms" in record
    teacher = [n for n in captured if n.split("_")[1] == "0"]
    student = [n for n in captured if n.split("_")[1] == "1"]
    assert all(not nonzero(captured[n]) for n in teacher)
    assert all(nonzero(captured[n]) for n in student if family(n) != "ratio")
    # alpha and beta gradients are lambda x the weighted latency's (gamma's term: sampled)
    expected = grads(searcher.lam * latency.decoupled("student").weighted, net)
    for name in student:
        if family(name) != "ratio":
            torch.testing.assert_close(captured[name], expected[name])


def test_teacher_is_derived_without_skip(space):
    net = Supernet(CLASSES, space)
    randomize_(net, 9)
    with torch.no_grad():
        for k in range(len(space.archs)):
            for j in range(3):
                net.arch_params[f"alpha_{k}_{j}"][:, 0] = 10.0  # skip strongly preferred
    tensors = net.arch_tensors("teacher")
    for branches in ((32, 8), (32, 16)):
        spec = derive_branches(space, "teacher", tensors, branches)
        cells = [c for b in spec.branches for c in b.cells]
        assert all(c.op != "skip" for c in cells)
        assert all(len(b.cells) == LAYERS for b in spec.branches)  # no skip removed a cell
        # the same parameters with skips allowed (the student's rule) lose cells
        k = space.arch_index("teacher")
        allowed = derive(
            [tensors[f"alpha_{k}_{j}"] for j in range(3)],
            [tensors[f"beta_{k}_1"], tensors[f"beta_{k}_2"]],
            [tensors[f"ratio_{k}_{j}"] for j in range(3)],
            branches=branches,
            allow_skip=True,
            supernet_layers=True,
            fch=FCH,
        )
        assert any(len(b.cells) < LAYERS for b in allowed.branches)


# ---------------------------------------------------------------- 6. switchable BN


def test_switchable_bn_keeps_statistics_per_width():
    torch.manual_seed(0)
    conv = SlimConvBN(4, (2, 4, 6)).train()
    bns = conv.bn.bns
    assert len({id(bns[w]) for w in bns}) == 3
    assert bns["2"].running_mean.data_ptr() != bns["6"].running_mean.data_ptr()
    x = torch.randn(2, 4, 8, 8) + 3.0
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    conv(x, 2)
    after_a = {k: v.clone() for k, v in conv.state_dict().items()}
    assert not torch.equal(after_a["bn.bns.2.running_mean"], state["bn.bns.2.running_mean"])
    for w in ("4", "6"):
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"bn.bns.{w}.{buffer}"
            assert torch.equal(after_a[key], state[key]), key
    conv(x, 6)
    after_b = conv.state_dict()
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        key = f"bn.bns.2.{buffer}"
        assert torch.equal(after_b[key], after_a[key]), key
    assert not torch.equal(after_b["bn.bns.6.running_mean"], state["bn.bns.6.running_mean"])
    assert after_b["bn.bns.2.running_mean"].shape == (2,)
    assert after_b["bn.bns.6.running_mean"].shape == (6,)


def test_mixed_op_at_one_width_leaves_the_others_statistics():
    torch.manual_seed(0)
    op = MixedOp(4, (2, 4), stride=1).train()
    before = {k: v.clone() for k, v in op.state_dict().items() if "running_mean" in k}
    op(torch.randn(2, 4, 8, 8) + 1.0, torch.full((len(OPS),), 0.2), 2)
    after = op.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".bns.2." in k for k in changed)
    assert all(not torch.equal(before[k], after[k]) for k in before if ".bns.2." in k)


# ---------------------------------------------------------------- 7. the A/B split


@pytest.mark.parametrize("n", [10, 16, 101])
def test_split_halves_is_disjoint_and_seeded(n):
    a, b = split_halves(n, 12345)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(n))
    assert len(a) == n // 2 and len(b) == n - n // 2
    assert split_halves(n, 12345) == (a, b)
    assert split_halves(n, 7) != (a, b)


def test_searcher_halves_are_disjoint(files, tmp_path):
    cfg = load_config(None, search_args(files, tmp_path / "work"))
    searcher = Searcher(cfg, None, progress=False)
    a, b = list(searcher.split_a.indices), list(searcher.split_b.indices)
    assert a and b and not set(a) & set(b)
    assert sorted(a + b) == list(range(len(searcher.train_set)))


# ---------------------------------------------------------------- 8. resume


@pytest.fixture(scope="module")
def straight(files) -> tuple[Path, Searcher]:
    """A finished tiny search (pretrain 2 steps, search 2 x 2 steps)."""
    cfg = load_config(None, search_args(files, files["root"] / "straight"))
    run_dir, searcher, _ = start_search(cfg, progress=False, say=quiet)
    return run_dir, searcher


def test_resume_mid_search_matches_a_straight_run(files, straight):
    run_dir, searcher = straight
    cfg = load_config(None, search_args(files, files["root"] / "stopped"))
    # 2 pretraining steps, then stop after the first search iteration (mid-epoch)
    stopped_dir, stopped, _ = start_search(cfg, stop_at=3, progress=False, say=quiet)
    assert stopped.step == 3 and stopped.phase == "search" and stopped.in_epoch == 1
    assert not (stopped_dir / "arch").exists()
    _, resumed, _ = start_search(cfg, resume=stopped_dir, progress=False, say=quiet)
    assert resumed.step == searcher.step == searcher.total_steps()
    for name, p in searcher.supernet.arch_params.items():
        assert torch.equal(p, resumed.supernet.arch_params[name]), name
    straight_state = searcher.supernet.state_dict()
    for key, value in resumed.supernet.state_dict().items():
        assert torch.equal(value, straight_state[key]), key
    arch_files = sorted(p.name for p in (run_dir / "arch").glob("epoch_*.json"))
    assert arch_files == ["epoch_001.json", "epoch_002.json"]
    for name in arch_files:
        straight_record = json.loads((run_dir / "arch" / name).read_text())
        assert json.loads((stopped_dir / "arch" / name).read_text()) == straight_record
    assert resumed.lam == searcher.lam


def test_search_can_start_from_pretrain_pt(files, straight, tmp_path):
    run_dir, _ = straight
    pretrained = run_dir / "pretrain.pt"
    assert pretrained.is_file()
    args = search_args(files, tmp_path / "work", f"search.pretrained={pretrained}")
    searcher = Searcher(load_config(None, args), None, progress=False)
    assert searcher.phase == "search" and searcher.a_steps == 2
    saved = torch.load(pretrained, weights_only=True)["state_dict"]
    for key, value in searcher.supernet.state_dict().items():
        assert torch.equal(value, saved[key]), key


# ---------------------------------------------------------------- 9. the sandwich rule


def test_search_and_pretrain_losses_run_the_sandwich_rule(space, monkeypatch):
    calls = []
    original = Supernet.loss

    def recording(self, images, labels, criterion, arch, widths):
        calls.append((arch, widths))
        return original(self, images, labels, criterion, arch, widths)

    monkeypatch.setattr(Supernet, "loss", recording)
    torch.manual_seed(0)
    net = Supernet(CLASSES, space)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, CLASSES, (2, 32, 32))
    loss = net.search_loss(images, labels, F.cross_entropy)
    assert calls == [
        ("teacher", "sample"),
        ("student", "sample"),
        ("student", "max"),
        ("student", "min"),
    ]
    assert loss.ndim == 0 and math.isfinite(loss.item())
    calls.clear()
    net.pretrain_loss(images, labels, F.cross_entropy)
    assert calls == [
        ("teacher", "max"),
        ("student", "max"),
        ("student", "min"),
        ("student", "random"),
    ]


# ---------------------------------------------------------------- 10. widths


def test_width_sampling(space):
    net = Supernet(CLASSES, space)
    randomize_(net, 10)
    torch.manual_seed(0)
    for _ in range(3):
        teacher = net.widths("teacher", "sample")
        for j, row in enumerate(teacher):
            assert len(row) == space.ratio_rows(j)
            assert all(c == space.choices(j)[-1] for c, _ in row)
    seen: set[int] = set()
    for _ in range(5):
        student = net.widths("student", "sample")
        scores = []
        for j, row in enumerate(student):
            assert len(row) == space.ratio_rows(j)
            for channels, score in row:
                assert channels in space.choices(j)
                assert isinstance(score, torch.Tensor) and score.requires_grad
                assert score.item() == 1.0
                scores.append(score)
            seen.update(c for c, _ in row if j == 0)
        found = grads(sum(scores), net)
        for name, grad in found.items():
            assert nonzero(grad) == (name.startswith("ratio_1_")), name
    assert len(seen) > 1  # sampled, not a fixed width


# ---------------------------------------------------------------- 11. the CLI


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_derive_writes_specs_part_one_builds(straight, tmp_path, capsys):
    run_dir, _ = straight
    assert main(["search", "derive", str(run_dir)]) == 0
    capsys.readouterr()
    out = run_dir / "derived" / "epoch_002"
    for arch in ("teacher", "student"):
        path = out / f"{arch}.json"
        spec = load_spec(path)
        saved = load_spec(run_dir / "specs" / f"epoch_002_{arch}.json")
        assert (spec.stem, spec.branches, spec.head) == (saved.stem, saved.branches, saved.head)
        model = build_model("fasterseg", CLASSES, arch=str(path)).eval()
        with torch.no_grad():
            logits = model(torch.randn(1, 3, 32, 32))["out"]
        assert logits.shape == (1, CLASSES, 32, 32)
    assert main(["search", "derive", str(run_dir), "--epoch", "99"]) == 2
    err = error_line(capsys)
    assert "99" in err and "[1, 2]" in err


def test_cli_search_without_a_latency_table(files, tmp_path, capsys):
    work = tmp_path / "work"
    args = search_args(files, work, "search.latency_weight=0.01", table=False)
    assert main(["search", *args]) == 2
    assert "search.latency_table" in error_line(capsys)
    assert not work.exists() or not any(work.iterdir())


def test_cli_search_with_a_lut_lacking_entries(files, space, tmp_path, capsys):
    entries = fake_entries(space)
    cells = [k for k in supernet_keys(space, SIZE) if "BasicResidual_downup_2x" in k]
    for key in cells[:3]:
        del entries[key]
    lut = tmp_path / "lacking.json"
    write_lut(lut, entries, dict(ONNX_CPU))
    work = tmp_path / "work"
    args = search_args(files, work, f"search.latency_table={lut}")
    assert main(["search", *args]) == 2
    assert "3 entries missing" in error_line(capsys)
    assert not work.exists() or not any(work.iterdir())


def test_cli_search_with_a_lut_of_another_backend(files, space, tmp_path, capsys):
    lut = tmp_path / "torch.json"
    write_lut(lut, fake_entries(space), {"backend": "torch", "device": "cpu"})
    work = tmp_path / "work"
    args = search_args(
        files, work, f"search.latency_table={lut}", "search.latency_backend=onnxruntime"
    )
    assert main(["search", *args]) == 2
    err = error_line(capsys)
    assert "torch" in err and "onnxruntime" in err
    assert not work.exists() or not any(work.iterdir())


def test_cli_search_lut_measures_every_key(tmp_path, capsys):
    out = tmp_path / "lut.json"
    overrides = [
        "search.layers=6",
        f"search.fch={FCH}",
        "search.width_choices=[0.5,1.0]",
        "search.latency_size=[16,32]",
    ]
    timing = ["--warmup", "0", "--target-seconds", "0.001", "--repeats", "1"]
    cmd = ["search", "lut", "-o", str(out), *timing, "--backend", "torch", *overrides]
    assert main(cmd) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    small = SearchSpace(layers=6, fch=FCH, width_choices=(0.5, 1.0))
    assert set(data["entries"]) == set(lut_keys(small, (16, 32), CLASSES))
    assert all(v >= 0 for v in data["entries"].values())
    assert (data["backend"], data["device"], data["threads"]) == ("torch", "cpu", 1)
    text = out.read_bytes()
    assert main(cmd) == 2
    assert "--force" in error_line(capsys)
    assert out.read_bytes() == text


# ---------------------------------------------------------------- 12. lambda


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        ([200.0], 0.5),
        ([175.0], 0.5),  # at high: halve
        ([100.0, 200.0], 0.5),  # any at high wins
        ([155.0], 2.0),  # at low: double
        ([100.0, 160.0], 2.0),
        ([160.0], 1.0),
        ([155.5, 174.9], 1.0),
    ],
)
def test_adapt_lambda(fps, expected):
    assert adapt_lambda(1.0, fps, 155.0, 175.0) == expected


class PlainIndexDataset(torch.utils.data.Dataset):
    """A user's dataset: plain indices, a random flip from torch's global generator."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base
        self.num_classes, self.class_names = base.num_classes, base.class_names
        self.palette = base.palette

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.base[(int(index), [0])]  # one fixed crop: its randomness is below
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def test_a_plain_index_dataset_is_searched_with_seeded_samples(files, tmp_path):
    cfg = load_config(None, search_args(files, tmp_path / "work"))
    train, val = build_datasets(cfg.data)
    searcher = Searcher(cfg, None, progress=False, datasets=(PlainIndexDataset(train), val))
    item = (0, [cfg.train.seed, 0, 0])
    first, again = searcher.split_a[item], searcher.split_a[item]  # a sampler's item, twice
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    column = [searcher.split_a[(0, [cfg.train.seed, 0, p])][0][..., 0] for p in range(12)]
    flips = {c.sum().item() for c in column}  # the first column: the flip moves it
    assert len(flips) == 2, "the seed of the item decides the flip"
