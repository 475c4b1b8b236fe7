"""File formats in and out, apart from the model code (which knows none of them).

    formats/lora.py        LoRA files: diffusers/PEFT and kohya/A1111 (LoCon convolutions too), read and written
    formats/embeddings.py  textual-inversion embeddings: diffusers learned_embeds, A1111 .pt / .safetensors

Whole checkpoints (diffusers folders, CompVis files) are minidiff/checkpoint.py and minidiff/keymaps.py.
"""
