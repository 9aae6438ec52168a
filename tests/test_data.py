"""Benchmark loading, prompt templates, collators and per-task metrics."""

import json

import pytest

from conftest import SHARED, requires_release
from sapt.training.collators import Collator
from sapt.training.data import DataError, carve_dev, format_prompt, load_pseudo_split, load_split
from sapt.training.metrics import compute_metrics, exact_match, normalize_answer, rouge_l


def write_task(root, benchmark, task, instances, definition=("Classify it.",), split="train"):
    folder = root / benchmark / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.json").write_text(json.dumps({"Definition": list(definition), "Instances": instances}))
    return folder


def test_prompt_templates_are_the_release_strings():
    assert format_prompt("SuperNI", "Do X.", "hello") == (
        "Definition: Do X.\n\nNow complete the following example -\nInput: hello\nOutput: "
    )
    assert format_prompt("Long_Sequence", "Pick a label.", "text") == "Pick a label.\ntext\nOutput: "
    assert format_prompt("Long_Sequence", "", "premise") == "premise\nOutput: "


def test_list_outputs_draw_one_label_with_the_seed(tmp_path):
    instances = [{"input": f"q{i}", "output": ["a", "b", "c", "d"]} for i in range(20)]
    write_task(tmp_path, "SuperNI", "task1_x", instances)
    first = load_split(tmp_path, "task1_x", "train", seed=1)["target"]
    assert first == load_split(tmp_path, "task1_x", "train", seed=1)["target"]
    assert first != load_split(tmp_path, "task1_x", "train", seed=2)["target"]
    assert set(first) <= {"a", "b", "c", "d"}


def test_split_columns_and_definition_strip(tmp_path):
    write_task(tmp_path, "Long_Sequence", "cb", [{"input": "s1", "output": "yes"}], definition=("  Decide. ",))
    data = load_split(tmp_path, "cb", "train")
    assert data.column_names == ["task", "source", "target", "index"]
    assert data[0] == {"task": "cb", "source": "Decide.\ns1\nOutput: ", "target": "yes", "index": 0}


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"Definition": []}), "'Instances' list"),
        (json.dumps({"Instances": []}), "no instances"),
        (json.dumps({"Instances": [{"input": "x"}]}), "instance 0 lacks 'input' or 'output'"),
    ],
)
def test_bad_split_files_name_the_file(tmp_path, content, message):
    folder = tmp_path / "SuperNI" / "task9_bad"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_split(tmp_path, "task9_bad", "train")
    assert str(folder / "train.json") in str(info.value)


def test_unknown_task_and_missing_split(tmp_path):
    write_task(tmp_path, "SuperNI", "task1_x", [{"input": "q", "output": "a"}])
    with pytest.raises(DataError, match="no task folder named 'nope'"):
        load_split(tmp_path, "nope", "train")
    with pytest.raises(DataError, match="dev.json: split file is missing"):
        load_split(tmp_path, "task1_x", "dev")


def test_clean_protocol_carves_a_disjoint_dev(tmp_path):
    write_task(tmp_path, "SuperNI", "task1_x", [{"input": f"q{i}", "output": "a"} for i in range(30)])
    train, dev = carve_dev(load_split(tmp_path, "task1_x", "train"), fraction=0.2, seed=3)
    assert len(train) == 24 and len(dev) == 6
    assert not set(train["source"]) & set(dev["source"])
    assert dev["index"] == list(range(6))


@requires_release()
def test_released_tasks_and_pseudo_data_load():
    superni = load_split(SHARED / "CL_Benchmark", "task363_sst2_polarity_classification", "test")
    assert len(superni) == 100 and superni[0]["source"].startswith("Definition: In this task")
    copa = load_split(SHARED / "CL_Benchmark", "copa", "train")
    assert not copa[0]["source"].startswith("\n")
    pseudo = load_pseudo_split(SHARED / "generated_data" / "lora_gen_superni_t5", "task363_sst2_polarity_classification")
    assert len(pseudo) == 20 and set(pseudo["target"]) == {""}


class CharTokenizer:
    """Tokenizer stand-in: one id per character (offset 10), LLaMA-like or T5-like specials."""

    def __init__(self, encoder_decoder):
        self.encoder_decoder = encoder_decoder
        self.pad_token_id, self.eos_token_id, self.bos_token_id = (0, 1, None) if encoder_decoder else (3, 2, 1)

    def _encode(self, text, add_special_tokens=True, max_length=None):
        ids = [10 + (ord(c) % 50) for c in text]
        if add_special_tokens:
            ids = ids + [self.eos_token_id] if self.encoder_decoder else [self.bos_token_id] + ids
        return ids[:max_length] if max_length else ids

    def __call__(self, texts=None, text_target=None, truncation=False, max_length=None, add_special_tokens=True):
        texts = texts if texts is not None else text_target
        return {"input_ids": [self._encode(t, add_special_tokens, max_length if truncation else None) for t in texts]}


EXAMPLES = [{"source": "abcd", "target": "xy", "index": 0}, {"source": "ab", "target": "xyz", "index": 1}]


def test_decoder_only_collator_masks_the_prompt_and_pads_left():
    batch = Collator(CharTokenizer(False), is_encoder_decoder=False)(EXAMPLES)
    # [bos a b c d] + [x y eos] = 8; [bos a b] + [x y z eos] = 7 -> one pad on the left
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1, 0] == 3 and batch["attention_mask"][1].tolist() == [0] + [1] * 7
    assert batch["labels"][0].tolist() == [-100] * 5 + [10 + ord("x") % 50, 10 + ord("y") % 50, 2]
    assert batch["labels"][1].tolist() == [-100] * 4 + [10 + ord(c) % 50 for c in "xyz"] + [2]
    generation = Collator(CharTokenizer(False), is_encoder_decoder=False, for_generation=True)(EXAMPLES)
    assert generation["input_ids"].tolist()[1][:2] == [3, 3] and "labels" not in generation
    assert generation["example_index"].tolist() == [0, 1]


def test_encoder_decoder_collator_pads_right_and_truncates():
    collator = Collator(CharTokenizer(True), is_encoder_decoder=True, max_source_length=3, max_target_length=2)
    batch = collator(EXAMPLES)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"].shape == (2, 2)
    short = Collator(CharTokenizer(True), is_encoder_decoder=True)(EXAMPLES)
    assert short["labels"][0].tolist()[-1] == -100 and short["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]


def test_metrics_follow_superni_conventions():
    assert normalize_answer("  The  Cat, sat! ") == "the cat sat"
    assert exact_match("POS.", "pos") == 1.0 and exact_match("NEG", "POS") == 0.0
    assert rouge_l("the cats sat", "the cat sat") == pytest.approx(1.0)  # Porter stemming
    assert rouge_l("a b c d", "a b") == pytest.approx(2 * (0.5 * 1.0) / 1.5)
    scores = compute_metrics(["POS", "neg", "x"], ["POS", "NEG", "y"])
    assert scores == {"exact_match": pytest.approx(200 / 3, abs=1e-4), "rougeL": pytest.approx(200 / 3, abs=1e-4)}
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
