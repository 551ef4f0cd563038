"""benchmark.md: the tables of `latentvae.benchmark.modes`'s results, one section per mode that ran."""

from __future__ import annotations


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "–" if value is None else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = [header, ["---"] * len(header), *[[_cell(v) for v in row] for row in rows]]
    return ["| " + " | ".join(line) + " |" for line in lines] + [""]


def _timing_table(rows: list[dict], keys: list[str]) -> list[str]:
    header = [*keys, "s (median)", "GFLOP", "GFLOP/s", "of matmul", "speedup", "peak MB"]
    return _table(header, [[*(r[k] for k in keys), r["seconds"], r["gflop"], r["gflops"],
                            f"{100 * r['fraction_of_matmul']:.0f} %", r["speedup"], r["peak_mb"]] for r in rows])  # fmt: skip


def render_speed(result: dict) -> list[str]:
    note = ""
    if any(r["fraction_of_matmul"] > 1 for r in result["rows"]):
        note = (" Fractions above 100 % mean the matmul is not the limit for that dtype here: fp32 matmul runs in "
                "MKL's sgemm, which on some CPUs (AMD) is far slower than oneDNN's fp32 convolutions.")  # fmt: skip
    skipped = result.get("skipped")
    if skipped:
        note += (f" Not run: {', '.join(skipped)}: this CPU has no bf16 instructions, and torch's emulated bf16 "
                 "convolutions are many times slower than fp32 (`--emulated-bf16` runs them).")  # fmt: skip
    rows = [[r["op"], r["size"], r["batch"], r["label"], r["seconds"], r["gflop"], r["gflops"],
             f"{100 * r['fraction_of_matmul']:.0f} %", r["speedup"], r.get("vs_best_diffusers"), r["peak_mb"]]
            for r in result["rows"]]  # fmt: skip
    header = ["op", "size", "batch", "label", "s (median)", "GFLOP", "GFLOP/s", "of matmul", "speedup",
              "vs best diffusers", "peak MB"]  # fmt: skip
    return ["## Encode and decode", "", f"Speedup relative to {result['baseline']} (same size and batch); vs best "
            "diffusers: relative to the fastest diffusers configuration measured for the same case (above 1: faster "
            f"than the best a diffusers user can pick by hand).{note}", "", *_table(header, rows)]  # fmt: skip


def render_training(result: dict) -> list[str]:
    return ["## Training step (forward + backward)", "", f"Loss: {result['loss']}.", "",
            *_timing_table(result["rows"], ["size", "batch", "case"])]  # fmt: skip


def render_tiling(result: dict) -> list[str]:
    def tiled(r: dict) -> str:
        if not r["tiled"]:
            return "no"
        mode = f", {r['statistics']} statistics" if r.get("statistics") else ""
        return ("yes" if r.get("budget_mb") is None else f"yes, budget {r['budget_mb']:.0f} MB") + mode

    rows = [[r["size"], r["implementation"], tiled(r), r.get("seconds"), r.get("activation_mb"),
             r.get("memory_vs_untiled"), r.get("time_vs_untiled"), r.get("psnr_vs_untiled", r.get("skipped"))]
            for r in result["rows"]]  # fmt: skip
    return [
        "## Tiled decode", "", f"Tile {result['tile_size']} px for both implementations (diffusers' overlap 0.25; ours: "
        "a halo of the receptive field). Ours keeps each residual block's output whole where its memory budget "
        "(`tile_memory_budget`) has room, else recomputes the level per GroupNorm pass: rows without and with a budget "
        "of a quarter of the untiled estimate; each with exact statistics and with sampled ones (the fast mode: "
        "`enable_tiling(statistics=\"sampled\")`). Each case runs in a fresh process; memory is the growth of its peak "
        "resident set (CPU) or of max_memory_allocated (CUDA) during the decode, weights excluded. PSNR: tiled against "
        "untiled decode of the same implementation (uint8; inf: identical). Input: a mosaic of 256 px photo crops.", "",
        *_table(["px", "implementation", "tiled", "s", "activation MB", "memory vs untiled", "time vs untiled",
                 "PSNR vs untiled (dB)"], rows),
    ]  # fmt: skip


