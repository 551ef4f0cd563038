"""Speed and memory of the autoencoder: latentvae against diffusers with the same weights, the fast path, tiling.

    python eval/benchmark.py [--preset sd-kl-f8] [--model TRAINED_VAE] [--out eval/results] [--quick]
    latentvae benchmark ...                      (the same)

Modes (`--modes`, default all); each is a function in `MODES` that measures, and one in
`latentvae.benchmark.report.RENDERERS` that renders its section of benchmark.md. To add a mode, write the two and
register them (and any flags in `latentvae.cli.benchmark`).
  speed     encode / decode, every variant (implementation x dtype x memory format, and our fast path), at `--sizes`
            and `--batch-sizes`: median time over interleaved repetitions, FLOPs (torch.utils.flop_counter),
            GFLOP/s and its ratio to a matmul rate of the same dtype measured beside each repetition, peak memory.
  training  forward + backward of the full loss (pixel + LPIPS + KL + PatchGAN with adaptive weight), fp32 and
            autocast, at `--train-sizes`.
  tiling    decode of a photo mosaic at `--tile-sizes`, tiled and untiled, ours and diffusers', each case in a
            child process (peak memory is per process): time, peak memory, PSNR of tiled against untiled.
  fp16      `check_fp16`: largest activation per block and whether fp16 overflows.
  fidelity  reconstruction PSNR of the fast path against fp32 on real images.
  data      (`--data`, not in the default set) images/s of the training data pipeline (decode + resize + crop)
            by data-loader workers, for the `--images` folder and for WebDataset shards written from it, and the
            workers per GPU that keep up with the training mode's step rate (`latentvae.benchmark.data`).
speed and training use `--preset` with random weights; tiling, fp16 and fidelity use `--model` (a trained VAE)
where given. Writes benchmark.json and benchmark.md into `--out`.

(One concept over about 400 lines: the modes, each a short measuring function, and the run over them.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from latentvae.benchmark.data import benchmark_data, format_rates
from latentvae.benchmark.report import render
from latentvae.data.shards import make_shards, shard_pattern
from latentvae.data.sources import find_images
from latentvae.evaluation.colour import colour_scores
from latentvae.evaluation.evaluate import prepare_image
from latentvae.evaluation.metrics import psnr, to_uint8
from latentvae.evaluation.profiling import PeakMemory, StageTimer
from latentvae.files.loading import load_vae
from latentvae.models.autoencoder_kl import AutoencoderKL
from latentvae.models.discriminator import NLayerDiscriminator
from latentvae.models.inference import check_fp16, cpu_has_bf16, optimize_for_inference
from latentvae.models.tiling import available_memory_bytes
from latentvae.pretrained import build_lpips
from latentvae.training.autoencoding import GaussianAutoencoding
from latentvae.training.losses import AutoencoderLoss

DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "bsds500" / "val"


@dataclass(frozen=True)
class Variant:
    implementation: str  # "latentvae" or "diffusers"
    low_precision: bool  # bf16 (fp16 on CUDA) weights and inputs instead of fp32
    channels_last: bool
    fast: bool = False  # latentvae.optimize_for_inference with its automatic choices


VARIANTS = {
    "diffusers-fp32": Variant("diffusers", False, False),
    "diffusers-fp32-cl": Variant("diffusers", False, True),
    "diffusers-low": Variant("diffusers", True, False),
    "diffusers-low-cl": Variant("diffusers", True, True),
    "ours-fp32": Variant("latentvae", False, False),
    "ours-fp32-cl": Variant("latentvae", False, True),
    "ours-low": Variant("latentvae", True, False),
    "ours-low-cl": Variant("latentvae", True, True),
    "ours-fast": Variant("latentvae", False, False, fast=True),
}
QUICK = {
    "sizes": [256], "batch_sizes": [1], "variants": ["diffusers-fp32", "ours-fp32", "ours-fast"], "repeats": 3,
    "train_sizes": [64], "tile_sizes": [512], "tile": 256, "fidelity_images": 4, "fp16_images": 2, "fp16_size": 128,
}  # fmt: skip


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    preset: AutoencoderKL  # random weights of --preset: speed and training
    trained: AutoencoderKL  # --model, else the preset: tiling, fp16, fidelity
    results: dict  # the modes measured so far in this run (data reads the training step rate)


# ----- measuring -----


def low_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def timed(fn: Callable[[], object], device: torch.device) -> float:
    timer = StageTimer(device)  # synchronises CUDA at both edges
    timer.start_batch(1)
    with timer("run"):
        fn()
    return timer.batches[-1]["run"]


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """One n x n matmul's rate in GFLOP/s: the practical compute limit of the device for `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / timed(lambda: a @ a, device) / 1e9


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure(cases: dict[str, Callable], dtypes: dict, bytes_: dict, ctx: Context, base: str) -> list[dict]:
    """Each case: FLOPs and peak memory of a warm-up call, then the median time of `--repeats` rounds in which every
    case runs once (order rotating each round), each timing followed by a matmul-rate sample of the case's dtype."""
    rows = {}
    for name, fn in cases.items():
        counter, memory = FlopCounterMode(display=False), PeakMemory(ctx.device, bytes_[name])
        with counter, memory.track():
            fn()
        rows[name] = {"case": name, "gflop": counter.get_total_flops() / 1e9, "peak_mb": memory.peak_mb,
                      "all_seconds": [], "matmul_samples": []}  # fmt: skip
    names = list(cases)
    for round_index in range(ctx.args.repeats):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            rows[name]["all_seconds"].append(timed(cases[name], ctx.device))
            rows[name]["matmul_samples"].append(matmul_gflops(dtypes[name], ctx.device))
    for row in rows.values():
        row["seconds"] = statistics.median(row["all_seconds"])
        row["matmul_gflops"] = statistics.median(row["matmul_samples"])
        row["gflops"] = row["gflop"] / row["seconds"]
        row["fraction_of_matmul"] = row["gflops"] / row["matmul_gflops"]
        row["speedup"] = rows[base]["seconds"] / row["seconds"]
    return list(rows.values())


