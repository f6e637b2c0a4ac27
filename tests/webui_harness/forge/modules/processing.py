"""modules.processing (Forge 2.0.1v1.10.1 order), built on the A1111 stand-in's processing.

Differences from A1111 that are reproduced (checked against Forge's modules/processing.py):

- ``process_images``: before_process -> override settings -> ``manage_model_and_prompt_cache``
  (``p.sd_model, _ = forge_model_reload()``) -> process_images_inner.
- ``process_images_inner``: ``scripts.process(p)`` runs OUTSIDE inference mode; everything after
  (p.init, the batch loop, decoding, postprocess_batch/_image, grid) runs under
  ``torch.inference_mode()``. Per batch: ``forge_model_reload()`` -> ``p.sd_model.forge_objects =
  forge_objects_original.shallow_copy()`` -> before_process_batch -> extra networks activate
  (Forge's LoRA replaces forge_objects.unet / .clip by patched clones and stores
  ``forge_objects_after_applying_lora``) -> ``forge_objects = forge_objects_after_applying_lora.shallow_copy()``
  -> process_batch -> setup_conds -> sample -> latents_after_sampling -> post_sample -> decode ...
- ``StableDiffusionProcessingTxt2Img.sample``: sampler created, x = rng.next(), ``forge_objects``
  reset from ``forge_objects_after_applying_lora`` (so every clone a script assigned earlier is
  dropped), token merging, ``process_before_every_sampling(p, x=, noise=, c=, uc=)``: a script
  patches ``p.sd_model.forge_objects.unet.clone()`` and assigns it back -> sampler.sample.
- Hires pass: hr extra networks -> hr conds -> before_hr -> process_before_every_sampling ->
  forge_objects reset -> process_before_every_sampling AGAIN (Forge calls it twice) ->
  sample_img2img with ``cfg_scale = p.hr_cfg`` (default 1.0).
"""
from __future__ import annotations

from modules import _inherit

_inherit("processing", globals())

import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from modules.shared import cmd_opts  # noqa: E402
from modules_forge.utils import apply_circular_forge  # noqa: E402
from backend.modules.k_prediction import rescale_zero_terminal_snr_sigmas  # noqa: E402
from backend import memory_management  # noqa: E402


def txt2img_image_conditioning(sd_model, x, width, height):
    if sd_model.is_inpaint:
        raise NotImplementedError("inpainting models are not simulated")
    # Dummy zero conditioning if we're not using inpainting or unclip models.
    return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)


def _txt2img_image_conditioning_method(self, x, width=None, height=None):
    self.is_using_inpainting_conditioning = self.sd_model.is_inpaint
    return txt2img_image_conditioning(self.sd_model, x, width or self.width, height or self.height)


StableDiffusionProcessing.txt2img_image_conditioning = _txt2img_image_conditioning_method  # noqa: F821
_a1111_post_init = StableDiffusionProcessing.__post_init__  # noqa: F821


def _post_init(self):
    _a1111_post_init(self)
    self.latents_after_sampling = []
    self.extra_result_images = []
    self.modified_noise = None


StableDiffusionProcessing.__post_init__ = _post_init  # noqa: F821

need_global_unload = False


def manage_model_and_prompt_cache(p):
    global need_global_unload
    p.sd_model, just_reloaded = sd_models.forge_model_reload()  # noqa: F821
    if need_global_unload and not just_reloaded:
        memory_management.unload_all_models()
    if need_global_unload:
        p.clear_prompt_cache()
    need_global_unload = False


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)

    stored_opts = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings.keys() if k in opts.data}  # noqa: F821
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get('sd_model_checkpoint')) is None:  # noqa: F821
            p.override_settings.pop('sd_model_checkpoint', None)
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)  # noqa: F821
        if not getattr(p, 'txt2img_upscale', False):
            manage_model_and_prompt_cache(p)
        sd_samplers.fix_p_invalid_sampler_and_scheduler(p)  # noqa: F821
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)  # noqa: F821
    return res


