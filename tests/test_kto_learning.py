"""The learning check of KTO: SFT briefly, then KTO from that run on unpaired answers (each training
picture's right colour labelled good and each wrong colour labelled bad, as separate flat records:
every colour word is good as often as any other, and bad as often); on 64 held-out pictures the
preference accuracy (the right colour likelier than a wrong one, as `vlmtune eval` scores pairs) rises
clearly above the SFT starting point. The synthetic task of the DPO check (tests/preference_task.py);
CPU, tiny Qwen2-VL, 4-bit, about two minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from preference_task import COLORS, write_task
from test_preference_learning import MODEL, TRAIN, one_thread, train_run  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


COLOURS = [f"{name.capitalize()}." for name in COLORS]


def unpaired(pairs: Path, target: Path) -> Path:
    """Flat records (image, question, answer, label): each picture's right colour good, the three others
    bad. With a wrong colour drawn at random (the pairs' rejected answer) some words would be bad more
    often than good across the set, which KTO, comparing no two answers of one picture, learns instead."""
    rows = []
    for line in pairs.read_text().splitlines():
        pair = json.loads(line)
        common = {"image": pair["image"], "question": pair["question"]}
        rows += [{**common, "answer": word, "label": word == pair["chosen"]} for word in COLOURS]
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def test_kto_after_sft_raises_held_out_preference_accuracy(tmp_path: Path, one_thread):  # noqa: F811
    from vlmtune.after import evaluate as ev
    from vlmtune.after.trained import open_trained_run

    task = write_task(tmp_path / "task", n_held_out=64)
    data = {"max_image_pixels": 12544}
    sft = train_run(
        tmp_path / "sft", model=MODEL, data={"train": str(task / "sft.jsonl"), **data}, train=TRAIN
    )
    answers = unpaired(task / "pairs.jsonl", task / "unpaired.jsonl")
    kto = train_run(
        tmp_path / "kto",
        model={**MODEL, "adapter": str(sft.path)},
        data={"train": str(answers), **data},
        train={**TRAIN, "objective": "kto", "lr": 2e-3, "max_steps": 40},
        kto={"beta": 0.3, "desirable_weight": 3.0},  # one good answer per three bad: 3 x 1 / (1 x 3) = 1
    )

    def held_out(run) -> tuple[float, float]:
        """Preference accuracy and mean log-prob margin on the held-out pairs, as `vlmtune eval` scores them."""
        from vlmtune.after.trained import load_for_inference

        trained = open_trained_run(run.path)
        items, _ = ev.load_items(str(task / "held_out.jsonl"), trained.recipe.data, None)
        model = load_for_inference(trained)
        scored = ev.pair_logps(model.model, model.processor, [item.pair for item in items])
        assert len(scored) == 64
        return sum(c > r for c, r in scored) / 64, sum(c - r for c, r in scored) / 64

    (before, margin_before), (after, margin_after) = held_out(sft), held_out(kto)
    print(f"held-out, 64 pairs: preference accuracy {before:.3f} -> {after:.3f}, "
          f"log-prob margin {margin_before:.2f} -> {margin_after:.2f} nats")  # fmt: skip
    assert after >= before + 0.06, (before, after)  # 4 pairs or more
    assert margin_after > margin_before + 1.0

    report = json.loads((kto.path / "3-train" / "data_report.json").read_text())["train"]
    assert (report["desirable"], report["undesirable"]) == (32, 96)
    rows = kto.read_jsonl("3-train/metrics.jsonl")
    first = rows[0]  # step 1: the policy is its reference, the SFT adapter: every reward 0
    assert [first[k] for k in ("reward_chosen", "reward_rejected")] == pytest.approx([0, 0], abs=1e-3)
    late = rows[-5:]
    assert sum(r["reward_margin"] for r in late) > 0, "good answers' rewards above the bad ones' at the end"
    assert kto.summary()["status"] == "done" and not (Path(kto.summary()["output"]) / "ref").exists()
