"""Writes the bundled demo data set: a small alpaca seed set with known defects, and an MC eval set.

Run ``python -m middo_ray.demo.generate`` (optionally ``--out DIR``). The output is deterministic: every
random choice comes from one seeded generator, and all material (facts, questions, answers) is written
in this file. Texts are short on purpose (instructions of at most 30 words, answers of at most 50) so
that two rounds of training and diagnosis fit in minutes on two CPU cores.

About 15% of the seed rows are deliberately bad, so a demo run shows the loop catching them:
wrong answers, mismatched answers, truncated answers, near-duplicates and needlessly convoluted
prompts. ``defects.json`` maps their sample ids to the defect kind.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from middo_ray.schema import sample_id

SEED = 20250901
MAX_INSTRUCTION_WORDS = 30
MAX_OUTPUT_WORDS = 50
DEFECT_KINDS = ("wrong_answer", "mismatched", "truncated", "near_duplicate", "convoluted")


@dataclass(frozen=True)
class Sample:
    """One demo SFT sample; ``defect`` is None for good samples."""

    instruction: str
    output: str
    input: str = ""
    category: str = ""
    defect: str | None = None

    @property
    def sid(self) -> str:
        """The id read_dataset will give this row (no system, no history)."""
        return sample_id(self.instruction, self.input, self.output)


# ---------------------------------------------------------------------------------------------
# Material: arithmetic word problems (templates; numbers drawn from the seeded generator)

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def _add(rng: random.Random) -> Sample:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(5, 60), rng.randint(3, 40)
    return Sample(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                  f"{a} + {b} = {a + b}. {name} has {a + b} {item} now.")


def _sub(rng: random.Random) -> Sample:
    name, item, a = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(20, 90)
    b = rng.randint(3, a - 5)
    return Sample(f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
                  f"{a} - {b} = {a - b}. {name} has {a - b} {item} left.")


def _mul(rng: random.Random) -> Sample:
    item, a, b = rng.choice(ITEMS), rng.randint(3, 12), rng.randint(2, 9)
    return Sample(f"A box holds {a} {item}. How many {item} are in {b} boxes?",
                  f"{a} × {b} = {a * b}. There are {a * b} {item} in {b} boxes.")


def _div(rng: random.Random) -> Sample:
    item, k, q = rng.choice(ITEMS), rng.randint(2, 8), rng.randint(2, 12)
    return Sample(f"{k * q} {item} are shared equally among {k} friends. How many {item} does each friend get?",
                  f"{k * q} ÷ {k} = {q}. Each friend gets {q} {item}.")


def _change(rng: random.Random) -> Sample:
    name, item, n, p = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 6), rng.randint(2, 9)
    cost = n * p
    bill = next(b for b in (10, 20, 50, 100) if b > cost)
    return Sample(f"{name} buys {n} {item} at {p} dollars each and pays with a {bill}-dollar note. "
                  f"How much change does {name} get?",
                  f"The {item} cost {n} × {p} = {cost} dollars. The change is {bill} - {cost} = {bill - cost} dollars.")


def _speed(rng: random.Random) -> Sample:
    v, h = rng.choice([40, 50, 60, 70, 80, 90, 120]), rng.randint(2, 5)
    return Sample(f"A train travels at {v} km per hour for {h} hours. How far does it travel?",
                  f"Distance = speed × time = {v} × {h} = {v * h} km. The train travels {v * h} km.")


def _order_of_operations(rng: random.Random) -> Sample:
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9)
    return Sample(f"What is {a} + {b} × {c}?",
                  f"Multiply first: {b} × {c} = {b * c}. Then add: {a} + {b * c} = {a + b * c}.")


ARITHMETIC_TEMPLATES = (_add, _sub, _mul, _div, _change, _speed, _order_of_operations)


def arithmetic(rng: random.Random, per_template: int = 6) -> list[Sample]:
    """Word problems with worked answers; repeats of a drawn question are redrawn."""
    out: list[Sample] = []
    seen: set[str] = set()
    for template in ARITHMETIC_TEMPLATES:
        made = 0
        while made < per_template:
            s = template(rng)
            if s.instruction in seen:
                continue
            seen.add(s.instruction)
            out.append(Sample(s.instruction, s.output, category="arithmetic"))
            made += 1
    return out


# ---------------------------------------------------------------------------------------------
# Material: unit conversions (plural from-unit, singular from-unit, to-unit, factor, value range)

UNITS = [
    ("kilometres", "kilometre", "metres", 1000, (2, 15)),
    ("metres", "metre", "centimetres", 100, (2, 12)),
    ("kilograms", "kilogram", "grams", 1000, (2, 9)),
    ("litres", "litre", "millilitres", 1000, (2, 8)),
    ("hours", "hour", "minutes", 60, (2, 10)),
    ("minutes", "minute", "seconds", 60, (2, 15)),
    ("days", "day", "hours", 24, (2, 9)),
    ("weeks", "week", "days", 7, (2, 12)),
    ("feet", "foot", "inches", 12, (2, 10)),
    ("yards", "yard", "feet", 3, (2, 20)),
    ("dollars", "dollar", "cents", 100, (2, 25)),
    ("years", "year", "months", 12, (2, 10)),
]


def conversions(rng: random.Random) -> list[Sample]:
    """Two conversions per unit pair, in two phrasings, with the factor stated in the answer."""
    out: list[Sample] = []
    for plural, singular, target, factor, (lo, hi) in UNITS:
        first, second = rng.sample(range(lo, hi + 1), 2)
        for value, phrasing in ((first, "convert"), (second, "how_many")):
            if phrasing == "convert":
                question = f"Convert {value} {plural} to {target}."
            else:
                question = f"How many {target} are in {value} {plural}?"
            answer = f"One {singular} is {factor} {target}, so {value} {plural} is {value} × {factor} = {value * factor} {target}."
            out.append(Sample(question, answer, category="units"))
    return out


# ---------------------------------------------------------------------------------------------
# Material: capitals and geography

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Brazil", "Brasília"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Mexico", "Mexico City"), ("India", "New Delhi"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("New Zealand", "Wellington"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Cuba", "Havana"), ("Colombia", "Bogotá"), ("Ghana", "Accra"),
]
TRAIN_CAPITALS = 24  # the rest appear only in the MC set and in defect rows

CAPITAL_PHRASINGS = [
    ("What is the capital of {c}?", "The capital of {c} is {k}."),
    ("Which city is the capital of {c}?", "{k} is the capital city of {c}."),
    ("Name the capital city of {c}.", "The capital city of {c} is {k}."),
]

GEOGRAPHY = [
    ("Which is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth. It covers about a third of the planet's surface."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is the highest mountain in the world?", "Mount Everest, on the border of Nepal and China, is the highest mountain. Its summit is about 8,849 metres above sea level."),
    ("Which is the largest hot desert in the world?", "The Sahara in northern Africa is the largest hot desert in the world."),
    ("Which country has the largest land area?", "Russia has the largest land area of any country, about 17 million square kilometres."),
    ("What is the smallest country in the world?", "Vatican City is the smallest country in the world. It lies inside the city of Rome."),
    ("On which continent is the Amazon rainforest?", "The Amazon rainforest is in South America, mostly in Brazil."),
    ("Which river flows through Cairo?", "The Nile flows through Cairo on its way north to the Mediterranean Sea."),
]


def capitals() -> list[Sample]:
    """Capital questions for the first TRAIN_CAPITALS countries, rotating the phrasing."""
    out = []
    for i, (country, capital) in enumerate(CAPITALS[:TRAIN_CAPITALS]):
        q, a = CAPITAL_PHRASINGS[i % len(CAPITAL_PHRASINGS)]
        out.append(Sample(q.format(c=country), a.format(c=country, k=capital), category="capitals"))
    return out


def geography() -> list[Sample]:
    return [Sample(q, a, category="geography") for q, a in GEOGRAPHY]


# ---------------------------------------------------------------------------------------------
# Material: definitions (term, article, gloss); the gloss also makes the MC questions

DEFINITIONS = [
    ("photosynthesis", "", "the process by which green plants use sunlight, water and carbon dioxide to make sugar and oxygen"),
    ("evaporation", "", "the change of a liquid into a gas, such as water turning into vapour when it is heated"),
    ("gravity", "", "the force that pulls objects with mass toward each other, such as things falling toward the ground"),
    ("atom", "an", "the smallest unit of a chemical element, made of a nucleus surrounded by electrons"),
    ("molecule", "a", "a group of two or more atoms held together by chemical bonds"),
    ("mammal", "a", "a warm-blooded animal with hair or fur that feeds its young with milk"),
    ("habitat", "a", "the natural home or surroundings where a plant or animal lives"),
    ("erosion", "", "the slow wearing away of rock or soil by wind, water or ice"),
    ("democracy", "", "a system of government in which citizens choose their leaders by voting"),
    ("metaphor", "a", "a figure of speech that describes something by calling it something else, like 'time is a thief'"),
    ("synonym", "a", "a word that means the same or nearly the same as another word"),
    ("noun", "a", "a word that names a person, place, thing or idea"),
    ("verb", "a", "a word that describes an action or a state, such as 'run' or 'be'"),
    ("prime number", "a", "a whole number greater than 1 whose only divisors are 1 and itself"),
    ("fraction", "a", "a number that represents part of a whole, written as one number over another"),
    ("perimeter", "the", "the total distance around the edge of a flat shape"),
    ("ecosystem", "an", "a community of living things together with the environment they share"),
    ("friction", "", "the force that resists motion when two surfaces rub against each other"),
    ("vaccine", "a", "a substance that trains the immune system to recognise and fight a disease"),
    ("volcano", "a", "an opening in Earth's crust through which molten rock, ash and gas escape"),
    ("orbit", "an", "the curved path an object takes around a star, planet or moon"),
    ("condensation", "", "the change of a gas into a liquid, such as water droplets forming on a cold glass"),
    ("adjective", "an", "a word that describes a noun, such as 'red' or 'tall'"),
    ("budget", "a", "a plan for how much money will be earned and spent over a period of time"),
    ("algorithm", "an", "a finite list of precise steps for solving a problem or doing a task"),
]

DEFINITION_PHRASINGS = ["Define {t}.", "What does the word '{t}' mean?", "Explain the term '{t}' in one sentence."]


def _definition_sentence(term: str, article: str, gloss: str) -> str:
    subject = f"{article} {term}" if article else term
    return f"{subject[0].upper()}{subject[1:]} is {gloss}."


def definitions() -> list[Sample]:
    out = []
    for i, (term, article, gloss) in enumerate(DEFINITIONS):
        q = DEFINITION_PHRASINGS[i % len(DEFINITION_PHRASINGS)].format(t=term)
        out.append(Sample(q, _definition_sentence(term, article, gloss), category="definitions"))
    return out


# ---------------------------------------------------------------------------------------------
# Material: rewriting and summarising (instruction, input, output)

REWRITES = [
    ("Rewrite the sentence in the passive voice.", "The dog chased the ball.", "The ball was chased by the dog."),
    ("Rewrite the sentence in the passive voice.", "The chef cooked a large meal.", "A large meal was cooked by the chef."),
    ("Correct the grammar of this sentence.", "She don't like cold weather.", "She doesn't like cold weather."),
    ("Correct the grammar of this sentence.", "Me and him goes to the park every day.", "He and I go to the park every day."),
    ("Make this sentence more formal.", "Hey, can you send me the report soon?", "Could you please send me the report at your earliest convenience?"),
    ("Make this sentence more formal.", "The meeting got moved to Friday, FYI.", "Please note that the meeting has been rescheduled to Friday."),
    ("Rewrite the sentence in the past tense.", "We walk to the market and buy fresh bread.", "We walked to the market and bought fresh bread."),
    ("Rewrite the sentence in the future tense.", "The children play in the garden.", "The children will play in the garden."),
    ("Rewrite the sentence so that it is shorter.", "Due to the fact that it was raining heavily, we decided to stay inside the house.", "Because it was raining heavily, we stayed inside."),
    ("Summarize the text in one sentence.",
     "Honey bees live in large colonies. Worker bees collect nectar from flowers and turn it into honey, which the colony eats during winter when flowers are scarce.",
     "Worker bees make honey from flower nectar so their colony has food in winter."),
    ("Summarize the text in one sentence.",
     "The library will close early on Thursday for staff training. Books due that day can be returned on Friday without a late fee.",
     "The library closes early on Thursday, and books due then can be returned on Friday without a fee."),
    ("Summarize the text in one sentence.",
     "Regular exercise strengthens the heart and muscles. It also improves sleep and mood, and even a short daily walk brings many of these benefits.",
     "Regular exercise, even a short daily walk, improves the body, sleep and mood."),
    ("Summarize the text in one sentence.",
     "The town built a new bridge over the river. It replaces an old wooden one and lets buses cross, cutting the trip to school by ten minutes.",
     "A new bridge that buses can cross shortens the trip to school by ten minutes."),
    ("Turn this sentence into a question.", "The museum opens at nine o'clock.", "What time does the museum open?"),
    ("Replace the underlined word with a synonym: 'The test was _difficult_.'", "", "The test was hard."),
    ("Rewrite the sentence using simpler words.", "The physician advised the patient to consume additional water.", "The doctor told the patient to drink more water."),
]


def rewrites() -> list[Sample]:
    return [Sample(i, o, input=x, category="rewriting") for i, x, o in REWRITES]


# ---------------------------------------------------------------------------------------------
# Material: sentiment classification (sentence, label)

SENTIMENT_INSTRUCTIONS = [
    "Classify the sentiment of this sentence as positive, negative or neutral.",
    "Is the sentiment of the following review positive, negative or neutral?",
]

SENTENCES = [
    ("The soup was warm and delicious, and the staff were very kind.", "Positive"),
    ("My new phone stopped working after two days.", "Negative"),
    ("The bus leaves the station at half past eight.", "Neutral"),
    ("I loved every minute of the concert last night.", "Positive"),
    ("The hotel room was dirty and the air conditioning was broken.", "Negative"),
    ("This book has three hundred pages.", "Neutral"),
    ("What a wonderful surprise, thank you so much!", "Positive"),
    ("The delivery was late again and nobody answered my calls.", "Negative"),
    ("The shop sells fruit, vegetables and bread.", "Neutral"),
    ("The new park is beautiful and my kids adore it.", "Positive"),
    ("The film was boring and far too long.", "Negative"),
    ("The meeting is scheduled for Tuesday afternoon.", "Neutral"),
    ("Great value for money, I would buy it again.", "Positive"),
    ("The instructions were confusing and the parts did not fit.", "Negative"),
    ("The jacket comes in blue and grey.", "Neutral"),
    ("Our guide was funny, patient and full of stories.", "Positive"),
    ("I waited an hour and the food arrived cold.", "Negative"),
    ("The train has eight carriages.", "Neutral"),
    ("This is the most comfortable chair I have ever owned.", "Positive"),
    ("The app keeps crashing whenever I open the camera.", "Negative"),
]


def sentiment() -> list[Sample]:
    return [Sample(SENTIMENT_INSTRUCTIONS[i % 2], label, input=text, category="sentiment")
            for i, (text, label) in enumerate(SENTENCES)]


# ---------------------------------------------------------------------------------------------
# Material: lists

LISTS = [
    ("List the three primary colours of paint.", "1. Red\n2. Yellow\n3. Blue"),
    ("Name four planets in our solar system.", "1. Mercury\n2. Venus\n3. Earth\n4. Mars"),
    ("List three mammals that live in the sea.", "1. Dolphin\n2. Whale\n3. Seal"),
    ("Give three tips for getting better sleep.", "1. Go to bed at the same time every night.\n2. Avoid screens before bed.\n3. Keep the bedroom dark and cool."),
    ("List the days of the working week.", "Monday, Tuesday, Wednesday, Thursday and Friday."),
    ("Name three states of matter.", "1. Solid\n2. Liquid\n3. Gas"),
    ("List four vegetables that grow underground.", "1. Carrot\n2. Potato\n3. Onion\n4. Beetroot"),
    ("Name three instruments in an orchestra.", "1. Violin\n2. Flute\n3. Trumpet"),
    ("List three ways to save water at home.", "1. Take shorter showers.\n2. Fix dripping taps.\n3. Turn off the tap while brushing your teeth."),
    ("Name the four seasons of the year.", "Spring, summer, autumn and winter."),
    ("List three things a plant needs to grow.", "1. Sunlight\n2. Water\n3. Nutrients from the soil"),
    ("Name three renewable sources of energy.", "1. Solar power\n2. Wind power\n3. Hydroelectric power"),
    ("List the first five prime numbers.", "2, 3, 5, 7 and 11."),
    ("Name three shapes that have straight sides.", "1. Triangle\n2. Square\n3. Hexagon"),
    ("List three items to pack for a day at the beach.", "1. Sunscreen\n2. A towel\n3. A bottle of water"),
]


def lists() -> list[Sample]:
    return [Sample(q, a, category="lists") for q, a in LISTS]


# ---------------------------------------------------------------------------------------------
# Material: one-line Python expressions

CODE = [
    ("Write a Python expression that reverses the string s.", "`s[::-1]` returns s reversed, using a slice with a step of -1."),
    ("Write a Python expression that gives the length of the list items.", "`len(items)` returns the number of elements in items."),
    ("Write a Python expression that returns the largest number in the list nums.", "`max(nums)` returns the largest value in nums."),
    ("Write a Python expression that sums the numbers in the list nums.", "`sum(nums)` adds up all the numbers in nums."),
    ("Write a Python expression that converts the string s to upper case.", "`s.upper()` returns a copy of s in upper case."),
    ("Write a Python expression that checks whether the integer n is even.", "`n % 2 == 0` is True when n is even and False when it is odd."),
    ("Write a Python expression that sorts the list nums in ascending order.", "`sorted(nums)` returns a new list with the numbers of nums in ascending order."),
    ("Write a Python expression that removes spaces from both ends of the string s.", "`s.strip()` returns s without leading or trailing whitespace."),
    ("Write a Python expression that splits the string s into words.", "`s.split()` returns a list of the words in s, split on whitespace."),
    ("Write a Python expression that joins the list words with spaces.", "`' '.join(words)` returns one string with the words separated by spaces."),
    ("Write a Python expression that squares every number in the list nums.", "`[x ** 2 for x in nums]` builds a new list of the squares."),
    ("Write a Python expression that keeps only the positive numbers in nums.", "`[x for x in nums if x > 0]` returns the numbers of nums greater than zero."),
    ("Write a Python expression that counts how often 'a' appears in the string s.", "`s.count('a')` returns how many times 'a' occurs in s."),
    ("Write a Python expression that returns the last element of the list items.", "`items[-1]` returns the last element; negative indices count from the end."),
    ("Write a Python expression that rounds the number x to two decimal places.", "`round(x, 2)` rounds x to two decimal places."),
    ("Write a Python expression that turns the string '42' into an integer.", "`int('42')` returns the integer 42."),
    ("Write a Python expression that removes duplicates from the list items.", "`list(set(items))` returns the distinct elements; use `list(dict.fromkeys(items))` to keep their order."),
    ("Write a Python expression that checks whether the key 'name' is in the dictionary d.", "`'name' in d` is True when d has the key 'name'."),
    ("Write a Python expression that gives the absolute value of x.", "`abs(x)` returns the absolute value of x."),
    ("Write a Python expression that creates a list of the numbers from 1 to 10.", "`list(range(1, 11))` gives [1, 2, ..., 10]; the stop value of range is excluded."),
]


def code() -> list[Sample]:
    return [Sample(q, a, category="code") for q, a in CODE]


# ---------------------------------------------------------------------------------------------
# Defects

WRONG_ANSWERS = [
    ("What is 8 × 7?", "", "8 × 7 = 54."),
    ("Maya has 15 pens and buys 9 more. How many pens does Maya have now?", "", "15 + 9 = 23. Maya has 23 pens now."),
    ("How many seconds are in 20 minutes?", "", "One minute is 60 seconds, so 20 minutes is 20 × 60 = 1,000 seconds."),
    ("A ticket costs 6 dollars. How much do 4 tickets cost?", "", "4 × 6 = 28. Four tickets cost 28 dollars."),
    ("What is the capital of Australia?", "", "The capital of Australia is Sydney."),
    ("How many legs does a spider have?", "", "A spider has six legs."),
    ("At what temperature does water boil at sea level, in degrees Celsius?", "", "At sea level, water boils at 90 degrees Celsius."),
    ("Which planet is closest to the Sun?", "", "Venus is the planet closest to the Sun."),
]

# Questions that get the answer of an unrelated good sample.
MISMATCHED_QUESTIONS = [
    "What is the capital of Switzerland?",
    "Define the word 'harvest'.",
    "List three animals that live in the desert.",
    "Convert 4 tonnes to kilograms.",
    "What is 14 + 27?",
    "Write a Python expression that returns the smallest number in the list nums.",
    "Name two gases found in the air we breathe.",
]

# (instruction, input, full answer); the answer is cut mid-sentence.
TRUNCATED = [
    ("Explain why the sky looks blue.", "",
     "Sunlight contains every colour. Tiny gas molecules in the air scatter short blue wavelengths much more "
     "strongly than red ones, so blue light reaches our eyes from every direction."),
    ("Describe how a rainbow forms.", "",
     "A rainbow forms when sunlight enters raindrops, bends, reflects off the back of each drop and bends again "
     "on the way out, which splits white light into its colours."),
    ("Why does Earth have seasons?", "",
     "Earth's axis is tilted by about 23 degrees. As Earth orbits the Sun, each hemisphere leans toward the Sun "
     "for part of the year and gets longer days and more direct sunlight."),
    ("What causes ocean tides?", "",
     "Tides are caused mainly by the Moon's gravity pulling on the oceans. The water bulges toward the Moon and "
     "on the opposite side of Earth, which gives most coasts two high tides a day."),
    ("Summarize the text in one sentence.",
     "Trees take in carbon dioxide as they grow and store the carbon in their wood. Planting forests can therefore "
     "slow the build-up of this gas in the air.",
     "Growing trees store carbon from the air in their wood, so planting forests helps slow the rise of carbon dioxide."),
    ("How does a refrigerator keep food cold?", "",
     "A refrigerator pumps a coolant through pipes. The coolant absorbs heat inside the fridge as it evaporates "
     "and releases that heat outside when it is compressed back into a liquid."),
    ("Write a Python expression that counts the vowels in the string s.", "",
     "`sum(1 for ch in s.lower() if ch in 'aeiou')` counts the characters of s that are vowels, ignoring case."),
]

# A simple ask buried in verbose, jargon-heavy wording; the answers are correct.
CONVOLUTED = [
    ("Leveraging a holistic quantitative paradigm, kindly operationalise the additive aggregation of the scalar "
     "magnitudes seventeen and twenty-five, surfacing the resultant cardinality as a deliverable.", "",
     "17 + 25 = 42."),
    ("Within the geopolitical ontology of sovereign European polities, please surface the administrative "
     "epicentre, colloquially the capital, pertaining to the entity designated Belgium.", "",
     "The capital of Belgium is Brussels."),
    ("Synergistically reframing metrological interoperability, transmute a temporal quantity of two hours into "
     "its granular sub-unit equivalent, namely minutes, per best-practice conversion heuristics.", "",
     "One hour is 60 minutes, so two hours is 2 × 60 = 120 minutes."),
    ("In alignment with lexicographic stakeholder expectations, articulate a concise semantic explication of the "
     "lexeme 'ocean', optimising for end-user cognitive throughput.", "",
     "An ocean is a very large body of salt water that covers much of Earth's surface."),
    ("Utilising an affective-computing lens, holistically adjudicate the emotional valence, whether positive, "
     "negative or neutral, embedded within the provided natural-language utterance artefact.",
     "I really enjoyed the quiet little café by the river.", "Positive"),
    ("Operationalising an idiomatic, best-in-class Pythonic paradigm, furnish a single-expression artefact "
     "yielding the cardinality, that is the element count, of the list-typed variable called values.", "",
     "`len(values)` returns the number of elements in values."),
    ("From a nutritional-taxonomy standpoint, and leveraging enumerative best practices, please itemise a triad "
     "of botanical produce units conventionally categorised as fruits.", "",
     "1. Apple\n2. Banana\n3. Orange"),
]

# One-word substitutions that turn a good instruction into a near-duplicate with the same answer.
NEAR_DUPLICATE_SWAPS = {
    "Define": "Describe", "List": "Name", "Convert": "Change", "Rewrite": "Restate", "Write": "Give",
    "word": "term", "Summarize": "Summarise", "buys": "purchases", "shared": "split", "holds": "contains",
    "travels": "moves",
}
N_NEAR_DUPLICATES = 7


def wrong_answers() -> list[Sample]:
    return [Sample(i, o, input=x, category="defect", defect="wrong_answer") for i, x, o in WRONG_ANSWERS]


def mismatched(rng: random.Random, good: list[Sample]) -> list[Sample]:
    """Each question gets the answer of a random good sample from a text-only category."""
    donors = [s for s in good if not s.input]
    return [Sample(q, rng.choice(donors).output, category="defect", defect="mismatched") for q in MISMATCHED_QUESTIONS]


def _truncate(text: str) -> str:
    """Cuts an answer about 60% of the way in, at a word that does not end a sentence."""
    words = text.split(" ")
    cut = max(2, int(len(words) * 0.6))
    while cut > 2 and words[cut - 1].endswith((".", "!", "?")):
        cut -= 1
    return " ".join(words[:cut]).rstrip(",;:")


def truncated() -> list[Sample]:
    return [Sample(i, _truncate(o), input=x, category="defect", defect="truncated") for i, x, o in TRUNCATED]


def convoluted() -> list[Sample]:
    return [Sample(i, o, input=x, category="defect", defect="convoluted") for i, x, o in CONVOLUTED]


def _swap_one_word(instruction: str) -> str | None:
    """The instruction with its first swappable word replaced, or None if it has none."""
    for word in instruction.split():
        bare = word.strip(".,?!'")
        if bare in NEAR_DUPLICATE_SWAPS:
            return re.sub(rf"\b{re.escape(bare)}\b", NEAR_DUPLICATE_SWAPS[bare], instruction, count=1)
    return None


def near_duplicates(rng: random.Random, good: list[Sample]) -> list[Sample]:
    """Copies of good samples (from distinct categories first) with one instruction word changed."""
    candidates = [s for s in good if _swap_one_word(s.instruction)]
    rng.shuffle(candidates)
    picked: list[Sample] = []
    used_categories: set[str] = set()
    # Spread the copies over categories so the defect is not tied to one topic.
    for s in candidates + candidates:
        if len(picked) == N_NEAR_DUPLICATES:
            break
        fresh_category = s.category not in used_categories
        if s in picked or (not fresh_category and len(used_categories) < 5):
            continue
        picked.append(s)
        used_categories.add(s.category)
    return [Sample(_swap_one_word(s.instruction), s.output, input=s.input, category="defect",
                   defect="near_duplicate") for s in picked]


# ---------------------------------------------------------------------------------------------
# Multiple-choice eval items {query, choices, gold}


def _mc_item(rng: random.Random, question: str, correct: str, wrong: list[str]) -> dict:
    choices = [correct] + wrong[:3]
    rng.shuffle(choices)
    return {"query": f"Question: {question}", "choices": choices, "gold": choices.index(correct)}


def _distinct_wrong(rng: random.Random, correct: int, candidates: list[int]) -> list[str]:
    """Three distinct positive distractors different from the correct number."""
    pool = sorted({c for c in candidates if c != correct and c > 0})
    rng.shuffle(pool)
    return [str(c) for c in pool[:3]]


def mc_arithmetic(rng: random.Random, n: int) -> list[dict]:
    items = []
    for i in range(n):
        a, b = rng.randint(6, 30), rng.randint(3, 12)
        op = ("+", "-", "×")[i % 3]
        value = {"+": a + b, "-": a - b, "×": a * b}[op]
        wrong = _distinct_wrong(rng, value, [value + 1, value - 1, value + 10, value - 2, value + b, value + 3])
        items.append(_mc_item(rng, f"What is {a} {op} {b}?", str(value), wrong))
    return items


def mc_capitals(rng: random.Random, n: int) -> list[dict]:
    countries = rng.sample(CAPITALS, n)
    items = []
    for country, capital in countries:
        others = [k for c, k in CAPITALS if c != country]
        items.append(_mc_item(rng, f"What is the capital of {country}?", capital, rng.sample(others, 3)))
    return items


def mc_units(rng: random.Random, n: int) -> list[dict]:
    items = []
    for i in range(n):
        plural, _, target, factor, (lo, hi) = UNITS[i % len(UNITS)]
        value = rng.randint(lo, hi)
        right = value * factor
        wrong = _distinct_wrong(rng, right, [value * factor // 10, right + factor, right - factor, value + factor,
                                             value * factor * 10])
        items.append(_mc_item(rng, f"How many {target} are in {value} {plural}?", str(right), wrong))
    return items


def mc_definitions(rng: random.Random, n: int) -> list[dict]:
    items = []
    for term, _, gloss in rng.sample(DEFINITIONS, n):
        others = [t for t, _, _ in DEFINITIONS if t != term]
        items.append(_mc_item(rng, f"Which word means {gloss}?", term, rng.sample(others, 3)))
    return items


def mc_items(rng: random.Random, per_topic: int = 15) -> list[dict]:
    """Multiple-choice items on the demo topics (a topic check, not a held-out benchmark)."""
    return (mc_arithmetic(rng, per_topic) + mc_capitals(rng, per_topic) + mc_units(rng, per_topic)
            + mc_definitions(rng, per_topic))


# ---------------------------------------------------------------------------------------------
# Assembly, checks and writing


def good_samples(rng: random.Random) -> list[Sample]:
    return (arithmetic(rng) + conversions(rng) + capitals() + geography() + definitions() + rewrites()
            + sentiment() + lists() + code())


def bad_samples(rng: random.Random, good: list[Sample]) -> list[Sample]:
    return (wrong_answers() + mismatched(rng, good) + truncated() + near_duplicates(rng, good) + convoluted())


def _words(text: str) -> int:
    return len(text.split())


def check_samples(samples: list[Sample]) -> None:
    """Fails loudly if the material breaks the demo's size limits or repeats a prompt."""
    prompts: set[tuple[str, str]] = set()
    for s in samples:
        if _words(s.instruction) > MAX_INSTRUCTION_WORDS:
            raise ValueError(f"instruction over {MAX_INSTRUCTION_WORDS} words: {s.instruction!r}")
        if _words(s.output) > MAX_OUTPUT_WORDS:
            raise ValueError(f"output over {MAX_OUTPUT_WORDS} words: {s.output!r}")
        if not s.instruction.strip() or not s.output.strip():
            raise ValueError(f"empty field in {s!r}")
        key = (s.instruction, s.input)
        if key in prompts:
            raise ValueError(f"prompt used twice: {key!r}")
        prompts.add(key)


