"""The new-concept experiment's runner (benchmarks/new_concept.py): a two-step smoke run of LoRA and textual inversion
through the real `minidiff finetune` command, and the report it writes. The measured table itself is in docs/finetuning.md."""
import sys
from pathlib import Path

import pytest

import minidiff

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import new_concept  # noqa: E402


def expected_full_lora_elements(rank: int) -> int:
    """r·(d_in·k·k + d_out) for every Linear and Conv2d of the embedded U-Net — LyCORIS' "full" preset wraps them all
    there (conv_in, the time embedding, ResNets, samplers, transformers, conv_out) — counted on the model."""
    from torch import nn
    unet = minidiff.load().unet
    return sum(rank * (m.weight[0].numel() + m.weight.shape[0]) for m in unet.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_smoke_run_of_one_method_and_its_report(tmp_path):
    result = new_concept.run_experiment(["lora-full", "ti"], tmp_path, threads=1, seeds=1, steps=2, n=16,
                                        eval_steps=4, log=lambda s: None)
    base, row = result["base"], result["rows"]["lora-full"]
    assert base["concept"] == 0.0                                  # the base model never draws a cross
    assert base["original"] > 0.2      # it draws old pairs (4 sampler steps here; notebook 12 checks >= 90% at 20)
    assert row["params"] == expected_full_lora_elements(4)         # what trained: rank-4 A and B of every layer
    assert row["file"] == "lora.safetensors" and row["bytes"] > 4 * row["params"]
    assert row["command"].startswith("minidiff finetune --data ") and "--lora-preset full" in row["command"]
    assert (tmp_path / "lora-full" / "train_log.jsonl").read_text().count("\n") == 2          # the two steps ran
    for key in ("concept", "held_out_colour", "original"):
        assert 0.0 <= row["after"][key] <= 1.0
    assert len(row["change"]) == sum(1 for k in row["change"] if k.startswith("unet.")) > 100  # ‖ΔW‖/‖W₀‖ per layer
    assert all(v >= 0 for v in row["change"].values())
    ti = result["rows"]["ti"]                                      # textual inversion: one new word of one vector
    assert ti["params"] == minidiff.load().text_encoder.config.hidden_size
    assert ti["file"] == "learned_embeds.safetensors" and "--train textual-inversion" in ti["command"]
    assert (tmp_path / "ti" / "train_log.jsonl").read_text().count("\n") == 2
    assert ti["before"]["concept"] == 0.0                          # "<cross>" means nothing before it is learned
    for key in ("concept", "held_out_colour", "original"):
        assert 0.0 <= ti["after"][key] <= 1.0

    result["measured"]["command"] = "python benchmarks/new_concept.py --methods lora-full,ti"
    text = new_concept.report(result)
    assert "| LoRA full r=4, lr 1.6e-3 | " + f"{row['params']:,} | 0% → " in text
    assert "| textual inversion `<cross>` | " + f"{ti['params']:,} | 0% → " in text
    assert "`python benchmarks/new_concept.py --methods lora-full,ti`" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n{new_concept.BEGIN}\nold table\n{new_concept.END}\nafter\n")
    new_concept.write_into(doc, text)
    new_concept.write_into(doc, text)                              # idempotent: the block is replaced, not added
    assert doc.read_text() == f"# title\n\nbefore\n{text}\nafter\n"


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        new_concept.main(["--methods", "full,dreambooth"])
    assert "--methods: unknown ['dreambooth']; choose from full,last-n,ti,lora," in capsys.readouterr().err


def _result(rows, date, base_original=1.0):
    after = {"concept": 0.5, "held_out_colour": 0.0, "original": 0.9}
    return {"base": {"concept": 0.0, "held_out_colour": 0.0, "original": base_original}, "seeds": 8, "threads": 1,
            "jobs": 1, "measured": {"date": date, "cpu": "CPU", "cores": 2, "load_average_start": "1.0 / 1.0 / 1.0",
                                    "load_average_end": "2.0 / 2.0 / 2.0", "versions": "v", "command": f"cmd {date}"},
            "rows": {m: {"command": f"minidiff finetune {m}", "params": 10, "wall_s": 1.0, "file": "f", "bytes": 40,
                         "before": {"concept": 0.0}, "after": after} for m in rows}}


def test_merge_keeps_the_earlier_rows_and_says_where_they_come_from():
    earlier, now = _result(["full", "lora", "ti"], "2026-01-01"), _result(["lora", "lora-full"], "2026-02-02")
    merged = new_concept.merge(new_concept.merge(now, earlier), _result(["lora-full-r8", "full"], "2026-03-03"))
    assert list(merged["rows"]) == ["full", "ti", "lora", "lora-full", "lora-full-r8"]   # in METHODS' order
    assert [merged["rows"][m].get("source") for m in merged["rows"]] == [0, 0, None, None, 1]   # the first file wins
    text = new_concept.report(merged)
    assert "Measured 2026-02-02 on CPU" in text and "load average 1.0 / 1.0 / 1.0 at the start" in text
    assert "Command: `cmd 2026-02-02`" in text
    assert "Rows full U-Net, textual inversion `<cross>`: from an earlier run — Measured 2026-01-01" in text
    assert "Rows LoRA full r=8, lr 1.6e-3: from an earlier run — Measured 2026-03-03" in text
    with pytest.raises(ValueError, match="base model"):                    # another model or evaluation: refused
        new_concept.merge(now, _result(["full"], "2026-01-01", base_original=0.5))
