"""The shipped instruction set: short loan applications -> a JSON decision with fixed fields.

Each example is generated from a seed, so the shipped files can be re-made byte for byte
(`python -m lmstack.finetune.loans DIR`). An application states the applicant, the amount, the term,
the yearly income, the monthly payments on other debts and the debt-to-income ratio the lender's intake
computed from them, in one of several phrasings; the answer is one line of JSON:

    {"applicant": "Ana Silva", "amount": 12000, "term_months": 36, "income": 48000, "dti": 0.23,
     "decision": "approve", "rule": "dti <= 0.36"}

The decision follows three rules, checked in order (debt-to-income ratio = monthly debt payments /
monthly income, the usual underwriting ratio; 0.43 is the US qualified-mortgage ceiling):

    amount > 5 × income            -> decline, "amount > 5x income"
    dti > 0.43                     -> decline, "dti > 0.43"
    dti > 0.36                     -> review,  "0.36 < dti <= 0.43"
    otherwise                      -> approve, "dti <= 0.36"
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

FIELDS = ("applicant", "amount", "term_months", "income", "dti", "decision", "rule")
INSTRUCTION = "Read the loan application and answer with its JSON summary."
FIRST = "Ana Ben Carla David Elena Farid Grace Hugo Irene Jonas Kira Liam Maya Nora Omar Pia Quinn Rosa Sami Tara Umar Vera Wen Yara Zoe".split()  # fmt: skip
LAST = "Silva Okafor Novak Chen Garcia Haddad Ivanova Jensen Kim Lopez Moreau Nakamura Olsen Patel Rossi Schmidt Tanaka Weber".split()  # fmt: skip
PHRASINGS = (
    "{name} asks for ${amount:,} over {term} months. {pronoun} {earns} ${income:,} a year and {pays} ${debt:,} a month on other debts, a debt-to-income ratio of {dti}.",
    "Loan request from {name}: ${amount:,}, {term}-month term. Yearly income ${income:,}; existing debt payments ${debt:,} per month (DTI {dti}).",
    "{name} would like to borrow ${amount:,} for {term} months. Income: ${income:,} per year. Monthly debts: ${debt:,}. Debt-to-income: {dti}.",
    "Applicant {name}, income ${income:,}/year, already pays ${debt:,}/month in loans (DTI {dti}), wants ${amount:,} repaid over {term} months.",
)


def decide(amount: int, income: int, debt: int) -> dict[str, Any]:
    """The dti (2 decimals) and the decision with the rule it rests on (see the module doc)."""
    dti = round(debt / (income / 12), 2)
    if amount > 5 * income:
        decision, rule = "decline", "amount > 5x income"
    elif dti > 0.43:
        decision, rule = "decline", "dti > 0.43"
    elif dti > 0.36:
        decision, rule = "review", "0.36 < dti <= 0.43"
    else:
        decision, rule = "approve", "dti <= 0.36"
    return {"dti": dti, "decision": decision, "rule": rule}


def example(rng: random.Random) -> dict[str, Any]:
    """One {"prompt", "response"} record drawn from `rng`."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    income = rng.randrange(18, 160) * 1000
    amount = rng.randrange(1, 80) * 1000 if rng.random() > 0.1 else income * rng.randrange(6, 9)
    term = rng.choice((12, 24, 36, 48, 60, 72))
    debt = rng.randrange(0, int(income / 12 * 0.6) // 50 + 1) * 50
    pronoun = rng.choice(("She", "He", "They"))
    verbs = {"earns": "earn", "pays": "pay"} if pronoun == "They" else {"earns": "earns", "pays": "pays"}
    rules = decide(amount, income, debt)
    stated = dict(name=name, amount=amount, term=term, income=income, debt=debt, dti=rules["dti"])
    text = rng.choice(PHRASINGS).format(**stated, pronoun=pronoun, **verbs)
    answer = {
        "applicant": name,
        "amount": amount,
        "term_months": term,
        "income": income,
        **rules,
    }
    return {"prompt": f"{INSTRUCTION}\n{text}", "response": json.dumps(answer, separators=(", ", ": "))}


OUTCOMES = (  # (decision, rule) pairs the rules can give
    ("approve", "dti <= 0.36"),
    ("review", "0.36 < dti <= 0.43"),
    ("decline", "dti > 0.43"),
    ("decline", "amount > 5x income"),
)


def preference_pair(record: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A DPO record from an SFT one: chosen = the right answer, rejected = the same answer with another
    of the rules' outcomes (a plausible but wrong decision and rule), drawn from `rng`."""
    answer = json.loads(record["response"])
    wrong = rng.choice([o for o in OUTCOMES if o != (answer["decision"], answer["rule"])])
    rejected = {**answer, "decision": wrong[0], "rule": wrong[1]}
    return {
        "prompt": record["prompt"],
        "chosen": record["response"],
        "rejected": json.dumps(rejected, separators=(", ", ": ")),
    }


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [example(rng) for _ in range(n)]


SPLITS = {"train": (400, 0), "heldout": (100, 1)}  # split -> (examples, seed)


def score(text: str, expected: str) -> tuple[bool, float]:
    """(whether `text` parses as a JSON object, the fraction of `FIELDS` equal to the expected answer's)."""
    want = json.loads(expected)
    try:
        got = json.loads(text.strip())
    except json.JSONDecodeError:
        return False, 0.0
    if not isinstance(got, dict):
        return False, 0.0
    return True, sum(got.get(k) == want[k] for k in FIELDS) / len(FIELDS)


def write(folder: Path) -> list[Path]:
    """Write every split as `loans_<split>.jsonl` into `folder`."""
    paths = []
    for split, (n, seed) in SPLITS.items():
        path = folder / f"loans_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in generate(n, seed)), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "datasets")):
        print(p)
