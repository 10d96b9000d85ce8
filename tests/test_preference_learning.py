"""The learning check: SFT briefly, then DPO from that run; on held-out images both preference
accuracy and exact match rise above the SFT starting point (CPU, tiny Qwen2-VL, 4-bit, about a minute)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from preference_task import write_task

from conftest import write_recipe

TRAIN = {"batch_size": 8, "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant", "max_length": 256,
         "gradient_checkpointing": False, "save_steps": 1000, "max_steps": 20}  # fmt: skip
MODEL = {"name": "tiny:qwen2_vl", "dtype": "float32"}
PAIR_KEYS = {"step", "loss", "learning_rate", "epoch", "reward_chosen", "reward_rejected", "reward_margin",
             "preference_accuracy", "logp_chosen", "logp_rejected"}  # fmt: skip


def train_run(folder: Path, **sections):
    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe

    folder.mkdir()
    path = write_recipe(folder, quantization={"bits": 4}, output={"dir": "runs"}, **sections)
    return pipeline.run(load_recipe(path), path.read_text(), folder.name, folder / "run")


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one torch thread is steadier (and here ~5x less CPU) than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_dpo_after_sft_beats_the_sft_starting_point_on_held_out_pairs(tmp_path: Path, one_thread):
    from vlmtune.after import evaluate as ev
    from vlmtune.after.trained import open_trained_run

    task = write_task(tmp_path / "task")
    data = {"max_image_pixels": 12544}
    sft = train_run(
        tmp_path / "sft", model=MODEL, data={"train": str(task / "sft.jsonl"), **data}, train=TRAIN
    )
    dpo = train_run(
        tmp_path / "dpo",
        model={**MODEL, "adapter": str(sft.path)},
        data={"train": str(task / "pairs.jsonl"), "eval": str(task / "held_out.jsonl"), **data},
        train={**TRAIN, "objective": "dpo"},
        dpo={"beta": 0.1, "sft_weight": 1.0},
    )

    def held_out_scores(run) -> dict:  # as `vlmtune eval RUN --data held_out.jsonl` scores it
        trained = open_trained_run(run.path)
        items, _ = ev.load_items(str(task / "held_out.jsonl"), trained.recipe.data, None)
        return ev.report(items, ev.run_answers(trained, items, max_new_tokens=8))  # answers are one word

    before, after = held_out_scores(sft), held_out_scores(dpo)
    figures = {name: {k: round(r[k], 3) for k in ("exact_match", "preference_accuracy", "logp_margin")}
               for name, r in (("sft", before), ("dpo", after))}  # fmt: skip
    print(f"held-out, 16 pairs: {figures}")
    assert after["n"] == before["n"] == 16
    assert after["preference_accuracy"] > before["preference_accuracy"], figures
    assert after["exact_match"] > before["exact_match"], figures

    # The DPO run: its reference is the SFT adapter (no reward at step 1), its metrics keep plain keys.
    rows = dpo.read_jsonl("3-train/metrics.jsonl")
    assert set(rows[0]) >= PAIR_KEYS and rows[0]["reward_margin"] == pytest.approx(0, abs=1e-3)
    assert rows[0]["loss"] > math.log(2), "ln 2 plus the SFT term on the chosen answers"
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["preference_accuracy"] > 0.5
    assert dpo.summary()["status"] == "done"
    adapter = Path(dpo.summary()["output"])
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
