"""The object-placement field's metrics on copy-paste composites (docs/design/evaluation.md):
plausibility accuracy (Acc), FID against real positive composites and LPIPS diversity.

All three are torchmetrics `Metric`s, so each rank updates its share and ``compute`` sums the
states over ranks. Their networks come from local files only: a missing file fails at once with
one line naming what to download (`MetricWeightsError`); tests pass tiny random networks instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["MetricWeightsError", "PlausibilityAccuracy", "LPIPSDiversity", "InceptionFeatures", "fid_metric",
           "lpips_network", "INCEPTION_URL", "ALEXNET_URL"]

INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


class MetricWeightsError(FileNotFoundError):
    """A metric network's weights file is missing; the message names the file to download."""


def _need(path, what: str, url: str, flag: str) -> Path:
    if path is None or not Path(path).is_file():
        raise MetricWeightsError(f"{what} weights {path or '(none given)'} not found: download {url} and pass its "
                                 f"path as {flag} (nothing is downloaded at run time)")
    return Path(path)


class PlausibilityAccuracy(Metric):
    """Acc: the share of composites the classifier judges plausible (probability >= ``threshold``).

    ``update`` takes the classifier's probabilities (`lightning_modules.PlausibilityModule.probabilities`
    of composites made by `datamodules.composites.composite_input`), so the caller keeps each verdict too."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("plausible", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probabilities: torch.Tensor) -> None:
        ok = probabilities.reshape(-1) >= self.threshold
        self.plausible += ok.sum().double()
        self.total += ok.numel()

    def compute(self) -> torch.Tensor:
        return self.plausible / self.total.clamp(min=1)


class LPIPSDiversity(Metric):
    """LPIPS diversity: for each group of composites of one (background, foreground) pair, the mean
    LPIPS distance over all pairs of its composites; ``compute`` averages the groups' means.

    ``distance(a, b)`` gives the distance of each pair of images ``[N, 3, H, W]`` in [0, 1] -> ``[N]``
    (`lpips_network` builds torchmetrics' LPIPS from local weights)."""

    full_state_update = False

    def __init__(self, distance: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.distance = distance
        self.add_state("sum_of_means", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("groups", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, composites: torch.Tensor) -> None:
        """``composites`` ``[K, 3, H, W]`` in [0, 1] of one pair (K >= 2; fewer adds nothing)."""
        k = len(composites)
        if k < 2:
            return
        i, j = torch.triu_indices(k, k, offset=1, device=composites.device)
        d = self.distance(composites[i], composites[j]).reshape(-1).double()
        self.sum_of_means += d.mean()
        self.groups += 1

    def compute(self) -> torch.Tensor:
        return self.sum_of_means / self.groups.clamp(min=1)


class _LPIPSDistance(nn.Module):
    """torchmetrics' LPIPS network as a pairwise distance of [0, 1] images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a, b, normalize=True).reshape(-1)


def lpips_network(alexnet_weights) -> nn.Module:
    """LPIPS (AlexNet, the LPIPS paper's default, as GracoNet uses it): torchmetrics' linear layers (shipped
    with torchmetrics) on an AlexNet read from ``alexnet_weights`` (torchvision's file)."""
    from torchmetrics.functional.image.lpips import _LPIPS

    path = _need(alexnet_weights, "LPIPS AlexNet", ALEXNET_URL, "--lpips-weights")
    features = {k.split(".", 1)[1]: v for k, v in torch.load(path, map_location="cpu").items() if k.startswith("features.")}
    net = _LPIPS(pretrained=True, net="alex", pnet_rand=True)
    own = net.net.state_dict()
    missing = [name for name in own if name.split(".", 1)[1] not in features]
    if missing:
        raise MetricWeightsError(f"{path} is not torchvision's AlexNet (no {missing[0]}); download {ALEXNET_URL}")
    net.net.load_state_dict({name: features[name.split(".", 1)[1]] for name in own})
    return _LPIPSDistance(net.eval())


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 pool features (2048) of [0, 1] images, resized to 299 and normalised
    as torchvision trained it; a custom FID feature extractor (torchmetrics' own needs torch-fidelity)."""

    num_features = 2048

    def __init__(self, weights):
        super().__init__()
        from torchvision.models import inception_v3

        path = _need(weights, "Inception-v3", INCEPTION_URL, "--inception-weights")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load(path, map_location="cpu"))
        net.fc = nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def fid_metric(feature: nn.Module) -> FrechetInceptionDistance:
    """FID on [0, 1] float images with ``feature`` (`InceptionFeatures`, or any module ``[N, 3, H, W]`` ->
    ``[N, d]``); the real (positive composite) statistics are kept across ``reset``."""
    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False)
