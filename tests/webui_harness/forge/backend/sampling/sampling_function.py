"""backend.sampling.sampling_function: Forge's CFG core (what CFGDenoiser.forward calls).

``calc_cond_uncond_batch`` batches the cond and uncond entries into ONE UNet call with the
UNCOND chunk first (``cond_or_uncond == [1, 0]``, 1 = uncond), sets transformer_options
``cond_or_uncond``, ``sigmas``, ``cond_mark``, ``cond_indices``, ``uncond_indices`` (copied from
``model_options["transformer_options"]``), and calls
``model_options["model_function_wrapper"](model.apply_model, {"input", "timestep", "c", "cond_or_uncond"})``
when set, else ``model.apply_model(input_x, timestep_, **c)`` with c = {c_crossattn, [c_concat],
transformer_options}. Memory-driven batch splitting, areas/masks and ControlNet are not simulated
beyond what SD1 txt2img needs (areas are full-frame; no masks).
"""
import math

import torch

from backend import memory_management
from backend.sampling.condition import Condition, compile_conditions, compile_weighted_conditions


def get_area_and_mult(conds, x_in, timestep_in):
    area = (x_in.shape[2], x_in.shape[3], 0, 0)
    if 'timestep_start' in conds and timestep_in[0] > conds['timestep_start']:
        return None
    if 'timestep_end' in conds and timestep_in[0] < conds['timestep_end']:
        return None
    area = conds.get('area', area)
    strength = conds.get('strength', 1.0)
    input_x = x_in[:, :, area[2]:area[0] + area[2], area[3]:area[1] + area[3]]
    mult = torch.ones_like(input_x) * strength
    conditioning = {c: v.process_cond(batch_size=x_in.shape[0], device=x_in.device, area=area) for c, v in conds["model_conds"].items()}
    return dict(input_x=input_x, mult=mult, conditioning=conditioning, area=area, control=conds.get('control', None), patches=None)


def cond_equal_size(c1, c2):
    if c1 is c2:
        return True
    if c1.keys() != c2.keys():
        return False
    return all(c1[k].can_concat(c2[k]) for k in c1)


def can_concat_cond(c1, c2):
    if c1["input_x"].shape != c2["input_x"].shape:
        return False
    if (c1["control"] is None) != (c2["control"] is None) or (c1["control"] is not None and c1["control"] is not c2["control"]):
        return False
    return cond_equal_size(c1["conditioning"], c2["conditioning"])


def cond_cat(c_list):
    temp = {}
    for x in c_list:
        for k in x:
            temp.setdefault(k, []).append(x[k])
    return {k: conds[0].concat(conds[1:]) for k, conds in temp.items()}


def compute_cond_mark(cond_or_uncond, sigmas):
    size = int(sigmas.shape[0])
    mark = []
    for cx in cond_or_uncond:
        mark += [cx] * size
    return torch.Tensor(mark).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):
    cl = int(sigmas.shape[0])
    cond_indices, uncond_indices = [], []
    for i, cx in enumerate(cond_or_uncond):
        (cond_indices if cx == 0 else uncond_indices).extend(range(i * cl, (i + 1) * cl))
    return cond_indices, uncond_indices


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    out_count = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    out_uncond_count = torch.ones_like(x_in) * 1e-37
    COND, UNCOND = 0, 1

    to_run = []
    for x in cond:
        p = get_area_and_mult(x, x_in, timestep)
        if p is not None:
            to_run.append((p, COND))
    if uncond is not None:
        for x in uncond:
            p = get_area_and_mult(x, x_in, timestep)
            if p is not None:
                to_run.append((p, UNCOND))

    while len(to_run) > 0:
        first = to_run[0]
        to_batch = [i for i in range(len(to_run)) if can_concat_cond(to_run[i][0], first[0])]
        to_batch.reverse()  # as in Forge: the last compatible entry (the uncond) comes first

        input_x, mult, c, cond_or_uncond, area = [], [], [], [], []
        control = None
        for i in to_batch:
            p, kind = to_run.pop(i)
            input_x.append(p["input_x"])
            mult.append(p["mult"])
            c.append(p["conditioning"])
            area.append(p["area"])
            cond_or_uncond.append(kind)
            control = p["control"]

        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = cond_cat(c)
        timestep_ = torch.cat([timestep] * batch_chunks)

        transformer_options = model_options['transformer_options'].copy() if 'transformer_options' in model_options else {}
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        transformer_options["cond_mark"] = compute_cond_mark(cond_or_uncond=cond_or_uncond, sigmas=timestep)
        transformer_options["cond_indices"], transformer_options["uncond_indices"] = compute_cond_indices(cond_or_uncond=cond_or_uncond, sigmas=timestep)
        c['transformer_options'] = transformer_options

        if control is not None:
            c['control'] = control.get_control(input_x, timestep_, c.copy(), len(cond_or_uncond))
            c['control_model'] = control

        if 'model_function_wrapper' in model_options:
            output = model_options['model_function_wrapper'](model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        del input_x

        for o in range(batch_chunks):
            a = area[o]
            sl = (slice(None), slice(None), slice(a[2], a[0] + a[2]), slice(a[3], a[1] + a[3]))
            if cond_or_uncond[o] == COND:
                out_cond[sl] += output[o] * mult[o]
                out_count[sl] += mult[o]
            else:
                out_uncond[sl] += output[o] * mult[o]
                out_uncond_count[sl] += mult[o]
        del mult

    out_cond /= out_count
    out_uncond /= out_uncond_count
    return out_cond, out_uncond


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None, return_full=False):
    edit_strength = sum((item['strength'] if 'strength' in item else 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond

    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)

    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)

    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep, "input": x, "sigma": timestep,
                "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale

    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)

    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    control = unet_patcher.controlnet_linked_list
    extra_concat_condition = unet_patcher.extra_concat_condition
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    seed = self.p.seeds[0]

    image_cond_in = extra_concat_condition if extra_concat_condition is not None else denoiser_params.image_cond
    if isinstance(image_cond_in, torch.Tensor):
        if image_cond_in.shape[0] == x.shape[0] and image_cond_in.shape[2] == x.shape[2] and image_cond_in.shape[3] == x.shape[3]:
            for item in (uncond or []) + cond:
                item['model_conds']['c_concat'] = Condition(image_cond_in)

    if control is not None:
        for h in cond + (uncond or []):
            h['control'] = control

    for modifier in model_options.get('conditioning_modifiers', []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed)

    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed, return_full=True)


def sampling_prepare(unet, x):
    """Loads the UNet patcher (object patches + LoRA merge) and the extra patchers."""
    additional_model_patchers = list(unet.extra_model_patchers_during_sampling)
    if unet.controlnet_linked_list is not None:
        additional_model_patchers += unet.controlnet_linked_list.get_models()
    memory_management.load_models_gpu(models=[unet] + additional_model_patchers)
    real_model = unet.model
    for cnet in unet.list_controlnets():
        cnet.pre_run(real_model, lambda p: real_model.predictor.percent_to_sigma(p))


def sampling_cleanup(unet):
    for cnet in unet.list_controlnets():
        cnet.cleanup()
