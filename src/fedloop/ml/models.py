"""Reference PyTorch models: the book's small CNN (``Net``) and McMahan et al.'s MNIST CNN."""

from __future__ import annotations

import torch
from torch import nn

from fedloop.errors import ConfigError

__all__ = ["Net", "PaperCNN"]


class Net(nn.Module):
    """The PyTorch CIFAR-tutorial CNN the book uses, sized for square inputs of side ``in_size``.

    conv(6) -> relu -> maxpool 2 -> conv(16) -> relu -> [maxpool 2] -> fc 120 -> fc 84 -> fc
    classes. Inputs of side >= 20 (MNIST 28, CIFAR 32) use the tutorial's unpadded 5x5
    convolutions and both pools (28 -> 16x4x4, 32 -> 16x5x5); smaller inputs (sklearn digits
    8x8) use padded 3x3 convolutions and keep the second pool only while the map is >= 8 wide
    (8 -> 16x4x4).
    """

    def __init__(self, in_size: int, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if in_size < 4:
            raise ConfigError(f"Net needs inputs at least 4 pixels wide, got {in_size}.")
        kernel, pad = (5, 0) if in_size >= 20 else (3, 1)
        side = (in_size + 2 * pad - kernel + 1) // 2
        side = side + 2 * pad - kernel + 1
        if side < 1:
            raise ConfigError(f"Net cannot handle inputs {in_size} pixels wide.")
        pool2 = side >= 8
        if pool2:
            side //= 2
        self.in_size = in_size
        self.conv1 = nn.Conv2d(in_channels, 6, kernel, padding=pad)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, kernel, padding=pad)
        self.pool2: nn.Module = nn.MaxPool2d(2, 2) if pool2 else nn.Identity()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        out: torch.Tensor = self.fc3(x)
        return out


class PaperCNN(nn.Module):
    """McMahan et al. 2017's MNIST CNN: 5x5 conv 32 -> pool -> 5x5 conv 64 -> pool -> 512 -> 10.

    Convolutions are padded ("same") as in the paper's TensorFlow model, so a 28x28 input
    becomes 64x7x7 before the dense layer (1,663,370 parameters). Returns logits; the softmax
    lives in the cross-entropy loss.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, in_size: int = 28) -> None:
        super().__init__()
        side = in_size // 2 // 2
        if side < 1:
            raise ConfigError(f"PaperCNN needs inputs at least 4 pixels wide, got {in_size}.")
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * side * side, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        out: torch.Tensor = self.fc2(x)
        return out
