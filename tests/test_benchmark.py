"""`latentvae benchmark` (eval/benchmark.py) --quick on a tiny model and tiny sizes: every mode runs and the files it writes read back."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentvae.benchmark import modes as benchmark
from latentvae.cli import main as cli_main
from latentvae.models.inference import cpu_has_bf16


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        yy, xx = np.mgrid[0:48, 0:64]
        smooth = np.stack([np.sin(xx / (5 + i)), np.cos(yy / 7), np.sin((xx + yy) / 9)], axis=-1)
        pixels = (127.5 + 100 * smooth + rng.normal(0, 10, smooth.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")
    return folder


def test_quick_benchmark_writes_json_and_markdown(photos, tmp_path):
    out = tmp_path / "results"
    argv = [
        "--quick",
        "--preset",
        "tiny-kl-f8",
        "--sizes",
        "32",
        "--train-sizes",
        "32",
        "--tile-sizes",
        "128",
    ]
    argv += [
        "--tile",
        "64",
        "--fp16-size",
        "32",
        "--repeats",
        "2",
        "--images",
        str(photos),
        "--out",
        str(out),
    ]
    argv += [
        "--modes",
        *benchmark.MODES,
        "--data-workers",
        "0",
        "1",
        "--data-batches",
        "2",
        "--data-resolution",
        "32",
    ]
    assert cli_main(["benchmark", *argv]) == 0
    results = json.loads((out / "benchmark.json").read_text())
    assert set(benchmark.MODES) <= set(results)

    speed = results["speed"]["rows"]
    assert {r["case"] for r in speed} == {"diffusers-fp32", "ours-fp32", "ours-fast"}  # --quick's variants
    assert {(r["op"], r["size"], r["batch"]) for r in speed} == {("encode", 32, 1), ("decode", 32, 1)}
    for row in speed + results["training"]["rows"]:
        assert len(row["all_seconds"]) == 2 and row["seconds"] > 0 and row["gflop"] > 0
        assert row["matmul_gflops"] > 0 and row["gflops"] == pytest.approx(row["gflop"] / row["seconds"])
    for row in speed:  # --quick measures one diffusers configuration: the best one is that one
        peer = next(r for r in speed if (r["case"], r["op"]) == ("diffusers-fp32", row["op"]))
        assert row["best_diffusers"] == peer["label"]
        assert row["vs_best_diffusers"] == pytest.approx(peer["seconds"] / row["seconds"])
    decode_flops = {r["case"]: r["gflop"] for r in speed if r["op"] == "decode"}
    # Same model shape in every variant; ours computes each upsampler as one transposed convolution, 4/9 of the
    # multiply-adds of diffusers' upsample-then-convolve.
    assert decode_flops["ours-fp32"] == pytest.approx(decode_flops["ours-fast"])
    assert decode_flops["ours-fp32"] < 0.9 * decode_flops["diffusers-fp32"]

    tiling = {
        (r["implementation"], r["tiled"], r["budget_mb"] is not None, r["statistics"]): r
        for r in results["tiling"]["rows"]
    }
    assert set(tiling) == {
        ("latentvae", False, False, None),
        ("latentvae", True, False, "exact"),
        ("latentvae", True, True, "exact"),  # a budget of a quarter of the untiled estimate
        ("latentvae", True, False, "sampled"),
        ("latentvae", True, True, "sampled"),
        ("diffusers", False, False, None),
        ("diffusers", True, False, None),
    }
    ours, lean, theirs = (
        tiling["latentvae", True, False, "exact"],
        tiling["latentvae", True, True, "exact"],
        tiling["diffusers", True, False, None],
    )
    assert (
        min(ours["psnr_vs_untiled"], lean["psnr_vs_untiled"]) > theirs["psnr_vs_untiled"]
    )  # shared statistics
    assert ours["activation_mb"] > 0 and "memory_vs_untiled" in ours

    assert results["fidelity"]["images"] == 3 and "ours-fast" in results["fidelity"]["mean"]
    # our fp32 model is diffusers' function: its reconstructions match diffusers' fp32 ones to float rounding
    assert results["fidelity"]["mean"]["ours-fp32"]["psnr_vs_fp32"] > 60
    assert {"psnr", "psnr_y", "psnr_c", "colourfulness_ratio", "ciede2000"} <= set(
        results["fidelity"]["mean"]["ours-fp32"]
    )
    assert results["fp16"]["images"] == 2 and results["fp16"]["fp32_max"]

    data = results["data"]
    assert {(r["source"], r["workers"]) for r in data["rows"]} == {
        (s, w) for s in ("folder", "shards") for w in (0, 1)
    }
    assert all(r["images"] == 2 * 16 and r["images_per_s"] > 0 for r in data["rows"])
    # The diffusers example's step (NCHW) against ours, also in channels_last; autocast where bf16 is native.
    cases = {r["case"] for r in results["training"]["rows"]}
    assert {"diffusers-fp32 fp32", "ours-fp32 fp32", "ours-fp32-cl fp32"} <= cases
    assert ("ours-fp32 autocast" in cases) == (torch.cuda.is_available() or cpu_has_bf16())
    # The rate training consumes is our fastest measured step at the data resolution: batch / seconds.
    step = min(
        (r for r in results["training"]["rows"] if r["case"].startswith("ours") and r["size"] == 32),
        key=lambda r: r["seconds"],
    )
    assert data["train_images_per_s"] == pytest.approx(step["batch"] / step["seconds"])
    assert all("workers" in line and "keep it fed" in line for line in data["feed"].values())

    markdown = (out / "benchmark.md").read_text()
    for heading in (
        "## Encode and decode",
        "## Training step",
        "## Tiled decode",
        "## fp16 safety",
        "## Fast path",
        "## Data loading",
    ):
        assert heading in markdown
    assert "--quick --preset tiny-kl-f8" in markdown  # the command that produced it


def test_cli_runs_the_benchmark_script(photos, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "benchmark",
        "--modes",
        "fp16",
        "--preset",
        "tiny-kl-f8",
        "--fp16-images",
        "1",
        "--fp16-size",
        "32",
    ]
    assert cli_main([*argv, "--images", str(photos), "--out", str(out)]) == 0
    assert json.loads((out / "benchmark.json").read_text())["fp16"]["images"] == 1
    assert "## fp16 safety" in (out / "benchmark.md").read_text()