# ----- modes -----


def build_models(ours: AutoencoderKL, names: list[str], device: torch.device) -> dict[str, nn.Module]:
    """One model per variant, all with `ours`' weights."""
    models = {}
    for name in names:
        variant = VARIANTS[name]
        cls = AutoencoderKL if variant.implementation == "latentvae" else diffusers.AutoencoderKL
        model = cls.from_config(ours.config)
        model.load_state_dict(ours.state_dict())
        model = nn.Module.to(
            model.eval().requires_grad_(False), device
        )  # nn.Module.to: no ModelMixin warning
        if variant.fast:
            optimize_for_inference(model)
        else:
            dtype = low_dtype(device) if variant.low_precision else torch.float32
            layout = torch.channels_last if variant.channels_last else torch.contiguous_format
            nn.Module.to(model, dtype=dtype, memory_format=layout)
        models[name] = model
    return models


def label(name: str, device: torch.device) -> str:
    variant = VARIANTS[name]
    if variant.fast:
        return "latentvae fast path"
    dtype = (
        {torch.bfloat16: "bf16", torch.float16: "fp16"}[low_dtype(device)]
        if variant.low_precision
        else "fp32"
    )
    return f"{variant.implementation} {dtype}" + (" channels_last" if variant.channels_last else "")


def call(model: nn.Module, variant: Variant, op: str, x: Tensor) -> Tensor:
    """encode or decode; plain models get their input cast here (inside the timing: the fast path casts too)."""
    if not variant.fast:
        layout = torch.channels_last if variant.channels_last else torch.contiguous_format
        x = x.to(dtype=model.dtype, memory_format=layout)
    return model.encode(x).latent_dist.mean if op == "encode" else model.decode(x).sample


