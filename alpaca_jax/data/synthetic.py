"""A generated instruction set with exactly checkable answers (license-free, unlimited), in the
Alpaca schema, and its exact-match scorer."""
from __future__ import annotations

import random
import string


def _task(rng: random.Random) -> dict:
    kind = rng.choice(["add", "multiply", "count", "sort", "reverse", "upper"])
    if kind == "add":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    if kind == "multiply":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return {"instruction": "Multiply the two numbers.", "input": f"{a} * {b}",
                "output": str(a * b)}
    if kind == "count":
        letter = rng.choice("abcde")
        word = "".join(rng.choice("abcde") for _ in range(rng.randint(3, 12)))
        return {"instruction": f"Count how many times the letter '{letter}' appears.",
                "input": word, "output": str(word.count(letter))}
    if kind == "sort":
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
        return {"instruction": "Sort the numbers in ascending order.",
                "input": ", ".join(map(str, xs)), "output": ", ".join(map(str, sorted(xs)))}
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
    if kind == "reverse":
        return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    return {"instruction": "Write the word in capital letters.", "input": word,
            "output": word.upper()}


def generate_tasks(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_task(rng) for _ in range(n)]


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split()).rstrip(".")


def exact_match(predictions: list[str], records: list[dict]) -> float:
    """Fraction of predictions equal to the record's output after whitespace normalization."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    hits = sum(normalize_answer(p) == normalize_answer(r["output"])
               for p, r in zip(predictions, records))
    return hits / max(1, len(records))
