"""modules.sd_hijack_optimizations: only "sdp" (class-level CrossAttention.forward replacement,
on ldm's and on sgm's CrossAttention, as the real SdOptimizationSdp.apply does)."""
import ldm_tiny
import sgm.modules.attention
from ldm_tiny import scaled_dot_product_attention_forward  # noqa: F401


class SdOptimization:
    name = None
    label = None
    cmd_opt = None
    priority = 0

    def title(self):
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def is_available(self):
        return True

    def apply(self):
        pass

    def undo(self):
        ldm_tiny.undo_optimizations()
        sgm.modules.attention.undo_optimizations()


class SdOptimizationSdp(SdOptimization):
    name = "sdp"
    label = "scaled dot product"
    cmd_opt = "opt_sdp_attention"
    priority = 70

    def apply(self):
        ldm_tiny.apply_sdp_optimization()
        sgm.modules.attention.apply_sdp_optimization()


def list_optimizers(res):
    res.append(SdOptimizationSdp())
