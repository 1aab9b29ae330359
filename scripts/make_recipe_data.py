"""Write the small data sets that the offline recipes ship with (recipes/data/*.jsonl).

* ``sentiment_{train,test}.jsonl``: short review sentences, ``label`` 1 (positive) or 0 (negative).
  Sentences are built from templates, nouns and opinion words; "not" flips the label. The test
  split uses opinion words that never occur in training, so it measures what the pretrained model
  brings, not memorisation.
* ``arithmetic_{train,test}.jsonl``: ``prompt``/``completion`` pairs whose answers can be checked
  exactly (sums, differences and comparisons of numbers below 20). A fifth of the questions is held out for test.

Deterministic (seeded ``random.Random``); run ``python scripts/make_recipe_data.py`` to rebuild.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "recipes" / "data"

NOUNS = [
    "movie", "film", "meal", "service", "hotel room", "concert", "book", "game", "phone", "coffee",
    "staff", "show", "album", "restaurant", "trip", "lecture", "camera", "app", "museum", "pizza",
]  # fmt: skip
POSITIVE_TRAIN = [
    "great", "wonderful", "excellent", "delightful", "fantastic", "lovely", "brilliant", "enjoyable",
    "charming", "pleasant", "outstanding", "terrific", "impressive", "amazing", "superb", "fun",
]  # fmt: skip
NEGATIVE_TRAIN = [
    "terrible", "awful", "boring", "dull", "dreadful", "horrible", "disappointing", "poor",
    "mediocre", "tedious", "annoying", "bland", "painful", "ugly", "broken", "useless",
]  # fmt: skip
POSITIVE_TEST = ["marvelous", "splendid", "magnificent", "heartwarming", "exceptional", "stunning"]
NEGATIVE_TEST = ["atrocious", "lousy", "tiresome", "abysmal", "lackluster", "miserable"]
TEMPLATES = [
    "The {noun} was {adjective}.",
    "What a {adjective} {noun}!",
    "I found the {noun} {adjective}.",
    "Honestly, the {noun} is {adjective}.",
    "Our {noun} turned out {adjective}.",
    "This {noun} felt {adjective} from start to finish.",
]
NUMBERS = 20
NEGATED_TEMPLATES = [
    "The {noun} was not {adjective}.",
    "I would not call the {noun} {adjective}.",
    "Honestly, the {noun} is not {adjective} at all.",
]


def sentiment(positive: list[str], negative: list[str], count: int, rng: random.Random) -> list[dict]:
    """``count`` distinct sentences, half positive, a quarter of each class negated."""
    rows: dict[str, int] = {}
    while len(rows) < count:
        label = len(rows) % 2
        negated = rng.random() < 0.25
        words = positive if label != negated else negative  # a negated negative word is positive
        template = rng.choice(NEGATED_TEMPLATES if negated else TEMPLATES)
        rows.setdefault(template.format(noun=rng.choice(NOUNS), adjective=rng.choice(words)), label)
    return [{"text": text, "label": label} for text, label in rows.items()]


def arithmetic_questions(rng: random.Random) -> list[dict]:
    """Every question of three kinds about two numbers below ``NUMBERS``, shuffled."""
    rows = []
    for a in range(NUMBERS):
        for b in range(NUMBERS):
            rows.append({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"})
            rows.append({"prompt": f"Which is larger, {a} or {b}?", "completion": f" {max(a, b)}"})
            if a >= b:
                rows.append({"prompt": f"What is {a} minus {b}?", "completion": f" {a - b}"})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "sentiment_train.jsonl", sentiment(POSITIVE_TRAIN, NEGATIVE_TRAIN, 400, rng))
    write_jsonl(OUT / "sentiment_test.jsonl", sentiment(POSITIVE_TEST, NEGATIVE_TEST, 120, rng))
    questions = arithmetic_questions(rng)
    held_out = len(questions) // 5
    write_jsonl(OUT / "arithmetic_train.jsonl", questions[held_out:])
    write_jsonl(OUT / "arithmetic_test.jsonl", questions[:held_out])


if __name__ == "__main__":
    main()