def build(seed: int = SEED) -> tuple[list[Sample], list[dict]]:
    """All seed samples (shuffled) and the MC items, from one seeded generator."""
    rng = random.Random(seed)
    good = good_samples(rng)
    samples = good + bad_samples(rng, good)
    check_samples(samples)
    rng.shuffle(samples)
    return samples, mc_items(rng)


def _row(s: Sample) -> dict:
    return {"instruction": s.instruction, "input": s.input, "output": s.output}


def _write_jsonl(records: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _invalid_lines(samples: list[Sample]) -> list[str]:
    """Five good rows with three invalid ones among them, for tests of the rejects path."""
    good = [json.dumps(_row(s), ensure_ascii=False) for s in samples[:5]]
    empty_output = json.dumps({"instruction": "Name a primary colour.", "input": "", "output": ""})
    no_instruction = json.dumps({"input": "", "output": "Paris is the capital of France."})
    broken = '{"instruction": "What is 2 + 2?", "output": "4"'
    return [good[0], good[1], empty_output, good[2], no_instruction, good[3], broken, good[4]]


def write_all(out_dir: Path, seed: int = SEED) -> dict[str, int]:
    """Writes seed.jsonl, defects.json, mc.jsonl and seed_with_invalid.jsonl; returns counts."""
    samples, mc = build(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl([_row(s) for s in samples], out_dir / "seed.jsonl")
    defects = {s.sid: s.defect for s in samples if s.defect}
    (out_dir / "defects.json").write_text(json.dumps(dict(sorted(defects.items())), indent=2) + "\n",
                                          encoding="utf-8")
    _write_jsonl(mc, out_dir / "mc.jsonl")
    (out_dir / "seed_with_invalid.jsonl").write_text("\n".join(_invalid_lines(samples)) + "\n", encoding="utf-8")
    counts = {"rows": len(samples), "mc": len(mc)}
    for kind in DEFECT_KINDS:
        counts[kind] = sum(1 for k in defects.values() if k == kind)
    return counts


def verify(out_dir: Path) -> None:
    """Reads the seed back the way a run will: no rejects, and every defect id present."""
    from middo_ray.io import read_dataset

    result = read_dataset(out_dir / "seed.jsonl")
    if result.rejects:
        raise AssertionError(f"demo seed has rejects: {result.rejects[:3]}")
    ids = {r["sample_id"] for r in result.rows}
    defects = json.loads((out_dir / "defects.json").read_text(encoding="utf-8"))
    missing = [sid for sid in defects if sid not in ids]
    if missing:
        raise AssertionError(f"defect ids not in the seed as read back: {missing}")


def main(argv: list[str] | None = None) -> None:
    """Command line: write the demo data (default: the package's data directory) and verify it."""
    from middo_ray.demo import DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of every random choice")
    args = parser.parse_args(argv)
    counts = write_all(args.out, args.seed)
    verify(args.out)
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
