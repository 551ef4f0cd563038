"""latentvae.VQModel and VectorQuantizer against their oracles: diffusers.VQModel (keys, outputs, gradients), the
VQ-VAE formulas on hand-built examples, torch.cdist, a single process for the all-reduced statistics of two, and
the files read back by stock diffusers."""

from __future__ import annotations

import json
import os
import socket

import diffusers
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors import safe_open

from latentvae import VQ_PRESETS, VAEFileError, VectorQuantizer, VQModel, export_vae, load_vae
from latentvae.cli import main as cli_main
from latentvae.files.convert import diffusers_to_ldm
from latentvae.models.quantizer import nearest_codes


def _config(block_out_channels=(8, 16), latent_channels=3, num_vq_embeddings=32, norm_num_groups=4, **extra):
    levels = len(block_out_channels)
    return dict(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        norm_num_groups=norm_num_groups,
        latent_channels=latent_channels,
        num_vq_embeddings=num_vq_embeddings,
        **extra,
    )


CONFIGS = {
    "two-levels": _config(),
    # 8 groups: what shape inference guesses for these widths, so a file without config rebuilds it exactly
    "code-dim-differs-from-latent": _config(
        (8, 16, 16), latent_channels=4, vq_embed_dim=6, layers_per_block=2, norm_num_groups=8
    ),
    "no-mid-attention-gelu": _config((4, 8), mid_block_add_attention=False, act_fn="gelu"),
}


