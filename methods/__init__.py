"""What every method shares (`adapters`: the Adapter layer and the Controller a training loop drives) and the
methods SeLoRA (selora.py, at the top) is compared with: LoRA, DyLoRA, AdaLoRA (`baselines`), LoRA^2 (`lora2`),
SeLoRA under the authors' script's rule (`selora_script`); and the kohya LoRA format (`kohya`)."""
