"""Tiny models, the diffusers host (folders, single files, names, encoding) and the sampler."""

import pytest
import torch
from checkpoint_fixtures import weight_files, write_config_folder, write_single_file_checkpoint
from diffusers import EulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from lib_loraclr.hosts.diffusers import DiffusersModel, load_base
from lib_loraclr.model import Conditioning
from lib_loraclr.sampling import decode_latents, initial_noise, sample, sigmas_for, trailing_timesteps
from lib_loraclr.tiny import build_tiny_components, build_tiny_pipeline

PROMPTS = ["a photo of a cat", "an oil painting of a red house by the sea"]


def unet_outputs(model: DiffusersModel):
    """Text conditioning and one UNet pass on fixed inputs: what two loads must agree on."""
    cond = model.encode(PROMPTS)
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return cond, model.unet_eps(latent, torch.tensor([999, 400]), cond)


@pytest.fixture(scope="module")
def models(tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tiny_model_runs_and_depends_on_the_prompt(models, arch):
    model = models[arch]
    assert model.arch == arch
    cond, eps = unet_outputs(model)
    assert eps.shape == (2, 4, 8, 8)
    assert torch.isfinite(eps).all()
    assert not torch.allclose(eps[0], eps[1], atol=1e-4)  # different prompts and timesteps


def test_tiny_components_are_deterministic_per_seed():
    first, again, other = (build_tiny_components("sd1", seed) for seed in (0, 0, 1))
    for name in ("unet", "text_encoder", "vae"):
        state, state_again, state_other = (c[name].state_dict() for c in (first, again, other))
        assert all(torch.equal(state[k], state_again[k]) for k in state)
        assert not all(torch.equal(state[k], state_other[k]) for k in state if state[k].dim() > 1)


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_components("sd1", seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_folder_round_trip_gives_identical_outputs(models, arch):
    built = DiffusersModel.from_pipeline(build_tiny_pipeline(arch, seed=0))
    cond_built, eps_built = unet_outputs(built)
    cond_loaded, eps_loaded = unet_outputs(models[arch])
    assert torch.equal(cond_built.context, cond_loaded.context)
    assert torch.equal(eps_built, eps_loaded)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def single_file(request, tmp_path_factory, tiny_sd1_folder, tiny_sdxl_folder):
    """(arch, checkpoint path, weight-free config folder) written from the tiny folder's model."""
    arch = request.param
    folder = {"sd1": tiny_sd1_folder, "sdxl": tiny_sdxl_folder}[arch]
    checkpoint, config = write_single_file(arch, folder, tmp_path_factory.mktemp(f"single_{arch}"))
    return arch, checkpoint, config


def write_single_file(arch, folder, out):
    checkpoint = write_single_file_checkpoint(build_tiny_pipeline(arch, seed=0), str(out / f"{arch}.safetensors"))
    return checkpoint, write_config_folder(folder, str(out / "config"))


def test_single_file_with_config_matches_folder(single_file, models):
    arch, checkpoint, config = single_file
    assert weight_files(config) == []  # every weight must come from the single file
    loaded = load_base(checkpoint, config=config)
    assert loaded.arch == arch
    cond_file, eps_file = unet_outputs(loaded)
    cond_folder, eps_folder = unet_outputs(models[arch])
    assert torch.equal(cond_file.context, cond_folder.context)
    if arch == "sdxl":
        assert torch.equal(cond_file.pooled, cond_folder.pooled)
    assert torch.equal(eps_file, eps_folder)
    vae_file, vae_folder = loaded.vae.state_dict(), models[arch].vae.state_dict()
    assert vae_file.keys() == vae_folder.keys()
    assert all(torch.equal(vae_file[k], vae_folder[k]) for k in vae_file)


def test_single_file_without_config_names_what_to_pass(single_file, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    _, checkpoint, _ = single_file
    with pytest.raises(FileNotFoundError) as error:
        load_base(checkpoint)
    message = str(error.value)
    assert checkpoint in message and "config=" in message and "model_index.json" in message


def test_single_file_with_the_other_architectures_config_is_refused(single_file, tiny_sd1_folder, tiny_sdxl_folder):
    arch, checkpoint, _ = single_file
    other = tiny_sdxl_folder if arch == "sd1" else tiny_sd1_folder
    with pytest.raises(ValueError, match="config folder"):
        load_base(checkpoint, config=other)


def test_load_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_base(missing)

    with pytest.raises(ValueError, match="model_index.json"):
        load_base(str(tmp_path))

    not_sd = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, not_sd)
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        load_base(not_sd)

    pickled = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": Conditioning}, pickled)
    with pytest.raises(ValueError, match="refused"):
        load_base(pickled)

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="unknown model file type"):
        load_base(str(tmp_path / "model.gguf"))


def test_tensor_only_ckpt_loads_like_the_safetensors_file(tiny_sd1_folder, models, tmp_path):
    checkpoint, config = write_single_file("sd1", tiny_sd1_folder, tmp_path)
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": load_file(checkpoint)}, ckpt)
    _, eps_ckpt = unet_outputs(load_base(ckpt, config=config))
    _, eps_folder = unet_outputs(models["sd1"])
    assert torch.equal(eps_ckpt, eps_folder)


def test_v_prediction_is_converted_to_noise(models):
    model = models["sd1"]
    v_scheduler = EulerDiscreteScheduler.from_config(model.scheduler.config, prediction_type="v_prediction")
    v_model = DiffusersModel(model.unet, model.text_encoder, model.tokenizer, v_scheduler)
    cond = model.encode(PROMPTS)
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timestep = torch.tensor([100, 900])
    with torch.no_grad():
        v = model.unet_eps(latent, timestep, cond)  # the same network, read as v
        eps = v_model.unet_eps(latent, timestep, cond)
    alphas = model.alphas_cumprod[timestep].view(-1, 1, 1, 1)
    assert torch.allclose(eps, alphas.sqrt() * v + (1 - alphas).sqrt() * latent, atol=1e-6)
    assert not torch.allclose(eps, v, atol=1e-3)


def test_targets_use_canonical_names_and_resolve_to_the_modules(models):
    sd1, sdxl = models["sd1"], models["sdxl"]
    targets = sd1.targets()
    to_k = "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"
    assert targets[f"unet.{to_k}"] is sd1.unet.get_submodule(to_k)
    assert sum(name.endswith("attn2.to_k") for name in targets) == 16  # as SD1.5
    text = sd1.text_encoder.text_model if hasattr(sd1.text_encoder, "text_model") else sd1.text_encoder
    assert targets["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] is text.encoder.layers[0].self_attn.q_proj
    assert isinstance(targets["unet.conv_in"], torch.nn.Conv2d)
    assert all(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in targets.values())
    assert all(
        name.startswith(("unet.", "text_encoder.text_model.")) for name in targets
    ), "text encoder names must be in the transformers-4 form"

    xl_targets = sdxl.targets()
    assert xl_targets["text_encoder_2.text_projection"] is sdxl.text_encoder_2.text_projection
    assert (
        xl_targets["text_encoder_2.text_model.encoder.layers.1.mlp.fc2"]
        is sdxl.text_encoder_2.text_model.encoder.layers[1].mlp.fc2
    )
    assert "unet.add_embedding.linear_1" in xl_targets
    # 2x2 latent level at 64 px (1/32 of the image) has cross-attention
    assert "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v" in xl_targets


def test_tokenize_pads_with_the_clip_special_tokens(models):
    ids = models["sd1"].tokenize(PROMPTS)
    assert ids.shape == (2, 77)
    assert (ids[:, 0] == 49406).all()
    assert (ids[0, 6:] == 49407).all()  # "a photo of a cat" is 5 tokens, then end/pad
    assert models["sd1"].tokenizer.decode(ids[0, 1:6]) == "a photo of a cat"


def test_encode_sd1_is_the_last_hidden_state(models):
    model = models["sd1"]
    cond = model.encode(PROMPTS)
    assert cond.context.shape == (2, 77, 32) and cond.pooled is None
    with torch.no_grad():
        expected = model.text_encoder(model.tokenize(PROMPTS)).last_hidden_state
    assert torch.equal(cond.context, expected)


def test_encode_sdxl_concatenates_penultimate_states_and_uses_time_ids(models):
    model = models["sdxl"]
    cond = model.encode(PROMPTS)
    assert cond.context.shape == (2, 77, 32 + 48)
    assert cond.pooled.shape == (2, 48)
    with torch.no_grad():
        hidden_1 = model.text_encoder(model.tokenize(PROMPTS), output_hidden_states=True).hidden_states[-2]
    assert torch.equal(cond.context[..., :32], hidden_1)

    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500])
    sized = model.encode(PROMPTS, size=(64, 64))
    assert sized.extra["time_ids"].tolist() == [64, 64, 0, 0, 64, 64]
    other_size = model.encode(PROMPTS, size=(1024, 768))
    with torch.no_grad():
        default = model.unet_eps(latent, timestep, cond)
        same = model.unet_eps(latent, timestep, sized)
        different = model.unet_eps(latent, timestep, other_size)
    assert torch.equal(default, same)  # default time ids = the latent's image size
    assert not torch.allclose(default, different)


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class GaussianDataModel:
    """A model whose data is N(mean, std^2) per element: its eps prediction is exact.

    With x = x0 + sigma * noise, E[x0 | x] = mean + std^2 / (std^2 + sigma^2) * (x - mean), and
    the probability-flow ODE keeps (x - mean) / sqrt(std^2 + sigma^2) constant.
    """

    device = torch.device("cpu")
    dtype = torch.float32
    latent_channels = 4
    vae_scale_factor = 8

    def __init__(self, mean: torch.Tensor, std: float, uncond_mean: torch.Tensor | None = None):
        self.mean, self.std, self.uncond_mean = mean.double(), std, uncond_mean
        self.alphas_cumprod = sd_alphas_cumprod()

    def unet_eps(self, model_input, timestep, cond):
        mean = self.mean
        if self.uncond_mean is not None:  # rows whose context is negative are unconditional
            is_cond = (cond.context[:, 0, 0] > 0).view(-1, 1, 1, 1)
            mean = torch.where(is_cond, self.mean, self.uncond_mean.double())
        alphas = self.alphas_cumprod.double()[timestep].view(-1, 1, 1, 1)
        x = model_input.double() / alphas.sqrt()  # back to x0 + sigma * noise
        variance = (1 - alphas) / alphas  # sigma^2
        denoised = mean + self.std**2 / (self.std**2 + variance) * (x - mean)
        return ((x - denoised) / variance.sqrt()).float()


