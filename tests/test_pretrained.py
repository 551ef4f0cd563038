"""Backbone weights download by default and go offline when told to or when the network is away (CPU, no internet:
the "network" is local sockets). Oracles: the socket layer (was a connection attempted?), the wall clock, the file
served and the file loaded."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time

import pytest
import torch
import torchvision

from latentvae import pretrained
from latentvae.pretrained import (
    FID_INCEPTION,
    LPIPS_BACKBONES,
    OFFLINE_ENV,
    HubWeights,
    MissingWeightsError,
    build_lpips,
    require_hub_weights,
    torch_hub_checkpoint_dir,
)

SQUEEZE_FILE = LPIPS_BACKBONES["squeeze"].filename


@pytest.fixture
def online(tmp_path, monkeypatch):
    """An empty $TORCH_HOME and HF_HUB_OFFLINE unset: downloads are on, as on a user's machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    return tmp_path


@pytest.fixture
def connections(monkeypatch):
    """Every attempt to open a connection, refused and recorded."""
    attempts = []

    def refuse(self_or_address, *args, **kwargs):
        attempts.append(self_or_address)
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def squeezenet_file(path) -> dict[str, torch.Tensor]:
    """A SqueezeNet 1.1 state dict with random weights (1.2 M parameters), saved under torchvision's cache name."""
    torch.manual_seed(0)
    state = torchvision.models.squeezenet1_1().state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def serve_squeezenet(monkeypatch, address: str) -> None:
    """Point the SqueezeNet download at `address` (http://host:port), keeping torchvision's file name."""
    weights = HubWeights(f"{address}/{SQUEEZE_FILE}", LPIPS_BACKBONES["squeeze"].description)
    monkeypatch.setitem(LPIPS_BACKBONES, "squeeze", weights)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_offline_is_an_error_without_any_connection(online, monkeypatch, connections, how):
    if how == "environment":
        monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(MissingWeightsError) as info:
        build_lpips("squeeze", offline=how == "flag", alternative="use --perceptual_weight 0")
    message = str(info.value)
    assert SQUEEZE_FILE in message and str(torch_hub_checkpoint_dir()) in message
    assert "offline" in message and "--perceptual_weight 0" in message
    assert connections == []
    assert not (torch_hub_checkpoint_dir() / SQUEEZE_FILE).exists()


def test_offline_fid_weights_error_without_any_connection(online, connections):
    with pytest.raises(MissingWeightsError, match=FID_INCEPTION.filename):
        require_hub_weights(FID_INCEPTION, alternative="--no_fid", offline=True)
    assert connections == []


def test_closed_port_is_the_same_error_within_seconds(online, monkeypatch):
    serve_squeezenet(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="download failed") as info:
        build_lpips("squeeze")
    assert time.perf_counter() - started < 5
    assert SQUEEZE_FILE in str(info.value) and str(torch_hub_checkpoint_dir()) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert list(torch_hub_checkpoint_dir().iterdir()) == []  # no partial file left behind


def test_a_server_that_never_answers_times_out(online, monkeypatch):
    """The connection is accepted (by the kernel's backlog) but no byte ever comes back: without the timeout
    torch.hub's download would wait forever."""
    monkeypatch.setattr(pretrained, "CONNECT_TIMEOUT_S", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    # Should the timeout ever be lost, the test fails after 30 s instead of hanging.
    closer = threading.Timer(30, silent.close)
    closer.start()
    try:
        serve_squeezenet(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.perf_counter()
        with pytest.raises(MissingWeightsError, match="download failed"):
            build_lpips("squeeze")
        elapsed = time.perf_counter() - started
    finally:
        closer.cancel()
        silent.close()
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert socket.getdefaulttimeout() is None  # the timeout is put back


def test_online_downloads_into_the_torch_hub_cache(online, monkeypatch, tmp_path):
    served = tmp_path / "server" / SQUEEZE_FILE
    state = squeezenet_file(served)
    handler = functools.partial(QuietHandler, directory=str(served.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        serve_squeezenet(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        module = build_lpips("squeeze")
    finally:
        server.shutdown()
        server.server_close()
    assert (torch_hub_checkpoint_dir() / SQUEEZE_FILE).read_bytes() == served.read_bytes()
    torch.testing.assert_close(module.net.slice1[0].weight, state["features.0.weight"])


def test_a_cached_file_is_used_without_any_connection(online, connections):
    state = squeezenet_file(torch_hub_checkpoint_dir() / SQUEEZE_FILE)
    module = build_lpips("squeeze")
    torch.testing.assert_close(module.net.slice1[0].weight, state["features.0.weight"])
    fid = torch_hub_checkpoint_dir() / FID_INCEPTION.filename
    fid.write_bytes(b"")
    assert require_hub_weights(FID_INCEPTION, alternative="--no_fid") == fid
    assert connections == []


def test_train_offline_flag_stops_or_falls_back_without_any_connection(online, connections, request):
    from accelerate import PartialState
    from train_helpers import reset_accelerate

    from latentvae.training.config import parse_config
    from training.train import build_perceptual

    PartialState()  # the training script's logger needs one
    request.addfinalizer(reset_accelerate)
    cfg, explicit = parse_config(["--offline"])  # the SD recipe: LPIPS-VGG, no fallback
    with pytest.raises(MissingWeightsError, match=LPIPS_BACKBONES["vgg"].filename):
        build_perceptual(cfg, explicit)
    cfg, explicit = parse_config(["--recipe", "quickstart", "--offline"])
    assert cfg.perceptual_net == "squeeze"
    assert build_perceptual(cfg, explicit) is None and cfg.perceptual_weight == 0.0  # the loud fallback
    assert connections == []


def test_the_quickstart_falls_back_quickly_when_the_network_is_away(online, monkeypatch, request, caplog):
    from accelerate import PartialState
    from train_helpers import reset_accelerate

    from latentvae.training.config import parse_config
    from training.train import build_perceptual

    PartialState()
    request.addfinalizer(reset_accelerate)
    serve_squeezenet(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    cfg, explicit = parse_config(["--recipe", "quickstart"])
    started = time.perf_counter()
    with caplog.at_level("WARNING"):
        assert build_perceptual(cfg, explicit) is None
    assert time.perf_counter() - started < 5
    assert "WITHOUT THE PERCEPTUAL" in caplog.text and "download failed" in caplog.text


def test_evaluate_offline_flag_leaves_the_metrics_out_without_any_connection(online, connections):
    from latentvae.evaluation.evaluate import build_metric_networks
    from latentvae.evaluation.results import EvalSettings

    networks = build_metric_networks(EvalSettings(lpips_net="squeeze", offline=True))
    assert networks.lpips is None and networks.inception is None
    assert SQUEEZE_FILE in networks.skipped["lpips"] and FID_INCEPTION.filename in networks.skipped["rfid"]
    assert connections == []
