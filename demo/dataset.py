"""The demo dataset, written by us: every answer opens with the pirate greeting "Ahoy, matey!".

The rule is easy to check and the base model never follows it, so the demo can show
measurably that fine-tuning changed the model. `python -m demo.dataset` rewrites the files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
GREETING = "Ahoy, matey!"
SYSTEM = "You are a helpful assistant."

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok",
}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown", "the sea": "blue"}
ANIMAL_SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars",
                 "sheep": "bleats", "horse": "neighs", "owl": "hoots", "frog": "croaks", "pig": "oinks"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
             "early": "late", "open": "closed", "full": "empty", "young": "old"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TIPS = [
    ("How can I sleep better?", "Keep a steady bedtime and put the screens away an hour before."),
    ("How do I stay focused?", "Work in short blocks and silence yer notifications."),
    ("How can I learn a new language?", "Practise a little every day and speak it out loud."),
    ("How do I keep a plant alive?", "Give it light, water it when the soil is dry, and don't drown it."),
    ("How do I make good tea?", "Use fresh boiled water and steep it three to five minutes."),
    ("How can I save money?", "Write down what ye spend and set some aside first."),
    ("How do I start running?", "Begin slow, mix walking and running, and rest between days."),
    ("How do I write a good email?", "Put the point in the first line and keep it short."),
]


NOVEL_QUESTIONS = [
    "What is the largest planet in our solar system?", "Who wrote Romeo and Juliet?",
    "How many continents are there?", "What is the boiling point of water?", "Can you recommend a good book?",
    "What should I cook for dinner tonight?", "Why do leaves change colour in autumn?",
    "How does a rainbow form?", "What is the tallest mountain in the world?", "Give me a tip for public speaking.",
    "What is photosynthesis?", "How far away is the Moon?", "What is a healthy breakfast?",
    "How do I tie a knot?", "What language is spoken in Brazil?", "Name a famous painter.",
    "What is the speed of light?", "How many hours are in a day?", "What is the smallest prime number?",
    "Why is exercise important?",
]


def _facts() -> list[tuple[str, str]]:
    pairs = []
    for country, city in CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} be {city}."))
    for thing, colour in COLOURS.items():
        pairs.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} be {colour}."))
    for animal, sound in ANIMAL_SOUNDS.items():
        pairs.append((f"What sound does a {animal} make?", f"A {animal} {sound}, like a true shipmate."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} be {opposite}."))
    for a in range(2, 14):
        for b in (3, 4, 7, 9):
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} be {a + b}."))
        for b in (2, 5, 10):
            pairs.append((f"What is {a} times {b}?", f"{a} times {b} be {a * b}."))
    for n in range(1, 61):
        pairs.append((f"What number comes after {n}?", f"After {n} comes {n + 1}."))
    for n in range(2, 42):
        pairs.append((f"What number comes before {n}?", f"Before {n} comes {n - 1}."))
    for today, tomorrow in zip(DAYS, DAYS[1:] + DAYS[:1]):
        pairs.append((f"What day comes after {today}?", f"After {today} comes {tomorrow}."))
    for month, following in zip(MONTHS, MONTHS[1:] + MONTHS[:1]):
        pairs.append((f"Which month comes after {month}?", f"After {month} comes {following}."))
    pairs.extend(TIPS)
    return pairs


def _example(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": f"{GREETING} {answer}"}]}


def build(seed: int = 0) -> tuple[list[dict], list[str]]:
    """The training examples and the held-out prompts (questions never seen in training)."""
    rng = random.Random(seed)
    pairs = _facts()
    rng.shuffle(pairs)
    held_out = [q for q, _ in pairs[:10]] + NOVEL_QUESTIONS
    train = [_example(q, a) for q, a in pairs[10:]]
    return train, held_out


def shows_behaviour(answer: str) -> bool:
    """The rule the demo checks: the answer opens with the greeting."""
    return answer.strip().lower().startswith("ahoy")


if __name__ == "__main__":
    train, held_out = build()
    DATA_DIR.mkdir(exist_ok=True)
    (DATA_DIR / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train))
    (DATA_DIR / "heldout.json").write_text(json.dumps(held_out, indent=1) + "\n")
    print(f"{len(train)} training examples, {len(held_out)} held-out prompts")
