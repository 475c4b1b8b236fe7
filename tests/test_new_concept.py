"""The new-concept experiment's runner (benchmarks/new_concept.py): a two-step smoke run of LoRA and textual inversion
through the real `minidiff finetune` command, and the report it writes. The measured table itself is in docs/finetuning.md."""
import sys
from pathlib import Path

import pytest

import minidiff

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import new_concept  # noqa: E402


def expected_lora_elements(rank: int) -> int:
    """r·(d_in + d_out) for every attention projection of the embedded U-Net, counted on the model, not the file."""
    unet = minidiff.load().unet
    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if name.endswith(("to_q", "to_k", "to_v", "to_out.0")))


def test_smoke_run_of_two_methods_and_their_report(tmp_path):
    result = new_concept.run_experiment(["lora", "ti"], tmp_path, threads=1, seeds=1, steps=2, n=16, eval_steps=4,
                                        log=lambda s: None)
    base, row = result["base"], result["rows"]["lora"]
    assert base["concept"] == 0.0                                  # the base model never draws a cross
    assert base["original"] > 0.2      # it draws old pairs (4 sampler steps here; notebook 12 checks >= 90% at 20)
    assert row["params"] == expected_lora_elements(16)             # what trained: rank-16 A and B of every projection
    assert row["file"] == "lora.safetensors" and row["bytes"] > 4 * row["params"]
    assert row["command"].startswith("minidiff finetune --data ") and "--train lora" in row["command"]
    assert (tmp_path / "lora" / "train_log.jsonl").read_text().count("\n") == 2          # the two steps ran
    for key in ("concept", "held_out_colour", "original"):
        assert 0.0 <= row["after"][key] <= 1.0
    ti = result["rows"]["ti"]                                      # textual inversion: one new word of one vector
    assert ti["params"] == minidiff.load().text_encoder.config.hidden_size
    assert ti["file"] == "learned_embeds.safetensors" and "--train textual-inversion" in ti["command"]
    assert (tmp_path / "ti" / "train_log.jsonl").read_text().count("\n") == 2
    assert ti["before"]["concept"] == 0.0                          # "<cross>" means nothing before it is learned
    for key in ("concept", "held_out_colour", "original"):
        assert 0.0 <= ti["after"][key] <= 1.0

    text = new_concept.report(result, ["--methods", "lora,ti"])
    assert "| LoRA r=16 (attention) | " + f"{row['params']:,} | 0% → " in text
    assert "| textual inversion `<cross>` | " + f"{ti['params']:,} | 0% → " in text
    assert "`python benchmarks/new_concept.py --methods lora,ti`" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n{new_concept.BEGIN}\nold table\n{new_concept.END}\nafter\n")
    new_concept.write_into(doc, text)
    new_concept.write_into(doc, text)                              # idempotent: the block is replaced, not added
    assert doc.read_text() == f"# title\n\nbefore\n{text}\nafter\n"


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        new_concept.main(["--methods", "full,dreambooth"])
    assert "--methods: unknown ['dreambooth']; choose from full,last-n,lora,ti" in capsys.readouterr().err