def perturbed_pair(config: dict, seed: int = 0) -> tuple[VQModel, diffusers.VQModel]:
    """Ours with random non-default weights and a codebook spread like real latents, and diffusers' with the same."""
    torch.manual_seed(seed)
    ours = VQModel(**config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ours.quantize.embedding.weight.normal_()  # far-apart codes: no near-ties between the two searches
    ref = diffusers.VQModel(**config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0)


# ----- the model against diffusers.VQModel -----


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_and_config_match_diffusers(name):
    ours, ref = VQModel(**CONFIGS[name]), diffusers.VQModel(**CONFIGS[name])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert "quantize.embedding.weight" in ours.state_dict()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    public = [k for k in ref.config if not k.startswith("_")]
    assert {k: ours.config[k] for k in public} == {k: ref.config[k] for k in public}


def test_constructor_defaults_match_diffusers():
    ours, ref = dict(VQModel().config), dict(diffusers.VQModel().config)
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {
        k: v for k, v in ref.items() if not k.startswith("_")
    }


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_outputs_match_diffusers_quantised_and_not(name):
    ours, ref = perturbed_pair(CONFIGS[name])
    x = images()
    h, h_ref = ours.encode(x).latents, ref.encode(x).latents
    assert_same(h, h_ref)
    for force in (False, True):
        a, b = ours.decode(h, force_not_quantize=force), ref.decode(h, force_not_quantize=force)
        assert_same(a.sample, b.sample)
        assert_same(a.commit_loss, b.commit_loss)
    sample, commit = ours(x, return_dict=False)
    assert_same(sample, ref(x).sample)
    assert_same(commit, ref(x).commit_loss)
    # the quantiser alone: same codes, the same tuple layout
    q, loss, (_, _, indices) = ours.quantize(h)
    q_ref, loss_ref, (_, _, indices_ref) = ref.quantize(h)
    assert torch.equal(indices, indices_ref) and indices.shape == (h.shape[0] * h.shape[2] * h.shape[3],)
    assert_same(q, q_ref)
    assert_same(loss, loss_ref)


@torch.no_grad()
def test_decoding_code_indices_matches_diffusers_lookup_from_codebook():
    ours, ref = perturbed_pair(_config(lookup_from_codebook=True))
    h = ours.encode(images()).latents
    b, c, height, width = h.shape
    indices = ours.quantize(h)[2][2]
    shape = (b, height, width, c)
    assert_same(
        ours.quantize.get_codebook_entry(indices, shape), ref.quantize.get_codebook_entry(indices, shape)
    )
    from_codes = ours.decode(indices, force_not_quantize=True, shape=shape).sample
    assert_same(from_codes, ref.decode(indices, force_not_quantize=True, shape=shape).sample)
    assert_same(from_codes, ours.decode(h).sample)  # the indices decode to what quantising decodes to


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    (out.sample.square().mean() + out.commit_loss).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradients_match_diffusers_with_its_legacy_weighting():
    ours, ref = perturbed_pair(CONFIGS["two-levels"])
    x = images()
    ours_grads, ref_grads = _grads(ours.train(), x), _grads(ref.train(), x)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_paper_weighting_moves_beta_from_the_codebook_to_the_commitment_term():
    """legacy (diffusers): ||z - sg e||^2 + beta ||sg z - e||^2; paper: ||sg z - e||^2 + beta ||z - sg e||^2."""
    ours, ref = perturbed_pair(CONFIGS["two-levels"])
    ours.train(), ref.train()
    ours.quantize.legacy = False
    x = images()
    for model in (ours, ref):
        model.zero_grad()
        model(x).commit_loss.backward()
    beta = 0.25
    codebook, ref_codebook = ours.quantize.embedding.weight.grad, ref.quantize.embedding.weight.grad
    torch.testing.assert_close(codebook, ref_codebook / beta, atol=1e-7, rtol=1e-5)
    encoder, ref_encoder = ours.encoder.conv_in.weight.grad, ref.encoder.conv_in.weight.grad
    torch.testing.assert_close(encoder, beta * ref_encoder, atol=1e-8, rtol=1e-4)


def test_gradients_reach_the_encoder_straight_through_the_quantiser():
    ours, _ = perturbed_pair(CONFIGS["two-levels"])
    x = images()
    h = ours.encode(x).latents
    h.retain_grad()
    quantized = ours.quantize(h, return_dict=True).quantized
    ours.decode_quantized(quantized).square().mean().backward()
    # Oracle: the decoder's gradient at the codes themselves, with no quantiser in the graph.
    codes = quantized.detach().requires_grad_(True)
    ours.decode_quantized(codes).square().mean().backward()
    torch.testing.assert_close(h.grad, codes.grad)
    assert h.grad.abs().sum() > 0
    assert ours.encoder.conv_in.weight.grad.abs().sum() > 0


def test_presets_build_ldm_vq_f4_and_a_small_one():
    model = VQModel.from_preset("vq-f4")
    ref = diffusers.VQModel(**VQ_PRESETS["vq-f4"])
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert model.downsampling_factor == 4 and model.config.latent_channels == 3
    assert tuple(model.quantize.embedding.weight.shape) == (8192, 3)
    assert list(model.config.block_out_channels) == [128, 256, 512] and model.config.layers_per_block == 2
    tiny = VQModel.from_preset("tiny-vq-f4", num_vq_embeddings=64)
    assert tiny.downsampling_factor == 4 and tiny.quantize.n_e == 64
    assert sum(p.numel() for p in tiny.parameters()) < 2e6
    with pytest.raises(ValueError, match="unknown VQModel preset"):
        VQModel.from_preset("sd-kl-f8")


def test_unsupported_architectures_are_refused_clearly():
    with pytest.raises(ValueError, match="norm_type='spatial'"):
        VQModel(**_config(norm_type="spatial"))
    with pytest.raises(ValueError, match="down_block_types"):
        VQModel(**{**_config(), "down_block_types": ("AttnDownEncoderBlock2D", "DownEncoderBlock2D")})


@torch.no_grad()
def test_to_diffusers_and_back_keep_weights_and_outputs():
    ours, _ = perturbed_pair(CONFIGS["two-levels"])
    stock = ours.to_diffusers()
    assert type(stock) is diffusers.VQModel
    x = images(1)
    assert_same(stock(x).sample, ours(x).sample)
    back = VQModel.from_diffusers(stock)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_an_ldm_super_resolution_pipeline_takes_it_as_its_vqvae():
    """diffusers' 4x LDM super-resolution pipeline (a VQ-f4 first stage) gives the same images with ours."""
    ours, ref = perturbed_pair(_config((8, 16, 16)))
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=6,  # 3 latent channels + the 3-channel low-resolution image
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    low_res = images(1, 8)
    outputs = []
    for vqvae in (ours, ref):
        pipe = diffusers.LDMSuperResolutionPipeline(
            vqvae=vqvae, unet=unet, scheduler=diffusers.DDIMScheduler()
        )
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        outputs.append(pipe(low_res, num_inference_steps=2, generator=generator, output_type="np").images)
    assert outputs[0].shape == (1, 32, 32, 3)  # 4x the low-resolution image
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


# ----- the quantiser's formulas -----


def hand_built():
    """Codes e0 = (0, 0), e1 = (1, 1), e2 = (3, 0); four 2-d latents in a (1, 2, 2, 2) tensor."""
    quantizer = VectorQuantizer(3, 2, beta=0.25, legacy=False)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]))
    vectors = torch.tensor([[0.2, -0.1], [0.9, 1.3], [2.5, 0.5], [1.0, 0.2]])
    z = vectors.T.reshape(1, 2, 2, 2).clone().requires_grad_(True)  # position (i, j) holds vector 2 i + j
    return quantizer, vectors, z


