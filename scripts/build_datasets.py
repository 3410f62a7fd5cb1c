"""Writes the six knowledge datasets shipped with the package (src/neuron_attribution/data/).

Facts are written from public knowledge and put into sentences through several templates per type. Each type
also gets its candidate answers: the paper keeps a sentence only when the gold answer beats every other
candidate of its type. Run from the repository root: python scripts/build_datasets.py
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "src" / "neuron_attribution" / "data"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "England": "London", "Ireland": "Dublin",
    "Greece": "Athens", "Austria": "Vienna", "Hungary": "Budapest", "Poland": "Warsaw", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "the Czech Republic": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv", "Turkey": "Ankara",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Ethiopia": "Addis", "Nigeria": "Abuja", "Ghana": "Accra",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar", "Uganda": "Kampala",
    "Canada": "Ottawa", "the United States": "Washington", "Mexico": "Mexico", "Cuba": "Havana",
    "Argentina": "Buenos", "Brazil": "Bras", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogot",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Australia": "Canberra",
    "New Zealand": "Wellington", "India": "New", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila",
    "South Korea": "Seoul", "North Korea": "Pyongyang", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Malaysia": "Kuala", "Iceland": "Reykjavik",
}

LANGUAGES = {
    "France": "French", "Germany": "German", "Austria": "German", "Italy": "Italian", "Spain": "Spanish",
    "Mexico": "Spanish", "Argentina": "Spanish", "Colombia": "Spanish", "Peru": "Spanish", "Chile": "Spanish",
    "Cuba": "Spanish", "Portugal": "Portuguese", "Brazil": "Portuguese", "Japan": "Japanese", "China": "Chinese",
    "Russia": "Russian", "Greece": "Greek", "Poland": "Polish", "Sweden": "Swedish", "Norway": "Norwegian",
    "Finland": "Finnish", "Denmark": "Danish", "the Netherlands": "Dutch", "Turkey": "Turkish",
    "South Korea": "Korean", "Egypt": "Arabic", "Saudi Arabia": "Arabic", "Morocco": "Arabic", "Iraq": "Arabic",
    "Israel": "Hebrew", "Iran": "Persian", "Thailand": "Thai", "Vietnam": "Vietnamese", "Hungary": "Hungarian",
    "Romania": "Romanian", "the Czech Republic": "Czech", "Ukraine": "Ukrainian", "England": "English",
    "Australia": "English", "the United States": "English", "Ireland": "English", "Indonesia": "Indonesian",
    "Bulgaria": "Bulgarian", "Serbia": "Serbian", "Croatia": "Croatian", "Iceland": "Icelandic",
    "Pakistan": "Urdu", "Bangladesh": "Bengali", "Ethiopia": "Amharic", "Kenya": "Swahili",
    "Tanzania": "Swahili", "Malaysia": "Malay", "Syria": "Arabic", "Jordan": "Arabic", "Lebanon": "Arabic",
    "Uruguay": "Spanish", "Venezuela": "Spanish", "Ecuador": "Spanish",
}

CITIES = {
    "Paris": "France", "Lyon": "France", "Marseille": "France", "Berlin": "Germany", "Munich": "Germany",
    "Hamburg": "Germany", "Rome": "Italy", "Milan": "Italy", "Naples": "Italy", "Venice": "Italy",
    "Madrid": "Spain", "Barcelona": "Spain", "Seville": "Spain", "Lisbon": "Portugal", "Porto": "Portugal",
    "Tokyo": "Japan", "Osaka": "Japan", "Kyoto": "Japan", "Beijing": "China", "Shanghai": "China",
    "Moscow": "Russia", "Saint Petersburg": "Russia", "London": "England", "Manchester": "England",
    "Liverpool": "England", "Dublin": "Ireland", "Athens": "Greece", "Vienna": "Austria", "Budapest": "Hungary",
    "Warsaw": "Poland", "Krakow": "Poland", "Oslo": "Norway", "Stockholm": "Sweden", "Helsinki": "Finland",
    "Copenhagen": "Denmark", "Brussels": "Belgium", "Amsterdam": "the Netherlands", "Zurich": "Switzerland",
    "Geneva": "Switzerland", "Prague": "the Czech Republic", "Istanbul": "Turkey", "Cairo": "Egypt",
    "Nairobi": "Kenya", "Lagos": "Nigeria", "Toronto": "Canada", "Montreal": "Canada", "Vancouver": "Canada",
    "Chicago": "the United States", "Boston": "the United States", "Mexico City": "Mexico",
    "Havana": "Cuba", "Buenos Aires": "Argentina", "Rio de Janeiro": "Brazil", "Sao Paulo": "Brazil",
    "Santiago": "Chile", "Lima": "Peru", "Sydney": "Australia", "Melbourne": "Australia",
    "Auckland": "New Zealand", "Mumbai": "India", "Delhi": "India", "Bangalore": "India", "Karachi": "Pakistan",
    "Bangkok": "Thailand", "Hanoi": "Vietnam", "Jakarta": "Indonesia", "Manila": "the Philippines",
    "Seoul": "South Korea", "Tehran": "Iran", "Baghdad": "Iraq", "Riyadh": "Saudi Arabia",
}

COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
    "a ripe banana": "yellow", "a lemon": "yellow", "milk": "white", "a ripe tomato": "red",
    "an orange": "orange", "a carrot": "orange", "a frog": "green", "a crow": "black", "the sea": "blue",
    "a strawberry": "red", "chocolate": "brown", "an elephant": "gray", "a cherry": "red",
    "a summer leaf": "green", "the sun in a child's drawing": "yellow", "a fire truck": "red",
    "a polar bear": "white", "charcoal": "black", "a pumpkin": "orange", "a lime": "green",
    "a raven": "black", "a cloud": "white", "a stop sign": "red", "an eggplant": "purple", "a flamingo": "pink",
    "a school bus": "yellow", "spinach": "green", "a blueberry": "blue", "coffee": "brown", "a mouse": "gray",
    "a swan": "white", "a ruby": "red", "an emerald": "green", "a sapphire": "blue", "a canary": "yellow",
    "a pig": "pink", "soil": "brown", "ink": "black", "a lavender flower": "purple", "cucumber skin": "green",
    "a tangerine": "orange", "salt": "white", "a banana peel": "yellow", "a grape": "purple",
    "a bear": "brown", "a panther": "black", "ivory": "white", "sunflower petals": "yellow",
    "a ladybug": "red", "a dolphin": "gray",
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]
COUNTS = {
    "legs does a spider have": 8, "legs does a dog have": 4, "legs does a bird have": 2,
    "legs does an insect have": 6, "arms does an octopus have": 8, "days are in a week": 7,
    "months are in a year": 12, "sides does a triangle have": 3, "sides does a square have": 4,
    "sides does a pentagon have": 5, "sides does a hexagon have": 6, "sides does an octagon have": 8,
    "wheels does a bicycle have": 2, "wheels does a tricycle have": 3, "wheels does a car have": 4,
    "fingers are on one hand": 5, "eyes does a person have": 2, "hearts does a person have": 1,
    "players are on a basketball court for one team": 5, "continents are there": 7, "colours are in a rainbow": 7,
    "legs does a horse have": 4, "wings does a bird have": 2, "hours are in half a day": 12,
}

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth"]
MONTH_FACTS = [
    ("Christmas is celebrated in the month of", "December"), ("Halloween is in the month of", "October"),
    ("Valentine's Day is in the month of", "February"), ("New Year's Day is in the month of", "January"),
    ("The last month of the year is", "December"), ("The shortest month of the year is", "February"),
    ("April Fools' Day is in the month of", "April"), ("Independence Day in the United States is in", "July"),
    ("Saint Patrick's Day is in the month of", "March"), ("The month after winter ends in the north is", "March"),
]


def _templated(table: dict[str, str], templates: list[str]) -> list[tuple[str, str]]:
    return [(t.format(subject), answer) for subject, answer in table.items() for t in templates]


def capital_facts():
    return _templated(CAPITALS, ["The capital of {} is", "The capital city of {} is",
                                 "{} has its capital in the city of"])


def language_facts():
    return _templated(LANGUAGES, ["The official language of {} is", "In {}, most people speak", "People in {} speak"])


def country_facts():
    return _templated(CITIES, ["{} is a city in the country of", "The city of {} is located in",
                               "{} is in the country of"])


def colour_facts():
    return _templated(COLOURS, ["The colour of {} is", "The color of {} is", "Q: What colour is {}? A: It is"])


def number_facts():
    facts = []
    for what, n in COUNTS.items():
        facts += [(f"Q: How many {what}? A:", NUMBER_WORDS[n]), (f"How many {what}? The answer is", NUMBER_WORDS[n])]
    for a in range(1, 7):
        for b in range(1, 7):
            facts.append((f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} equals", NUMBER_WORDS[a + b]))
    for a in range(3, 10):
        for b in range(1, a):
            facts.append((f"{NUMBER_WORDS[a].capitalize()} minus {NUMBER_WORDS[b]} equals", NUMBER_WORDS[a - b]))
    for start in range(1, 10):
        run = ", ".join(NUMBER_WORDS[start: start + 3])
        facts.append((f"{run.capitalize()},", NUMBER_WORDS[start + 3]))
        facts.append((f"Counting up: {run},", NUMBER_WORDS[start + 3]))
    for n in range(1, 12):
        facts.append((f"The number after {NUMBER_WORDS[n]} is", NUMBER_WORDS[n + 1]))
        facts.append((f"The number before {NUMBER_WORDS[n + 1]} is", NUMBER_WORDS[n]))
    return facts


def month_facts():
    facts = list(MONTH_FACTS)
    for i, month in enumerate(MONTHS):
        after, before = MONTHS[(i + 1) % 12], MONTHS[i - 1]
        facts += [
            (f"The month after {month} is", after), (f"The month that comes after {month} is", after),
            (f"Q: Which month follows {month}? A:", after), (f"{before}, {month},", after),
            (f"The month before {month} is", before), (f"The month that comes before {month} is", before),
            (f"Two months after {month} comes", MONTHS[(i + 2) % 12]),
            (f"The {ORDINALS[i]} month of the year is", month),
            (f"The month between {before} and {after} is", month),
            (f"Three months after {month} is", MONTHS[(i + 3) % 12]),
            (f"In the calendar, {month} is followed by", after),
            (f"In the calendar, {month} comes right after", before),
        ]
    return facts


TYPES = {
    "language": (language_facts, sorted(set(LANGUAGES.values()))),
    "capital": (capital_facts, sorted(set(CAPITALS.values()))),
    "country": (country_facts, sorted(set(CITIES.values()))),
    "color": (colour_facts, ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                             "white", "gray"]),
    "number": (number_facts, NUMBER_WORDS[1:]),
    "month": (month_facts, MONTHS),
}


def main() -> None:
    candidates = {}
    for kind, (make, answers) in TYPES.items():
        facts = list(dict.fromkeys(make()))  # distinct, in order
        prompts = [p for p, _ in facts]
        assert len(set(prompts)) == len(prompts), f"{kind}: a prompt with two answers"
        assert len(facts) >= 150, f"{kind}: only {len(facts)} facts"
        assert {a for _, a in facts} <= set(answers), f"{kind}: an answer missing from the candidates"
        lines = [json.dumps({"prompt": p, "answer": a, "type": kind}, ensure_ascii=False) for p, a in facts]
        (DATA / f"{kind}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        candidates[kind] = answers
        print(f"{kind}: {len(facts)} facts, {len(answers)} candidate answers")
    (DATA / "candidates.json").write_text(json.dumps(candidates, indent=1, ensure_ascii=False) + "\n",
                                          encoding="utf-8")


if __name__ == "__main__":
    main()