@torch.inference_mode()
def run_speed(ctx: Context) -> dict:
    args, device, f = ctx.args, ctx.device, ctx.preset.downsampling_factor
    variants, skipped = args.variants, []
    if device.type == "cpu" and not cpu_has_bf16() and not args.emulated_bf16:
        # Without bf16 units torch emulates bf16 convolutions at a small fraction of the fp32 rate (116 s against
        # 5 s for a 256 px decode here): no user would pick it, and it would take the run hours.
        skipped = [n for n in variants if VARIANTS[n].low_precision]
        variants = [n for n in variants if n not in skipped]
        print(
            f"speed: this CPU has no bf16 instructions; skipping {', '.join(skipped)} (--emulated-bf16 runs them)"
        )
    models = build_models(ctx.preset, variants, device)
    rows = []
    for op in ("encode", "decode"):
        combinations = [(s, b) for s in args.sizes for b in args.batch_sizes]
        for size, batch in [(s, b) for s, b in combinations if b * s * s <= (args.max_pixels or b * s * s)]:
            if op == "encode":
                x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
            else:
                x = torch.randn(batch, ctx.preset.config.latent_channels, size // f, size // f, device=device)
            cases = {n: (lambda n=n, op=op, x=x: call(models[n], VARIANTS[n], op, x)) for n in variants}
            dtypes = {n: models[n].dtype for n in variants}
            sizes_ = {n: weight_bytes(models[n]) for n in variants}
            measured = measure(cases, dtypes, sizes_, ctx, base=variants[0])
            # The peer to beat: the fastest configuration a diffusers user can pick by hand for this case.
            peer = min((r for r in measured if VARIANTS[r["case"]].implementation == "diffusers"),
                       key=lambda r: r["seconds"], default=None)  # fmt: skip
            for r in measured:
                r["best_diffusers"] = None if peer is None else label(peer["case"], device)
                r["vs_best_diffusers"] = None if peer is None else peer["seconds"] / r["seconds"]
            rows += [
                dict(op=op, size=size, batch=batch, label=label(r["case"], device), **r) for r in measured
            ]
            print(
                f"speed {op} {size}px x{batch}: "
                + ", ".join(f"{r['case']} {r['seconds']:.2f}s" for r in measured)
            )
    return {"baseline": label(variants[0], device), "skipped": skipped, "rows": rows}


def run_training(ctx: Context) -> dict:
    # LPIPS's backbone weights cannot be downloaded here; a random backbone costs the same FLOPs.
    loss_fn = AutoencoderLoss(build_lpips("vgg", random_backbone=True), disc_start=0).to(ctx.device)
    critic = NLayerDiscriminator().to(ctx.device)
    # diffusers-fp32: the step as the diffusers training example writes it (NCHW); ours-fp32-cl: the trainer's
    # --channels_last (weights and batches in channels_last). Same model, same loss, same optimizer-free step.
    names = ["diffusers-fp32", "ours-fp32", "ours-fp32-cl"]
    models = {
        n: m.train().requires_grad_(True) for n, m in build_models(ctx.preset, names, ctx.device).items()
    }
    precisions = ["fp32", "autocast"]
    if ctx.device.type == "cpu" and not cpu_has_bf16() and not ctx.args.emulated_bf16:
        # Emulated bf16: many times slower than fp32, no one trains with it (see run_speed).
        precisions = ["fp32"]
        print(
            "training: this CPU has no bf16 instructions; skipping the autocast steps (--emulated-bf16 runs them)"
        )

    def step(name: str, autocast: bool, x: Tensor) -> None:
        model = models[name]
        if VARIANTS[name].channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, low_dtype(ctx.device)) if autocast else nullcontext():
            recon, kl_loss, _, _ = GaussianAutoencoding(model)(x, torch.Generator(ctx.device).manual_seed(0))
            last_layer = model.decoder.conv_out.weight
            loss, _ = loss_fn.autoencoder_loss(x, recon, 0, last_layer=last_layer, discriminator=critic)
            loss = loss + kl_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)

    rows = []
    for size in ctx.args.train_sizes:
        x = torch.rand(ctx.args.train_batch, 3, size, size, device=ctx.device) * 2 - 1
        cases = {f"{n} {mode}": (n, mode == "autocast") for n in names for mode in precisions}
        fns = {c: (lambda n=n, a=a, x=x: step(n, a, x)) for c, (n, a) in cases.items()}
        dtypes = {c: low_dtype(ctx.device) if a else torch.float32 for c, (n, a) in cases.items()}
        sizes_ = {c: weight_bytes(models[n]) for c, (n, a) in cases.items()}
        measured = measure(fns, dtypes, sizes_, ctx, base=next(iter(cases)))
        rows += [dict(size=size, batch=ctx.args.train_batch, **r) for r in measured]
        print(f"training {size}px: " + ", ".join(f"{r['case']} {r['seconds']:.2f}s" for r in measured))
    return {
        "rows": rows,
        "loss": "MSE + LPIPS-VGG (random backbone) + 1e-6 KL + PatchGAN hinge, adaptive weight",
    }


