"""minidiff.infotext: AUTOMATIC1111's PNG `parameters` text. Round trips, the quoting rule, and infotexts written by
AUTOMATIC1111 itself (texts copied verbatim from its source and from images people published) read as AUTOMATIC1111's
parse_generation_parameters reads them."""
import pytest
from PIL import Image

from minidiff import infotext

# AUTOMATIC1111's own example, from the docstring of parse_generation_parameters (modules/infotext_utils.py)
A1111_DOCSTRING = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")

# AUTOMATIC1111 v1.9.3 (published with an image): a sampler split into Sampler + Schedule type, JSON-quoted values
# holding commas and colons, no negative prompt
A1111_V193 = (
    "cpc explosion, <lora:207:1>\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 966911465, Size: 512x512, "
    "Model hash: 15012c538f, Model: realisticVisionV51_v51VAE, Clip skip: 2, ControlNet 0: \"Module: none, Model: "
    "None, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, "
    "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced\", ControlNet 1: "
    "\"Module: none, Model: None, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, "
    "Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced\", "
    "ControlNet 2: \"Module: none, Model: None, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, "
    "Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control "
    "Mode: Balanced\", Lora hashes: \"207: fd0e0d7d115e\", Version: v1.9.3")

# an inpainting run (documented by the Embedding Merge extension): a quoted extension value, Conditional mask weight
A1111_INPAINT = (
    "a photo of <'EM_1'>\n"
    "Negative prompt: {'EM_2'}\n"
    "Steps: 8, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1374372309, Size: 512x512, Model hash: c6bbc15e32, "
    "Model: sd-v1-5-inpainting, EmbeddingMerge: \"<'EM_1'>=<'sky' * 2/4 + 'forest' * 3/4>, {'EM_2'}={'blurry'+"
    "'cropped'}\", Conditional mask weight: 1")

# AUTOMATIC1111 v1.3.2 (published with an image), a 960-pixel-high portrait
A1111_V132 = (
    "(masterpiece:1.2), best quality\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1270640879, Size: 540x960, Model hash: ec6f68ea63, "
    "Model: lyriel_v16, Version: v1.3.2")


def test_a1111_docstring_example():
    d = infotext.parse(A1111_DOCSTRING)
    assert d["prompt"].startswith("girl with an artist's beret") and d["prompt"].endswith("detailed, intricate")
    assert d["negative_prompt"].startswith("ugly, fat") and d["negative_prompt"].endswith("messy drawing")
    assert (d["steps"], d["sampler_name"], d["cfg_scale"], d["seed"]) == (20, "Euler a", 7.0, 965400086)
    assert (d["width"], d["height"], d["model_hash"]) == (512, 512, "45dee52b")
    assert d["extras"] == {}


def test_a1111_193_schedule_type_and_quoted_values():
    d = infotext.parse(A1111_V193)
    assert d["prompt"] == "cpc explosion, <lora:207:1>" and d["negative_prompt"] == ""
    assert d["sampler_name"] == "DPM++ 2M Karras"                     # Sampler + Schedule type
    assert (d["steps"], d["cfg_scale"], d["seed"], d["width"], d["height"]) == (20, 7.0, 966911465, 512, 512)
    assert (d["model_hash"], d["model"]) == ("15012c538f", "realisticVisionV51_v51VAE")
    ex = d["extras"]
    assert ex["Clip skip"] == "2" and ex["Version"] == "v1.9.3" and ex["Lora hashes"] == "207: fd0e0d7d115e"
    assert ex["ControlNet 0"].startswith("Module: none, Model: None, Weight: 1.0")
    assert ex["ControlNet 2"].endswith("Control Mode: Balanced")
    assert "Schedule type" not in ex
    # the untyped view AUTOMATIC1111's png-info answers with keeps both keys
    f = infotext.fields(A1111_V193)
    assert f["Sampler"] == "DPM++ 2M" and f["Schedule type"] == "Karras" and f["Size-1"] == "512"


