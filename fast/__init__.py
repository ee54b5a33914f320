"""The fast path, beside the readable one and proven equal to it by tests: SeLoRA's test step batched over layers
of equal shapes and compiled (`fisher`, `probe`), adapters at a fixed capacity for torch.compile (`capacity`), and
data-parallel training under torchrun (`distributed`). A run takes it where it is needed: --compile, torchrun, or
train.py --fast-test-step."""
