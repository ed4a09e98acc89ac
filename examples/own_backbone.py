"""A small U-Net of your own, with a site where LFPVs can attach (see the README, "LFPVs on your own network")."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfpv_fast.models import Site


class SmallUNet(nn.Module):
    """Two stride-2 levels down, two up, skips; the LFPVs attach at the 1/4-scale bottleneck."""

    default_site = "bottleneck"
    align = 4  # input sides must be multiples of this (two stride-2 levels)

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.sites = {"bottleneck": Site("bottleneck", channels=2 * width, stride=4)}
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down1 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Conv2d(2 * width, 3, 3, padding=1)

    def encode(self, x: torch.Tensor, site: str):
        """x -> (features at the site, whatever decode needs)."""
        full = F.relu(self.stem(x))
        half = F.relu(self.down1(full))
        quarter = F.relu(self.down2(half))
        return quarter, (x, full, half)

    def decode(self, features: torch.Tensor, state) -> torch.Tensor:
        x, full, half = state
        up = F.relu(self.up2(features))
        up = F.relu(self.up1(torch.cat([up, half], dim=1)))
        return x + self.head(torch.cat([up, full], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x, self.default_site))
