"""backend.args: ``args`` (parsed backend flags, all defaults) and ``dynamic_args`` (set by the WebUI)."""
import argparse

args = argparse.Namespace(
    gpu_device_id=None, all_in_fp32=False, all_in_fp16=False, unet_in_bf16=False, unet_in_fp16=False, unet_in_fp8_e4m3fn=False,
    unet_in_fp8_e5m2=False, vae_in_fp16=False, vae_in_fp32=False, vae_in_bf16=False, vae_in_cpu=False, clip_in_fp8_e4m3fn=False,
    clip_in_fp8_e5m2=False, clip_in_fp16=False, clip_in_fp32=False, attention_split=False, attention_quad=False,
    attention_pytorch=False, disable_attention_upcast=False, force_upcast_attention=False, always_cpu=True, always_gpu=False,
    always_high_vram=False, always_normal_vram=False, always_low_vram=False, always_no_vram=False, always_offload_from_vram=False,
    pytorch_deterministic=False, cuda_malloc=False, cuda_stream=False, pin_shared_memory=False, disable_gpu_warning=True,
    disable_ipex_hijack=False,
)

dynamic_args = dict(
    embedding_dir='./embeddings',
    emphasis_name='Original',
    forge_unet_storage_dtype=None,
    online_lora=False,
)
