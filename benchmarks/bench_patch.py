"""Patch lab speed: batched pasting alone, and pasting plus EfficientNet-Lite0 (the cost of a search)."""

from __future__ import annotations

import time

import torch

from atlas import patch as lab
from atlas.models.zoo import load_model


def _rate(count: int, work, repeats: int = 3) -> float:
    work()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return count * repeats / (time.perf_counter() - started)


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    placements = [lab.corner_placement(224, r, c) for r in lab.SEARCH_RATIOS for c in lab.CORNERS]  # 16
    tiles = [lab.resize_patch(torch.rand(3, 200, 200, generator=generator), p.size).to(device) for p in placements]
    rows = []
    images = torch.rand(32, 3, 224, 224, generator=generator).to(device)
    per_s = _rate(len(images) * len(placements), lambda: lab.paste(images, tiles, placements))
    rows.append({"step": "paste", "device": device, "images": 32, "placements": 16, "composites_per_s": per_s})
    model = load_model("efficientnet-lite0", device=device)
    few = images[:4]  # 4 x 16 = 64 composites per call keeps the CPU run short
    per_s = _rate(len(few) * len(placements), lambda: lab.predict_pasted(model, few, tiles, placements, 0, 32))
    rows.append(
        {
            "step": "paste + efficientnet-lite0",
            "device": device,
            "images": 4,
            "placements": 16,
            "composites_per_s": per_s,
        }
    )
    return rows
