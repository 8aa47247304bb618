"""TF32 factor and preconditioning products emulated on the CPU, against float64.

A TF32 tensor core multiplies fp32 inputs cut to 10 fraction bits and sums the (exact) products in fp32.
Here the inputs are cut by masking (truncation, or rounding to nearest), the products are CPU fp32
matrix products, and the reference is float64, for every Conv2d/Linear layer of torchvision's
ResNet-50 (random weights, one batch of random images, training mode): the factors A and G, and the
preconditioned gradient G⁻¹·∇W·A⁻¹ (π-damped inverses, formed in float64). An emulation, not a GPU
measurement: cuBLAS's order of summation differs from the CPU's.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python scripts/tf32_emulation.py --batch 8 --size 64
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet50

Cut = Callable[[torch.Tensor], torch.Tensor]


def truncated(x: torch.Tensor) -> torch.Tensor:
    return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def rounded(x: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def fp32(x: torch.Tensor) -> torch.Tensor:
    return x


CUTS: dict[str, Cut] = {"fp32": fp32, "TF32 rounded": rounded, "TF32 truncated": truncated}


def rows_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(samples·positions, d) rows of a aᵀ, with the bias 1."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )
        x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if module.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    return x


def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


def damped_inverse(factor: torch.Tensor, shift: float) -> torch.Tensor:
    return torch.linalg.inv(factor + shift * torch.eye(factor.shape[0], dtype=factor.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet50()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    for name, module in layers.items():

        def keep(module, args_, output, name=name):
            inputs[name] = args_[0].detach()
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))

        module.register_forward_hook(keep)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    nn.functional.cross_entropy(model(x), y).backward()

    errors: dict[str, dict[str, list[float]]] = {
        kind: {cut: [] for cut in CUTS} for kind in ("A", "A per tr", "G", "G per tr", "update")
    }
    for name, module in layers.items():
        a_rows = rows_of(module, inputs[name])
        g = grads[name] * args.batch  # δ = N · grad_output
        g_rows = g.transpose(0, 1).reshape(g.shape[1], -1).t() if g.dim() == 4 else g
        samples = args.batch
        positions = a_rows.shape[0] // samples
        exact = {
            "A": a_rows.double().t() @ a_rows.double() / (samples * positions),
            "G": g_rows.double().t() @ g_rows.double() / samples,
        }
        for kind, rows, scale in (("A", a_rows, samples * positions), ("G", g_rows, samples)):
            for cut_name, cut in CUTS.items():
                got = cut(rows).t() @ cut(rows) / scale
                errors[kind][cut_name].append(relative(got, exact[kind]))
                errors[f"{kind} per tr"][cut_name].append(
                    float((got.double() - exact[kind]).norm() / exact[kind].trace())
                )
        pi = math.sqrt(
            (exact["A"].trace() / exact["A"].shape[0]) / (exact["G"].trace() / exact["G"].shape[0])
        )
        root = math.sqrt(args.damping)
        a_inv, g_inv = damped_inverse(exact["A"], pi * root), damped_inverse(exact["G"], root / pi)
        weight = module.weight.grad.reshape(module.weight.shape[0], -1)
        gradient = torch.cat([weight, module.bias.grad[:, None]], 1) if module.bias is not None else weight
        update = g_inv @ gradient.double() @ a_inv
        for cut_name, cut in CUTS.items():
            left = cut(g_inv.float()) @ cut(gradient)
            got = cut(left) @ cut(a_inv.float())
            errors["update"][cut_name].append(relative(got, update))

    print(
        f"ResNet-50, {len(layers)} Conv2d/Linear layers, batch {args.batch}, {args.size} px, "
        f"damping {args.damping}: error against float64, median / max over the layers\n"
    )
    print("| quantity | " + " | ".join(CUTS) + " |")
    print("|---|" + "---|" * len(CUTS))
    labels = {
        "A": "‖A − A₆₄‖_F / ‖A₆₄‖_F",
        "A per tr": "‖A − A₆₄‖_F / tr A₆₄",
        "G": "‖G − G₆₄‖_F / ‖G₆₄‖_F",
        "G per tr": "‖G − G₆₄‖_F / tr G₆₄",
        "update": "‖U − U₆₄‖_F / ‖U₆₄‖_F, U = G⁻¹∇W A⁻¹",
    }
    for kind, label in labels.items():
        cells = [f"{statistics.median(v):.1e} / {max(v):.1e}" for v in errors[kind].values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