def mosaic(images: list[Path], size: int) -> Tensor:
    """A size x size image in [-1, 1] tiled from photos resized and cropped to 256 px (no photo of that size is at
    hand; unrelated neighbours make tiling harder, not easier)."""
    cells = -(-size // 256)
    crops = [prepare_image(images[i % len(images)], 256) for i in range(cells * cells)]
    rows = [np.concatenate(crops[r * cells : (r + 1) * cells], axis=1) for r in range(cells)]
    return torch.from_numpy(np.concatenate(rows)[:size, :size]).permute(2, 0, 1)[None].float() / 127.5 - 1


def run_tiling(ctx: Context) -> dict:
    model, rows = ctx.trained, []
    tile = ctx.args.tile or model.tile_sample_size
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        for size in ctx.args.tile_sizes:
            with torch.inference_mode():
                torch.save(
                    model.encode(mosaic(list_images(ctx.args.images), size)).latent_dist.mode(), f"{tmp}/z.pt"
                )
            estimate = model.untiled_peak_bytes((1, 3, size, size))
            untiled, outputs = {}, {}
            # Our tiling keeps residual blocks whole where its memory budget allows: without a budget, and with a
            # quarter of the untiled estimate (the memory a tiled decode should stay under); each with exact and
            # with sampled statistics (the fast mode).
            cases = [("latentvae", False, None, None)]
            cases += [("latentvae", True, budget, statistics) for statistics in ("exact", "sampled")
                      for budget in (None, estimate // 4)]  # fmt: skip
            cases += [("diffusers", False, None, None), ("diffusers", True, None, None)]
            for implementation, tiled, budget, statistics in cases:
                case = dict(model=f"{tmp}/model", implementation=implementation, tiled=tiled, tile=tile, budget=budget,
                            statistics=statistics, device=str(ctx.device), latents=f"{tmp}/z.pt", out=f"{tmp}/out.pt")  # fmt: skip
                row = dict(size=size, implementation=implementation, tiled=tiled, statistics=statistics,
                           estimated_mb=estimate / 2**20, budget_mb=None if budget is None else budget / 2**20)  # fmt: skip
                available = available_memory_bytes(ctx.device) or float("inf")
                if not tiled and estimate > available / 2:
                    row["skipped"] = (
                        f"untiled needs ~{estimate / 2**30:.1f} GiB, {available / 2**30:.1f} free"
                    )
                else:
                    row |= run_child(case)
                    outputs[tiled] = torch.load(case["out"])
                if not tiled:
                    untiled = row
                elif False in outputs and "skipped" not in untiled:
                    row["psnr_vs_untiled"] = psnr(outputs[False], outputs[True]).item()
                    row["memory_vs_untiled"] = row["activation_mb"] / untiled["activation_mb"]
                    row["time_vs_untiled"] = row["seconds"] / untiled["seconds"]
                rows.append(row)
            print(f"tiling {size}px: " + ", ".join(f"{r['implementation']} tiled={r['tiled']} "
                  f"{r.get('seconds', 0):.1f}s {r.get('activation_mb', 0):.0f}MB" for r in rows if r["size"] == size))  # fmt: skip
    return {"tile_size": tile, "rows": rows}


def run_child(case: dict) -> dict:
    """Run one tiling case in a fresh Python process (its peak memory is its own) and return its JSON result."""
    command = [sys.executable, "-m", "latentvae", "benchmark", "--child", json.dumps(case)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tiling case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def child_main(case: dict) -> None:
    device = torch.device(case["device"])
    model = load_vae(case["model"], device=device)
    if case["implementation"] == "diffusers":
        theirs = diffusers.AutoencoderKL.from_config(model.config)
        theirs.load_state_dict(model.state_dict())
        model = nn.Module.to(theirs.eval(), device)
        model.tile_sample_min_size = case["tile"]  # our tile size; their overlap is 0.25
        model.tile_latent_min_size = case["tile"] // 2 ** (len(model.config.block_out_channels) - 1)
    else:
        model.tile_memory_budget = case["budget"]  # None: exactly what was asked, tiled or untiled
        model.tile_sample_size = case["tile"]
    if case["tiled"] and case["implementation"] == "diffusers":
        model.enable_tiling()
    elif case["tiled"]:
        model.enable_tiling(statistics=case["statistics"])
    z = torch.load(case["latents"]).to(device)
    memory = PeakMemory(device, weight_bytes(model))
    with memory.track():
        seconds = timed(
            lambda: torch.save(to_uint8(model.decode(z).sample).to(torch.uint8).cpu(), case["out"]), device
        )
    print(json.dumps(dict(seconds=seconds, activation_mb=memory.growth / 2**20, peak_mb=memory.peak_mb)))


def run_fp16(ctx: Context) -> dict:
    images = real_batch(ctx.args, ctx.args.fp16_images, ctx.args.fp16_size)
    report = check_fp16(ctx.trained.to(ctx.device), images)
    return dict(
        vars(report), safe=report.safe, headroom=report.headroom, images=len(images), size=ctx.args.fp16_size
    )


@torch.inference_mode()
def run_fidelity(ctx: Context) -> dict:
    # The fast path beside the best a diffusers user picks by hand (bf16 + channels_last; fp16 on CUDA), each also
    # scored against the fp32 reconstruction (unrounded: fidelity to fp32 beyond uint8's step).
    names = ["diffusers-fp32", "diffusers-low-cl", "ours-fp32", "ours-fast"]
    if ctx.device.type == "cpu" and not cpu_has_bf16() and not ctx.args.emulated_bf16:
        names.remove("diffusers-low-cl")  # emulated bf16: see run_speed
    models = build_models(ctx.trained, names, ctx.device)
    images = real_batch(ctx.args, ctx.args.fidelity_images, 256)
    scores = {name: {} for name in models}  # variant -> metric -> per-image values
    for x in images.to(ctx.device).split(8):
        fp32 = None
        for name, model in models.items():
            z = model.encode(x.to(model.dtype)).latent_dist.mode()
            recon = model.decode(z).sample.float()
            real8, fake8 = to_uint8(x), to_uint8(recon)
            fp32 = (recon.clamp(-1, 1) + 1) * 127.5 if fp32 is None else fp32  # diffusers-fp32 comes first
            measured = {"psnr": psnr(real8, fake8), **colour_scores(real8, fake8),
                        "psnr_vs_fp32": psnr(fp32, (recon.clamp(-1, 1) + 1) * 127.5)}  # fmt: skip
            for metric, values in measured.items():
                scores[name].setdefault(metric, []).extend(values.tolist())
    means = {name: {m: float(np.nanmean(v)) for m, v in metrics.items()} for name, metrics in scores.items()}
    fast = models["ours-fast"].inference_settings
    return dict(images=len(images), mean=means, delta_fast_vs_fp32=means["ours-fast"]["psnr"] - means["ours-fp32"]["psnr"],
                fast_dtype=str(fast.dtype), fast_reason=fast.reason)  # fmt: skip


# ----- benchmark.md -----


def run_data(ctx: Context) -> dict:

    args, rows = ctx.args, []
    # Training consumes batch / step time images per second: our fastest step at the data resolution, if measured.
    steps = [r for r in ctx.results.get("training", {}).get("rows", [])
             if r["size"] == args.data_resolution and r["case"].startswith("ours")]  # fmt: skip
    fastest = min(steps, key=lambda r: r["seconds"], default=None)
    train_rate = fastest["batch"] / fastest["seconds"] if fastest else args.train_images_per_s
    tables = {}
    with tempfile.TemporaryDirectory() as scratch:
        shards, _ = make_shards(args.images, scratch, shard_size=max(1, len(list_images(args.images)) // 8))
        for kind, source in (("folder", str(args.images)), ("shards", shard_pattern(shards))):
            rates = benchmark_data(source, args.data_workers, args.data_resolution, batches=args.data_batches)
            rows += [dict(source=kind, **vars(rate)) for rate in rates]
            tables[kind] = format_rates(rates, train_rate)
            print(f"data ({kind}):\n{tables[kind]}")
    return {"rows": rows, "resolution": args.data_resolution, "train_images_per_s": train_rate,
            "feed": {kind: table.splitlines()[-1] if train_rate else None for kind, table in tables.items()},
            "images": str(args.images), "cpus": os.cpu_count()}  # fmt: skip


MODES: dict[str, Callable[[Context], dict]] = {  # each renders as benchmark_report.RENDERERS[name]
    "speed": run_speed,
    "training": run_training,
    "tiling": run_tiling,
    "fp16": run_fp16,
    "fidelity": run_fidelity,
    "data": run_data,
}
DEFAULT_MODES = ["speed", "training", "tiling", "fp16", "fidelity"]


# ----- inputs and command line -----


def list_images(folder: Path) -> list[Path]:
    files = find_images(folder) if Path(folder).is_dir() else []
    if not files:
        raise FileNotFoundError(f"no images in {folder}; pass --images DIR (e.g. ../shared/data/bsds500/val)")
    return files


def real_batch(args: argparse.Namespace, count: int, size: int) -> Tensor:
    """`count` images from `--images`, shorter side resized to `size` and center-cropped, in [-1, 1] (CPU)."""
    batch = np.stack([prepare_image(path, size) for path in list_images(args.images)[:count]])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def environment(device: torch.device, command: str) -> dict:
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "CPU"
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu, torch=torch.__version__,
        diffusers=diffusers.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
        load=[round(v, 2) for v in os.getloadavg()], command=command,
    )  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> int:
    """Run the modes `args.modes` (the `latentvae benchmark` flags, `--quick` already applied) and write
    benchmark.json and benchmark.md; returns the exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    preset = AutoencoderKL.from_preset(args.preset).eval()
    ctx = Context(args, device, preset, load_vae(args.model).eval() if args.model else preset, results={})
    command = getattr(args, "command_line", None) or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    results = {
        "environment": environment(device, command),
        "preset": args.preset,
        "model": args.model or args.preset,
    }
    for name in args.modes:
        started = time.perf_counter()
        results[name] = ctx.results[name] = MODES[name](ctx)
        results[name]["wall_seconds"] = time.perf_counter() - started
    results["environment"]["load_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "benchmark.md").write_text(render(results))
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return 0
