"""The synthetic benchmark: a small seeded stand-in for the release, in its exact format.

    python -m sapt prepare_data --synthetic --dest DIR [--seed 0]

Every task is a toy with a deterministic rule from input to label, so a tiny model can learn it; the
pseudo data (2% of train, empty outputs) sits where the release's does. Same seed, same bytes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..training.data import BENCHMARKS
from ..utils.fileio import write_bytes_if_changed

logger = logging.getLogger(__name__)

SPLIT_SIZES = {"train": 200, "dev": 40, "test": 40}
PSEUDO_FRACTION = 0.02
FAMILIES = ("t5", "llama")
GEN_FOLDERS = {"SuperNI": "lora_gen_superni", "Long_Sequence": "lora_gen_long"}

_NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena"]
_ADJECTIVES = ["small", "large", "shiny", "old", "fresh", "strange", "lovely", "plain"]
_FILLERS = [
    "this morning", "after lunch", "near the old bridge", "in the garden", "during the holiday",
    "on a rainy day", "before dinner", "at the market", "with a friend", "late at night",
]
_WORDS = [
    "apple", "river", "stone", "cloud", "paper", "window", "garden", "silver", "forest", "candle",
    "rocket", "pencil", "mirror", "violin", "bridge", "castle", "planet", "ladder", "basket", "island",
    "lantern", "meadow", "harbor", "feather", "rabbit", "button", "marble", "blanket", "engine", "tunnel",
]
_COLOURS = {
    "red": ["tomato", "cherry", "strawberry", "ruby"],
    "green": ["leaf", "lime", "frog", "cucumber"],
    "yellow": ["banana", "lemon", "sunflower", "canary"],
    "blue": ["sapphire", "blueberry", "bluebell", "cornflower"],
}
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_SOUNDS = {
    "cat": ["meow", "purr", "hiss"],
    "dog": ["woof", "bark", "growl"],
    "cow": ["moo", "mooo", "low moo"],
    "duck": ["quack", "quack quack", "soft quack"],
}
_FRUITS = ["apple", "pear", "plum", "mango", "grape", "peach"]
_THINGS = ["chair", "table", "pencil", "shoe", "lamp", "window", "bottle", "hat", "coin", "rope"]
_TOPICS = {
    "sports": ["football", "tennis", "goal", "referee", "stadium", "coach"],
    "music": ["guitar", "melody", "concert", "drummer", "song", "piano"],
    "food": ["soup", "bread", "recipe", "kitchen", "cheese", "noodles"],
    "travel": ["airport", "passport", "hotel", "luggage", "train", "map"],
}
_SENTIMENT = {
    "positive": ["wonderful", "great", "delightful", "excellent"],
    "negative": ["awful", "terrible", "boring", "dreadful"],
}
_REVIEWED = ["film", "book", "meal", "concert", "hotel", "game", "lecture", "trip"]


def _colour(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_COLOURS))
    obj = rng.choice(_COLOURS[label])
    return f"{rng.choice(_NAMES)} saw a {rng.choice(_ADJECTIVES)} {obj} {rng.choice(_FILLERS)}.", label


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return " ".join(words), " ".join(reversed(words))


def _parity(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["even", "odd"])
    number = rng.randrange(50, 50_000) * 2 + (label == "odd")
    return f"Number: {number}", label


def _weekday(rng: random.Random) -> tuple[str, str]:
    index = rng.randrange(7)
    template = rng.choice([
        "If today is {day}, what day is tomorrow? {name} asks {filler}.",
        "{name} says it is {day} {filler}. Which day comes next?",
        "Today is {day}. {name} wants to know the following day.",
    ])
    text = template.format(day=_DAYS[index], name=rng.choice(_NAMES), filler=rng.choice(_FILLERS))
    return text, _DAYS[(index + 1) % 7]


def _animal(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_SOUNDS))
    sound = rng.choice(_SOUNDS[label])
    return f"{rng.choice(_NAMES)} heard a {rng.choice(_ADJECTIVES)} animal go '{sound}' {rng.choice(_FILLERS)}.", label


def _yesno(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["yes", "no"])
    items = rng.sample(_THINGS, rng.randint(3, 5))
    if label == "yes":
        items[rng.randrange(len(items))] = rng.choice(_FRUITS)
    return f"List: {', '.join(items)}", label


def _topic(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_TOPICS))
    first, second = rng.sample(_TOPICS[label], 2)
    return f"{rng.choice(_NAMES)} talked about the {first} and the {second} {rng.choice(_FILLERS)}.", label


def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_SENTIMENT))
    word = rng.choice(_SENTIMENT[label])
    return f"{rng.choice(_NAMES)} thought the {rng.choice(_REVIEWED)} was {word} {rng.choice(_FILLERS)}.", label


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    benchmark: str
    definition: str
    make: Callable[[random.Random], tuple[str, str]]
    labels: tuple[str, ...] = ()  # the closed label set (Long Sequence labels.json); empty for generation


SYNTHETIC_TASKS = (
    SyntheticTask(
        "task9001_synthetic_colour_classification", "SuperNI",
        "In this task, you are given a sentence that mentions one object. Answer with the usual colour of "
        "that object: red, green, yellow or blue.", _colour, tuple(sorted(_COLOURS)),
    ),
    SyntheticTask(
        "task9002_synthetic_reverse_words", "SuperNI",
        "In this task, you are given a sequence of words. Write the same words in reverse order, separated "
        "by single spaces.", _reverse,
    ),
    SyntheticTask(
        "task9003_synthetic_digit_parity", "SuperNI",
        "In this task, you are given a number. Answer \"even\" if the number is even and \"odd\" if it is odd.",
        _parity, ("even", "odd"),
    ),
    SyntheticTask(
        "task9004_synthetic_next_weekday", "SuperNI",
        "In this task, you are told which day of the week it is. Answer with the name of the next day.",
        _weekday, tuple(_DAYS),
    ),
    SyntheticTask(
        "synth_animal", "Long_Sequence",
        "Which animal makes the sound in the sentence? Choose one from the options: cat, cow, dog, duck.",
        _animal, tuple(sorted(_SOUNDS)),
    ),
    SyntheticTask(
        "synth_yesno", "Long_Sequence",
        "Does the list contain a fruit? Choose one from the options: yes, no.", _yesno, ("yes", "no"),
    ),
    SyntheticTask(
        "synth_topic", "Long_Sequence",
        "What is the topic of the following sentence? Choose one from the options: food, music, sports, travel.",
        _topic, tuple(sorted(_TOPICS)),
    ),
    SyntheticTask(
        "synth_sentiment", "Long_Sequence",
        "What is the sentiment of the following review? Choose one from the options: negative, positive.", _sentiment,
        tuple(sorted(_SENTIMENT)),
    ),
)
SYNTHETIC_ORDERS = {
    "SuperNI": ["task9001_synthetic_colour_classification", "task9002_synthetic_reverse_words",
                "task9003_synthetic_digit_parity"],
    "Long_Sequence": ["synth_animal", "synth_topic", "synth_yesno"],
}

_NOTE = """# SYNTHETIC DATA: not the released SAPT benchmark

