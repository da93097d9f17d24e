"""Write data/qa_prefs: short questions (facts and arithmetic) with a correct concise answer (chosen)
and a fluent wrong one (rejected), for `make demo-real` (configs/smollm2_lora.yaml). Deterministic:

    python scripts/make_qa_prefs.py

The held-out split (test.jsonl) asks about entities (countries, elements, books, operands) that the
training split never mentions, in phrasings it never uses, so its accuracy measures what carries
over, not what was memorised. The wrong answer is the same sentence with a plausible wrong value:
another city of the region, a neighbouring element's symbol, another author, a result off by a little.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "qa_prefs"
SEED = 1234

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Russia": "Moscow",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Turkey": "Ankara",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Switzerland": "Bern",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Hungary": "Budapest",
    "Czechia": "Prague",
    "Romania": "Bucharest",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "South Korea": "Seoul",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh",
    "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa",
    "Ghana": "Accra",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "New Zealand": "Wellington",
    "Ukraine": "Kyiv",
    "Croatia": "Zagreb",
    "Serbia": "Belgrade",
    "Bulgaria": "Sofia",
    "Iceland": "Reykjavik",
    "Israel": "Jerusalem",
    "Nepal": "Kathmandu",
    "Malaysia": "Kuala Lumpur",
    "Uruguay": "Montevideo",
}
# A well-known wrong answer: the biggest or best-known other city.
DECOYS = {
    "Australia": "Sydney",
    "Canada": "Toronto",
    "Brazil": "Rio de Janeiro",
    "Turkey": "Istanbul",
    "Switzerland": "Zurich",
    "India": "Mumbai",
    "China": "Shanghai",
    "Nigeria": "Lagos",
    "Morocco": "Casablanca",
    "Pakistan": "Karachi",
    "New Zealand": "Auckland",
    "Vietnam": "Ho Chi Minh City",
    "Italy": "Milan",
    "Spain": "Barcelona",
    "Germany": "Munich",
    "Japan": "Osaka",
    "United States": "New York",
    "Israel": "Tel Aviv",
    "Saudi Arabia": "Jeddah",
    "South Korea": "Busan",
    "Russia": "Saint Petersburg",
    "Poland": "Krakow",
}
ELEMENTS = {
    "hydrogen": "H",
    "helium": "He",
    "lithium": "Li",
    "carbon": "C",
    "nitrogen": "N",
    "oxygen": "O",
    "fluorine": "F",
    "neon": "Ne",
    "sodium": "Na",
    "magnesium": "Mg",
    "aluminium": "Al",
    "silicon": "Si",
    "phosphorus": "P",
    "sulfur": "S",
    "chlorine": "Cl",
    "argon": "Ar",
    "potassium": "K",
    "calcium": "Ca",
    "iron": "Fe",
    "copper": "Cu",
    "zinc": "Zn",
    "silver": "Ag",
    "gold": "Au",
    "tin": "Sn",
    "lead": "Pb",
    "mercury": "Hg",
    "uranium": "U",
    "nickel": "Ni",
    "iodine": "I",
    "platinum": "Pt",
}
BOOKS = {
    "Romeo and Juliet": "William Shakespeare",
    "Hamlet": "William Shakespeare",
    "Pride and Prejudice": "Jane Austen",
    "Emma": "Jane Austen",
    "Oliver Twist": "Charles Dickens",
    "Great Expectations": "Charles Dickens",
    "War and Peace": "Leo Tolstoy",
    "Anna Karenina": "Leo Tolstoy",
    "Crime and Punishment": "Fyodor Dostoevsky",
    "Moby-Dick": "Herman Melville",
    "1984": "George Orwell",
    "Animal Farm": "George Orwell",
    "Don Quixote": "Miguel de Cervantes",
    "The Odyssey": "Homer",
    "Frankenstein": "Mary Shelley",
    "Dracula": "Bram Stoker",
    "Ulysses": "James Joyce",
    "The Divine Comedy": "Dante Alighieri",
    "Les Miserables": "Victor Hugo",
    "The Old Man and the Sea": "Ernest Hemingway",
    "Jane Eyre": "Charlotte Bronte",
    "Wuthering Heights": "Emily Bronte",
    "The Hobbit": "J. R. R. Tolkien",
    "Faust": "Johann Wolfgang von Goethe",
}

TRAIN_TEMPLATES = {
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}."],
    "element": ["What is the chemical symbol for {x}?", "Which symbol stands for {x} on the periodic table?"],
    "book": ["Who wrote {x}?", "Who is the author of {x}?"],
    "add": ["What is {a} plus {b}?", "Add {a} and {b}."],
    "mul": ["What is {a} times {b}?", "Multiply {a} by {b}."],
    "sub": ["What is {a} minus {b}?", "Subtract {b} from {a}."],
}
TEST_TEMPLATES = {
    "capital": ["Tell me the capital city of {x}.", "{x}'s seat of government is in which city?"],
    "element": ["Give the element symbol of {x}.", "How is {x} written as a chemical symbol?"],
    "book": ["Which writer created {x}?", "{x} was written by whom?"],
    "add": ["Compute the sum of {a} and {b}.", "How much is {a} + {b}?"],
    "mul": ["Compute the product of {a} and {b}.", "How much is {a} x {b}?"],
    "sub": ["How much is {a} - {b}?", "What do you get when you take {b} away from {a}?"],
}
SYSTEMS = ["You are a helpful assistant. Answer in one short sentence.", "Be concise."]


def split_keys(items: dict[str, str], held_out: int, rng: random.Random) -> tuple[list[str], list[str]]:
    keys = sorted(items)
    rng.shuffle(keys)
    return keys[held_out:], keys[:held_out]


def fact_rows(kind: str, keys: list[str], table: dict[str, str], templates: list[str], rng: random.Random) -> list:
    rows = []
    values = sorted(set(table.values()))
    for key in keys:
        right = table[key]
        wrong = DECOYS.get(key) if kind == "capital" else None
        while wrong is None or wrong == right:
            wrong = rng.choice(values)
        question = rng.choice(templates).format(x=key)
        if kind == "capital":
            sentence = "The capital of {k} is {v}."
        elif kind == "element":
            sentence = "The chemical symbol for {k} is {v}."
        else:
            sentence = "{k} was written by {v}."
        rows.append((question, sentence.format(k=key, v=right), sentence.format(k=key, v=wrong)))
    return rows


def arithmetic_rows(
    n: int, operands: list[int], factors: list[int], templates: dict[str, list[str]], rng: random.Random
) -> list:
    rows = []
    for _ in range(n):
        kind = rng.choice(["add", "mul", "sub"])
        a, b = rng.choice(operands), rng.choice(operands)
        if kind == "mul":
            a, b = rng.choice(factors), rng.choice(range(2, 13))
        if kind == "sub" and b > a:
            a, b = b, a
        right = {"add": a + b, "mul": a * b, "sub": a - b}[kind]
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
        question = rng.choice(templates[kind]).format(a=a, b=b)
        rows.append((question, f"The answer is {right}.", f"The answer is {wrong}."))
    return rows


def to_json(row: tuple[str, str, str], rng: random.Random) -> dict:
    question, chosen, rejected = row
    out = {"prompt": question, "chosen": chosen, "rejected": rejected}
    if rng.random() < 0.3:
        out["system"] = rng.choice(SYSTEMS)
    return out


def main() -> None:
    rng = random.Random(SEED)
    train, test = [], []
    for kind, table, held in (("capital", CAPITALS, 15), ("element", ELEMENTS, 8), ("book", BOOKS, 6)):
        train_keys, test_keys = split_keys(table, held, rng)
        for _ in range(3):  # each training entity asked three times, in its phrasings
            train += fact_rows(kind, train_keys, table, TRAIN_TEMPLATES[kind], rng)
        test += fact_rows(kind, test_keys, table, TEST_TEMPLATES[kind], rng)
    # Operands: training uses 2..49 except multiples of 7 (products: 2..12 x 2..12); held-out uses
    # 50..99 and multiples of 7 (products: 13..19 x 2..12).
    train_ops = [n for n in range(2, 50) if n % 7]
    test_ops = list(range(50, 100)) + [n for n in range(7, 50, 7)]
    train += arithmetic_rows(200, train_ops, list(range(2, 13)), TRAIN_TEMPLATES, rng)
    test += arithmetic_rows(60, test_ops, list(range(13, 20)), TEST_TEMPLATES, rng)
    rng.shuffle(train)
    rng.shuffle(test)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(to_json(row, rng)) + "\n")
        print(f"{OUT / name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