def toy_cond(value: float = 1.0) -> Conditioning:
    return Conditioning(torch.full((1, 77, 8), value))


def test_trailing_timesteps_and_sigmas():
    timesteps = trailing_timesteps(1000, 20)
    assert timesteps[0] == 999 and timesteps[-1] == 49 and (timesteps.diff() == -50).all()
    sigmas = sigmas_for(sd_alphas_cumprod(), timesteps)
    assert sigmas.shape == (21,) and sigmas[-1] == 0 and (sigmas[:-1].diff() < 0).all()
    assert 14.0 < sigmas[0] < 15.0  # SD's largest training sigma is about 14.6
    with pytest.raises(ValueError):
        trailing_timesteps(1000, 0)


@pytest.mark.parametrize("std", [0.5, 1.0])
def test_sampler_follows_the_exact_ode_on_gaussian_data(std):
    mean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    model = GaussianDataModel(mean, std)
    steps = 20
    latent = sample(model, toy_cond(), steps=steps, height=64, width=64, seed=3).double()
    sigmas = sigmas_for(model.alphas_cumprod, trailing_timesteps(1000, steps))
    sigma_max, sigma_last = sigmas[0].item(), sigmas[-2].item()
    start = initial_noise((1, 4, 8, 8), 3).double() * (1 + sigma_max**2) ** 0.5
    # exact ODE from sigma_max to sigma_last, then the final step returns the denoised estimate
    expected = mean + (start - mean) * std**2 / ((std**2 + sigma_max**2) * (std**2 + sigma_last**2)) ** 0.5
    relative_error = (latent - expected).norm() / (expected - mean).norm()
    # DPM-Solver++(2M) gets < 0.5 %; a first-order (DDIM) solver is at about 5 %
    assert relative_error < 0.01


