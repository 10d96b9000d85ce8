"""The learning check of KTO: SFT briefly, then KTO from that run on unpaired answers (each training
picture's right colour labelled good, a wrong one labelled bad, written as separate records); on
held-out pictures the preference accuracy (the right colour the likelier answer, as `vlmtune eval`
scores pairs) rises above the SFT starting point. The synthetic task of the DPO check
(tests/preference_task.py); CPU, tiny Qwen2-VL, 4-bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from preference_task import write_task
from test_preference_learning import MODEL, TRAIN, one_thread, train_run  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


def unpaired(pairs: Path, target: Path) -> Path:
    """Each pair as two flat records (image, question, answer, label): its chosen answer good, its rejected
    one bad."""
    rows = []
    for line in pairs.read_text().splitlines():
        pair = json.loads(line)
        common = {"image": pair["image"], "question": pair["question"]}
        rows += [{**common, "answer": pair["chosen"], "label": True},
                 {**common, "answer": pair["rejected"], "label": False}]  # fmt: skip
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def test_kto_after_sft_raises_held_out_preference_accuracy(tmp_path: Path, one_thread):  # noqa: F811
    from vlmtune.after import evaluate as ev
    from vlmtune.after.trained import open_trained_run

    task = write_task(tmp_path / "task")
    data = {"max_image_pixels": 12544}
    sft = train_run(
        tmp_path / "sft", model=MODEL, data={"train": str(task / "sft.jsonl"), **data}, train=TRAIN
    )
    answers = unpaired(task / "pairs.jsonl", task / "unpaired.jsonl")
    kto = train_run(
        tmp_path / "kto",
        model={**MODEL, "adapter": str(sft.path)},
        data={"train": str(answers), **data},
        train={**TRAIN, "objective": "kto"},
        kto={"beta": 0.1},
    )

    def held_out_scores(run) -> dict:  # as `vlmtune eval RUN --data held_out.jsonl` scores it
        trained = open_trained_run(run.path)
        items, _ = ev.load_items(str(task / "held_out.jsonl"), trained.recipe.data, None)
        return ev.report(items, ev.run_answers(trained, items, max_new_tokens=8))

    before, after = held_out_scores(sft), held_out_scores(kto)
    figures = {name: {k: round(r[k], 3) for k in ("exact_match", "preference_accuracy", "logp_margin")}
               for name, r in (("sft", before), ("kto", after))}  # fmt: skip
    print(f"held-out, 16 pairs: {figures}")
    assert after["n"] == before["n"] == 16
    assert after["preference_accuracy"] > before["preference_accuracy"], figures
    assert after["logp_margin"] > before["logp_margin"], figures

    rows = kto.read_jsonl("3-train/metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6), (
        "step 1: the policy is its reference, the SFT adapter"
    )
    late = rows[-5:]
    assert sum(r["reward_margin"] for r in late) > 0, "good answers' rewards above the bad ones' at the end"
    assert kto.summary()["status"] == "done" and not (Path(kto.summary()["output"]) / "ref").exists()