def test_codebook_and_commitment_losses_and_their_gradients_are_the_formulas():
    quantizer, vectors, z = hand_built()
    out = quantizer(z, return_dict=True)
    # nearest codes: 0, 1, 2, and 1 for (1.0, 0.2) (squared distances 1.04, 0.64, 4.04)
    assert out.indices.flatten().tolist() == [0, 1, 2, 1]
    # squared distances 0.05, 0.10, 0.50, 0.64; mean over the 8 elements = 1.29 / 8
    assert out.codebook_loss.item() == pytest.approx(1.29 / 8)
    assert out.commitment_loss.item() == pytest.approx(1.29 / 8)
    assert out.loss.item() == pytest.approx(1.29 / 8 * 1.25)  # codebook + 0.25 x commitment
    codes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(out.quantized, codes.T.reshape(1, 2, 2, 2))
    out.loss.backward()
    # d/de_k mean((e_k - z)^2) = 2 (e_k - z) / 8 summed over the vectors assigned to k
    expected_codebook = torch.tensor([[-0.05, 0.025], [0.025, 0.125], [0.125, -0.125]])
    torch.testing.assert_close(quantizer.embedding.weight.grad, expected_codebook)
    # beta * d/dz mean((z - e)^2) = 0.25 * 2 (z - e) / 8
    expected_z = 0.25 * 2 * (vectors - codes) / 8
    torch.testing.assert_close(z.grad, expected_z.T.reshape(1, 2, 2, 2))


def test_perplexity_and_usage_of_a_known_histogram():
    quantizer, _, _ = hand_built()
    # four vectors on code 0, four on code 2: two codes equally used -> perplexity 2, usage 2 / 3
    z = torch.tensor([[0.1, 0.0]] * 4 + [[2.9, 0.1]] * 4).T.reshape(1, 2, 2, 4)
    out = quantizer(z, return_dict=True)
    assert out.perplexity.item() == pytest.approx(2.0)
    assert out.usage.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("block_elements", [7, 64, 2**24])
def test_blockwise_nearest_codes_agree_with_cdist(block_elements):
    generator = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(300, 5, generator=generator), torch.randn(40, 5, generator=generator)
    expected = torch.cdist(vectors, codebook).argmin(1)
    assert torch.equal(nearest_codes(vectors, codebook, block_elements), expected)


def test_distances_and_losses_stay_fp32_under_bf16_autocast():
    quantizer = VectorQuantizer(64, 4)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    z = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z, return_dict=True)
    expected = torch.cdist(z.float().permute(0, 2, 3, 1).reshape(-1, 4), quantizer.embedding.weight).argmin(1)
    assert torch.equal(out.indices.flatten(), expected)
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.bfloat16


# ----- training-time state: EMA, restarts, usage window -----


def clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (1, 2, 8, 8) around (0, 0) and (4, 4), and the per-position cluster label."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(64) % 2).float()
    vectors = labels[:, None] * 4 + 0.3 * torch.randn(64, 2, generator=generator)
    return vectors.T.reshape(1, 2, 8, 8), labels


def test_ema_moves_each_code_to_the_mean_of_its_vectors():
    quantizer = VectorQuantizer(3, 2, beta=0.25, legacy=False)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[1.0, 1.0], [3.0, 3.0], [-9.0, 9.0]]))
    quantizer.configure_training(ema_decay=0.9)
    assert not quantizer.embedding.weight.requires_grad  # the EMA, not an optimizer, owns the codebook
    z, labels = clusters()
    vectors = z.reshape(2, 64).T
    for _ in range(120):
        out = quantizer.train()(z, return_dict=True)
    assert out.loss.item() == pytest.approx(0.25 * out.commitment_loss.item())  # no codebook term
    means = np.stack([vectors[labels == k].numpy().mean(0) for k in (0, 1)])
    np.testing.assert_allclose(quantizer.embedding.weight[:2].detach().numpy(), means, atol=1e-4)


