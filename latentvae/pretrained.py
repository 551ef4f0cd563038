"""Pretrained backbone weights (LPIPS's VGG16 / AlexNet / SqueezeNet, FID's Inception) in the torch hub cache.

The libraries we use (lpips -> torchvision, pytorch-fid) fetch these files on first use into
`$TORCH_HOME/hub/checkpoints/` and read them from there afterwards; so do we, with their download function, by
default. Their fetch has no timeout, though: on a network that drops packets it hangs, and where it fails the error
does not say which file was wanted. So we look for the file first; when it is absent we download it ourselves with a
short connect timeout, unless the user said offline (`HF_HUB_OFFLINE=1`, the switch of the Hugging Face libraries,
or `offline=True` from a `--offline` flag). Offline, or when the download fails, a `MissingWeightsError` names the
file, the folder it belongs in and where to get it. A file already in the cache never touches the network.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import lpips
import torch
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

OFFLINE_ENV = "HF_HUB_OFFLINE"
# Seconds a connection (and then each read) may wait before the download counts as failed: a dropped network fails
# in seconds instead of hanging. huggingface_hub waits 10 s for its metadata requests too.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HubWeights:
    """A weights file that a library downloads into the torch hub cache on first use.

    Args:
        url (`str`): the official download address; its last path component is the cached file name.
        description (`str`): what the file is, for error messages.
    """

    url: str
    description: str

    @property
    def filename(self) -> str:
        # torch.hub.load_state_dict_from_url names the cached file after the URL's basename; so do we.
        return os.path.basename(urlparse(self.url).path)


# Taken from the installed torchvision, so the names always match what lpips -> torchvision will look for.
LPIPS_BACKBONES: dict[str, HubWeights] = {
    "vgg": HubWeights(
        VGG16_Weights.IMAGENET1K_V1.url, "torchvision's VGG16 ImageNet weights (LPIPS-VGG backbone)"
    ),
    "alex": HubWeights(
        AlexNet_Weights.IMAGENET1K_V1.url, "torchvision's AlexNet ImageNet weights (LPIPS-Alex backbone)"
    ),
    # about 5 MB, against VGG16's 528 MB: the quickstart's perceptual term on a connected machine in seconds
    "squeeze": HubWeights(
        SqueezeNet1_1_Weights.IMAGENET1K_V1.url,
        "torchvision's SqueezeNet 1.1 ImageNet weights (LPIPS-SqueezeNet backbone)",
    ),
}
# The standard FID Inception-v3 weights as pytorch-fid publishes them.
FID_INCEPTION = HubWeights(
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "the standard FID Inception-v3 weights (pytorch-fid)",
)


class MissingWeightsError(FileNotFoundError, RuntimeError):
    """A pretrained weights file is not in the torch hub cache, and we are offline or the download failed.

    Attributes:
        filename (`str`): the file name that is missing, e.g. `vgg16-397923af.pth`.
        directory (`Path`): the folder it must be put in (`$TORCH_HOME/hub/checkpoints`).
        url (`str`): where to download it.
    """

    def __init__(self, weights: HubWeights, directory: Path, alternative: str, reason: str):
        super().__init__(
            f"Missing pretrained weights: {weights.description}, file '{weights.filename}', is not in the torch hub "
            f"cache {directory} ({reason}).\n"
            f"  Fix: download {weights.url} (on any machine with internet) and copy it to "
            f"{directory / weights.filename} (the folder follows $TORCH_HOME; default ~/.cache/torch). It is "
            f"downloaded there on first use when the network is reachable and neither {OFFLINE_ENV}=1 nor "
            "--offline is set.\n"
            f"  Or: {alternative}."
        )
        self.filename = weights.filename
        self.directory = directory
        self.url = weights.url

    def __str__(self) -> str:
        # OSError would format itself as "[Errno None] None: <filename>"; the message is the useful part.
        return self.args[0]


def torch_hub_checkpoint_dir() -> Path:
    """The folder where torch.hub / torchvision cache downloaded weights: `$TORCH_HOME/hub/checkpoints`.

    Returns:
        `Path`: `torch.hub.get_dir() / "checkpoints"` (read afresh on each call, so `$TORCH_HOME` changes apply).
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline_mode(offline: bool = False) -> bool:
    """Whether to stay off the network: `offline` (a `--offline` flag) or `$HF_HUB_OFFLINE` set to 1 / true / yes / on,
    as the Hugging Face libraries read it."""
    return offline or os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def require_hub_weights(weights: HubWeights, *, alternative: str, offline: bool = False) -> Path:
    """The path of `weights` in the torch hub cache, downloaded there first if it is missing and we are online.

    Args:
        weights (`HubWeights`): the file, e.g. `LPIPS_BACKBONES["vgg"]` or `FID_INCEPTION`.
        alternative (`str`): what the user can do instead, quoted in the error (e.g. "pass --no_lpips").
        offline (`bool`): never use the network (as `$HF_HUB_OFFLINE=1` does).

    Returns:
        `Path`: the cached file, which the library (torchvision, pytorch-fid) then reads without downloading.

    Raises:
        `MissingWeightsError`: the file is absent, and we are offline or the download failed (within
            `CONNECT_TIMEOUT_S` when the network does not answer).
    """
    directory = torch_hub_checkpoint_dir()
    path = directory / weights.filename
    if path.is_file():
        return path
    if offline_mode(offline):
        raise MissingWeightsError(
            weights, directory, alternative, reason=f"offline: {OFFLINE_ENV}=1 or --offline"
        )
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(CONNECT_TIMEOUT_S):
            torch.hub.download_url_to_file(weights.url, str(path), progress=True)
    except OSError as err:  # URLError, refused or timed-out connections, a full disk: all OSErrors
        raise MissingWeightsError(
            weights, directory, alternative, reason=f"the download failed: {err}"
        ) from err
    return path


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Sockets created inside get this timeout: torch.hub's download opens its URL without one, and takes none."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def build_lpips(
    net: str = "vgg",
    *,
    random_backbone: bool = False,
    offline: bool = False,
    alternative: str = "train without the perceptual term (--perceptual_weight 0) or evaluate with --no_lpips",
) -> lpips.LPIPS:
    """Build LPIPS v0.1 through the `lpips` package's own loading path, frozen, for use as a loss or a metric.

    The linear calibration layers ship inside the `lpips` package; the backbone comes from torchvision's ImageNet
    weights in the torch hub cache (`LPIPS_BACKBONES[net].filename`), downloaded there first when missing (see
    `require_hub_weights`). Whatever file sits under that name is loaded as is (torchvision checks no hash).

    Args:
        net (`str`): `"vgg"` (the LDM / SD training loss), `"alex"` (the usual evaluation metric) or `"squeeze"`
            (SqueezeNet 1.1: a 5 MB backbone, the CPU quickstart's loss).
        random_backbone (`bool`): randomly initialised backbone (`pnet_rand=True`), no file needed. For tests of
            the code path only: the distances are meaningless.
        offline (`bool`): never download a missing backbone (as `$HF_HUB_OFFLINE=1` does).
        alternative (`str`): what the user can do instead, quoted in the error.

    Returns:
        `lpips.LPIPS`: in eval mode with `requires_grad=False` on every parameter; gradients still flow to its
        inputs. Call it as `lpips_module(x, y)` with images in [-1, 1]; it returns distances of shape `(B, 1, 1, 1)`.

    Raises:
        `MissingWeightsError`: the backbone file is missing, and we are offline or the download failed.
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    if random_backbone:
        module = _construct_lpips(net, pnet_rand=True)
    else:
        require_hub_weights(LPIPS_BACKBONES[net], alternative=alternative, offline=offline)
        module = _construct_lpips(net, pnet_rand=False)  # torchvision finds the file: no network
    module.eval()
    module.requires_grad_(False)
    return module


def _construct_lpips(net: str, pnet_rand: bool) -> lpips.LPIPS:
    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision with the legacy `pretrained=` argument; the warnings are not actionable.
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        return lpips.LPIPS(net=net, version="0.1", pnet_rand=pnet_rand, verbose=False)
