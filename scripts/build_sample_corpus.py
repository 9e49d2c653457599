"""Build the generated parts of the built-in sample corpus in ``moxin/data/sample/``.

Run once, commit the output (the files are deterministic for a given Python version)::

    python scripts/build_sample_corpus.py            # writes code.jsonl, chat*.jsonl, preferences*.jsonl

What it writes:

* ``code.jsonl``: real source code, one top-level function or class per document, cut with :mod:`ast` from the
  standard library of the running interpreter (Python Software Foundation License). Sizes are kept between
  ``MIN_CHARS`` and ``MAX_CHARS`` so documents pack well into short CPU training blocks.
* ``chat.jsonl`` / ``chat_heldout.jsonl``: short helpful Tülu-form conversations (``{"messages": [...]}``), built
  from small fact tables plus hand-written exchanges, some with a system turn and some multi-turn.
* ``preferences.jsonl`` / ``preferences_heldout.jsonl``: ``{"chosen": [...], "rejected": [...]}`` pairs whose
  signal is systematic: the chosen answer is always correct, polite and on topic; the rejected one is wrong,
  rude or off topic. Held-out pairs use facts that never appear in the training pairs.

``prose.jsonl`` and ``cjk.jsonl`` are hand-curated public-domain text and are not produced here.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "moxin" / "data" / "sample"

#: Standard-library modules the code documents are cut from (pure Python, stable, readable).
CODE_MODULES = [
    "textwrap", "json.decoder", "json.encoder", "string", "heapq", "bisect", "fractions", "statistics",
    "shlex", "difflib", "fnmatch", "glob", "calendar", "colorsys", "functools", "copy", "pprint", "reprlib",
    "configparser", "csv", "dataclasses", "enum", "graphlib", "ipaddress", "operator", "queue", "sched",
    "secrets", "tokenize", "typing", "uuid", "zipfile", "tarfile", "urllib.parse", "html", "html.parser",
    "argparse", "base64", "gettext", "locale", "random", "posixpath", "contextlib", "abc", "numbers",
    "collections", "decimal", "datetime", "email.utils", "http.cookies", "weakref", "ast", "dis", "pathlib",
]
#: Keep code documents between these sizes (characters).
MIN_CHARS, MAX_CHARS = 400, 4000
#: How many code documents to keep in all.
N_CODE_DOCS = 220


def build_code() -> list[dict]:
    docs = []
    for name in CODE_MODULES:
        try:
            mod = importlib.import_module(name)
            source = inspect.getsource(mod)
        except (ImportError, OSError, TypeError):
            continue
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                seg = ast.get_source_segment(source, node, padded=True)
                if seg and MIN_CHARS <= len(seg) <= MAX_CHARS:
                    header = f"# From the Python standard library: {name} ({mod.__file__.split('/lib/')[-1]})\n"
                    docs.append({"text": header + seg + "\n"})
    random.Random(0).shuffle(docs)
    return docs[:N_CODE_DOCS]


# ---------------------------------------------------------------------------------------------- fact tables
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Russia", "Moscow"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Turkey", "Ankara"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("Denmark", "Copenhagen"), ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Colombia", "Bogotá"), ("Iceland", "Reykjavík"),
    ("Czech Republic", "Prague"), ("Ukraine", "Kyiv"), ("Philippines", "Manila"), ("Pakistan", "Islamabad"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("strong", "weak"), ("loud", "quiet"),
    ("hard", "soft"), ("rich", "poor"), ("young", "old"), ("wet", "dry"), ("thick", "thin"), ("high", "low"),
    ("near", "far"), ("clean", "dirty"), ("true", "false"), ("begin", "end"), ("win", "lose"),
    ("push", "pull"), ("inside", "outside"), ("before", "after"), ("heavy", "light"), ("brave", "afraid"),
]
ELEMENTS = [
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("sodium", "Na"), ("iron", "Fe"), ("gold", "Au"), ("silver", "Ag"), ("copper", "Cu"), ("lead", "Pb"),
    ("potassium", "K"), ("calcium", "Ca"), ("neon", "Ne"), ("sulfur", "S"), ("zinc", "Zn"), ("tin", "Sn"),
    ("mercury", "Hg"), ("chlorine", "Cl"), ("uranium", "U"), ("magnesium", "Mg"), ("aluminium", "Al"),
]
FRENCH = [
    ("hello", "bonjour"), ("thank you", "merci"), ("goodbye", "au revoir"), ("cat", "chat"), ("dog", "chien"),
    ("water", "eau"), ("bread", "pain"), ("house", "maison"), ("book", "livre"), ("friend", "ami"),
    ("apple", "pomme"), ("red", "rouge"), ("sun", "soleil"), ("moon", "lune"), ("yes", "oui"), ("no", "non"),
]

# Hand-written exchanges: (user, assistant). Real, short, helpful answers.
HANDWRITTEN = [
    ("How many days are in a leap year?", "A leap year has 366 days. The extra day is February 29."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Give me a synonym for \"happy\".", "A synonym for \"happy\" is \"joyful\"."),
    ("Why is the sky blue?", "Sunlight is scattered by the molecules in the air, and blue light is scattered much more "
     "than red light because its wavelength is shorter. That scattered blue light reaches our eyes from every "
     "part of the sky."),
    ("What is photosynthesis?", "Photosynthesis is the process by which plants, algae and some bacteria use "
     "sunlight, water and carbon dioxide to make sugar, releasing oxygen as a by-product."),
    ("Write a Python function that reverses a string.", "```python\ndef reverse(s: str) -> str:\n    "
     "return s[::-1]\n```\nSlicing with a step of -1 walks the string from the end to the start."),
    ("How do I read a file line by line in Python?", "```python\nwith open(\"data.txt\", encoding=\"utf-8\") as f:\n"
     "    for line in f:\n        print(line.rstrip(\"\\n\"))\n```\nThe `with` block closes the file for you."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("Who wrote \"Pride and Prejudice\"?", "Jane Austen wrote \"Pride and Prejudice\"; it was published in 1813."),
    ("Who wrote \"Hamlet\"?", "William Shakespeare wrote \"Hamlet\", around the year 1600."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, "
     "North America and South America."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O: two hydrogen atoms and one "
     "oxygen atom."),
    ("Summarize the story of the tortoise and the hare in one sentence.", "A boastful hare naps during a race "
     "against a slow but steady tortoise, who keeps going and wins."),
    ("Give me three tips for better sleep.", "1. Go to bed and wake up at the same time every day.\n2. Keep the "
     "bedroom dark, quiet and cool.\n3. Avoid caffeine and screens in the hour before bed."),
    ("What is a prime number?", "A prime number is a whole number greater than 1 whose only divisors are 1 and "
     "itself, such as 2, 3, 5, 7 and 11."),
    ("Is 51 a prime number?", "No. 51 = 3 × 17, so it is not prime."),
    ("Convert 5 kilometres to metres.", "5 kilometres is 5,000 metres."),
    ("How many minutes are in three hours?", "Three hours is 180 minutes."),
    ("What is the past tense of \"run\"?", "The past tense of \"run\" is \"ran\"."),
    ("What is the plural of \"mouse\"?", "The plural of \"mouse\" is \"mice\"."),
    ("Explain what a list comprehension is in Python.", "A list comprehension builds a list from an iterable in "
     "one expression, for example `[x * x for x in range(5)]` gives `[0, 1, 4, 9, 16]`. You can add a filter: "
     "`[x for x in data if x > 0]`."),
    ("What does HTTP stand for?", "HTTP stands for Hypertext Transfer Protocol."),
    ("What is the speed of light?", "In a vacuum, light travels at about 299,792 kilometres per second."),
    ("Name the three primary colours of light.", "The primary colours of light are red, green and blue."),
    ("What gas do humans breathe out?", "Humans breathe out carbon dioxide, along with nitrogen, unused oxygen "
     "and water vapour."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag or leaves in a cup, let it steep for three "
     "to five minutes, remove the tea, and add milk, sugar or lemon if you like."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 °F."),
    ("What is the square root of 144?", "The square root of 144 is 12."),
    ("Write a haiku about autumn.", "Red leaves drift and fall,\ncool wind hums through empty trees,\nthe year "
     "breathes out slow."),
    ("What is an adjective?", "An adjective is a word that describes a noun, such as \"green\" in \"a green "
     "apple\"."),
    ("How can I sort a list of numbers in Python?", "Use `sorted(numbers)` to get a new sorted list, or "
     "`numbers.sort()` to sort the list in place. Add `reverse=True` for descending order."),
    ("What is the difference between weather and climate?", "Weather is the state of the atmosphere over hours "
     "or days; climate is the average pattern of weather in a place over many years."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the longest river in the world?", "The Nile and the Amazon are the two longest rivers; the Nile is "
     "usually listed as the longest, at about 6,650 km."),
    ("Translate \"good morning\" into Spanish.", "\"Good morning\" in Spanish is \"buenos días\"."),
    ("What is 15% of 200?", "15% of 200 is 30."),
    ("Give an example of a mammal that can fly.", "The bat is a mammal that can fly."),
    ("What is the main idea of Newton's first law?", "An object stays at rest, or keeps moving in a straight "
     "line at constant speed, unless a force acts on it."),
]
MULTI_TURN = [
    [("user", "I want to learn Python. Where should I start?"),
     ("assistant", "Start with the basics: variables, numbers and strings, then lists, loops and functions. "
      "The official Python tutorial at docs.python.org is a good free guide."),
     ("user", "How long will that take?"),
     ("assistant", "With an hour a day, most people are comfortable with the basics in three to four weeks.")],
    [("user", "What is 12 times 12?"), ("assistant", "12 times 12 is 144."),
     ("user", "And 144 divided by 3?"), ("assistant", "144 divided by 3 is 48.")],
    [("user", "Can you recommend a classic novel?"),
     ("assistant", "\"Pride and Prejudice\" by Jane Austen is a witty, readable classic."),
     ("user", "Who is the main character?"),
     ("assistant", "Elizabeth Bennet, the clever second daughter of the Bennet family.")],
    [("user", "What is the capital of Italy?"), ("assistant", "The capital of Italy is Rome."),
     ("user", "What river runs through it?"), ("assistant", "The Tiber runs through Rome.")],
    [("user", "How do I make a Python dictionary?"),
     ("assistant", "Use braces with key: value pairs, for example `ages = {\"Ann\": 31, \"Bo\": 27}`."),
     ("user", "How do I read a value?"),
     ("assistant", "Index it by key: `ages[\"Ann\"]` gives 31. Use `ages.get(\"Cy\")` to get None instead of an "
      "error when the key is missing.")],
    [("user", "Tell me a fun fact about octopuses."),
     ("assistant", "An octopus has three hearts and blue blood."),
     ("user", "Why is its blood blue?"),
     ("assistant", "Its blood carries oxygen with a copper-based protein called hemocyanin, which is blue.")],
]
SYSTEMS = [
    "You are a helpful, concise assistant.",
    "You are a friendly tutor. Answer in one or two sentences.",
    "Answer truthfully and briefly.",
]


def _msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def build_chat(rng: random.Random) -> list[dict]:
    convs: list[list[dict]] = []
    for country, capital in CAPITALS:
        convs.append(_msgs(("user", f"What is the capital of {country}?"),
                           ("assistant", f"The capital of {country} is {capital}.")))
    for a, b in OPPOSITES:
        convs.append(_msgs(("user", f"What is the opposite of \"{a}\"?"),
                           ("assistant", f"The opposite of \"{a}\" is \"{b}\".")))
    for name, sym in ELEMENTS:
        convs.append(_msgs(("user", f"What is the chemical symbol for {name}?"),
                           ("assistant", f"The chemical symbol for {name} is {sym}.")))
    for en, fr in FRENCH:
        convs.append(_msgs(("user", f"How do you say \"{en}\" in French?"),
                           ("assistant", f"\"{en.capitalize()}\" in French is \"{fr}\".")))
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if rng.random() < 0.5:
            convs.append(_msgs(("user", f"What is {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}.")))
        else:
            a, b = a % 13 + 2, b % 13 + 2
            convs.append(_msgs(("user", f"What is {a} times {b}?"), ("assistant", f"{a} × {b} = {a * b}.")))
    for u, a in HANDWRITTEN:
        convs.append(_msgs(("user", u), ("assistant", a)))
    for turns in MULTI_TURN:
        convs.append(_msgs(*turns))
    rng.shuffle(convs)
    # a system turn on every fifth conversation
    for i, c in enumerate(convs):
        if i % 5 == 0:
            c.insert(0, {"role": "system", "content": SYSTEMS[i // 5 % len(SYSTEMS)]})
    return [{"messages": c} for c in convs]


RUDE = [
    "Look it up yourself.", "Why are you asking me? Figure it out.", "That is a boring question.",
    "Obviously everyone knows that. Stop wasting my time.", "I don't feel like answering.",
]
OFF_TOPIC = [
    "I like turtles. They are very slow.", "Bananas are yellow and curved.",
    "My favourite season is summer because of the long days.", "The weather is nice today, isn't it?",
]


def _pref(prompt: str, good: str, bad: str, system: str | None = None) -> dict:
    head = [{"role": "system", "content": system}] if system else []
    head.append({"role": "user", "content": prompt})
    return {
        "chosen": head + [{"role": "assistant", "content": good}],
        "rejected": [dict(m) for m in head] + [{"role": "assistant", "content": bad}],
    }


def _fact_items() -> list[tuple[str, str, str]]:
    """(kind, prompt, correct answer) plus the pool a wrong answer is drawn from, per fact table."""
    items = []
    for country, capital in CAPITALS:
        items.append(("capital", f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                      country, capital))
    for name, sym in ELEMENTS:
        items.append(("element", f"What is the chemical symbol for {name}?",
                      f"The chemical symbol for {name} is {sym}.", name, sym))
    for a, b in OPPOSITES:
        items.append(("opposite", f"What is the opposite of \"{a}\"?", f"The opposite of \"{a}\" is \"{b}\".", a, b))
    return items


def build_preferences(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs; held-out facts never occur in training pairs."""
    items = _fact_items()
    rng.shuffle(items)
    pools: dict[str, list[str]] = {}
    for kind, *_rest, ans in items:
        pools.setdefault(kind, []).append(ans)

    def wrong(kind: str, subject: str, right: str) -> str:
        choice = rng.choice([a for a in pools[kind] if a != right])
        if kind == "capital":
            return f"The capital of {subject} is {choice}."
        if kind == "element":
            return f"The chemical symbol for {subject} is {choice}."
        return f"The opposite of \"{subject}\" is \"{choice}\"."

    def pairs_for(item, k: int) -> list[dict]:
        kind, prompt, good, subject, right = item
        style = k % 3
        if style == 0:
            bad = wrong(kind, subject, right)
        elif style == 1:
            bad = rng.choice(RUDE)
        else:
            bad = rng.choice(OFF_TOPIC)
        system = SYSTEMS[k % len(SYSTEMS)] if k % 7 == 0 else None
        return [_pref(prompt, good, bad, system)]

    arith = []
    for k in range(40):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        good = f"{a} + {b} = {a + b}."
        bad = f"{a} + {b} = {a + b + rng.choice([-3, -2, -1, 1, 2, 5, 10])}." if k % 2 == 0 else rng.choice(RUDE)
        arith.append(_pref(f"What is {a} + {b}?", good, bad))
    hand = []
    for k, (u, a) in enumerate(HANDWRITTEN):
        bad = rng.choice(RUDE) if k % 2 == 0 else rng.choice(OFF_TOPIC)
        hand.append(_pref(u, a, bad))

    fact_pairs = [p for k, it in enumerate(items) for p in pairs_for(it, k)]
    heldout = fact_pairs[:20] + arith[:5] + hand[:5]
    train = fact_pairs[20:] + arith[5:] + hand[5:]
    # more training signal: every training fact again with the other two failure styles
    for k, it in enumerate(items[20:]):
        train += pairs_for(it, k + 1)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} records, {path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: moxin/data/sample)")
    ap.add_argument("--skip-code", action="store_true", help="do not rewrite code.jsonl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_code:
        write_jsonl(args.out / "code.jsonl", build_code())
    chat = build_chat(random.Random(1))
    n_held = 36
    write_jsonl(args.out / "chat.jsonl", chat[n_held:])
    write_jsonl(args.out / "chat_heldout.jsonl", chat[:n_held])
    train, heldout = build_preferences(random.Random(2))
    write_jsonl(args.out / "preferences.jsonl", train)
    write_jsonl(args.out / "preferences_heldout.jsonl", heldout)


if __name__ == "__main__":
    main()
