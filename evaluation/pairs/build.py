"""Build evaluation/pairs/pairs.jsonl: labelled prompt pairs for the semantic cache.

Each line is {"a", "b", "same_answer", "kind", "domain"}. Paraphrases ask the same question
in other words (same answer); hard negatives change one thing that changes the answer:
a negation, swapped entities, another number, date or subject, a narrower or wider scope,
or an antonym. Most pairs come from templates (one question, several phrasings, real
subjects from many domains); the rest are written by hand. Seeded, so the file is stable.

Run: python -m evaluation.pairs.build
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).with_name("pairs.jsonl")
PARAPHRASES_PER_FAMILY = 12
NEGATIVES_PER_CHANGE = 7
# Negation is the failure MiniLM is worst at, so it gets more pairs.
NEGATIONS_PER_FAMILY = 14


@dataclass
class Family:
    """One question said several ways, over subjects that change its answer.

    `fills` hold slots that go together; `pools` hold independent slots whose change is a
    hard negative of the kind given in `pool_kinds`. `swap` names two slots whose order
    matters; `negated` says the negated question; `subject_change` marks that another fill
    asks another question.
    """

    domain: str
    phrasings: list[str]
    fills: list[dict[str, str]]
    pools: dict[str, list[str]] = field(default_factory=dict)
    pool_kinds: dict[str, str] = field(default_factory=dict)
    swap: tuple[str, str] | None = None
    negated: list[str] = field(default_factory=list)
    subject_change: str | None = None


LANGS = ["Python", "Java", "JavaScript", "Go", "Rust", "C#", "Ruby", "Kotlin", "Swift", "PHP"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def each(slot: str, values: list[str]) -> list[dict[str, str]]:
    return [{slot: v} for v in values]


def both(values: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"x": x, "y": y} for x, y in values]


FAMILIES = [
    Family(
        "programming",
        [
            "How do I sort a list in {lang}?",
            "What's the way to sort a list in {lang}?",
            "In {lang}, how can I sort a list?",
            "How can I sort a list using {lang}?",
        ],
        each("lang", LANGS),
        subject_change="changed_entity",
    ),
    Family(
        "programming",
        [
            "How do I round a number to {n} decimal places in {lang}?",
            "In {lang}, how can I round a number to {n} decimal places?",
            "What is the {lang} code to round a number to {n} decimal places?",
        ],
        each("lang", LANGS),
        pools={"n": ["2", "3", "4", "5"]},
        pool_kinds={"n": "changed_number"},
        subject_change="changed_entity",
    ),
    Family(
        "programming",
        [
            "How do I convert {x} to {y} in Python?",
            "What is the best way to turn {x} into {y} with Python?",
            "Using Python, how can I convert {x} into {y}?",
            "Show me how to convert {x} to {y} in Python.",
        ],
        both(
            [
                ("JSON", "CSV"),
                ("XML", "JSON"),
                ("YAML", "JSON"),
                ("CSV", "Parquet"),
                ("Markdown", "HTML"),
                ("TOML", "YAML"),
                ("Excel", "CSV"),
            ]
        ),
        swap=("x", "y"),
    ),
    Family(
        "programming",
        [
            "How do I migrate a database from {x} to {y}?",
            "What are the steps to move a database from {x} to {y}?",
            "What is the process for migrating my data from {x} to {y}?",
        ],
        both(
            [
                ("MySQL", "PostgreSQL"),
                ("MongoDB", "PostgreSQL"),
                ("SQLite", "MySQL"),
                ("Oracle", "PostgreSQL"),
                ("SQL Server", "MySQL"),
                ("DynamoDB", "MongoDB"),
            ]
        ),
        swap=("x", "y"),
    ),
    Family(
        "programming",
        [
            "How do I call {x} code from {y}?",
            "What's the way to call {x} functions from a {y} program?",
            "How can I invoke {x} code from within {y}?",
        ],
        both(
            [
                ("C", "Python"),
                ("Rust", "Python"),
                ("Java", "Kotlin"),
                ("C++", "Rust"),
                ("Go", "C"),
                ("Python", "JavaScript"),
            ]
        ),
        swap=("x", "y"),
    ),
    Family(
        "programming",
        [
            "Which {lang} data types are mutable?",
            "What data types in {lang} are mutable?",
            "In {lang}, which data types can be mutated?",
        ],
        each("lang", ["Python", "Java", "JavaScript", "C#", "Swift", "Kotlin", "Scala", "Ruby"]),
        negated=[
            "Which {lang} data types are not mutable?",
            "What data types in {lang} are not mutable?",
            "In {lang}, which data types cannot be mutated?",
        ],
    ),
    Family(
        "cooking",
        [
            "How do I make {dish} with {ing}?",
            "What's a recipe for {dish} that uses {ing}?",
            "Give me a {dish} recipe with {ing}.",
            "Can you share a recipe for {dish} made with {ing}?",
        ],
        [
            {"dish": "bread", "ing": "yeast"},
            {"dish": "pancakes", "ing": "eggs"},
            {"dish": "chocolate cake", "ing": "butter"},
            {"dish": "pizza dough", "ing": "yeast"},
            {"dish": "oatmeal cookies", "ing": "sugar"},
            {"dish": "mayonnaise", "ing": "eggs"},
            {"dish": "risotto", "ing": "wine"},
            {"dish": "brownies", "ing": "flour"},
            {"dish": "mashed potatoes", "ing": "milk"},
            {"dish": "pesto", "ing": "pine nuts"},
        ],
        negated=[
            "How do I make {dish} without {ing}?",
            "What's a recipe for {dish} that doesn't use {ing}?",
            "Give me a {dish} recipe without {ing}.",
            "Can you share a recipe for {dish} made without {ing}?",
        ],
    ),
    Family(
        "cooking",
        [
            "How long should I roast a {n} pound {meat}?",
            "What's the roasting time for a {n}-pound {meat}?",
            "For a {n} lb {meat}, how long do I roast it?",
            "How many hours does a {n} pound {meat} need in the oven?",
        ],
        each("meat", ["turkey", "chicken", "pork shoulder", "leg of lamb", "beef brisket"]),
        pools={"n": ["3", "4", "5", "8", "12", "15", "20"]},
        pool_kinds={"n": "changed_number"},
        subject_change="changed_subject",
    ),
    Family(
        "cooking",
        [
            "How many {u2} are in {n} {u1}?",
            "Convert {n} {u1} to {u2}.",
            "What is {n} {u1} in {u2}?",
            "{n} {u1} is how many {u2}?",
        ],
        [
            {"u1": "cups", "u2": "millilitres"},
            {"u1": "ounces", "u2": "grams"},
            {"u1": "tablespoons", "u2": "teaspoons"},
            {"u1": "pounds", "u2": "kilograms"},
            {"u1": "kilometres", "u2": "miles"},
            {"u1": "litres", "u2": "gallons"},
            {"u1": "inches", "u2": "centimetres"},
            {"u1": "feet", "u2": "metres"},
        ],
        pools={"n": ["3", "5", "12", "20", "42", "100", "250", "2.5"]},
        pool_kinds={"n": "changed_number"},
        swap=("u1", "u2"),
    ),
    Family(
        "health",
        [
            "Which foods are high in {n}?",
            "What foods contain a lot of {n}?",
            "Can you list foods rich in {n}?",
        ],
        each(
            "n",
            [
                "potassium",
                "iron",
                "vitamin C",
                "protein",
                "fiber",
                "calcium",
                "sugar",
                "sodium",
                "magnesium",
                "zinc",
            ],
        ),
        negated=[
            "Which foods are not high in {n}?",
            "What foods don't contain much {n}?",
            "Can you list foods that are not rich in {n}?",
        ],
        subject_change="changed_subject",
    ),
    Family(
        "health",
        [
            "How much {drug} can a {n}-year-old child take?",
            "What's the safe dose of {drug} for a {n}-year-old?",
            "What is the right {drug} dosage for a child aged {n}?",
        ],
        each("drug", ["ibuprofen", "acetaminophen", "cetirizine", "loratadine"]),
        pools={"n": ["2", "4", "6", "8", "10", "12"]},
        pool_kinds={"n": "changed_number"},
        subject_change="changed_subject",
    ),
    Family(
        "health",
        [
            "Which painkillers are safe to take with {drug}?",
            "What pain relievers can I safely combine with {drug}?",
            "Which pain medications are safe alongside {drug}?",
        ],
        each("drug", ["warfarin", "lisinopril", "sertraline", "metformin", "prednisone"]),
        negated=[
            "Which painkillers are not safe to take with {drug}?",
            "What pain relievers can't I safely combine with {drug}?",
            "Which pain medications are not safe alongside {drug}?",
        ],
    ),
    Family(
        "science",
        [
            "Which {g} can {act}?",
            "What {g} are able to {act}?",
            "Name the {g} that can {act}.",
        ],
        [
            {"g": "birds", "act": "fly backwards"},
            {"g": "mammals", "act": "lay eggs"},
            {"g": "fish", "act": "breathe air"},
            {"g": "snakes", "act": "swim"},
            {"g": "insects", "act": "see ultraviolet light"},
            {"g": "metals", "act": "float on water"},
            {"g": "plants", "act": "grow in the dark"},
        ],
        negated=[
            "Which {g} cannot {act}?",
            "What {g} are not able to {act}?",
            "Name the {g} that can't {act}.",
        ],
    ),
    Family(
        "travel",
        [
            "Which countries require a visa for {nat} citizens?",
            "For {nat} citizens, which countries need a visa?",
            "What countries do {nat} citizens need a visa to enter?",
        ],
        each(
            "nat",
            [
                "US",
                "Indian",
                "British",
                "Canadian",
                "Brazilian",
                "Chinese",
                "Nigerian",
                "Mexican",
                "Japanese",
                "Australian",
            ],
        ),
        negated=[
            "Which countries do not require a visa for {nat} citizens?",
            "For {nat} citizens, which countries don't need a visa?",
            "What countries can {nat} citizens enter without a visa?",
        ],
        subject_change="changed_entity",
    ),
    Family(
        "travel",
        [
            "What documents do I need to travel from {x} to {y}?",
            "Which documents are required for a trip from {x} to {y}?",
            "What paperwork do I need when travelling from {x} to {y}?",
        ],
        both(
            [
                ("Canada", "Mexico"),
                ("Germany", "Turkey"),
                ("India", "Thailand"),
                ("Brazil", "Argentina"),
                ("Australia", "Indonesia"),
                ("France", "Morocco"),
                ("Japan", "China"),
            ]
        ),
        swap=("x", "y"),
    ),
    Family(
        "travel",
        [
            "Is the {place} open on {day}?",
            "Can I visit the {place} on {day}?",
            "Does the {place} open to visitors on {day}?",
        ],
        each(
            "place",
            [
                "Louvre",
                "British Museum",
                "Prado Museum",
                "Uffizi Gallery",
                "Metropolitan Museum of Art",
                "Rijksmuseum",
                "Vatican Museums",
            ],
        ),
        pools={"day": WEEKDAYS},
        pool_kinds={"day": "changed_date"},
        subject_change="changed_entity",
    ),
    Family(
        "travel",
        [
            "What's the weather usually like in {city} in {month}?",
            "How is the weather in {city} during {month}?",
            "What weather should I expect in {city} in {month}?",
            "What is {city}'s typical weather in {month}?",
        ],
        each(
            "city",
            [
                "Lisbon",
                "Tokyo",
                "Reykjavik",
                "Cape Town",
                "Buenos Aires",
                "Bangkok",
                "Vancouver",
                "Marrakech",
                "Sydney",
                "Cairo",
            ],
        ),
        pools={"month": MONTHS},
        pool_kinds={"month": "changed_date"},
        subject_change="changed_entity",
    ),
    Family(
        "travel",
        [
            "What is the weather forecast for {city} {when}?",
            "What will the weather be like in {city} {when}?",
            "How will the weather be in {city} {when}?",
        ],
        each("city", ["Chicago", "Berlin", "Madrid", "Seoul", "Toronto", "Dublin"]),
        pools={"when": ["today", "tomorrow", "this weekend", "next week", "on Friday"]},
        pool_kinds={"when": "changed_date"},
    ),
    Family(
        "finance",
        [
            "Convert {n} {x} to {y}.",
            "What is {n} {x} in {y}?",
            "How much is {n} {x} in {y}?",
            "If I exchange {n} {x}, how many {y} will I get?",
        ],
        both(
            [
                ("USD", "EUR"),
                ("GBP", "JPY"),
                ("EUR", "CHF"),
                ("CAD", "USD"),
                ("AUD", "NZD"),
                ("INR", "USD"),
                ("BRL", "EUR"),
            ]
        ),
        pools={"n": ["50", "100", "250", "1,000", "5,000"]},
        pool_kinds={"n": "changed_number"},
        swap=("x", "y"),
    ),
    Family(
        "finance",
        [
            "What is {p}% of {n}?",
            "Calculate {p} percent of {n}.",
            "How much is {p}% of {n}?",
            "What do you get when you take {p}% of {n}?",
        ],
        [{}],
        pools={"p": ["5", "10", "15", "18", "20", "25"], "n": ["40", "80", "120", "250", "1200"]},
        pool_kinds={"p": "changed_number", "n": "changed_number"},
    ),
    Family(
        "finance",
        [
            "What is the monthly payment on a {n} dollar mortgage at {r}% over {y} years?",
            "If I borrow {n} dollars for a mortgage at {r}% for {y} years, what is the "
            "monthly payment?",
            "What would I pay each month on a {n} dollar, {y}-year mortgage at {r}% interest?",
        ],
        [{}],
        pools={
            "n": ["200,000", "350,000", "500,000"],
            "r": ["3.5", "4", "5.25", "6.5"],
            "y": ["15", "20", "30"],
        },
        pool_kinds={"n": "changed_number", "r": "changed_number", "y": "changed_number"},
    ),
    Family(
        "finance",
        [
            "What was the closing level of the S&P 500 on {month} {d}, {year}?",
            "At what level did the S&P 500 close on {month} {d}, {year}?",
            "Where did the S&P 500 close on {month} {d}, {year}?",
        ],
        [{}],
        pools={"month": MONTHS, "d": ["3", "14", "21", "28"], "year": ["2008", "2015", "2020"]},
        pool_kinds={"month": "changed_date", "d": "changed_date", "year": "changed_date"},
    ),
    Family(
        "history",
        [
            "What were the major world events of {year}?",
            "What major events happened around the world in {year}?",
            "Which big historical events took place in {year}?",
        ],
        [{}],
        pools={"year": ["1914", "1929", "1945", "1969", "1989", "2001", "2008"]},
        pool_kinds={"year": "changed_date"},
    ),
    Family(
        "sports",
        [
            "Who won the {event} in {year}?",
            "Who was the winner of the {event} in {year}?",
            "Which team won the {event} in {year}?",
        ],
        each(
            "event",
            ["FIFA World Cup", "Super Bowl", "NBA Finals", "Stanley Cup", "Champions League"],
        ),
        pools={"year": ["1998", "2006", "2010", "2014", "2018", "2022"]},
        pool_kinds={"year": "changed_date"},
        subject_change="changed_entity",
    ),
    Family(
        "geography",
        [
            "Is {x} bigger than {y} by area?",
            "Does {x} have a larger area than {y}?",
            "Is the land area of {x} greater than that of {y}?",
        ],
        both(
            [
                ("France", "Spain"),
                ("Canada", "China"),
                ("Brazil", "Australia"),
                ("Texas", "Alaska"),
                ("Germany", "Japan"),
                ("Egypt", "Nigeria"),
            ]
        ),
        swap=("x", "y"),
    ),
    Family(
        "sports",
        [
            "What is {x}'s head-to-head record against {y}?",
            "How does {x}'s head-to-head record against {y} look?",
            "What's the head-to-head record of {x} against {y}?",
        ],
        both(
            [
                ("Nadal", "Federer"),
                ("Djokovic", "Murray"),
                ("Serena Williams", "Maria Sharapova"),
                ("Magnus Carlsen", "Hikaru Nakamura"),
                ("Real Madrid", "Barcelona"),
            ]
        ),
        swap=("x", "y"),
    ),
]

# Broad question, then a narrower one whose answer the broad answer does not give.
SCOPES = [
    (
        "programming",
        "How do I sort a list in Python?",
        "How do I sort a list of dictionaries by a key in Python?",
    ),
    (
        "programming",
        "How do I read a file in Java?",
        "How do I read a large file line by line in Java without loading it into memory?",
    ),
    (
        "programming",
        "How do I make an HTTP request in JavaScript?",
        "How do I make an HTTP POST request with a JSON body in JavaScript?",
    ),
    (
        "programming",
        "How do I write a unit test in Go?",
        "How do I write a table-driven unit test for an HTTP handler in Go?",
    ),
    (
        "programming",
        "How do I handle errors in Rust?",
        "How do I convert a custom error type into an io::Error in Rust?",
    ),
    (
        "programming",
        "How do I create a Docker image?",
        "How do I create a multi-stage Docker image for a Node.js app?",
    ),
    ("programming", "How do I use Git branches?", "How do I rename a remote Git branch?"),
    (
        "programming",
        "What are Python decorators?",
        "How do I write a Python decorator that takes arguments?",
    ),
    (
        "programming",
        "How do I connect to a database in Python?",
        "How do I connect to PostgreSQL with SSL in Python using psycopg?",
    ),
    (
        "programming",
        "How do I center things in CSS?",
        "How do I vertically center an image inside a flexbox container in CSS?",
    ),
    ("cooking", "How do I cook rice?", "How do I cook brown basmati rice in a pressure cooker?"),
    ("cooking", "How do I bake bread?", "How do I bake a sourdough rye bread in a Dutch oven?"),
    ("cooking", "How do I make soup?", "How do I make a vegan butternut squash soup?"),
    ("cooking", "How do I grill fish?", "How do I grill whole sea bass on a charcoal grill?"),
    (
        "cooking",
        "What spices go well with chicken?",
        "What spices go well with chicken in an Indian curry?",
    ),
    ("cooking", "How do I store vegetables?", "How do I store fresh basil so it doesn't wilt?"),
    ("cooking", "How do I make pasta sauce?", "How do I make a carbonara sauce without cream?"),
    ("travel", "What should I see in Italy?", "What should I see in Florence in one day?"),
    ("travel", "How do I get around Japan?", "How do I get from Tokyo to Kyoto by bullet train?"),
    (
        "travel",
        "What should I pack for a trip?",
        "What should I pack for a week of winter hiking in Norway?",
    ),
    (
        "travel",
        "Where should I stay in Paris?",
        "Where should I stay in Paris with kids on a budget?",
    ),
    (
        "travel",
        "What are the best beaches in Spain?",
        "What are the best quiet beaches near Malaga?",
    ),
    (
        "travel",
        "How do I find cheap flights?",
        "How do I find cheap flights from London to New York in December?",
    ),
    ("finance", "How do I invest money?", "How do I invest in index funds through a Roth IRA?"),
    (
        "finance",
        "What is a good credit score?",
        "What credit score do I need to get a mortgage in the US?",
    ),
    (
        "finance",
        "How do taxes work?",
        "How is capital gains tax calculated on selling stocks held under a year?",
    ),
    ("finance", "How do I save money?", "How do I save money on groceries for a family of four?"),
    ("finance", "What is inflation?", "How does inflation affect fixed-rate bond prices?"),
    (
        "finance",
        "How do I make a budget?",
        "How do I make a budget on an irregular freelance income?",
    ),
    ("health", "How can I sleep better?", "How can I sleep better while working night shifts?"),
    (
        "health",
        "What are the benefits of exercise?",
        "What are the benefits of strength training for women over 50?",
    ),
    (
        "health",
        "What are the health benefits of tea?",
        "What are the health benefits of green tea?",
    ),
    (
        "health",
        "How do I lower my blood pressure?",
        "How do I lower my blood pressure without medication?",
    ),
    ("health", "What causes headaches?", "What causes headaches behind the eyes in the morning?"),
    (
        "health",
        "How much water should I drink?",
        "How much water should I drink while running a marathon?",
    ),
    (
        "history",
        "What caused World War I?",
        "What role did the assassination of Franz Ferdinand play in starting World War I?",
    ),
    (
        "history",
        "Tell me about the Roman Empire.",
        "Tell me about the fall of the Western Roman Empire.",
    ),
    (
        "history",
        "What was the Industrial Revolution?",
        "How did the Industrial Revolution change child labour in Britain?",
    ),
    ("history", "Who were the Vikings?", "Why did the Vikings settle in Iceland?"),
    (
        "history",
        "What happened during the Cold War?",
        "What happened during the Cuban Missile Crisis?",
    ),
    ("science", "How do vaccines work?", "How do mRNA vaccines work?"),
    ("science", "What is climate change?", "How does climate change affect coral reefs?"),
    ("science", "How do plants grow?", "How do cacti grow without much water?"),
    ("science", "What is a black hole?", "What happens at the event horizon of a black hole?"),
    ("science", "How do batteries work?", "How do lithium-ion batteries degrade over time?"),
]

ANTONYMS = [
    (
        "programming",
        "How do I increase the heap size of the JVM?",
        "How do I decrease the heap size of the JVM?",
    ),
    (
        "programming",
        "How do I enable dark mode in VS Code?",
        "How do I disable dark mode in VS Code?",
    ),
    (
        "programming",
        "How do I add a column to a table in PostgreSQL?",
        "How do I remove a column from a table in PostgreSQL?",
    ),
    (
        "programming",
        "How do I convert a string to uppercase in Python?",
        "How do I convert a string to lowercase in Python?",
    ),
    (
        "programming",
        "How do I find the maximum value in a list in Python?",
        "How do I find the minimum value in a list in Python?",
    ),
    (
        "programming",
        "How do I sort an array in ascending order in JavaScript?",
        "How do I sort an array in descending order in JavaScript?",
    ),
    ("cooking", "How do I make my soup thicker?", "How do I make my soup thinner?"),
    ("cooking", "How do I make a sauce less spicy?", "How do I make a sauce more spicy?"),
    (
        "cooking",
        "What should I do if my dough is too dry?",
        "What should I do if my dough is too wet?",
    ),
    ("health", "What are symptoms of high blood sugar?", "What are symptoms of low blood sugar?"),
    ("health", "How can I gain weight healthily?", "How can I lose weight healthily?"),
    (
        "health",
        "What are the signs of an overactive thyroid?",
        "What are the signs of an underactive thyroid?",
    ),
    (
        "finance",
        "What happens to bond prices when interest rates rise?",
        "What happens to bond prices when interest rates fall?",
    ),
    ("finance", "How do I buy shares of a company?", "How do I sell shares of a company?"),
    (
        "finance",
        "What are the advantages of renting a home?",
        "What are the disadvantages of renting a home?",
    ),
    (
        "travel",
        "What is the cheapest month to fly to Hawaii?",
        "What is the most expensive month to fly to Hawaii?",
    ),
    ("travel", "What should I do before a long flight?", "What should I do after a long flight?"),
    (
        "history",
        "What happened before the French Revolution?",
        "What happened after the French Revolution?",
    ),
    (
        "history",
        "What were the causes of the Great Depression?",
        "What were the effects of the Great Depression?",
    ),
    ("science", "Why does ice float on water?", "Why does iron sink in water?"),
    (
        "science",
        "What is the hottest planet in the solar system?",
        "What is the coldest planet in the solar system?",
    ),
    ("science", "How do you heat water quickly?", "How do you cool water quickly?"),
]

HAND_PARAPHRASES = [
    (
        "programming",
        "How do I reverse a string in Python?",
        "What's the easiest way to reverse a string in Python?",
    ),
    (
        "programming",
        "Why isn't my Python script finding the module?",
        "Why does my Python script not find the module?",
    ),
    (
        "programming",
        "How do I round to two decimal places in Python?",
        "How do I round to 2 decimal places in Python?",
    ),
    (
        "programming",
        "What does the yield keyword do in Python?",
        "Can you explain what yield does in Python?",
    ),
    (
        "programming",
        "How do I undo the last Git commit?",
        "How can I revert my most recent Git commit?",
    ),
    (
        "programming",
        "What is the difference between let and const in JavaScript?",
        "In JavaScript, how do let and const differ?",
    ),
    (
        "programming",
        "How do I check if a key exists in a Python dictionary?",
        "What's the way to test whether a Python dict contains a key?",
    ),
    (
        "programming",
        "Why can't I push to my GitHub repository?",
        "Why am I not able to push to my GitHub repository?",
    ),
    (
        "programming",
        "How do I install packages with pip?",
        "What is the command to install a package using pip?",
    ),
    (
        "programming",
        "How do I get the length of an array in JavaScript?",
        "How can I find out how many elements a JavaScript array has?",
    ),
    (
        "cooking",
        "How long do I boil an egg for a runny yolk?",
        "How many minutes should I boil an egg to keep the yolk runny?",
    ),
    (
        "cooking",
        "What can I use instead of buttermilk?",
        "What's a good substitute for buttermilk?",
    ),
    ("cooking", "Why doesn't my bread rise?", "Why is my bread not rising?"),
    (
        "cooking",
        "How do I keep avocados from turning brown?",
        "How can I stop cut avocado from browning?",
    ),
    (
        "cooking",
        "How do I sharpen a kitchen knife?",
        "What's the right way to sharpen a kitchen knife?",
    ),
    ("cooking", "Can I freeze cooked rice?", "Is it okay to freeze rice after cooking it?"),
    (
        "travel",
        "Do I need a visa to visit Japan as a US citizen?",
        "As a US citizen, is a visa required to visit Japan?",
    ),
    (
        "travel",
        "What is the best time of year to visit Iceland?",
        "When is the best time to travel to Iceland?",
    ),
    (
        "travel",
        "How do I get from the airport to central London?",
        "What's the best way to get from the airport into central London?",
    ),
    (
        "travel",
        "Is tap water safe to drink in Mexico City?",
        "Can I safely drink the tap water in Mexico City?",
    ),
    (
        "travel",
        "What currency is used in Switzerland?",
        "Which currency do they use in Switzerland?",
    ),
    ("finance", "What is compound interest?", "Can you explain compound interest?"),
    ("finance", "How does a Roth IRA work?", "Can you explain how a Roth IRA works?"),
    (
        "finance",
        "What's the difference between a stock and a bond?",
        "How do stocks differ from bonds?",
    ),
    (
        "finance",
        "Why shouldn't I keep all my savings in cash?",
        "Why is it not a good idea to keep all my savings in cash?",
    ),
    ("finance", "How do I improve my credit score?", "What can I do to raise my credit score?"),
    ("health", "What are the symptoms of dehydration?", "What are the signs of being dehydrated?"),
    ("health", "How much sleep does an adult need?", "How many hours of sleep do adults need?"),
    (
        "health",
        "Is it bad to take ibuprofen on an empty stomach?",
        "Is taking ibuprofen on an empty stomach harmful?",
    ),
    ("health", "Why can't I fall asleep at night?", "Why am I unable to fall asleep at night?"),
    ("health", "What foods help lower cholesterol?", "Which foods can reduce cholesterol?"),
    ("history", "Who was the first emperor of Rome?", "Who was Rome's first emperor?"),
    ("history", "Why did the Roman Empire fall?", "What caused the fall of the Roman Empire?"),
    ("history", "When did the Berlin Wall fall?", "In what year did the Berlin Wall come down?"),
    (
        "history",
        "Who wrote the Declaration of Independence?",
        "Who was the author of the Declaration of Independence?",
    ),
    ("science", "Why is the sky blue?", "What makes the sky look blue?"),
    (
        "science",
        "How far is the Moon from Earth?",
        "What is the distance between Earth and the Moon?",
    ),
    ("science", "What is photosynthesis?", "Can you explain photosynthesis?"),
    ("science", "How do airplanes stay in the air?", "What keeps airplanes up in the air?"),
    (
        "science",
        "What is the boiling point of water at sea level?",
        "At what temperature does water boil at sea level?",
    ),
]


def line(a: str, b: str, same: bool, kind: str, domain: str) -> dict[str, object]:
    return {"a": a, "b": b, "same_answer": same, "kind": kind, "domain": domain}


def pick(family: Family, rng: random.Random) -> dict[str, str]:
    slots = dict(rng.choice(family.fills))
    slots.update({slot: rng.choice(values) for slot, values in family.pools.items()})
    return slots


def from_family(family: Family, rng: random.Random) -> list[dict[str, object]]:
    """Paraphrases from two phrasings of one question; negatives change one thing."""
    pairs: list[dict[str, object]] = []
    domain = family.domain
    for index in range(PARAPHRASES_PER_FAMILY):
        # A third of the paraphrases of a negatable question are both negated.
        phrasings = family.negated if family.negated and index % 3 == 2 else family.phrasings
        slots = pick(family, rng)
        first, second = rng.sample(phrasings, 2)
        pairs.append(
            line(first.format(**slots), second.format(**slots), True, "paraphrase", domain)
        )

    def negatives(kind: str, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        count = NEGATIONS_PER_FAMILY if kind == "negation" else NEGATIVES_PER_CHANGE
        for _ in range(count):
            slots = pick(family, rng)
            changed = change(slots)
            a = rng.choice(family.phrasings).format(**slots)
            b_phrasings = family.negated if kind == "negation" else family.phrasings
            b = rng.choice(b_phrasings).format(**changed)
            if rng.random() < 0.5:
                a, b = b, a
            pairs.append(line(a, b, False, kind, domain))

    for slot, kind in family.pool_kinds.items():
        values = family.pools[slot]

        def other_value(
            slots: dict[str, str], slot: str = slot, values: list[str] = values
        ) -> dict[str, str]:
            return slots | {slot: rng.choice([v for v in values if v != slots[slot]])}

        negatives(kind, other_value)
    if family.swap is not None:
        x, y = family.swap
        negatives("swapped_entities", lambda s: s | {x: s[y], y: s[x]})
    if family.negated:
        negatives("negation", lambda s: s)
    if family.subject_change is not None:

        def other_fill(slots: dict[str, str]) -> dict[str, str]:
            fills = [f for f in family.fills if any(slots[k] != v for k, v in f.items())]
            return slots | rng.choice(fills)

        negatives(family.subject_change, other_fill)
    return pairs


def build(seed: int = SEED) -> list[dict[str, object]]:
    rng = random.Random(seed)
    pairs = [p for family in FAMILIES for p in from_family(family, rng)]
    pairs += [line(a, b, True, "paraphrase", d) for d, a, b in HAND_PARAPHRASES]
    pairs += [line(broad, narrow, False, "narrowed_scope", d) for d, broad, narrow in SCOPES]
    pairs += [line(narrow, broad, False, "widened_scope", d) for d, broad, narrow in SCOPES]
    pairs += [line(a, b, False, "antonym", d) for d, a, b in ANTONYMS]
    unique: dict[tuple[object, object], dict[str, object]] = {}
    for pair in pairs:
        if pair["a"] != pair["b"]:
            unique.setdefault((pair["a"], pair["b"]), pair)
    return list(unique.values())


def main() -> None:
    pairs = build()
    OUT.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs to {OUT}")


if __name__ == "__main__":
    main()
