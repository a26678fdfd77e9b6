"""A small meaning-representation-to-text task in the E2E NLG format, generated locally.

The built-in quickstart trains on it, so a user with only this repository (no downloads) can run
the whole pipeline. Rows are `mr,ref` like the E2E CSVs: `name[The Eagle], eatType[pub], ...` and a
templated English realisation. Deterministic for a seed.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from dsee_dist.utils.files import atomic_path

NAMES = [
    "The Eagle",
    "Alimentum",
    "Blue Spice",
    "The Punter",
    "Zizzi",
    "Loch Fyne",
    "The Mill",
    "Cotto",
    "Giraffe",
    "Fitzbillies",
    "The Phoenix",
    "Aromi",
    "Strada",
    "Wildwood",
    "Bibimbap House",
    "The Vaults",
]
EAT_TYPES = ["pub", "restaurant", "coffee shop"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "more than £30", "£20-25"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
NEAR = ["Burger King", "Café Rouge", "The Sorrento", "Crowne Plaza Hotel", "Raja Indian Cuisine", "All Bar One"]


def _realise(slots: dict, rng: random.Random) -> str:
    name = slots["name"]
    kind = slots.get("eatType", "place")
    first = rng.choice([f"{name} is a {kind}", f"There is a {kind} called {name}", f"{name} is a {kind} you can visit"])
    parts = [first]
    if "food" in slots:
        parts.append(rng.choice([f"serving {slots['food']} food", f"that offers {slots['food']} dishes"]))
    if "area" in slots:
        parts.append(rng.choice([f"in the {slots['area']}", f"located in the {slots['area']} area"]))
    if "near" in slots:
        parts.append(f"near {slots['near']}")
    sentence = " ".join(parts) + "."
    extra = []
    if "priceRange" in slots:
        extra.append(rng.choice([f"Prices are {slots['priceRange']}", f"It has a {slots['priceRange']} price range"]))
    if "customer rating" in slots:
        extra.append(
            rng.choice(
                [
                    f"Customers rate it {slots['customer rating']}",
                    f"It has a customer rating of {slots['customer rating']}",
                ]
            )
        )
    if "familyFriendly" in slots:
        extra.append("It is family friendly" if slots["familyFriendly"] == "yes" else "It is not family friendly")
    return " ".join([sentence] + [e + "." for e in extra])


def generate_examples(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        slots = {"name": rng.choice(NAMES), "eatType": rng.choice(EAT_TYPES)}
        optional = [
            ("food", FOODS),
            ("priceRange", PRICES),
            ("customer rating", RATINGS),
            ("area", AREAS),
            ("familyFriendly", ["yes", "no"]),
            ("near", NEAR),
        ]
        for key, values in rng.sample(optional, rng.randint(1, len(optional))):
            slots[key] = rng.choice(values)
        order = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]
        mr = ", ".join(f"{k}[{slots[k]}]" for k in order if k in slots)
        rows.append((mr, _realise(slots, rng)))
    return rows


def write_csv(rows: list[tuple[str, str]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