def test_a_dead_code_is_restarted_from_the_batch():
    quantizer, _, _ = hand_built()  # code 2 sits at (3, 0), far from both clusters
    with torch.no_grad():
        quantizer.embedding.weight[1] = torch.tensor([4.0, 4.0])
    tracker = quantizer.configure_training(restart_after=3, usage_window=10)
    z, _ = clusters()
    vectors = z.reshape(2, 64).T
    quantizer.train()
    for _ in range(2):
        quantizer(z)
        assert tracker.restarted == 0 and torch.equal(quantizer.embedding.weight[2], torch.tensor([3.0, 0.0]))
        assert tracker.window_usage().item() == pytest.approx(2 / 3)
    quantizer(z)  # the third step without code 2
    assert tracker.restarted == 1
    assert (quantizer.embedding.weight[2] == vectors).all(1).any()  # now one of the batch's encoder outputs
    out = quantizer(z, return_dict=True)
    assert (out.indices == 2).any()  # and chosen again


def test_window_usage_forgets_codes_older_than_the_window():
    quantizer, _, _ = hand_built()
    tracker = quantizer.configure_training(usage_window=2)
    quantizer.train()
    near = {0: [0.1, 0.0], 1: [1.1, 1.0], 2: [2.9, 0.0]}
    for code in (0, 1, 2):  # one code per step
        quantizer(torch.tensor([near[code]] * 4).T.reshape(1, 2, 2, 2))
    assert tracker.window_usage().item() == pytest.approx(2 / 3)  # codes 1 and 2 in the last two steps


def test_training_state_stays_out_of_the_state_dict_and_round_trips():
    model, ref = perturbed_pair(CONFIGS["two-levels"])
    keys = set(model.state_dict())
    tracker = model.quantize.configure_training(ema_decay=0.5, restart_after=5)
    assert set(model.state_dict()) == keys  # export keys stay diffusers'
    ref.load_state_dict(model.state_dict(), strict=True)
    model.train()
    for seed in range(3):
        model(images(seed=seed))
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in tracker.state_dict().items()}
    model.load_state_dict(model.state_dict())  # new weights: the history is reset ...
    assert tracker.last_used.max().item() == -1
    tracker.load_state_dict(saved)  # ... and a checkpoint's tracker state restores it
    restored = tracker.state_dict()
    assert restored["step"] == 3
    assert all(torch.equal(restored[k], saved[k]) for k in saved if k != "step")


def test_a_nonfinite_batch_leaves_the_codebook_alone():
    quantizer, _, _ = hand_built()
    tracker = quantizer.configure_training(ema_decay=0.5, restart_after=1)
    before = quantizer.embedding.weight.detach().clone()
    quantizer.train()(torch.full((1, 2, 2, 2), float("nan")))
    assert torch.equal(quantizer.embedding.weight, before) and tracker.step == 0


# ----- two processes: the statistics are all-reduced -----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_codebook_run(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    quantizer, z = _ddp_setup()
    for _ in range(4):
        # each process sees its half of the latents: without the broadcast, restarted codes would differ
        part = z.chunk(world, dim=-1)[rank]
        out = quantizer.train()(part, return_dict=True)
    torch.save(
        {"weight": quantizer.embedding.weight.detach(), "perplexity": out.perplexity},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _ddp_setup() -> tuple[VectorQuantizer, torch.Tensor]:
    quantizer = VectorQuantizer(4, 2)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[0.5, 0.5], [3.0, 3.0], [50.0, 50.0], [-50.0, 50.0]]))
    # Codes 2 and 3 are never chosen; they are restarted at the end of the 4th (last) step, after its EMA update.
    quantizer.configure_training(ema_decay=0.8, restart_after=4)
    z, _ = clusters()
    return quantizer, z


