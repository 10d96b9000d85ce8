"""Token level: in a preference batch, chosen and rejected rows are labelled on their answers only.

Never on the prompt, an earlier answer of a multi-turn prompt, an image or structural vision token,
or padding; rows are all chosen sides, then all rejected sides, as TRL's DPOTrainer reads them.
"""

from __future__ import annotations

import pytest

from vlmtune.data.collator import vision_token_ids
from vlmtune.data.preference import PreferencePair
from vlmtune.model.families import family_names, get_family

from conftest import ROOT

RED = str(ROOT / "data" / "demo" / "images" / "000.png")
BLUE = str(ROOT / "data" / "demo" / "images" / "001.png")

# Every family, Qwen2-VL, Llava and Gemma 3 among them. Each family's end of an answer turn, as its chat template writes it (the collator trains on it).
END_OF_TURN = {
    "qwen2_vl": "<|im_end|>\n", "qwen2_5_vl": "<|im_end|>\n", "qwen3_vl": "<|im_end|>\n",
    "llava": "</s>", "llava_next": "</s>", "llava_onevision": "<|im_end|>\n", "pixtral": "</s>",
    "mistral3": "</s>", "gemma3": "<end_of_turn>\n", "mllama": "<|eot_id|>", "idefics3": "<end_of_utterance>\n",
    "smolvlm": "<end_of_utterance>\n", "paligemma": "<eos>", "internvl": "<|im_end|>\n",
    "qwen3_5": "<|im_end|>\n", "qwen3_vl_moe": "<|im_end|>\n", "qwen3_5_moe": "<|im_end|>\n", "gemma4": "<turn|>\n",
    "glm4v": "<|endoftext|>", "glm46v": "<|endoftext|>",  # GLM-4's template ends no answer: the collator appends eos
    "aya_vision": "<|END_OF_TURN_TOKEN|>", "minicpmv4_6": "<|im_end|>\n",
    "glm4v_moe": "<|endoftext|>", "llama4": "<|eot|>", "lfm2_vl": "<|im_end|>\n",
}  # fmt: skip
# Templates that put a space between the assistant's tag and its answer ("ASSISTANT: Red.").
ANSWER_PREFIX = {"llava": " ", "llava_next": " ", "idefics3": " ", "smolvlm": " "}


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


ONE_IMAGE = PreferencePair(0, [user("What color is it?", 1)], answer("Red."), answer("Blue."), [RED])
TWO_TURNS = PreferencePair(
    1,
    [user("Which is first?", 2), answer("An earlier answer."), user("And its color?")],
    answer("Red, then blue."),
    answer("Green."),
    [RED, BLUE],
)


@pytest.fixture(scope="module", params=family_names(), ids=family_names())
def family_collator(request, tiny_path):
    from vlmtune.data.preference_collator import PreferenceCollator
    from vlmtune.model.processing import load_processor

    family = get_family(request.param)
    processor = load_processor(tiny_path(request.param), family, 12544)
    return request.param, PreferenceCollator(processor, family, max_length=None)


def completions(collator, batch) -> list[str]:
    tokenizer = collator.answers.tokenizer
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in
            zip(batch["input_ids"], batch["completion_mask"], strict=True)]  # fmt: skip


def test_chosen_and_rejected_rows_are_labelled_on_their_answers_only(family_collator):
    import torch

    name, collator = family_collator
    batch = collator([ONE_IMAGE, TWO_TURNS])
    end, lead = END_OF_TURN[name], ANSWER_PREFIX.get(name, "")
    expected = [f"{lead}{text}{end}" for text in ("Red.", "Red, then blue.", "Blue.", "Green.")]
    assert completions(collator, batch) == expected, "rows: chosen, chosen, rejected, rejected"
    mask = batch["completion_mask"].bool()
    vision = torch.tensor(vision_token_ids(collator.answers.tokenizer, collator.answers.family))
    assert not torch.isin(batch["input_ids"][mask], vision).any(), "no image token is ever scored"
    assert not (mask & (batch["attention_mask"] == 0)).any(), "no padding is ever scored"
    assert "labels" not in batch, "TRL builds its labels from completion_mask"


def test_both_sides_of_a_pair_see_the_same_prompt_and_images(family_collator):
    import torch

    name, collator = family_collator
    batch = collator([ONE_IMAGE])
    chosen, rejected = batch["input_ids"][0], batch["input_ids"][1]
    first_answer = int(batch["completion_mask"][0].argmax())
    assert first_answer == int(batch["completion_mask"][1].argmax()), "the answers start at the same token"
    assert torch.equal(chosen[:first_answer], rejected[:first_answer]), "identical prompts, images included"
