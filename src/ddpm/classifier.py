"""Features for scoring samples of small images: a small convolutional classifier trained on the
data set's training split, whose penultimate layer stands in for Inception's pool features
(Inception features mean little for 8x8 digits). No library ships such a network for arbitrary
small data sets, so it is defined and trained here; the FID/KID statistics themselves are
torchmetrics' (`ddpm.metrics.fid_kid`).

The trained network is cached as `<cache_dir>/classifier-<data>-train<digest>-seed<seed>.pt`,
the digest taken over the training split's images and labels, so another split or data set never
reads a stale file."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class SmallClassifier(nn.Module):
    """Three 3x3 convolutions (the last two with stride 2), global average pooling, a
    `num_features`-wide feature layer and a linear head. `forward` returns the features, what
    torchmetrics' FID/KID read (`num_features` tells them the width), centred and scaled to a
    mean standard deviation of 1 over the training split (`standardise`), so that FID and KID
    read alike for any data; `logits` the classes."""

    def __init__(self, channels: int, num_classes: int, num_features: int = 64) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, num_features),
            nn.GELU(),
        )
        self.head = nn.Linear(num_features, num_classes)
        self.register_buffer("shift", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [N, C, H, W] -> features [N, num_features]."""
        return (self.body(images.float()) - self.shift) / self.scale

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images.float()))

    @torch.no_grad()
    def standardise(self, images: torch.Tensor) -> None:
        """Set `shift` to the mean feature on `images` and `scale` to the features' mean standard
        deviation (one number: the geometry of the feature space is kept)."""
        features = torch.cat([self.body(batch.float()) for batch in images.split(1024)])
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).mean())


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    steps: int = 500,
    batch_size: int = 64,
) -> SmallClassifier:
    """Adam on the cross-entropy, `steps` batches drawn from a generator seeded by `seed` (the
    global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        net = SmallClassifier(images.shape[1], int(labels.max()) + 1)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            batch = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
            loss = nn.functional.cross_entropy(net.logits(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval().requires_grad_(False).standardise(images)
    return net


@torch.no_grad()
def accuracy(net: SmallClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of `images` classified as `labels`."""
    predicted = torch.cat([net.logits(batch).argmax(1) for batch in images.split(1024)])
    return (predicted == labels).float().mean().item()


def _digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    sha = hashlib.sha1(images.contiguous().numpy().tobytes())
    sha.update(labels.contiguous().numpy().tobytes())
    return sha.hexdigest()[:12]


def classifier_for(datamodule: Any, cache_dir: str | Path, seed: int = 0) -> SmallClassifier | None:
    """The data's feature network: read from the cache, or trained on the training split and
    cached (None, with one line saying why, for data without labels)."""
    labels = datamodule.labels("train")
    name = type(datamodule).__name__.removesuffix("DataModule").lower()
    if labels is None:
        log.warning(
            f"sample score skipped: {name} has no class labels to train its feature classifier on."
        )
        return None
    images = datamodule.train_data
    path = Path(cache_dir) / f"classifier-{name}-train{_digest(images, labels)}-seed{seed}.pt"
    if path.is_file():
        state = torch.load(path, weights_only=True)
        net = SmallClassifier(images.shape[1], state["head.weight"].shape[0])
        net.load_state_dict(state)
        return net.eval().requires_grad_(False)
    net = train_classifier(images, labels, seed)
    test_labels = datamodule.labels("test")
    held_out = accuracy(net, datamodule.test_data, test_labels)
    log.info(f"feature classifier for {name}: test accuracy {held_out:.3f}; cached in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(net.state_dict(), temporary)
    temporary.replace(path)
    return net
