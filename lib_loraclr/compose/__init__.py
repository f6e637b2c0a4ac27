"""CLoRA test-time composition: several LoRAs in one image, no training, no user masks.

Each denoising step runs one UNet pass per prompt (pass 0: the base prompt, no LoRA;
pass k: LoRA k with its own prompt), pulls the concepts' cross-attention maps apart with a
contrastive loss on the latent, and fuses the passes' predictions with masks cut from
those maps. The modules here are the host-independent math: ``settings`` (the paper's
defaults), ``concepts`` (prompts -> token positions), ``loss`` (the contrastive objective)
and ``fusion`` (masks, fusion, CFG, which LoRAs each pass uses).
"""
