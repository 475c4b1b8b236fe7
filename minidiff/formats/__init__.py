"""Every file format in and out (checkpoints, key maps, LoRA, embeddings). Model code knows none of them."""
