"""Tiny stand-in for IntegratedAutoencoderKL: NOT a VAE.

``decode`` = tanh(nearest-x8(conv1x1(z))) in [-1, 1]; ``encode`` = conv1x1(avgpool/8(x)).
``process_in`` / ``process_out`` scale by ``scaling_factor`` (0.18215) as Forge's VAE does.
"""
import torch
from torch import nn


class IntegratedAutoencoderKL(nn.Module):
    def __init__(self, latent_channels=4, scaling_factor=0.18215, shift_factor=0.0):
        super().__init__()
        self.decoder_conv = nn.Conv2d(latent_channels, 3, 1)
        self.encoder_conv = nn.Conv2d(3, latent_channels, 1)
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.latent_channels = latent_channels

    def encode(self, x, regulation=None):
        return self.encoder_conv(torch.nn.functional.avg_pool2d(x, 8))

    def decode(self, z):
        return torch.tanh(torch.nn.functional.interpolate(self.decoder_conv(z), scale_factor=8, mode="nearest"))

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return (latent / self.scaling_factor) + self.shift_factor
