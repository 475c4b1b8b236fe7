"""File formats in and out, apart from the model code (which holds no format's rules).

    formats/weights.py     the one safe reader of weights files: .safetensors, and pickles through torch's
                           weights-only unpickler (read_state_dict, CheckpointError)
    formats/keymaps.py     how the published layouts (diffusers folders, CompVis files) name each of our parameters
    formats/configs.py     config.json translation: diffusers' / transformers' configs <-> UNetConfig, VAEConfig,
                           CLIPTextConfig, CLIPImageConfig
    formats/lora.py        LoRA files: diffusers/PEFT and kohya/A1111 (LoCon convolutions too), read and written
    formats/embeddings.py  textual-inversion embeddings: diffusers learned_embeds, A1111 .pt / .safetensors

The first three know no minidiff class (the model files' config dataclasses delegate their from_diffusers /
to_diffusers to configs.py); the last two work on models' layers. Whole checkpoints, read and written with them,
are minidiff/checkpoint.py (minidiff.load / minidiff.save).
"""
