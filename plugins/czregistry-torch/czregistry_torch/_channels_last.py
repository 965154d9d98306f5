"""The channels-last wrapper around a PyTorch module (imports torch: import this module only when packing)."""

from __future__ import annotations

import torch

__all__ = ["ChannelsLast"]


class ChannelsLast(torch.nn.Module):
    """``inner`` between transposes: NHWC / NDHWC in, channels-last out when the output is spatial.

    Scriptable (``torch.jit.script``), so a TorchScript module can sit inside it.
    """

    def __init__(self, inner: torch.nn.Module, rank: int) -> None:
        super().__init__()
        self.inner = inner
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 3:
            y = self.inner(x.permute(0, 4, 1, 2, 3))
            if y.dim() == 5:
                y = y.permute(0, 2, 3, 4, 1)
            return y
        y = self.inner(x.permute(0, 3, 1, 2))
        if y.dim() == 4:
            y = y.permute(0, 2, 3, 1)
        return y