def test_two_processes_agree_with_one_process_on_all_the_data(tmp_path):
    mp.spawn(_shared_codebook_run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # EMA and restarts agree across processes
    single, z = _ddp_setup()
    for _ in range(4):
        out = single.train()(z, return_dict=True)
    used = [0, 1]  # the single process re-seeds codes 2 and 3 from its own draw; the EMA codes must match
    torch.testing.assert_close(ranks[0]["weight"][used], single.embedding.weight[used].detach())
    assert ranks[0]["perplexity"].item() == pytest.approx(out.perplexity.item())


# ----- files -----


@pytest.fixture
def exported(tmp_path):
    model, _ = perturbed_pair(CONFIGS["code-dim-differs-from-latent"])
    ldm_file = export_vae(model, tmp_path / "vq-vae")
    return model, tmp_path / "vq-vae", ldm_file


@torch.no_grad()
def test_export_loads_in_stock_diffusers_with_every_key(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, folder, _ = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["force_upcast"] is False
    stock = diffusers.VQModel.from_pretrained(folder)
    assert stock.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in model.state_dict().items())
    x = images(1)
    assert_same(stock(x).sample, model(x).sample)


@torch.no_grad()
def test_every_file_we_write_loads_back_as_the_same_vq_model(exported, tmp_path):
    model, folder, ldm_file = exported
    with safe_open(ldm_file, framework="pt") as f:
        ldm_keys = set(f.keys())
    assert ldm_keys == set(diffusers_to_ldm(model.state_dict()))
    assert "quantize.embedding.weight" in ldm_keys and "encoder.down.0.block.0.conv1.weight" in ldm_keys
    # the ldm file alone, without metadata: a latent-diffusion VQ checkpoint, architecture from the shapes
    bare = tmp_path / "bare" / "vq.safetensors"
    bare.parent.mkdir()
    with safe_open(ldm_file, framework="pt") as f:
        from safetensors.torch import save_file

        save_file({k: f.get_tensor(k) for k in f.keys()}, bare)
    x = images(1)
    for path in (folder, ldm_file, bare):
        loaded = load_vae(path)
        assert type(loaded) is VQModel
        assert loaded.config.num_vq_embeddings == 32 and loaded.config.vq_embed_dim == 6
        assert_same(loaded(x).sample, model(x).sample)


def test_a_config_we_cannot_build_is_a_file_error(tmp_path):
    model = VQModel(**_config())
    export_vae(model, tmp_path / "movq")
    config_path = tmp_path / "movq" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "norm_type": "spatial"}))
    with pytest.raises(VAEFileError, match="norm_type='spatial'"):
        load_vae(tmp_path / "movq" / "diffusion_pytorch_model.safetensors")


def test_info_reports_the_codebook(exported, capsys):
    _, folder, _ = exported
    assert cli_main(["info", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "VQModel" in printed
    assert "32 codes of dimension 6 (5.0 bits per latent position)" in printed
    assert "quant convs" not in printed


def test_reconstruct_refuses_tiling_a_vq_model_and_names_it(exported, tmp_path, capsys):
    _, folder, _ = exported
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    assert cli_main(["reconstruct", str(folder), str(image), "--out", str(tmp_path / "out"), "--tile"]) != 0
    error = capsys.readouterr().err
    assert "--tile" in error and "VQModel" in error and str(folder) in error
    assert cli_main(["reconstruct", str(folder), str(image), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "a.png").is_file()


# ----- evaluation -----


def test_evaluate_reconstructs_through_the_codebook_and_reports_its_usage(exported, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "torch")
    )  # no LPIPS / FID weights: those columns stay empty
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, folder, _ = exported
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "report"
    argv = ["evaluate", "--model", f"vq={folder}", "--data_dir", str(data), "--output_dir", str(out)]
    assert cli_main([*argv, "--resize", "none", "--batch_size", "2", "--sample_posterior"]) == 0
    summary = json.loads((out / "summary.json").read_text())["models"][0]
    assert any("--sample_posterior does not apply" in note for note in summary["notes"])  # said, not ignored

    # Oracle: stock diffusers on the same uint8 pixels, its own quantiser's codes.
    stock = diffusers.VQModel.from_pretrained(folder).eval()
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(data / f"{i}.png"))) for i in range(3)])
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        codes = stock.quantize(stock.encode(x).latents)[2][2]
        recon = ((stock(x).sample.clamp(-1, 1) + 1) * 127.5).round()
    counts = np.bincount(codes.numpy(), minlength=32)
    assert summary["codes_used"] == int((counts > 0).sum())
    assert summary["codebook_usage"] == pytest.approx((counts > 0).mean())
    p = counts[counts > 0] / counts.sum()
    assert summary["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    mse = (recon - pixels.permute(0, 3, 1, 2).float()).square().mean(dim=(1, 2, 3))
    assert summary["psnr"] == pytest.approx((10 * torch.log10(255**2 / mse)).mean().item(), abs=0.02)
    report = (out / "report.md").read_text()
    assert (
        "Codebook usage (perplexity)" in report and f"of 32 ({summary['codebook_perplexity']:.1f})" in report
    )