def render_data(result: dict) -> list[str]:
    rows = [[r["source"], r["workers"], r["images_per_s"], r["per_worker"]] for r in result["rows"]]
    feed = [f"- {kind}: {line}" for kind, line in result["feed"].items() if line]
    return [
        "## Data loading", "", f"Training crops ({result['resolution']} px: decode, resize, random crop, flip) of "
        f"`{result['images']}` as a folder and as WebDataset shards, per DataLoader worker count (0: in the main "
        f"process), on {result['cpus']} CPUs. Workers share the cores: beyond the free cores the per-worker rate drops.",
        "", *_table(["source", "workers", "images/s", "per worker"], rows), "", *feed,
    ]  # fmt: skip


def render_fp16(result: dict) -> list[str]:
    verdict = "fp16-safe" if result["safe"] else f"overflows in {result['overflowing']}"
    if result["fp16_max"] is not None:
        ran = f"fp16 vs fp32 reconstruction {_cell(result['psnr_fp16_vs_fp32'])} dB"
    else:
        ran = f"no fp16 run ({result['fp16_error']}): judged on fp32 magnitudes against 65504"
    return [
        "## fp16 safety (check_fp16)", "", f"{result['images']} images at {result['size']} px: {verdict}; headroom "
        f"x{result['headroom']:.3g} (65504 / the largest fp32 activation); {ran}.", "",
        *_table(["block", "max abs activation, fp32", "fp16"],
                [[b, v, (result["fp16_max"] or {}).get(b)] for b, v in result["fp32_max"].items()]),
    ]  # fmt: skip


def render_fidelity(result: dict) -> list[str]:
    return [
        "## Fast path fidelity", "", f"Fast path: {result['fast_dtype']} ({result['fast_reason']}). Mean reconstruction "
        f"PSNR of {result['images']} images (256 px center crops); fast - fp32 = {result['delta_fast_vs_fp32']:+.3f} dB. "
        "Colour (latentvae.evaluation.colour): PSNR of luma Y and chroma CbCr, colourfulness ratio, mean CIEDE2000. "
        "PSNR vs fp32: of each reconstruction against diffusers' fp32 one, before rounding to uint8 (inf: identical).",
        "", *_table(["variant", "PSNR (dB)", "PSNR Y", "PSNR CbCr", "colourfulness ratio", "ΔE00", "PSNR vs fp32"],
                    [[name, m["psnr"], m["psnr_y"], m["psnr_c"], m["colourfulness_ratio"], m["ciede2000"],
                      m.get("psnr_vs_fp32")] for name, m in result["mean"].items()]),
    ]  # fmt: skip


RENDERERS = {  # mode -> its section of benchmark.md, in the order they appear
    "speed": render_speed,
    "training": render_training,
    "tiling": render_tiling,
    "fp16": render_fp16,
    "fidelity": render_fidelity,
    "data": render_data,
}


def render(results: dict) -> str:
    """benchmark.md: the command and environment, how to read it, then one section per mode that ran."""
    env = results["environment"]
    head = [
        "# Speed and memory benchmark", "", f"Command: `{env['command']}`  ",
        f"Models: speed and training `{results['preset']}` (random weights); tiling, fp16, fidelity "
        f"`{results['model']}`  ", f"Device: {env['device']}, {env['threads']} torch threads of {env['cpus']} CPUs; "
        f"torch {env['torch']}, diffusers {env['diffusers']}; load average {env['load']} at the start, "
        f"{env.get('load_end')} at the end.", "",
        "Times are medians over interleaved rounds: every variant runs once per round, in a rotating order, and a "
        "2048 x 2048 matmul of its dtype is timed right after it. On a machine shared with other jobs absolute times "
        "drift; ratios compare cases measured in the same rounds, and the matmul rate (the practical compute limit "
        "of that dtype) is sampled at the same moments. FLOPs: torch.utils.flop_counter (convolutions, matmuls, "
        "attention). Peak memory: weights plus the growth of CUDA max_memory_allocated, or on CPU of the peak "
        "resident set, during the warm-up call (latentvae.evaluation.profiling.PeakMemory).", "",
    ]  # fmt: skip
    return "\n".join(
        head
        + [
            line
            for name, render_mode in RENDERERS.items()
            if name in results
            for line in render_mode(results[name])
        ]
    )