def test_a1111_inpaint_and_old_versions():
    d = infotext.parse(A1111_INPAINT)
    assert d["prompt"] == "a photo of <'EM_1'>" and d["negative_prompt"] == "{'EM_2'}"
    assert d["extras"]["EmbeddingMerge"] == "<'EM_1'>=<'sky' * 2/4 + 'forest' * 3/4>, {'EM_2'}={'blurry'+'cropped'}"
    assert d["extras"]["Conditional mask weight"] == "1" and d["model"] == "sd-v1-5-inpainting"
    d = infotext.parse(A1111_V132)
    assert (d["width"], d["height"], d["sampler_name"], d["extras"]) == (540, 960, "DPM++ 2M Karras",
                                                                         {"Version": "v1.3.2"})


def test_round_trip_text_and_values():
    values = {"prompt": "a red circle,\non a blue square", "negative_prompt": "green: none", "steps": 20,
              "sampler_name": "Euler a", "cfg_scale": 7.5, "seed": 1234, "width": 32, "height": 40,
              "model_hash": "afd76d527b", "model": "minidiff-shapes", "denoising_strength": 0.6,
              "extras": {"Lora hashes": "a: 1, b: 2", "Note": 'say "hi"\nbye', "Clip skip": "2"}}
    text = infotext.format(**values)
    assert infotext.parse(text) == values
    assert infotext.format(**infotext.parse(text)) == text
    # each A1111 text reads back to the same values after writing it in minidiff's form
    for t in (A1111_DOCSTRING, A1111_V193, A1111_INPAINT, A1111_V132):
        assert infotext.parse(infotext.format(**infotext.parse(t))) == infotext.parse(t)


def test_format_is_a1111s_line():
    text = infotext.format("a red circle", steps=20, sampler_name="Euler a", cfg_scale=7.0, seed=1234, width=512,
                           height=512, model_hash="abc", model="m")
    assert text == "a red circle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, " \
                   "Model hash: abc, Model: m"
    # quoting: a value with "," ":" or a newline is a JSON string; nothing else is quoted
    assert infotext.quote("a, b") == '"a, b"' and infotext.quote("a: b") == '"a: b"'
    assert infotext.quote("a\nb") == '"a\\nb"' and infotext.quote("plain") == "plain" and infotext.quote(7.0) == "7"
    assert infotext.unquote('"a, \\"b\\""') == 'a, "b"' and infotext.unquote('"broken') == '"broken'
    with pytest.raises(ValueError, match="cannot be read back"):
        infotext.format("x", steps=1, extras={"bad,key": 1})


def test_prompt_only_and_unparsable_values():
    # fewer than three "Key: value" pairs on the last line: it is part of the prompt (AUTOMATIC1111's rule)
    d = infotext.parse("a cat\nwith a hat: red")
    assert d == {"prompt": "a cat\nwith a hat: red", "negative_prompt": "", "extras": {}}
    d = infotext.parse("x\nSteps: many, Size: big, Seed: 3")
    assert d["seed"] == 3 and d["extras"] == {"Steps": "many", "Size": "big"}
    with pytest.raises(TypeError):
        infotext.parse(None)


def test_png_chunk(tmp_path):
    image = Image.new("RGB", (8, 8))
    image.save(tmp_path / "a.png", pnginfo=infotext.png_info(A1111_V193))
    assert infotext.read_png(Image.open(tmp_path / "a.png")) == A1111_V193
    assert infotext.read_png(image) is None


def test_model_hash_is_sha256_of_the_file(tmp_path):
    import hashlib
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    assert infotext.model_hash(tmp_path / "m.safetensors") == hashlib.sha256(b"weights").hexdigest()
    a = infotext.model_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("not part of the model")
    assert infotext.model_hash(tmp_path) == a                       # only .json and weight files count
    (tmp_path / "m.safetensors").write_bytes(b"other")
    assert infotext.model_hash(tmp_path) != a
