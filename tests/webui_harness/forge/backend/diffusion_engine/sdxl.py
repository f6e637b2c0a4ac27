"""backend.diffusion_engine.sdxl.StableDiffusionXL: ``shared.sd_model`` in Forge for SDXL.

Mirrors Forge's backend/diffusion_engine/sdxl.py (our re-implementation, not a copy):

- ``forge_objects.clip``: ``CLIP(model_dict={'clip_l': text_encoder, 'clip_g': text_encoder_2},
  tokenizer_dict={'clip_l': tokenizer, 'clip_g': tokenizer_2})``.
- ``text_processing_engine_l``: clip_l, ``clip_skip=minimal_clip_skip=2`` (penultimate hidden
  state), no final layer norm, no pooled output.
- ``text_processing_engine_g``: clip_g, penultimate hidden state, no final layer norm,
  ``return_pooled=True`` with ``text_projection=True`` (pooler_output -> text_projection).
- ``embedder = Timestep(256)``; ``get_learned_conditioning(prompt)`` reads ``prompt.width`` /
  ``prompt.height`` (default 1024, also when None) and ``prompt.is_negative_prompt`` (an
  ``SdConditioning``), crop 0/0, target = size; the six ids (height, width, crop_h, crop_w,
  target_height, target_width) are embedded, flattened and repeated per row; an all-empty
  negative prompt gives zeros for cond_l / cond_g / pooled. Returns
  ``{'crossattn': cat([cond_l, cond_g], dim=2), 'vector': cat([clip_pooled, flat], dim=1)}``.
- ``is_sdxl = True``; ``set_clip_skip`` sets both engines.
"""
import torch

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects, VaeFirstStage
from backend.nn.unet import Timestep
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


class StableDiffusionXL(VaeFirstStage, ForgeDiffusionEngine):
    matched_guesses = []  # Forge: [huggingface_guess.model_list.SDXL]

    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(model_dict={'clip_l': huggingface_components['text_encoder'], 'clip_g': huggingface_components['text_encoder_2']},
                    tokenizer_dict={'clip_l': huggingface_components['tokenizer'], 'clip_g': huggingface_components['tokenizer_2']})
        vae = VAE(model=huggingface_components['vae'])
        unet = UnetPatcher.from_model(model=huggingface_components['unet'], diffusers_scheduler=huggingface_components['scheduler'],
                                      config=estimated_config)
        # Forge passes embedding_expected_shape=2048 (768 + 1280) to both engines.
        expected_shape = (huggingface_components['text_encoder'].transformer.config.hidden_size
                          + huggingface_components['text_encoder_2'].transformer.config.hidden_size)
        self.text_processing_engine_l = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_l, tokenizer=clip.tokenizer.clip_l, embedding_dir=dynamic_args['embedding_dir'],
            embedding_key='clip_l', embedding_expected_shape=expected_shape, emphasis_name=dynamic_args['emphasis_name'],
            text_projection=False, minimal_clip_skip=2, clip_skip=2, return_pooled=False, final_layer_norm=False)
        self.text_processing_engine_g = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_g, tokenizer=clip.tokenizer.clip_g, embedding_dir=dynamic_args['embedding_dir'],
            embedding_key='clip_g', embedding_expected_shape=expected_shape, emphasis_name=dynamic_args['emphasis_name'],
            text_projection=True, minimal_clip_skip=2, clip_skip=2, return_pooled=True, final_layer_norm=False)
        self.embedder = Timestep(256)
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        # WebUI Legacy
        self.is_sdxl = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, clip_pooled = self.text_processing_engine_g(prompt)

        width = getattr(prompt, 'width', 1024) or 1024
        height = getattr(prompt, 'height', 1024) or 1024
        is_negative_prompt = getattr(prompt, 'is_negative_prompt', False)
        crop_w = 0
        crop_h = 0
        target_width = width
        target_height = height
        out = [self.embedder(torch.Tensor([height])), self.embedder(torch.Tensor([width])),
               self.embedder(torch.Tensor([crop_h])), self.embedder(torch.Tensor([crop_w])),
               self.embedder(torch.Tensor([target_height])), self.embedder(torch.Tensor([target_width]))]
        flat = torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(clip_pooled.shape[0], 1).to(clip_pooled)

        if is_negative_prompt and all(x == '' for x in prompt):  # force_zero_negative_prompt
            clip_pooled = torch.zeros_like(clip_pooled)
            cond_l = torch.zeros_like(cond_l)
            cond_g = torch.zeros_like(cond_g)

        return dict(crossattn=torch.cat([cond_l, cond_g], dim=2), vector=torch.cat([clip_pooled, flat], dim=1))

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        _, token_count = self.text_processing_engine_l.process_texts([prompt])
        return token_count, self.text_processing_engine_l.get_target_prompt_token_count(token_count)
