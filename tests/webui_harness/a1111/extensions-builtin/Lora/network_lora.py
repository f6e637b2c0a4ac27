"""Built-in Lora stand-in: plain LoRA (lora_up / lora_down / alpha; lora_A / lora_B accepted)."""
import torch

import network
from modules import devices


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return NetworkModuleLora(net, weights)
        if all(x in weights.w for x in ["lora_A.weight", "lora_B.weight"]):
            w = weights.w.copy()
            weights.w.clear()
            weights.w.update({"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]})
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.up_model = self.create_module(weights.w, "lora_up.weight")
        self.down_model = self.create_module(weights.w, "lora_down.weight")
        self.mid_model = None  # Tucker / LoCon mid weights are not simulated
        self.dim = weights.w["lora_down.weight"].shape[0]

    def create_module(self, weights, key):
        """Wrap the factor in a bias-free Linear (linear target) or Conv2d (conv target) like the real code."""
        weight = weights[key]
        is_linear = type(self.sd_module) in [torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear, torch.nn.MultiheadAttention]
        if is_linear:
            weight = weight.reshape(weight.shape[0], -1)
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif type(self.sd_module) is torch.nn.Conv2d:
            if key == "lora_down.weight":
                if weight.dim() == 2:
                    weight = weight.reshape(weight.shape[0], -1, 1, 1)
                if weight.shape[2] != 1 or weight.shape[3] != 1:
                    module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], self.sd_module.kernel_size, self.sd_module.stride, self.sd_module.padding, bias=False)
                else:
                    module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
            else:
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        else:
            raise AssertionError(f'Lora layer {self.network_key} matched a layer with unsupported type: {type(self.sd_module).__name__}')

        with torch.no_grad():
            module.weight.copy_(weight.reshape(module.weight.shape))
        module.to(device=devices.cpu, dtype=devices.dtype)
        module.weight.requires_grad_(False)
        return module

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if down.dim() == 4:
            output_shape += down.shape[2:]
        up2 = up.reshape(up.size(0), -1)
        down2 = down.reshape(down.size(0), -1)
        if self.network.dyn_dim is not None:
            up2 = up2[:, :self.network.dyn_dim]
            down2 = down2[:self.network.dyn_dim, :]
        updown = (up2 @ down2).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)

    def forward(self, x, y):
        return y + self.up_model(self.down_model(x)) * self.multiplier() * self.calc_scale()