def test_sampler_cfg_on_point_data_is_the_guided_point():
    cond_point = torch.full((1, 4, 8, 8), 0.5)
    uncond_point = torch.full((1, 4, 8, 8), -0.25)
    model = GaussianDataModel(cond_point, 0.0, uncond_mean=uncond_point)
    unguided = sample(model, toy_cond(1.0), steps=8, height=64, width=64)
    assert torch.allclose(unguided, cond_point, atol=1e-4)
    guided = sample(model, toy_cond(1.0), uncond=toy_cond(-1.0), guidance_scale=3.0, steps=8, height=64, width=64)
    assert torch.allclose(guided, uncond_point + 3.0 * (cond_point - uncond_point), atol=1e-4)


def test_sampler_on_tiny_model_is_deterministic_and_reports_progress(models):
    model = models["sd1"]
    cond = model.encode(["a photo of a cat"])
    uncond = model.encode([""])
    calls = []

    def record(step_index, total):
        calls.append((step_index, total))

    first = sample(model, cond, steps=4, height=64, width=64, seed=1, callback=record)
    again = sample(model, cond, steps=4, height=64, width=64, seed=1)
    other_seed = sample(model, cond, steps=4, height=64, width=64, seed=2)
    guided = sample(model, cond, steps=4, height=64, width=64, seed=1, uncond=uncond, guidance_scale=5.0)
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert first.shape == (1, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed)
    assert not torch.allclose(first, guided)
    with pytest.raises(ValueError, match="multiples of 8"):
        sample(model, cond, steps=2, height=60, width=64)

    images = decode_latents(model.vae, first)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_sampler_per_row_seeds_make_each_row_independent_of_the_batch(models):
    model = models["sd1"]
    cond = model.encode(["a photo of a cat", "a red house"])
    batched = sample(model, cond, steps=3, height=64, width=64, seed=[5, 9])
    alone = [sample(model, model.encode([prompt]), steps=3, height=64, width=64, seed=seed)
             for prompt, seed in (("a photo of a cat", 5), ("a red house", 9))]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], sample(model, cond, steps=3, height=64, width=64, seed=5)[1])
    with pytest.raises(ValueError, match="3 seeds for 2 rows"):
        sample(model, cond, steps=2, height=64, width=64, seed=[1, 2, 3])


def test_sampler_given_rows_of_a_larger_batchs_noise_samples_those_rows(models):
    """What the merge's micro-batched capture relies on: a row's result depends on its noise, not its batch-mates."""
    model = models["sd1"]
    prompts = ["a photo of a cat", "a red house", "a blue car"]
    whole = sample(model, model.encode(prompts), steps=3, height=64, width=64, seed=7)
    noise = initial_noise((3, model.latent_channels, 8, 8), 7)
    torch.testing.assert_close(sample(model, model.encode(prompts), steps=3, height=64, width=64, noise=noise), whole,
                               rtol=0, atol=0)
    last = sample(model, model.encode(prompts[2:]), steps=3, height=64, width=64, noise=noise[2:])
    torch.testing.assert_close(last, whole[2:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="noise of shape"):
        sample(model, model.encode(prompts[:1]), steps=2, height=64, width=64, noise=noise)


def test_sdxl_sampling_runs(models):
    model = models["sdxl"]
    latent = sample(model, model.encode(PROMPTS), steps=2, height=64, width=96, seed=0)
    assert latent.shape == (2, 4, 8, 12) and torch.isfinite(latent).all()
    assert model.alphas_cumprod.shape == (1000,)
