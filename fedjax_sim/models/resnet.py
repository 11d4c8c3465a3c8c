"""CIFAR ResNet-18 with group normalization, the CIFAR-100 model of Reddi et al. (2021).

Batch normalization keeps running statistics and mixes the examples of a batch, which breaks
under non-IID client data and needs mutable state; group normalization normalizes each example
on its own, so the model is a pure function of (params, example).

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
  Wu and He, "Group Normalization", ECCV 2018.
  Hsieh et al., "The Non-IID Data Quagmire of Decentralized Machine Learning", ICML 2020.
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
"""

from __future__ import annotations

from flax import linen as nn

from fedjax_sim.checks import check_integer
from fedjax_sim.models.adapters import from_linen
from fedjax_sim.models.core import Model
from fedjax_sim.models.layers import Conv


class _BasicBlock(nn.Module):
    features: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        h = nn.relu(nn.GroupNorm(self.groups)(h))
        h = Conv(self.features, (3, 3), use_bias=False)(h)
        h = nn.GroupNorm(self.groups)(h)
        if x.shape[-1] != self.features or self.strides != 1:
            # Projection shortcut (He et al.'s option B) where the shape changes.
            x = Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
            x = nn.GroupNorm(self.groups)(x)
        return nn.relu(h + x)


class _ResNet18GN(nn.Module):
    num_classes: int
    groups: int
    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        # CIFAR stem: one 3x3 convolution at stride 1 and no max-pool, for 32x32 inputs.
        h = Conv(self.width, (3, 3), use_bias=False)(x.reshape(x.shape[0], 32, 32, 3))
        h = nn.relu(nn.GroupNorm(self.groups)(h))
        for stage, multiple in enumerate((1, 2, 4, 8)):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                h = _BasicBlock(self.width * multiple, strides, self.groups)(h)
        return nn.Dense(self.num_classes)(h.mean(axis=(1, 2)))


def resnet18_gn(num_classes: int = 100, groups: int = 2, *, width: int = 64, x: str = "x",
                y: str = "y") -> Model:
    """CIFAR ResNet-18 with GroupNorm of `groups` groups in place of every BatchNorm.

    A 3x3 stem, no max-pool, four stages of two BasicBlocks (width, 2x, 4x, 8x: 64-128-256-512
    by default), global average pooling and a dense layer: 11,220,132 parameters for 100 classes
    (the BatchNorm ResNet-18's trainable count, since GroupNorm has the same scale and bias).
    Inputs are float32 [B, 32, 32, 3] images. `width` shrinks the model for quick tests.

    References: He et al. 2016; Hsieh et al. 2020 (GroupNorm for non-IID FL); Reddi et al.
      2021 (CIFAR-100 with two groups).
    """
    groups, width = check_integer("groups", groups, 1), check_integer("width", width, 1)
    if width % groups:
        raise ValueError(f"width={width} must be divisible by groups={groups}")
    return from_linen(_ResNet18GN(num_classes, groups, width), (32, 32, 3), num_classes, x=x,
                      y=y)
