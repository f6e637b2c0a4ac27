"""backend.patcher.vae.VAE: channels-last image interface ([0, 1], (B, H, W, 3)) like Forge."""
import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class VAE:
    def __init__(self, model=None, device=None, dtype=None, no_init=False):
        if no_init:
            return
        self.first_stage_model = model.eval()
        self.latent_channels = getattr(model, "latent_channels", 4)
        self.device = memory_management.vae_device()
        self.offload_device = memory_management.vae_offload_device()
        self.vae_dtype = torch.float32
        self.output_device = memory_management.intermediate_device()
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device, offload_device=self.offload_device)

    def clone(self):
        n = VAE(no_init=True)
        n.patcher = self.patcher.clone()
        n.first_stage_model = self.first_stage_model
        n.latent_channels = self.latent_channels
        n.device, n.offload_device, n.vae_dtype, n.output_device = self.device, self.offload_device, self.vae_dtype, self.output_device
        return n

    def decode(self, samples_in):
        memory_management.load_model_gpu(self.patcher)
        out = self.first_stage_model.decode(samples_in.to(self.vae_dtype))
        return torch.clamp((out + 1.0) / 2.0, min=0.0, max=1.0).to(self.output_device).float().movedim(1, -1)

    def encode(self, pixel_samples):
        memory_management.load_model_gpu(self.patcher)
        pixel_samples = pixel_samples.movedim(-1, 1)
        return self.first_stage_model.encode((2. * pixel_samples - 1.).to(self.vae_dtype)).to(self.output_device).float()
