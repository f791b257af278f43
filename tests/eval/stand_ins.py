"""Tiny stand-in networks and file helpers shared by the evaluation tests (no weights, no downloads)."""
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


#: a Places365-like class list for Palette evaluation trees (class.txt), as both Palette fixtures write it
PALETTE_CLASSES = [f"/{chr(97 + i % 26)}/cls{i}" for i in range(100)]


class TinyInceptionScript(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 3, 8, stride=37), nn.AdaptiveAvgPool2d(1))
        with torch.no_grad():
            self.layers[0].weight.mul_(10)  # features of a few units, so FIDs are O(1) and up

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


class TinyClassifier(nn.Module):
    def __init__(self, k=5):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, k))

    def forward(self, x):
        return self.body(x) * 5  # sharper softmax -> an IS clearly above 1


class TinyVisual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.proj = nn.Linear(3 * 8 * 8, 6)

    def forward(self, x):
        return self.proj(x.flatten(1))


def preprocess_plain(img):
    return torch.from_numpy(np.array(img.resize((8, 8), Image.BILINEAR))).permute(2, 0, 1).float() / 255


def save_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")  # lossless content under the reference's file names
