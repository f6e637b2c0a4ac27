"""modules.rng.ImageRNG: one torch.Generator per seed (CPU source); the first next() draws the
initial noise, later next() calls continue each seed's stream (used for sampler noise)."""
import torch

from modules import devices


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.generators = [torch.Generator(device=devices.cpu).manual_seed(int(seed)) for seed in seeds]
        self.is_first = True

    def first(self):
        xs = []
        for i, seed in enumerate(self.seeds):
            noise = torch.randn(self.shape, generator=self.generators[i], device=devices.cpu)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                subnoise = torch.randn(self.shape, generator=torch.Generator().manual_seed(int(subseed)))
                noise = slerp(self.subseed_strength, noise, subnoise)
            xs.append(noise)
        return torch.stack(xs).to(devices.device)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g, device=devices.cpu) for g in self.generators]).to(devices.device)


def slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high
