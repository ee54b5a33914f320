"""The rest of Stable Diffusion 1.5 beside the three networks at the top (sd_unet.py, clip_text.py, vae.py):
safetensors read and write (`weights`), the CLIP tokenizer, the noise schedule and samplers (`sampling`), and the
four parts as one object with its loaders (`sd15`)."""
