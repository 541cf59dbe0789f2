"""Parameters and GFLOPs per mask: the paper's table, and hand-computed counts on tiny modules."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import adn
from adn.complexity import count_flops, count_params
from adn.summary import summarize

from .families import PAPER_MODELS

# The paper's ImageNet table: params (M), GFLOPs of FF..F and TT..T.
PAPER = {
    "resnet50": (25.58, 4.11, 2.58),
    "mobilenet_v2": (3.53, 0.32, 0.22),
    "vit_b16": (86.59, 17.58, 11.76),
    "swin_t": (28.30, 4.49, 2.34),
}
PLAIN_PARAMS = {"resnet50": 25.56, "mobilenet_v2": 3.50, "vit_b16": 86.57, "swin_t": 28.29}


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_summary_matches_the_paper(name):
    params, super_gflops, base_gflops = PAPER[name]
    summary = summarize(name)
    costs = {c.mask: c for c in summary.costs}
    full, base = costs["F" * len(summary.costs[0].mask)], costs["T" * len(summary.costs[0].mask)]
    assert summary.resolution == 224 and len(summary.costs) == 2 ** len(full.mask)
    assert abs(summary.stored_params / 1e6 - params) <= 0.01
    assert abs(full.gflops / super_gflops - 1) <= 0.03
    assert abs(base.gflops / base_gflops - 1) <= 0.03
    assert abs((base.gflops / full.gflops) / (base_gflops / super_gflops) - 1) <= 0.015
    # The super-net uses one norm of each pair: exactly the plain timm network's parameters.
    assert abs(full.params_m - PLAIN_PARAMS[name]) <= 0.005
    # Skipping never adds cost.
    for c in summary.costs:
        assert base.flops <= c.flops <= full.flops and base.params <= c.params <= full.params


def test_summary_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "adn.summary", "--model", "resnet50", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = json.loads(out)
    assert [r["mask"] for r in rows][:2] == ["FFFF", "FFFT"] and len(rows) == 16
    assert all({"mask", "params_m", "gflops"} <= set(r) for r in rows)
    by_mask = {r["mask"]: r for r in rows}
    assert abs(by_mask["FFFF"]["gflops"] - 4.11) / 4.11 <= 0.03 and abs(by_mask["TTTT"]["gflops"] - 2.58) / 2.58 <= 0.03
    assert abs(rows[0]["stored_params_m"] - 25.58) <= 0.01


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet51"], "unknown model 'resnet51'"),
    (["--model", "resnet_mini", "--resolution", "3"], "--resolution 3 is out of range"),
])
def test_summary_cli_rejects_bad_input(args, message, capsys):
    """The command's own main(), in this process: what is checked is its answer, not its start-up."""
    from adn.summary import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_flops_of_conv_norm_act_linear_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5), nn.GELU(),
    )
    conv = 8 * 16 * 16 * 3 * 3 * 3  # output elements x (in channels x kernel area)
    norm = act = 8 * 16 * 16
    linear, gelu = 8 * 5, 5
    assert count_flops(model, resolution=16) == conv + norm + act + linear + gelu


def test_flops_count_fused_attention_matmuls():
    class Attention(nn.Module):
        def forward(self, x):
            q = k = v = x.reshape(1, 2, 32, 3)  # 3x8x8 input as (batch 1, heads 2, tokens 32, dim 3)
            return nn.functional.scaled_dot_product_attention(q, k, v)

    model = Attention()
    model.register_parameter("unused", nn.Parameter(torch.zeros(1)))  # count_flops reads the dtype from it
    heads, tokens, dim = 2, 32, 3
    assert count_flops(model, resolution=8) == heads * 2 * tokens * tokens * dim  # QK^T and AV


def test_params_of_a_mask_count_kept_blocks_and_one_norm_per_pair():
    model = adn.create_model("resnet_mini", num_classes=10)
    stored = count_params(model)
    pairs = [m for m in model.modules() if isinstance(m, adn.SwitchableNorm)]
    one_half = sum(p.numel() for m in pairs for p in m.norms[0].parameters())
    assert count_params(model, "FFFF") == stored - one_half
    skipped = sum(p.numel() for i in range(1, 5) for p in getattr(model, f"layer{i}")[1].parameters())
    assert count_params(model, "TTTT") == stored - one_half - skipped