Written by `python -m sapt prepare_data --synthetic` (seed {seed}) for machines without the release's
data. Same layout and JSON format as the release (`CL_Benchmark/`, `generated_data/`), but every task is
a toy with a deterministic rule from input to label, so a tiny model can learn it. Scores on these tasks
say nothing about SAPT on the real benchmark.

{tasks}

Default 3-task orders: SuperNI {order_superni}; Long_Sequence {order_long}.
Splits: {sizes}; pseudo data: 2% of train with empty outputs, as in the release.
Regenerate with the same seed to get byte-identical files.
"""


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _draw_unique(task: SyntheticTask, rng: random.Random, count: int, seen: set[str]) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(count * 200):
        text, label = task.make(rng)
        if text not in seen:
            seen.add(text)
            pairs.append((text, label))
            if len(pairs) == count:
                return pairs
    raise RuntimeError(f"{task.name}: could not draw {count} distinct inputs")  # pools are far larger


def _split_file(task: SyntheticTask, definition: str, pairs, split: str, example) -> dict:
    if task.benchmark == "SuperNI":  # SuperNI-style: list outputs, ids, one worked example
        instances = [
            {"id": f"{task.name.split('_')[0]}-{split}-{i}", "input": text, "output": [label]}
            for i, (text, label) in enumerate(pairs)
        ]
        positive = [{"input": example[0], "output": example[1], "explanation": "The rule of the task gives this."}]
    else:
        instances = [{"input": text, "output": label} for text, label in pairs]
        positive = []
    return {"Definition": [definition], "Positive Examples": positive, "Negative Examples": [], "Instances": instances}


def write_synthetic_benchmark(dest: str | Path, seed: int = 0, root_note: bool = True) -> dict:
    """Write the synthetic benchmark and its pseudo data under `dest`; return
    {"seed", "tasks": {benchmark: [task, ...]}, "orders": {benchmark: [3 tasks]}}. Files that already hold
    the right bytes are left untouched. `root_note` adds `dest/SYNTHETIC.md` (the folders below always
    get one)."""
    dest = Path(dest)
    files: dict[Path, bytes] = {}
    tasks = {benchmark: [] for benchmark in BENCHMARKS}
    pseudo_count = max(1, round(SPLIT_SIZES["train"] * PSEUDO_FRACTION))
    for task in SYNTHETIC_TASKS:
        tasks[task.benchmark].append(task.name)
        rng = random.Random(f"sapt-synthetic-{seed}-{task.name}")
        seen: set[str] = set()
        example = _draw_unique(task, rng, 1, seen)[0]
        folder = dest / "CL_Benchmark" / task.benchmark / task.name
        for split, size in SPLIT_SIZES.items():
            pairs = _draw_unique(task, rng, size, seen)
            files[folder / f"{split}.json"] = _json_bytes(_split_file(task, task.definition, pairs, split, example))
        if task.benchmark == "Long_Sequence":
            files[folder / "labels.json"] = (json.dumps(list(task.labels)) + "\n").encode("utf-8")
        for family in FAMILIES:  # pseudo inputs: fresh draws per family, outputs empty
            pseudo_rng = random.Random(f"sapt-synthetic-pseudo-{seed}-{family}-{task.name}")
            pairs = [(text, "") for text, _ in _draw_unique(task, pseudo_rng, pseudo_count, set())]
            content = _split_file(task, task.definition, pairs, "train", example)
            content["Positive Examples"] = [{**e, "output": ""} for e in content["Positive Examples"]]
            for instance in content["Instances"]:
                instance["output"] = ""  # SuperNI's list output becomes empty too, as in the release
            gen = dest / "generated_data" / f"{GEN_FOLDERS[task.benchmark]}_{family}" / task.benchmark / task.name
            for split in SPLIT_SIZES:
                files[gen / f"{split}.json"] = _json_bytes(content)
    info = {"seed": seed, "tasks": tasks, "orders": {k: list(v) for k, v in SYNTHETIC_ORDERS.items()}}
    described = "\n".join(f"- `{t.benchmark}/{t.name}`: {t.definition}" for t in SYNTHETIC_TASKS)
    note = _NOTE.format(
        seed=seed, tasks=described, order_superni=", ".join(SYNTHETIC_ORDERS["SuperNI"]),
        order_long=", ".join(SYNTHETIC_ORDERS["Long_Sequence"]),
        sizes=" / ".join(f"{n} {s}" for s, n in SPLIT_SIZES.items()),
    ).encode("utf-8")
    for folder in ([dest] if root_note else []) + [dest / "CL_Benchmark", dest / "generated_data"]:
        files[folder / "SYNTHETIC.md"] = note
        files[folder / "SYNTHETIC.json"] = _json_bytes(info)
    written = sum(write_bytes_if_changed(path, data) for path, data in sorted(files.items()))
    logger.info("synthetic benchmark (seed %d) under %s: %d files, %d written", seed, dest, len(files), written)
    return info
