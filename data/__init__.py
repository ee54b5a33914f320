"""The data: the paper's data sets in their real layouts, preprocessing and the split (`datasets`), and the two
synthetic domains generated here, chest-like phantoms (the embedded default's target) and coloured shapes (the tiny
model's pretraining)."""
