"""The seed's MNIST CNN: two 5x5 convolutions with max-pooling, then two fully connected layers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MnistCnn", "initial_state"]


class MnistCnn(nn.Module):
    """conv 1->20 5x5, maxpool 2, conv 20->50 5x5, maxpool 2, fc 800->500, fc 500->10, ReLU between.

    A 28x28 image becomes 20x24x24, 20x12x12, 50x8x8 and 50x4x4 = 800 features.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.relu(self.conv1(images)))
        features = self.pool(self.relu(self.conv2(features)))
        logits: torch.Tensor = self.fc2(self.relu(self.fc1(features.flatten(1))))
        return logits


def initial_state(seed: int) -> dict[str, torch.Tensor]:
    """The initial weights every optimizer starts from: PyTorch's default init under `seed`.

    A private generator keeps the global RNG untouched, so the weights depend on `seed` alone.
    """
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = MnistCnn()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
