"""DDD CRF cost next to the DeepLabV3 training step it is added to, in one run.

    python benchmarks/crf.py [--sizes 33 65] [--batch 1] [--classes 21] [--channels 256]
        [--iters 5] [--gamma 2.0] [--dp function autograd checkpoint] [--rounds 3]
        [--model deeplabv3_resnet50] [--no-model] [--no-model-crf] [--threads N]

For each feature size S (33 = a 513 input at output stride 16, 65 = 1025): the CRF alone
(pairwise 1x1 conv + DDD inference on given features (B, channels, S, S) and unary logits, both
requiring grad; loss = cross-entropy at the feature resolution) with each chain-DP memory strategy
of ``leanseg.models.chain_dp``, the plain model's training step at input 16 (S - 1) + 1, and the
same model with ``crf="ddd"``. Per row: bytes saved for backward (parameters excluded, each
storage once), the rise of peak RSS over a step, and the median step time (forward, backward,
SGD; round-robin over the rows, so that drift on a shared machine hits all alike, after the
warm-up step of ``train_step_report``), plus each as a fraction of the plain model's. At batch 1
the models' image-pooling BN uses running statistics (batch statistics of a 1x1 map are undefined).
"""

from __future__ import annotations

import argparse
import ctypes
import json

import torch
from torch import Tensor, nn

from leanseg import build_model
from leanseg.bench import TrainingStep, round_robin_seconds, train_step_report
from leanseg.engine.runtime import select_device
from leanseg.models.chain_dp import CHAIN_DP
from leanseg.models.crf import DualDecompositionCRF, ddd_inference
from leanseg.models.deeplab import ASPPPooling

_FRACTION_KEYS = ("saved_activation_bytes", "peak_rss_step_bytes", "step_seconds_median")


class _CRFAlone(nn.Module):
    """The CRF on fixed unary logits: ``forward(features)`` -> logits."""

    def __init__(self, crf: DualDecompositionCRF, unary: Tensor) -> None:
        super().__init__()
        self.crf, self.unary = crf, unary

    def forward(self, features: Tensor) -> Tensor:
        return self.crf(features, self.unary)


def _pooling_bn_uses_running_stats(model: nn.Module) -> None:
    """At batch 1 the image-pooling BN (1x1 maps) has no batch statistics: use the running ones."""

    def eval_mode(module: nn.Module, _: object) -> None:
        module.training = False

    for module in model.modules():
        if isinstance(module, ASPPPooling):
            module[2].register_forward_pre_hook(eval_mode)


def _trim() -> None:
    """Hand freed heap back to the OS (glibc), so that a small step's RSS rise shows."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _iterations_run(crf: DualDecompositionCRF, features: Tensor, unary: Tensor) -> int:
    """How many DDD iterations ran before the early stop (or all of them)."""
    trace: list = []
    with torch.no_grad():
        terms = crf.pairwise_terms(features)
        ddd_inference(unary, terms, gamma=crf.gamma, iters=crf.iters, trace=trace)
    return len(trace)


def measure(size: int, args: argparse.Namespace, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, k, c = args.batch, args.classes, args.channels
    features = torch.randn(b, c, size, size, generator=gen).to(device).requires_grad_()
    unary = (3 * torch.randn(b, k, size, size, generator=gen)).to(device).requires_grad_()
    targets = torch.randint(k, (b, size, size), generator=gen).to(device)
    rows, steps = [], []
    for dp in args.dp:
        torch.manual_seed(0)
        crf = DualDecompositionCRF(c, k, args.iters, args.gamma, dp=dp).to(device)
        head = _CRFAlone(crf, unary)
        _trim()
        report = train_step_report(head, features, targets, steps=1)
        report["iterations_run"] = _iterations_run(crf, features, unary)
        rows.append({"variant": f"crf_alone[{dp}]", **report})
        steps.append(TrainingStep(head.train(), features, targets, 255))
    image_size = 16 * (size - 1) + 1
    if args.model:
        images = torch.randn(b, 3, image_size, image_size, generator=gen).to(device)
        image_targets = torch.randint(k, (b, image_size, image_size), generator=gen).to(device)
        variants = [(args.model, {})]
        if args.model_crf:
            crf_options = {"crf": "ddd", "crf_iters": args.iters, "crf_gamma": args.gamma}
            variants.append((f"{args.model}+ddd", crf_options))
        for label, options in variants:
            torch.manual_seed(0)
            model = build_model(args.model, k, output_stride=16, **options).to(device)
            if b == 1:
                _pooling_bn_uses_running_stats(model)
            _trim()
            report = train_step_report(model, images, image_targets, steps=1)
            rows.append({"variant": label, **report})
            steps.append(TrainingStep(model, images, image_targets, 255))
    for row, seconds in zip(rows, round_robin_seconds(steps, args.rounds), strict=True):
        row["step_seconds_median"] = seconds
    if args.model:
        base = next(row for row in rows if row["variant"] == args.model)
        for row in rows:
            for key in _FRACTION_KEYS:
                if row.get(key) is not None and base.get(key):
                    row[f"{key}_vs_model"] = row[key] / base[key]
    return {"feature_size": size, "input_size": image_size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[33, 65])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--dp", nargs="+", default=sorted(CHAIN_DP), choices=sorted(CHAIN_DP))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="deeplabv3_resnet50")
    parser.add_argument("--no-model", dest="model", action="store_const", const=None)
    parser.add_argument("--no-model-crf", dest="model_crf", action="store_false")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    results = [measure(size, args, device) for size in args.sizes]
    settings = ("batch", "classes", "channels", "iters", "gamma", "rounds", "model")
    header = {"benchmark": "crf", "device": str(device), "threads": torch.get_num_threads()}
    config = {k: getattr(args, k) for k in settings}
    print(json.dumps({**header, **config, "results": results}, indent=2))


if __name__ == "__main__":
    main()
