from __future__ import annotations

import pytest

from cpo_data.testing import train_tokenizer
from training.data import EMPTY_COMPLETION, IGNORE, collate, tokenize_triplets

PROMPT = "Translate this from German to English:\nGerman: Es regnet.\nEnglish:"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bos_eos_and_the_joint_tokenization(tokenizer):
    rows = [{"prompt": PROMPT, "chosen": " It is raining.", "rejected": " It rains yesterday."}]
    (example,), report = tokenize_triplets(tokenizer, rows)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # What the model sees is the joint tokenization of prompt + completion, framed by BOS/EOS.
    assert example.chosen_ids == [bos] + _ids(tokenizer, PROMPT + " It is raining.") + [eos]
    assert example.rejected_ids == [bos] + _ids(tokenizer, PROMPT + " It rains yesterday.") + [
        eos]
    assert example.chosen_prompt_length <= 1 + len(_ids(tokenizer, PROMPT))
    assert report.examples == 1 and report.truncated == 0


def test_prompt_tokens_merged_with_the_completion_go_to_the_completion(tokenizer):
    """A completion that continues the prompt's last word: the boundary token is shared."""
    prompt, completion = "Der Zug fährt um acht Uhr a", "b."
    joint = _ids(tokenizer, prompt + completion)
    alone = _ids(tokenizer, prompt)
    (example,), _ = tokenize_triplets(tokenizer, [{"prompt": prompt, "chosen": completion,
                                                    "rejected": "x"}])
    assert example.chosen_ids[1:-1] == joint
    common = next((i for i, (a, b) in enumerate(zip(alone, joint, strict=False)) if a != b),
                  min(len(alone), len(joint)))
    assert example.chosen_prompt_length == 1 + common


def test_collate_puts_chosen_then_rejected_and_masks_prompt_and_padding(tokenizer):
    rows = [{"prompt": PROMPT, "chosen": " It is raining.", "rejected": " Rain."},
            {"prompt": "Translate: Hallo", "chosen": " Hello", "rejected": " Hallo there friend"}]
    examples, _ = tokenize_triplets(tokenizer, rows)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    longest = max(len(ids) for e in examples for ids in (e.chosen_ids, e.rejected_ids))
    assert batch["input_ids"].shape == (4, longest)
    sequences = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    prompts = ([e.chosen_prompt_length for e in examples]
               + [e.rejected_prompt_length for e in examples])
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompts, strict=True)):
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        labels = batch["labels"][row].tolist()
        assert labels[:prompt_length] == [IGNORE] * prompt_length
        assert labels[prompt_length:n] == ids[prompt_length:]
        assert labels[n:] == [IGNORE] * (longest - n)
        assert labels[n - 1] == tokenizer.eos_token_id


def test_truncation_keeps_the_prompt_end_and_counts(tokenizer):
    long_prompt = "Translate: " + "Es regnet seit gestern. " * 20 + "\nEnglish:"
    rows = [{"id": "t1", "prompt": long_prompt, "chosen": " It has been raining." * 10,
             "rejected": " Rain."},
            {"id": "t2", "prompt": PROMPT, "chosen": " Rain.", "rejected": " It rains."}]
    # PROMPT + " It rains." is 47 tokens here, + BOS and EOS: 49, which fits 64.
    examples, report = tokenize_triplets(tokenizer, rows, max_length=64, max_prompt_length=16)
    assert report.truncated == 1 and report.truncated_ids == ["t1"]
    first = examples[0]
    assert len(first.chosen_ids) == 64 and first.chosen_prompt_length == 16
    assert first.chosen_ids[0] == tokenizer.bos_token_id
    # The prompt keeps its end, next to the completion.
    end = _ids(tokenizer, "\nEnglish:")
    assert first.chosen_ids[16 - len(end): 16] == end
    assert first.chosen_ids[-1] != tokenizer.eos_token_id  # the cut completion lost its EOS
    # The short side fits whole after the pair's one prompt cut, EOS included.
    assert first.rejected_ids == first.chosen_ids[:16] + _ids(tokenizer, " Rain.") + [
        tokenizer.eos_token_id]
    assert examples[1].chosen_ids[-1] == tokenizer.eos_token_id


