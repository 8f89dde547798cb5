"""Training-step throughput and achieved FLOP/s as a fraction of measured fp32 matmul FLOP/s.

    python benchmarks/train_step.py [--models deeplabv3_mobilenetv2 deeplabv3_resnet50]
        [--batch 8 --size 256 --steps 3 --device auto --amp --channels-last]

Prints one JSON object. FLOPs are counted with torch.utils.flop_counter (through
leanseg.flops, which corrects torch's over-count of grouped-convolution weight gradients) for
one forward+backward; the matmul peak is measured in the same run on the same device.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from leanseg import build_model
from leanseg.engine.runtime import select_device
from leanseg.flops import flop_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """fp32 GEMM throughput: the reference 'peak' of this device."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = build_model(name, num_classes=21, output_stride=16).to(device).train()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    masks = torch.randint(0, 21, (args.batch, args.size, args.size), device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)["out"]
        loss = F.cross_entropy(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    counter = flop_counter()
    with counter:
        step()  # also the warm-up
    sync(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    flops = counter.get_total_flops()
    return {
        "model": name,
        "step_s_median": median,
        "images_per_s": args.batch / median,
        "gflop_per_step": flops / 1e9,
        "achieved_gflop_per_s": flops / median / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["deeplabv3_mobilenetv2", "deeplabv3_resnet50"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = select_device(args.device)
    peak = matmul_flops_per_s(device)
    results = [measure(name, args, device) for name in args.models]
    for result in results:
        result["fraction_of_matmul_peak"] = result["achieved_gflop_per_s"] * 1e9 / peak
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "device": str(device),
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "batch": args.batch,
                "size": args.size,
                "output_stride": 16,
                "amp": args.amp,
                "channels_last": args.channels_last,
                "fp32_matmul_gflop_per_s": peak / 1e9,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