def process_images_inner(p):
    if isinstance(p.prompt, list):
        assert len(p.prompt) > 0
    else:
        assert p.prompt is not None

    devices.torch_gc()

    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)

    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    if p.tiling is None:
        p.tiling = opts.tiling

    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    p.sd_vae_name = sd_vae.get_loaded_vae_name()
    p.sd_vae_hash = sd_vae.get_loaded_vae_hash()

    apply_circular_forge(p.sd_model, p.tiling)
    p.sd_model.comments = []
    p.sd_model.extra_generation_params = {}

    p.fill_fields_from_opts()
    p.setup_prompts()

    if isinstance(seed, list):
        p.all_seeds = seed
    else:
        p.all_seeds = [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]

    if isinstance(subseed, list):
        p.all_subseeds = subseed
    else:
        p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.inference_mode():
        with devices.autocast():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)

        if state.job_count == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n

            if state.skipped:
                state.skipped = False

            if state.interrupted or state.stopping_generation:
                break

            sd_models.forge_model_reload()  # model can be changed for example by refiner, hiresfix

            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]

            latent_channels = shared.sd_model.forge_objects.vae.latent_channels
            p.rng = rng.ImageRNG((latent_channels, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                                 seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)

            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            if len(p.prompts) == 0:
                break

            p.parse_extra_network_prompts()

            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)

            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()

            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            p.setup_conds()

            p.extra_generation_params.update(p.sd_model.extra_generation_params)

            for comment in p.sd_model.comments:
                p.comment(comment)

            if p.n_iter > 1:
                shared.state.job = f"Batch {n + 1} out of {p.n_iter}"

            sd_models.apply_alpha_schedule_override(p.sd_model, p)

            sigmas_backup = None
            if opts.sd_noise_schedule == "Zero Terminal SNR" or getattr(p.sd_model.model_config, 'ztsnr', False):
                p.extra_generation_params['Noise Schedule'] = opts.sd_noise_schedule
                predictor = p.sd_model.forge_objects.unet.model.predictor
                sigmas_backup = predictor.sigmas
                predictor.set_sigmas(rescale_zero_terminal_snr_sigmas(predictor.sigmas))

            samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)

            for x_sample in samples_ddim:
                p.latents_after_sampling.append(x_sample)

            if sigmas_backup is not None:
                p.sd_model.forge_objects.unet.model.predictor.set_sigmas(sigmas_backup)

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples

            if getattr(samples_ddim, 'already_decoded', False):
                x_samples_ddim = samples_ddim
            else:
                x_samples_ddim = decode_latent_batch(p.sd_model, samples_ddim, target_device=devices.cpu, check_for_nans=True)

            x_samples_ddim = torch.stack(x_samples_ddim).float()
            x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)

            del samples_ddim

            devices.torch_gc()

            state.nextjob()

            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)

                p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
                p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]

                batch_params = scripts.PostprocessBatchListArgs(list(x_samples_ddim))
                p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
                x_samples_ddim = batch_params.images

            def infotext(index=0, use_main_prompt=False):
                return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt, index=index, all_negative_prompts=p.negative_prompts)

            for i, x_sample in enumerate(x_samples_ddim):
                p.batch_index = i

                x_sample = 255. * np.moveaxis(x_sample.cpu().numpy(), 0, 2)
                x_sample = x_sample.astype(np.uint8)

                image = Image.fromarray(x_sample)

                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image

                mask_for_overlay = getattr(p, "mask_for_overlay", None)
                overlay_image = None

                if p.scripts is not None:
                    ppmo = scripts.PostProcessMaskOverlayArgs(i, mask_for_overlay, overlay_image)
                    p.scripts.postprocess_maskoverlay(p, ppmo)

                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image_after_composite(p, pp)
                    image = pp.image

                text = infotext(i)
                infotexts.append(text)
                if opts.enable_pnginfo:
                    image.info["parameters"] = text
                output_images.append(image)

            del x_samples_ddim

            devices.torch_gc()

        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))

        p.color_corrections = None

        index_of_first_image = 0
        unwanted_grid_because_of_img_count = len(output_images) < 2 and opts.grid_only_if_multiple
        if (opts.return_grid or opts.grid_save) and not p.do_not_save_grid and not unwanted_grid_because_of_img_count:
            grid = images.image_grid(output_images, p.batch_size)
            if opts.return_grid:
                text = infotext(use_main_prompt=True)
                infotexts.insert(0, text)
                if opts.enable_pnginfo:
                    grid.info["parameters"] = text
                output_images.insert(0, grid)
                index_of_first_image = 1

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)

    devices.torch_gc()

    res = Processed(
        p,
        images_list=output_images,
        seed=p.all_seeds[0],
        info=infotexts[0],
        subseed=p.all_subseeds[0],
        index_of_first_image=index_of_first_image,
        infotexts=infotexts,
    )

    if p.scripts is not None:
        p.scripts.postprocess(p, res)

    return res


_A1111Txt2Img = StableDiffusionProcessingTxt2Img  # noqa: F821


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(_A1111Txt2Img):
    hr_cfg: float = 1.0
    hr_distilled_cfg: float = 3.5
    distilled_cfg_scale: float = 3.5
    firstpass_image: object = None

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)  # noqa: F821

        x = self.rng.next()

        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        sd_models.apply_token_merging(self.sd_model, self.get_token_merging_ratio())  # noqa: F821

        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)

        if self.modified_noise is not None:
            x = self.modified_noise
            self.modified_noise = None

        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        del x

        if not self.enable_hr:
            return samples

        devices.torch_gc()  # noqa: F821
        decoded_samples = None
        return self.sample_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if shared.state.interrupted:  # noqa: F821
            return samples

        self.is_hr_pass = True
        target_width = self.hr_upscale_to_x
        target_height = self.hr_upscale_to_y

        img2img_sampler_name = self.hr_sampler_name or self.sampler_name
        self.sampler = sd_samplers.create_sampler(img2img_sampler_name, self.sd_model)  # noqa: F821

        samples = torch.nn.functional.interpolate(samples, size=(target_height // opt_f, target_width // opt_f), mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"])  # noqa: F821
        image_conditioning = self.txt2img_image_conditioning(samples)

        shared.state.nextjob()  # noqa: F821

        self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds, subseed_strength=self.subseed_strength,  # noqa: F821
                                seed_resize_from_h=self.seed_resize_from_h, seed_resize_from_w=self.seed_resize_from_w)
        noise = self.rng.next()

        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)  # noqa: F821

        self.calculate_hr_conds()

        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        sd_models.apply_token_merging(self.sd_model, self.get_token_merging_ratio(for_hr=True))  # noqa: F821

        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        if self.modified_noise is not None:
            noise = self.modified_noise
            self.modified_noise = None

        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps, image_conditioning=image_conditioning)

        self.sampler = None
        decoded_samples = decode_latent_batch(self.sd_model, samples, target_device=devices.cpu, check_for_nans=True)  # noqa: F821
        self.is_hr_pass = False
        return decoded_samples

    def init(self, all_prompts, all_seeds, all_subseeds):
        super().init(all_prompts, all_seeds, all_subseeds)
        if self.enable_hr:
            self.extra_generation_params["Hires CFG Scale"] = self.hr_cfg


def program_version():
    """Forge: launch.git_tag() = 'f' + forge_version + '-' + A1111's tag."""
    from modules_forge import forge_version
    return 'f' + forge_version.version + '-v1.10.1'