def test_a_prompt_shorter_than_its_limit_is_kept_whole(tokenizer):
    """Only the completion is cut when the prompt is within max_prompt_length (a 40-token
    prompt under 96 / 48 keeps all 40 on both sides, not its last 7)."""
    assert len(_ids(tokenizer, PROMPT)) == 40
    rows = [{"prompt": PROMPT, "chosen": " Rain.", "rejected": " It has been raining." * 10}]
    (example,), report = tokenize_triplets(tokenizer, rows, max_length=96, max_prompt_length=48)
    assert report.truncated == 1
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + _ids(tokenizer, PROMPT)
    assert example.chosen_prompt_length == example.rejected_prompt_length == len(prompt)
    assert example.chosen_ids == [bos] + _ids(tokenizer, PROMPT + " Rain.") + [eos]
    assert example.rejected_ids[: len(prompt)] == prompt
    assert len(example.rejected_ids) == 96 and example.rejected_ids[-1] != eos


def test_one_prompt_cut_serves_both_sides(tokenizer):
    """prompt + chosen fits and prompt + rejected does not: both sides still get one prompt."""
    prompt = "Translate: " + "Es regnet seit gestern. " * 3 + "\nEnglish:"  # 49 tokens
    rows = [{"prompt": prompt, "chosen": " Rain.", "rejected": " It has been raining." * 10}]
    assert 1 + len(_ids(tokenizer, prompt + " Rain.")) + 1 <= 80
    (example,), report = tokenize_triplets(tokenizer, rows, max_length=80, max_prompt_length=24)
    assert report.truncated == 1
    assert example.chosen_prompt_length == example.rejected_prompt_length == 24
    assert example.chosen_ids[:24] == example.rejected_ids[:24]
    assert example.chosen_ids[1:24] == _ids(tokenizer, prompt)[-23:]
    assert example.chosen_ids[24:] == _ids(tokenizer, " Rain.") + [tokenizer.eos_token_id]
    assert len(example.rejected_ids) == 80


def test_a_prompt_longer_than_max_length_leaves_every_completion_tokens(tokenizer):
    """Where a completion-only cut (TRL's) would leave the completion nothing, the prompt is
    cut: every completion keeps at least max_length - max_prompt_length tokens."""
    prompt = "Translate: " + "Es regnet seit gestern. " * 20 + "\nEnglish:"
    assert len(_ids(tokenizer, prompt)) > 32
    rows = [{"prompt": prompt, "chosen": " It is raining heavily today.", "rejected": " Rain."}]
    (example,), _ = tokenize_triplets(tokenizer, rows, max_length=32, max_prompt_length=24)
    for ids, prompt_length, text in ((example.chosen_ids, example.chosen_prompt_length,
                                      " It is raining heavily today."),
                                     (example.rejected_ids, example.rejected_prompt_length,
                                      " Rain.")):
        assert prompt_length == 24 and len(ids) <= 32
        completion = (_ids(tokenizer, text) + [tokenizer.eos_token_id])[: 32 - 24]
        assert ids[24:] == completion and len(completion) >= 1


@pytest.mark.parametrize("empty", ["", "</s>"])
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_a_pair_with_an_empty_completion_is_left_out_and_counted(tokenizer, side, empty):
    rows = [{"id": "a", "prompt": PROMPT, "chosen": " Rain.", "rejected": " It rains."},
            {"id": "b", "prompt": PROMPT, "chosen": " Rain.", "rejected": " It rains."},
            {"id": "c", "prompt": PROMPT, "chosen": " It rains.", "rejected": " Rain."}]
    rows[1][side] = empty
    examples, report = tokenize_triplets(tokenizer, rows)
    assert len(examples) == report.examples == 2
    assert report.left_out == {EMPTY_COMPLETION: 1} and report.left_out_ids == ["b"]
    assert examples == tokenize_triplets(tokenizer, [rows[0], rows[2]])[0]


def test_bos_and_eos_the_texts_carry_are_not_doubled(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    plain = {"prompt": PROMPT, "chosen": " It is raining.", "rejected": " Rain."}
    marked = {"prompt": "<s>" + PROMPT, "chosen": " It is raining.</s>",
              "rejected": " Rain.</s>"}
    assert _ids(tokenizer, marked["prompt"])[0] == bos  # the texts really carry them
    assert _ids(tokenizer, marked["chosen"])[-1] == eos
    (expected, got), _ = tokenize_triplets(tokenizer, [plain, marked])
    assert got == expected
    assert got.chosen_ids.count(bos) == 1 and got.chosen_ids.count(eos) == 1


def test_prompt_limit_must_leave_room(tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_triplets(tokenizer, [], max_length=64, max_prompt_length=64)
