"""minidiff — Stable Diffusion v1.4 rebuilt from scratch in PyTorch, one readable module per concept.

    import minidiff
    pipe = minidiff.load(path)            # a diffusers folder, a CompVis .ckpt / .safetensors, or None: the embedded model
    images = pipe.generate("a toucan", seed=0)
    minidiff.save(pipe, "out/", format="diffusers")
"""
__version__ = "0.1.0"

# The model stack is imported on first use, so `import minidiff.nn` (chapter 1) and `minidiff --help` stay light.
_LAZY = {"load": "checkpoint", "save": "checkpoint", "CheckpointError": "formats.weights",
         "StableDiffusion": "pipeline", "InputError": "errors", "MinidiffError": "errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minidiff' has no attribute {name!r}")


__all__ = ["load", "save", "CheckpointError", "InputError", "MinidiffError", "StableDiffusion", "__version__"]
