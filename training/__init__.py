"""The run machinery of train.py: the diffusion objective and one step (`diffusion`), the loop (`train_loop`),
the run folder and its rules (`run_folder`), exact-resume checkpoints (`checkpoint`), the table from --method to a
method's classes and options (`method_table`), option types (`cli`) and figures (`plots`)."""
