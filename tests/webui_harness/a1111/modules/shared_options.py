"""The subset of modules.shared_options' settings that the harnessed code paths read (real defaults)."""
from modules.options import OptionInfo, options_section

restricted_opts = {"samples_filename_pattern", "directories_filename_pattern", "outdir_samples", "outdir_txt2img_samples"}

_defaults = {
    # saving / infotext
    "samples_save": True, "save_incomplete_images": False, "samples_format": "png", "grid_save": True, "grid_format": "png",
    "grid_extended_filename": False, "grid_only_if_multiple": True, "return_grid": True, "enable_pnginfo": True,
    "outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images", "outdir_grids": "",
    "outdir_txt2img_grids": "outputs/txt2img-grids", "save_images_before_face_restoration": False,
    "save_images_before_highres_fix": False, "save_images_before_color_correction": False, "save_mask": False,
    "save_mask_composite": False, "return_mask": False, "return_mask_composite": False, "overlay_inpaint": True,
    "add_model_hash_to_info": True, "add_model_name_to_info": True, "add_user_name_to_info": False,
    "add_version_to_infotext": True, "add_vae_name_to_info": True, "add_vae_hash_to_info": True,
    "infotext_skip_pasting": [], "infotext_styles": "Apply if any", "enable_console_prompts": False,
    "samples_log_stdout": False, "do_not_show_images": False,
    # sd / model
    "sd_model_checkpoint": None, "sd_checkpoints_limit": 1, "CLIP_stop_at_last_layers": 1, "emphasis": "Original",
    "comma_padding_backtrack": 20, "use_old_emphasis_implementation": False, "upcast_attn": False,
    "cross_attention_optimization": "Automatic", "enable_quantization": False, "persistent_cond_cache": True,
    "batch_cond_uncond": True, "fp8_storage": "Disable", "cache_fp16_weight": False, "sdxl_crop_top": 0,
    "sdxl_crop_left": 0, "sdxl_refiner_low_aesthetic_score": 2.5, "sdxl_refiner_high_aesthetic_score": 6.0,
    "sdxl_clip_l_skip": False, "sd_vae": "Automatic", "sd_vae_decode_method": "Full", "sd_vae_encode_method": "Full",
    "auto_vae_precision": True, "auto_vae_precision_bfloat16": False, "inpainting_mask_weight": 1.0,
    "token_merging_ratio": 0.0, "token_merging_ratio_hr": 0.0, "token_merging_ratio_img2img": 0.0,
    "face_restoration": False, "face_restoration_model": "CodeFormer", "tiling": False,
    # sampler parameters
    "hide_samplers": [], "eta_ddim": 0.0, "eta_ancestral": 1.0, "ddim_discretize": "uniform", "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "eta_noise_seed_delta": 0, "always_discard_next_to_last_sigma": False, "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1", "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3, "uni_pc_lower_order_final": True,
    "sd_noise_schedule": "Default", "skip_early_cond": 0.0, "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
    "use_old_karras_scheduler_sigmas": False, "no_dpmpp_sde_batch_determinism": False, "use_old_hires_fix_width_height": False,
    "hires_fix_use_firstpass_conds": False, "use_old_scheduling": False, "use_downcasted_alpha_bar": False,
    "refiner_switch_by_sample_steps": False, "img2img_extra_noise": 0.0, "img2img_fix_steps": False,
    "s_min_uncond": 0.0, "s_min_uncond_all": False, "pad_cond_uncond": False, "pad_cond_uncond_v0": False,
    "randn_source": "GPU", "hires_fix_refiner_pass": "second pass",
    # live previews
    "live_previews_enable": False, "live_previews_image_format": "png", "show_progress_grid": True,
    "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN", "live_preview_allow_lowvram_full": False,
    "live_preview_content": "Prompt", "live_preview_refresh_period": 1000, "live_preview_fast_interrupt": False,
    # extra networks
    "extra_networks_default_multiplier": 1.0, "extra_networks_add_text_separator": " ",
    "textual_inversion_add_hashes_to_infotext": True,
    # misc
    "memmon_poll_rate": 8, "profiling_enable": False, "disable_all_extensions": "none",
}

options_templates = options_section(("harness", "Harness defaults"), {k: OptionInfo(v) for k, v in _defaults.items()})
