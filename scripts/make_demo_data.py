"""Generate lorapipe's demo dataset: raw synthetic text-compression pairs with known defects.

    uv run python scripts/make_demo_data.py            # (re)write data/raw/, then verify it
    uv run python scripts/make_demo_data.py --check    # verify data/raw/ against its manifest

Writes data/raw/nl_pairs.jsonl, code_pairs.jsonl, manifest.json and README.md. The rows mirror
what a synthetic-data LLM returns for a compression task (a verbose request, note or Python
function -> a terse canonical form that keeps every fact), including the defects the data stages
exist to clean, each at a count recorded in manifest.json. Pure standard library; one
random.Random(42) drives everything, so the bytes are identical on every run and machine.
The check re-reads the bytes and classifies every line with its own rules (the ones README.md
documents), so the manifest cannot drift from the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import os
import random
import re
import shutil
import string
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SEED = 42
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "data" / "raw"
NL_FILE = "nl_pairs.jsonl"
CODE_FILE = "code_pairs.jsonl"
MANIFEST = "manifest.json"
README = "README.md"

# Thresholds the defects are built around (the runbook's preprocess settings).
MAX_RATIO = {"nl": 0.95, "code": 1.0}
# Clean rows stay far below the thresholds, so char- and token-based ratios agree on them.
# SmolLM2's tokenizer splits digits one by one, so a char ratio of 0.8 can still be 1.0 in
# tokens: clean rows are also bounded in approximate tokens (a word, a digit or a punctuation
# mark each count one). Measured against SmolLM2, 0.65 here kept the real token ratio < 0.9.
CLEAN_MAX_RATIO = 0.8
CLEAN_MAX_TOKEN_RATIO = 0.65
CLEAN_MIN_INPUT_TOKENS = 36
# Raw ratio (tags included) of <think>/<tool_call> rows: they pass even if a stage measures the
# ratio before stripping.
TAGGED_MAX_RAW_RATIO = 0.9
# Clean inputs are < 1,500 chars and overlong ones > 15,000: any limit in between (a few
# hundred to ~3,000 tokens) flags exactly the overlong rows.
OVERLONG_CHARS = 8000
CLEAN_MAX_INPUT_CHARS = 1500
OVERLONG_MIN_CHARS = 15000

# ---------------------------------------------------------------------------------------------
# Detection rules. The check uses exactly these; README.md documents them for the data stages.
# ---------------------------------------------------------------------------------------------
THINK_RE = re.compile(r"<think>.*?</think>", re.S)
TOOL_RE = re.compile(r"<tool_call>.*?</tool_call>", re.S)
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "phone": re.compile(
        r"\+\d{1,3}(?: \d{2,6}){2,3}\b|\(\d{3}\) \d{3}-\d{4}\b|\b\d{3}-\d{3}-\d{4}\b"
    ),
    "api_key": re.compile(r"\bsk-[A-Za-z0-9]{20,}|\bghp_[A-Za-z0-9]{36}\b|\bAKIA[0-9A-Z]{16}\b"),
    "ipv4": re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
}
API_KEY_PREFIXES = ("sk-", "ghp_", "AKIA")
# Stricter nets than a sanitizer needs: clean rows must not trip even these.
LOOSE_PII = re.compile(
    r"@|\+?\(?\d[\d ().-]{5,}\d|\d+\.\d+\.\d+|[A-Za-z0-9]{20,}|sk-|ghp_|AKIA", re.I
)
NEGATION_RE = re.compile(
    r"\b(?:not|no|never|neither|nor|without|none|nothing|nobody|nowhere)\b|n't", re.I
)
OUTPUT_GRAMMAR = re.compile(r"[a-z]+(?: \| [a-z]+: (?:(?! \| ).)+)+")
PUNCT_RE = re.compile(r"[^\w\s]")


def strip_tags(text: str) -> str:
    """What preprocessing must do to an output: drop whole blocks, then outer whitespace."""
    return TOOL_RE.sub("", THINK_RE.sub("", text)).strip()


def normalize(text: str) -> str:
    """Near-duplicate key: case, whitespace and punctuation ignored."""
    return " ".join(PUNCT_RE.sub(" ", text.lower()).split())


def normalize_deleting(text: str) -> str:
    """The other common normalization (punctuation deleted): checked to give the same groups."""
    return " ".join(PUNCT_RE.sub("", text.lower()).split())


def char_ratio(inp: str, out: str) -> float:
    return len(out) / len(inp)


TOKEN_RE = re.compile(r"\d|[^\W\d_]+|[^\w\s]|_")


def approx_tokens(text: str) -> int:
    return len(TOKEN_RE.findall(text))


def compressive(inp: str, out: str, max_chars: float = CLEAN_MAX_RATIO) -> bool:
    """Far enough below both thresholds, in characters and in approximate tokens."""
    n_in = approx_tokens(inp)
    return (
        char_ratio(inp, out) <= max_chars
        and approx_tokens(out) <= CLEAN_MAX_TOKEN_RATIO * n_in
        and n_in >= CLEAN_MIN_INPUT_TOKENS
    )


# ---------------------------------------------------------------------------------------------
# Value pools. Large, so held-out rows carry unseen combinations the model must copy.
# Names are Latin-1 encodable on purpose (one malformed line is the Latin-1 encoding of a row).
# ---------------------------------------------------------------------------------------------
# fmt: off
FIRST = [
    "Alice", "Bruno", "Dana", "Elif", "Farah", "Gabriel", "Hana", "Ivan", "Jonas", "Kavya",
    "Liam", "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar",
    "Vera", "Wei", "Ximena", "Yusuf", "Zoe", "Amara", "Bilal", "Carmen", "Diego", "Emma",
    "Felix", "Grace", "Hugo", "Ingrid", "Jamal", "Keiko", "Lucas", "Mei", "Nora", "Oscar",
    "Priya", "Rafael", "Sofia", "Tomás", "Uma", "Viktor", "Wanda", "Yara", "Zainab", "Aiko",
    "Ben", "Clara", "Dmitri", "Esther", "Finn", "Greta", "Hamid", "Isla", "Jorge", "Kofi",
    "Lena", "Marco", "Nadia", "Omar", "Paula", "Rohan", "Sara", "Theo", "Ursula", "Valentina",
    "Will", "Xavier", "Yuki", "Zeynep", "Adele", "Björn", "Chiara", "Dev", "Fatima", "Goran",
    "Helga", "Ines", "Jin", "Kwame", "Leila", "Mateo", "Noor", "Otto", "Pia", "Ravi", "Selin",
    "Tariq", "Uri", "Vikram", "Wen", "Yosef", "Zara", "Anders", "Beatriz", "Cyrus", "Daria",
    "Emil", "Freya", "Gideon", "Hiro", "Ilse", "José", "Mila", "Arjun", "Sven", "Lotte",
]
LAST = [
    "Chen", "Garcia", "Okafor", "Novak", "Silva", "Kim", "Patel", "Müller", "Rossi", "Nguyen",
    "Schmidt", "Kowalski", "Haddad", "Tanaka", "Johansson", "Moreau", "Singh", "Costa",
    "Ivanova", "Brown", "Ortiz", "Lindqvist", "Mensah", "Yilmaz", "Dubois", "Park", "Fischer",
    "Sato", "Ahmed", "Rahman", "Lopez", "Bauer", "Nakamura", "Hughes", "Kaur", "Petrov",
    "Santos", "Weber", "Takahashi", "O'Brien", "Jensen", "Romero", "Ali", "Kovacs", "Murphy",
    "Andersen", "Byrne", "Castillo", "Das", "Eriksen", "Farouk", "Gomez", "Hansen", "Iyer",
    "Jovanovic", "Klein", "Larsen", "Mwangi", "Nair", "Olsen", "Pereira", "Quintero", "Reyes",
    "Sharma", "Torres", "Varga", "Walsh", "Xu", "Yamamoto", "Zhou", "Abara", "Bianchi", "Cruz",
    "Dimitrov", "Esposito", "Fontaine", "Grant", "Horvat", "Ibrahim", "Jung", "Kruger",
    "Laine", "Mori", "Nilsen", "Owusu", "Pham", "Ruiz", "Sousa", "Tran", "Vogel", "Wong",
    "Young", "Zimmermann", "Achebe", "Brandt",
]
CITIES = [
    "Lisbon", "Oslo", "Denver", "Nairobi", "Osaka", "Porto", "Austin", "Montreal", "Bogotá",
    "Cairo", "Dublin", "Helsinki", "Krakow", "Lagos", "Lima", "Lyon", "Manila", "Melbourne",
    "Munich", "Nantes", "Perth", "Prague", "Quito", "Riga", "Seoul", "Seville", "Tallinn",
    "Tunis", "Turin", "Utrecht", "Valencia", "Vienna", "Vilnius", "Warsaw", "Zagreb", "Zurich",
    "Accra", "Athens", "Bangalore", "Barcelona", "Berlin", "Boston", "Brussels", "Budapest",
    "Calgary", "Chicago", "Copenhagen", "Edinburgh", "Geneva", "Glasgow", "Hamburg", "Hanoi",
    "Istanbul", "Jakarta", "Kyoto", "Leeds", "Madrid", "Milan", "Mumbai", "Ottawa", "Phoenix",
    "Reykjavik", "Rotterdam", "Santiago", "Seattle", "Singapore", "Stockholm", "Sydney",
    "Toronto", "Vancouver", "Wellington", "Malmö",
]
AIRLINES = [
    "LH", "BA", "AF", "KL", "UA", "DL", "AA", "IB", "SK", "TP", "LX", "OS", "AY", "EK", "QR",
    "AC", "NH", "JL",
]
NAMED_ROOMS = [
    "Atlas", "Birch", "Cedar", "Delta", "Everest", "Fjord", "Granite", "Harbor", "Juniper",
    "Kestrel", "Lotus", "Maple", "Nova", "Orchid", "Pine", "Quartz", "Redwood", "Summit",
    "Tundra", "Willow",
]
TOPICS = [
    "Q3 budget", "hiring plan", "vendor contract", "onboarding checklist", "roadmap for Q4",
    "marketing launch", "customer churn numbers", "office move", "security audit",
    "pricing update", "support backlog", "data retention policy", "team offsite",
    "mobile release", "API deprecation", "holiday schedule", "quarterly review",
    "sales forecast", "cloud costs", "partner program", "design review", "interview loop",
    "incident postmortem", "training budget", "brand refresh", "warehouse layout",
    "supplier pricing", "board deck", "analytics dashboard", "accessibility fixes",
    "billing migration", "travel policy", "intern projects", "product demo", "renewal terms",
    "beta feedback", "sprint planning", "release notes", "compliance checklist",
    "localization work", "hiring pipeline", "Q1 goals", "annual plan", "performance reviews",
    "customer survey results", "new logo", "website redesign", "search ranking",
    "shipping delays", "insurance renewal", "expense policy", "on-call rota", "desk booking",
]
ERRANDS = [
    "call the dentist", "submit the timesheet", "renew the parking permit",
    "water the office plants", "book the team lunch", "send the invoice to accounting",
    "back up the laptop", "pick up the dry cleaning", "pay the electricity bill",
    "order printer toner", "update the project wiki", "review the pull request",
    "prepare the slides", "email the landlord", "file the expense report",
    "check the server logs", "confirm the hotel booking", "sign the contract",
    "return the library books", "schedule the car service", "refill the coffee beans",
    "collect the parcel", "print the boarding pass", "reset the wifi router",
    "archive old tickets", "call the insurance company", "renew the domain",
    "buy a birthday card", "clean the whiteboard", "update the on-call rota",
    "send the weekly report", "check the mailbox", "feed the office fish",
    "renew the gym membership", "book a haircut", "charge the headset",
    "take out the recycling", "call my sister", "update the budget sheet",
    "cancel the old subscription", "stretch and take a break", "review the open invoices",
]
WORK_TASKS = [
    "update the onboarding docs", "migrate the build to the new runner",
    "draft the newsletter", "audit the access list", "fix the login timeout bug",
    "write the API changelog", "clean up stale feature flags", "translate the help center",
    "benchmark the search service", "refresh the sales dashboard", "rotate the on-call schedule",
    "prepare the board update", "review the vendor shortlist", "set up the staging database",
    "archive the old wiki pages", "write unit tests for the parser", "triage the bug backlog",
    "update the privacy notice", "plan the team offsite", "reply to the customer survey",
    "rename the marketing assets", "document the release process", "tidy up the shared drive",
    "check the accessibility report", "order new laptops", "interview the design candidates",
    "upgrade the logging library", "summarize the user interviews", "fix the broken links",
    "draft the hiring plan", "reconcile the invoices", "review the security checklist",
]
ITEMS = [
    "ergonomic chairs", "standing desks", "USB-C docks", "laptop stands", "monitors",
    "noise-cancelling headsets", "whiteboards", "webcams", "keyboards", "printer cartridges",
    "desk lamps", "coffee machines", "label printers", "ethernet cables", "power strips",
    "filing cabinets", "first-aid kits", "projectors", "conference phones", "bike racks",
    "notebooks", "water bottles", "desk plants", "storage boxes", "HDMI adapters",
    "office chairs", "wireless mice", "laptop bags", "phone chargers", "shelving units",
]
VENDORS = [
    "Northwind", "Contoso", "Globex", "Initech", "Umbrella Supplies", "Acme Office",
    "Bluebird Trading", "Stark Equipment", "Pioneer Goods", "Summit Supply", "Evergreen Traders",
    "Orbit Electronics", "Harbor Office Co", "Lumen Tech", "Crescent Furniture", "Redline Parts",
    "Silverline", "Vertex Supply", "Oakwood Office", "Brightside Retail",
]
SERVICES = [
    "checkout API", "login service", "search index", "payment gateway", "email relay",
    "push notification service", "billing worker", "image CDN", "reporting database",
    "auth proxy", "inventory sync", "notification queue", "admin dashboard", "export job",
    "recommendation engine", "order pipeline", "SSO integration", "file upload service",
    "status page", "chat widget", "pricing service", "invoice generator", "mobile backend",
    "metrics pipeline", "scheduler", "webhook dispatcher",
]
LEAVE_REASONS = [
    "a family wedding", "a conference", "a beach holiday", "moving house",
    "a medical appointment", "jury duty", "a training course", "parental leave", "volunteering",
    "a sabbatical", "a hiking trip", "exam preparation", "visiting family", "a ski trip",
    "a house renovation",
]
EXPENSE_CATEGORIES = [
    "taxi", "hotel", "client dinner", "train ticket", "conference fee", "office supplies",
    "parking", "airfare", "team lunch", "software license", "courier", "visa fee", "phone bill",
    "coworking pass", "books", "car rental", "catering", "internet bill",
]
CARRIERS = [
    "DHL", "UPS", "FedEx", "DPD", "GLS", "PostNL", "Royal Mail", "USPS", "Canada Post",
    "Aramex", "Purolator", "La Poste",
]
RESTAURANTS = [
    "Blue Olive", "Casa Verde", "The Copper Pot", "Sakura House", "Trattoria Roma",
    "Le Petit Bistro", "Golden Lotus", "Spice Route", "Harbor Grill", "Nordic Table", "El Faro",
    "Green Fig", "Saffron Lounge", "Maple & Rye", "Olive Tree", "Red Lantern", "Basil Garden",
    "Fika Café", "Taqueria Sol", "The Hungry Owl", "Bistro Nord", "Jade Garden",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
EMAIL_DOMAINS = [
    "acme.io", "northwind.com", "globex.net", "example.org", "initech.co", "contoso.com",
    "bluebird.io", "lumen.dev",
]
HOSTS = [
    "web-03", "db-primary", "cache-2", "build-runner-7", "vpn-gw", "staging-api", "metrics-1",
    "mail-relay", "backup-nas", "ci-agent-4", "edge-proxy", "search-node-2",
]
KEY_SERVICES = {"sk-": "OpenAI API", "ghp_": "GitHub", "AKIA": "AWS"}
ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits

GREETINGS = [
    "Hi,", "Hello,", "Hey,", "Hi there,", "Hello team,", "Good morning,", "Good afternoon,",
    "Hey there,", "Dear assistant,", "Hiya,", "Morning!",
]
CLOSINGS = [
    "Thanks!", "Thanks a lot.", "Cheers.", "Many thanks.", "Thank you so much.", "Appreciate it.",
    "Best regards.", "Thanks in advance.", "Talk soon.", "Much appreciated!",
]
FILLER = [
    "I hope your week is going well.", "Sorry for the long message.",
    "I know things are busy right now, so I appreciate the help.",
    "Let me know if anything is unclear.", "It would really help me stay organized.",
    "I meant to send this earlier today.", "This came up during our last chat.",
    "Feel free to ping me with questions.", "I'm trying to get my calendar in order.",
    "Everything else can stay as it is.", "Thanks for being so quick with these requests.",
    "Just want to make sure it's on the radar.", "It's a small thing, but it matters.",
    "I'll follow up later if anything changes.", "Hopefully this is straightforward.",
    "As always, your help is appreciated.", "I'm writing this between two calls.",
    "Please double-check the details when you get a moment.",
    "It would be great to get this sorted soon.", "Apologies if this is a repeat request.",
    "I'd rather get it written down now.", "The team asked me to pass this along.",
    "Bear with me, it's been a hectic morning.", "Happy to clarify anything.",
    "This is the last item on my list today.", "I think that covers everything.",
    "Let's keep things simple.", "I appreciate you handling this.", "Hope that all makes sense.",
    "My inbox is a mess this week, so bear with me.",
]
# fmt: on


def pick(rng: random.Random, seq: Sequence[T]) -> T:
    return seq[rng.randrange(len(seq))]


def person(rng: random.Random) -> str:
    return f"{pick(rng, FIRST)} {pick(rng, LAST)}"


def random_date(rng: random.Random) -> dt.date:
    return dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(365))


def date_canon(d: dt.date) -> str:
    return f"{MONTHS[d.month - 1][:3]} {d.day}"


def date_surface(rng: random.Random, d: dt.date) -> str:
    """Full or short month, sometimes an ordinal; the canonical form is always 'Mar 14'."""
    month = MONTHS[d.month - 1] if rng.random() < 0.5 else MONTHS[d.month - 1][:3]
    suffix = ""
    if rng.random() < 0.2:
        suffix = (
            "th" if 10 <= d.day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d.day % 10, "th")
        )
    return f"{month} {d.day}{suffix}"


def clock(rng: random.Random, first_hour: int, last_hour: int) -> str:
    return f"{rng.randint(first_hour, last_hour):02d}:{pick(rng, ['00', '15', '30', '45'])}"


def when_value(rng: random.Random, first_hour: int, last_hour: int) -> tuple[str, str]:
    """A day and a time: canonical 'Tue 15:00'; the surface says the day in one of three ways."""
    day = pick(rng, DAYS)
    time = clock(rng, first_hour, last_hour)
    form = rng.randrange(3)
    if form == 2:
        day_text = f"this {day}"
        phrase = pick(rng, [f"{day_text} at {time}", f"at {time} {day_text}"])
    else:
        day_text = day if form == 0 else day[:3]
        phrase = pick(rng, [f"on {day_text} at {time}", f"at {time} on {day_text}"])
    return f"{day[:3]} {time}", phrase


def money(rng: random.Random, low: int, high: int, step: int) -> str:
    return f"${rng.randrange(low, high, step):,}"


# ---------------------------------------------------------------------------------------------
# Natural-language records: `type | key: value | ...`, keys in a fixed order per type.
# ---------------------------------------------------------------------------------------------
# A sampler returns the canonical value and the text that states it in the input.
Sampler = Callable[[random.Random], tuple[str, str]]


def same(draw: Callable[[random.Random], str]) -> Sampler:
    """A value the input states exactly as the output has it."""

    def sample(rng: random.Random) -> tuple[str, str]:
        value = draw(rng)
        return value, value

    return sample


def verbatim(values: Sequence[str]) -> Sampler:
    return same(lambda rng: pick(rng, values))


def phrasings(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Parse `head: phrasing | phrasing | ...` lines (a line starting with `|` continues one).

    A phrasing is a sentence template ("Please invite {with}.") or a way to say a value; the
    head names what it states. Order matters: the rng picks phrasings by position.
    """
    entries = []
    for line in re.sub(r"\n\s*\|", " |", text.strip()).splitlines():
        head, body = line.split(":", 1)
        entries.append((head.strip(), tuple(p.strip() for p in body.split("|") if p.strip())))
    return entries


def phrased(text: str) -> Sampler:
    """A value normalized in the output: `canonical: phrasing | ...`, one line per value."""
    surfaces = dict(phrasings(text))
    canonical = list(surfaces)

    def sample(rng: random.Random) -> tuple[str, str]:
        value = pick(rng, canonical)
        return value, pick(rng, surfaces[value])

    return sample


sample_person = same(person)


def sample_date(rng: random.Random) -> tuple[str, str]:
    d = random_date(rng)
    return date_canon(d), date_surface(rng, d)


def meeting_when(rng: random.Random) -> tuple[str, str]:
    return when_value(rng, 8, 18)


def dinner_when(rng: random.Random) -> tuple[str, str]:
    return when_value(rng, 11, 21)


def room(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return f"room {rng.randint(1, 14)}{pick(rng, 'ABCDEF')}"
    return f"{pick(rng, NAMED_ROOMS)} room"


def flight(rng: random.Random) -> str:
    return f"{pick(rng, AIRLINES)}{rng.randint(10, 9999)}"


def sample_severity(rng: random.Random) -> tuple[str, str]:
    level = rng.randint(1, 4)
    return f"P{level}", pick(
        rng, [f"P{level}", f"sev {level}", f"severity {level}", f"SEV-{level}"]
    )


sample_repeat = phrased(
    """
    daily: every day | each day | on a daily basis
    weekly: every week | each week | on a weekly basis
    monthly: every month | once a month | on a monthly basis
    """
)
sample_priority = phrased(
    """
    high: It's urgent. | This is high priority. | Treat it as top priority.
        | It's a high-priority item.
    normal: Normal priority is fine. | It's a regular-priority item. | Standard priority applies.
        | It's routine work.
    low: It's low priority. | This is a low-priority item. | It can wait, it's low priority.
        | Treat it as low priority.
    """
)


@dataclass(frozen=True)
class RecordType:
    """One record type: its keys in output order, and the sentences that can state them.

    Every input states every key of its type. (Optional facts were tried: deciding whether a
    fact is present was what SmolLM2-135M learned slowest; most held-out misses were a dropped
    or invented optional field.)
    """

    name: str
    keys: tuple[str, ...]
    samplers: dict[str, Sampler]
    intents: tuple[str, ...]
    # (keys stated, templates): every key has a single-key entry, so any subset can be covered.
    clauses: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]


def record_type(name: str, keys: str, samplers: dict[str, Sampler], text: str) -> RecordType:
    """A type from its phrasings: `intents: ...`, then one `keys stated: template | ...` line
    per clause (see phrasings)."""
    (head, intents), *clauses = phrasings(text)
    assert head == "intents", name
    return RecordType(
        name,
        tuple(keys.split()),
        samplers,
        intents,
        tuple((tuple(keys_stated.split()), templates) for keys_stated, templates in clauses),
    )


# Each type: its name, its keys in output order, how each key's value is drawn, and its
# phrasings (an `intents:` line, then one `keys stated: template | ...` line per clause).
# fmt: off
NL_TYPES: tuple[RecordType, ...] = (
    record_type("meeting", "with when where topic", {
        "with": sample_person, "when": meeting_when, "where": same(room), "topic": verbatim(TOPICS),
    }, """
        intents: Could you set up a meeting for me? | I need a meeting on the calendar, please.
            | Please schedule a meeting. | Can you arrange a meeting for me?
            | I'd like to arrange a meeting. | Would you mind organizing a meeting?
            | Quick favor: please put a meeting in the diary.
            | We should meet soon, so please set something up.
            | Please add a meeting to my calendar. | I'm hoping to get a meeting booked.
        with: It should be with {with}. | Please invite {with}. | The other attendee is {with}.
            | I'll be meeting {with}. | {with} needs to be there.
        when: It should happen {when}. | Let's aim to meet {when}. | Please make it {when}.
            | Could we do it {when}? | Everyone is free {when}.
        where: We can use {where}. | Please reserve {where} for it. | It can be held in {where}.
            | The location should be {where}.
        topic: We'll go over the {topic}. | The topic is the {topic}. | It's about the {topic}.
            | We need to discuss the {topic}.
        with when: Please set it up with {with} {when}.
            | {with} is free {when}, so let's grab that slot.
        with where: {with} and I can meet in {where}.
        when where: Grab {where} {when}, if it's free. | Let's meet in {where} {when}.
        with topic: I want to talk to {with} about the {topic}.
            | {with} wants to go through the {topic} with me.
        with when where: Can you get {with} and me into {where} {when}?
            | Please have {with} join me in {where} {when}.
        with when where topic:
            | Please set up a meeting with {with} {when} in {where} to discuss the {topic}.
            | I need {where} {when} so {with} and I can go through the {topic}.
        when topic: We should cover the {topic} {when}.
    """),
    record_type("reminder", "task when repeat", {
        "task": verbatim(ERRANDS), "when": meeting_when, "repeat": sample_repeat,
    }, """
        intents: Please set a reminder for me. | Can you remind me about something?
            | I keep forgetting this, so please add a reminder. | Set up a reminder, please.
            | Could you make sure I get a reminder?
            | Note to self, please turn this into a reminder. | I need a nudge for this one.
        task: I need to {task}. | The thing to remember is to {task}.
            | It's about needing to {task}.
        when: Ping me {when}. | The reminder should go off {when}. | Please alert me {when}.
        repeat: This should repeat {repeat}. | Make it recur {repeat}. | I have to do it {repeat}.
        task when: Remind me to {task} {when}. | I have to {task}, so please ping me {when}.
        task repeat: I need to {task} {repeat}.
        task when repeat: Remind me {repeat} to {task}, starting {when}.
    """),
    record_type("travel", "who from to date flight", {
        "who": sample_person, "from": verbatim(CITIES), "date": sample_date, "flight": same(flight),
        # to: sample_facts (any city but the departure one)
    }, """
        intents: Please log this trip. | Can you arrange travel for a colleague?
            | I need a trip added to the travel tracker.
            | Here are the details for an upcoming trip.
            | Could you sort out the travel arrangements? | Please note the following trip.
        who: The traveler is {who}. | This is for {who}. | {who} will be the one flying.
        from: Departure is from {from}.
        to: The destination is {to}.
        from to: The route is {from} to {to}. | It's a trip from {from} to {to}.
            | Departure is from {from}, arriving in {to}.
        date: The travel date is {date}. | It's scheduled for {date}. | The departure day is {date}.
        flight: The flight number is {flight}. | Please use flight {flight}.
            | They're booked on {flight}.
        who from to: {who} is flying from {from} to {to}.
        who date: {who} leaves on {date}.
        from to date: The flight from {from} to {to} departs on {date}.
        who from to date: {who} needs to get from {from} to {to} on {date}.
        date flight: Flight {flight} leaves on {date}.
    """),
    record_type("order", "item qty vendor budget", {
        "item": verbatim(ITEMS), "qty": same(lambda rng: str(rng.randint(2, 60))),
        "vendor": verbatim(VENDORS), "budget": same(lambda rng: money(rng, 200, 20000, 50)),
    }, """
        intents: Could you place an order for the office? | Please put in a purchase request.
            | We need to order some supplies. | Can you raise a purchase order?
            | I'd like to request a purchase. | Please order the following for the team.
        item qty: We need {qty} {item}. | Please get {qty} {item}.
            | The request is for {qty} {item}.
        item: The items are {item}. | What we need is {item}.
        qty: The quantity is {qty}. | We need {qty} of them.
        vendor: Please order from {vendor}. | Our usual supplier is {vendor}.
            | {vendor} is the vendor to use.
        budget: The budget is {budget}. | Please keep it under {budget}.
            | We have {budget} set aside.
        item qty vendor: Can you buy {qty} {item} from {vendor}?
            | Please order {qty} {item} through {vendor}.
        vendor budget: {vendor} should be able to do it within {budget}.
    """),
    record_type("incident", "service severity ticket owner", {
        "service": verbatim(SERVICES), "severity": sample_severity,
        "ticket": same(lambda rng: f"INC-{rng.randint(1000, 9999)}"), "owner": sample_person,
    }, """
        intents: Please log an incident. | Heads up, we have an incident to track.
            | Writing this up from the ops call. | Can you record this outage?
            | Notes from the incident channel follow. | We need an incident entry for this.
        service: The affected system is the {service}. | The {service} is down.
            | Problems are coming from the {service}.
        severity: It's been classed as {severity}. | Severity is {severity}.
            | We're treating it as {severity}.
        ticket: The ticket is {ticket}. | It's tracked as {ticket}. | Please reference {ticket}.
        owner: {owner} is the owner. | {owner} is handling it. | Assign it to {owner}.
        service severity: The {service} issue is {severity}.
        ticket owner: {owner} owns {ticket}. | {ticket} is assigned to {owner}.
        service ticket: The {service} outage is tracked in {ticket}.
        service severity owner: {owner} is working on the {severity} problem with the {service}.
    """),
    record_type("expense", "who amount category date", {
        "who": sample_person,
        "amount": same(lambda rng: f"${rng.randint(5, 950)}.{rng.randrange(100):02d}"),
        "category": verbatim(EXPENSE_CATEGORIES), "date": sample_date,
    }, """
        intents: Please file an expense. | I need to submit an expense claim.
            | Could you log this expense? | Adding an expense for reimbursement.
            | Can you process a reimbursement?
        who: The claim is for {who}. | {who} paid for it. | It should be reimbursed to {who}.
        amount: The total was {amount}. | It came to {amount}. | The amount is {amount}.
        category: The category is {category}. | It was for {category}. | File it under {category}.
        date: It was paid on {date}. | The receipt is dated {date}. | This was on {date}.
        who amount: {who} spent {amount}.
        amount category: It was {amount} for {category}.
        who amount category date: {who} paid {amount} for {category} on {date}.
        category date: The {category} was on {date}.
    """),
    record_type("delivery", "order carrier eta to", {
        "order": same(lambda rng: f"ORD-{rng.randint(10000, 99999)}"),
        "carrier": verbatim(CARRIERS), "eta": sample_date, "to": verbatim(CITIES),
    }, """
        intents: Can you track a delivery for me? | Please note this shipment.
            | Logging a delivery update. | Here's an update on a package.
            | Could you keep an eye on this order?
        order: The order number is {order}. | It's order {order}. | Reference: {order}.
        carrier: It's shipping with {carrier}. | The carrier is {carrier}.
            | {carrier} is handling it.
        eta: It should arrive on {eta}. | The expected delivery date is {eta}.
            | Estimated arrival is {eta}.
        to: It's going to {to}. | The destination is {to}. | It ships to our {to} office.
        order carrier: {carrier} is delivering {order}. | Order {order} went out with {carrier}.
        order eta: {order} should land on {eta}.
        order carrier eta: {carrier} says {order} will arrive on {eta}.
        carrier to: {carrier} is taking it to {to}.
    """),
    # One person per record: with a second one (who covers), who/cover swaps were the
    # commonest held-out miss.
    record_type("leave", "who from to reason", {
        "who": sample_person, "reason": verbatim(LEAVE_REASONS),  # from/to: sample_facts
    }, """
        intents: Please record some time off. | I'd like to take some annual leave.
            | Can you log a vacation request? | Putting in a leave request.
            | Please add this absence to the team calendar.
        who: The request is for {who}. | {who} will be away. | This is the leave for {who}.
        from to: The leave runs from {from} to {to}. | They're out from {from} until {to}.
            | It covers {from} through {to}.
        from: It starts on {from}.
        to: The last day off is {to}.
        reason: The reason is {reason}. | It's for {reason}. | They'll be away for {reason}.
        who from to: {who} is off from {from} to {to}.
        who reason: {who} needs time off for {reason}.
    """),
    record_type("task", "owner task due priority", {
        "owner": sample_person, "task": verbatim(WORK_TASKS), "due": sample_date,
        "priority": sample_priority,
    }, """
        intents: Please create a task. | Can you add this to the tracker?
            | New action item from today's sync. | Logging an action item.
            | Please assign the following work. | Here's a to-do for the board.
        owner: {owner} will own it. | It's assigned to {owner}. | The owner is {owner}.
        task: The work is to {task}. | Someone needs to {task}. | The job is to {task}.
        due: It's due on {due}. | The deadline is {due}. | Please finish it by {due}.
        priority: {priority}
        owner task: {owner} needs to {task}. | Can {owner} please {task}?
        owner task due: {owner} has to {task} by {due}. | By {due}, {owner} should {task}.
    """),
    record_type("booking", "place party when name", {
        "place": verbatim(RESTAURANTS), "party": same(lambda rng: str(rng.randint(2, 14))),
        "when": dinner_when, "name": sample_person,
    }, """
        intents: Could you book a table? | Please make a restaurant reservation.
            | I'd love a dinner booking. | Can you reserve a table for us?
            | Please sort out a table for a team meal.
        place: The restaurant is {place}. | Let's go to {place}. | Please try {place}.
        party: There will be {party} of us. | It's a party of {party}. | We need seats for {party}.
        when: We'd like to eat {when}. | Please reserve it {when}.
        name: Put it under {name}. | The booking name is {name}. | Use the name {name}.
        place party: A table for {party} at {place}, please. | Book {place} for {party} people.
        party when: We're {party} people {when}.
        place when name: Reserve {place} {when} under {name}.
        place party when name: Please book {place} for {party} {when} under the name {name}.
    """),
)

# Record types that only occur in the PII rows (their facts are the personal data).
PII_TYPES: dict[str, RecordType] = {t.name: t for t in (
    record_type("contact", "name company email phone", {}, """
        intents: Please add a new contact. | Can you save these contact details?
            | Adding someone to the address book. | Please update the CRM with a new contact.
        name: The contact is {name}. | Their name is {name}.
        company: They work at {company}. | {company} is their employer.
        email: Their email is {email}. | You can reach them at {email}.
        phone: Their phone number is {phone}. | Call them on {phone}.
        name company: {name} works at {company}.
        name email: {name} can be emailed at {email}.
    """),
    record_type("access", "owner service key", {}, """
        intents: Please store this credential. | Here's a new key for the vault.
            | Can you record this access token? | Saving an API credential for the team.
        owner: It belongs to {owner}. | {owner} requested it.
        service: It's for {service}. | The service is {service}.
        key: The key is {key}. | Token: {key}.
        service key: The {service} key is {key}.
    """),
    record_type("server", "host ip owner", {}, """
        intents: Please update the server inventory. | Recording a new server address.
            | A machine moved, please note it. | Can you log this host?
        host: The host is {host}.
        ip: Its address is {ip}. | It now lives at {ip}.
        owner: {owner} maintains it.
        host ip: {host} is reachable at {ip}.
    """),
)}
# fmt: on


def render_output(type_name: str, facts: dict[str, str], keys: Sequence[str]) -> str:
    return " | ".join([type_name, *(f"{k}: {facts[k]}" for k in keys if k in facts)])


def cover(rng: random.Random, rtype: RecordType, present: Sequence[str]) -> list[str]:
    """Pick templates that state each present fact exactly once, in a random order."""
    remaining = set(present)
    sentences: list[tuple[tuple[str, ...], str]] = []
    while remaining:
        fits = [(keys, tpls) for keys, tpls in rtype.clauses if set(keys) <= remaining]
        if rng.random() < 0.5:  # half the time prefer the widest sentence available
            widest = max(len(keys) for keys, _ in fits)
            fits = [f for f in fits if len(f[0]) == widest]
        keys, templates = fits[rng.randrange(len(fits))]
        sentences.append((keys, pick(rng, templates)))
        remaining -= set(keys)
    rng.shuffle(sentences)
    return [tpl for _, tpl in sentences]


def compose_nl(
    rng: random.Random, rtype: RecordType, surfaces: dict[str, str], n_filler: int
) -> str:
    """A verbose message: greeting, intent, the facts in shuffled clauses, filler, closing."""
    body = [tpl.format(**surfaces) for tpl in cover(rng, rtype, list(surfaces))]
    intent = pick(rng, rtype.intents)
    if rng.random() < 0.8:
        body.insert(0, intent)
    else:
        body.append(intent)
    for filler in rng.sample(FILLER, n_filler):
        body.insert(rng.randint(1, len(body)), filler)
    greeting = pick(rng, GREETINGS) if rng.random() < 0.55 else ""
    closing = pick(rng, CLOSINGS) if rng.random() < 0.5 else ""
    if rng.random() < 0.3 and (greeting or closing):  # e-mail layout
        return "\n\n".join(part for part in (greeting, " ".join(body), closing) if part)
    if greeting.endswith(","):  # "Hi, Could you..." reads wrong on one line
        greeting = greeting[:-1] + pick(rng, ["!", "."])
    return " ".join(part for part in (greeting, *body, closing) if part)


def sample_facts(rng: random.Random, rtype: RecordType) -> tuple[dict[str, str], dict[str, str]]:
    facts: dict[str, str] = {}
    surfaces: dict[str, str] = {}
    for key in rtype.keys:
        if rtype.name == "leave" and key in ("from", "to"):
            if key == "from":
                start = random_date(rng)
                end = start + dt.timedelta(days=rng.randint(1, 16))
                for k, d in (("from", start), ("to", end)):
                    facts[k], surfaces[k] = date_canon(d), date_surface(rng, d)
            continue
        if rtype.name == "travel" and key == "to":
            dest = pick(rng, [c for c in CITIES if c != facts["from"]])
            facts[key] = surfaces[key] = dest
            continue
        facts[key], surfaces[key] = rtype.samplers[key](rng)
    return facts, surfaces


@dataclass
class Pair:
    """One generated pair before it is written; `task` goes to meta."""

    input: str
    output: str
    task: str


def nl_pair(rng: random.Random, min_filler: int = 0) -> Pair:
    rtype = NL_TYPES[rng.randrange(len(NL_TYPES))]
    facts, surfaces = sample_facts(rng, rtype)
    output = render_output(rtype.name, facts, rtype.keys)
    n_filler = rng.choice([0, 1, 1, 2, 2, 3]) + min_filler
    text = compose_nl(rng, rtype, surfaces, n_filler)
    while not compressive(text, output):  # terse enough already: add pleasantries
        n_filler += 1
        text = compose_nl(rng, rtype, surfaces, n_filler)
    return Pair(text, output, rtype.name)


# ---------------------------------------------------------------------------------------------
# Code records: a verbose Python function -> `fn | name: ... | args: ... | raises: ... |
# returns: ...` (raises only when the function has a guard clause).
# ---------------------------------------------------------------------------------------------
# fmt: off
LIST_NAMES = [
    "values", "numbers", "prices", "scores", "amounts", "readings", "weights", "samples", "costs",
    "durations", "ratings", "totals", "measurements", "balances", "distances", "temperatures",
]
TEXT_NAMES = ["text", "message", "sentence", "raw_text", "line", "title", "comment", "label"]
WORDS_NAMES = ["words", "parts", "tokens", "names", "tags", "labels", "fields", "segments"]
MAP_NAMES = ["mapping", "lookup", "table", "settings", "config", "registry", "index", "aliases"]
GENERIC_LOOP_VARS = ["item", "value", "entry", "element", "x", "num", "current"]
ACCUMULATORS = ["total", "running_total", "accumulated", "result", "subtotal", "grand_total"]
EXCEPTIONS = ["ValueError", "ValueError", "ValueError", "RuntimeError"]
# fmt: on


@dataclass
class Param:
    name: str
    hint: str
    default: str | None = None
    doc: str = ""

    def source(self, hints: bool) -> str:
        text = f"{self.name}: {self.hint}" if hints else self.name
        if self.default is not None:
            text += f" = {self.default}" if hints else f"={self.default}"
        return text

    def canonical(self) -> str:
        return self.name if self.default is None else f"{self.name}={self.default}"


@dataclass
class CodeSpec:
    """A function's facts plus the verbose pieces its source is built from."""

    name: str
    params: list[Param]
    return_hint: str
    returns: str  # canonical expression
    summary: str
    returns_doc: str
    bodies: list[list[str]]  # alternative verbose bodies (comment lines start with '#')
    guard: list[str] = field(default_factory=list)
    raises: str | None = None


def list_hint(name: str) -> str:
    return "list[float]" if name in LIST_NAMES else "list[str]"


def singular(name: str) -> str:
    return name[:-1] if name.endswith("s") else f"{name}_item"


def loop_var(rng: random.Random, plural: str, avoid: Sequence[str]) -> str:
    options = [singular(plural), *GENERIC_LOOP_VARS]
    return pick(rng, [v for v in options if v not in avoid])


# A slot is one name or value drawn per function, in table order (the rng draws in exactly that
# order): one of its options (a str of whitespace-separated words, or a list; a tuple option
# fills several slots, e.g. "lo_d hi_d"), or what a function of the rng and the slots drawn so
# far returns. A drawn option is itself a template over the earlier slots ("not {p}").
SlotDraw = Callable[[random.Random, dict[str, str]], str | tuple[str, ...]]
Slot = str | Sequence[str] | Sequence[tuple[str, ...]] | SlotDraw


def draw_slots(rng: random.Random, table: dict[str, Slot], slots: dict[str, str]) -> dict[str, str]:
    for names, slot in table.items():
        value: str | tuple[str, ...]
        if callable(slot):
            value = slot(rng, slots)
        else:
            chosen = pick(rng, slot.split() if isinstance(slot, str) else slot)
            value = chosen.format(**slots) if isinstance(chosen, str) else tuple(chosen)
        slots.update(zip(names.split(), [value] if isinstance(value, str) else value, strict=True))
    return slots


def list_name(names: str | Sequence[str]) -> SlotDraw:
    """A list parameter's name, its singular and its type hint: slots `p s hint`."""
    choices = names.split() if isinstance(names, str) else names

    def draw(rng: random.Random, slots: dict[str, str]) -> tuple[str, ...]:
        p = pick(rng, choices)
        return p, singular(p), list_hint(p)

    return draw


def loop_var_over(*avoid: str) -> SlotDraw:
    """The variable of a loop over the list `p`."""
    return lambda rng, slots: loop_var(rng, slots["p"], [slots["p"], *avoid])


def coin(heads: tuple[str, ...], tails: tuple[str, ...]) -> SlotDraw:
    return lambda rng, slots: heads if rng.random() < 0.5 else tails


@dataclass(frozen=True)
class Guard:
    """A guard clause that half the functions of an op get: its slots, lines and `raises`."""

    slots: dict[str, Slot]
    lines: str
    raises: str


@dataclass(frozen=True)
class CodeOp:
    """One family of functions: slots, drawn in order, and a spec of templates over them.

    The spec is the docstring summary, one `name: hint [= default] -- doc` line per parameter,
    `-> hint -- doc` for the result and `canonical: expression` (the output's `returns`), then
    each alternative verbose body after a `---` line (comment lines start with '#'). Templates
    are str.format strings (literal braces doubled); the slot `name` is the function's name.
    """

    task: str
    slots: dict[str, Slot]
    spec: str
    guard: Guard | None = None


def code_spec(rng: random.Random, op: CodeOp, given: dict[str, str] | None = None) -> CodeSpec:
    """Draw op's slots (after the given ones) and fill in its spec; half get the guard."""
    slots = draw_slots(rng, op.slots, dict(given or {}))

    def fill(template: str) -> str:
        return template.format(**slots)

    head, *bodies = textwrap.dedent(op.spec).strip().split("\n---\n")
    summary, *args, result, canonical = head.split("\n")
    params = []
    for arg in args:
        name_hint, doc = arg.split(" -- ")
        name, hint = name_hint.split(": ", 1)
        hint, _, default = hint.partition(" = ")
        params.append(Param(fill(name), fill(hint), fill(default) if default else None, fill(doc)))
    return_hint, returns_doc = result.removeprefix("-> ").split(" -- ")
    spec = CodeSpec(
        slots["name"],
        params,
        fill(return_hint),
        fill(canonical.removeprefix("canonical: ")),
        fill(summary),
        fill(returns_doc),
        [fill(body).split("\n") for body in bodies],
    )
    if op.guard and rng.random() < 0.5:
        draw_slots(rng, op.guard.slots, slots)
        spec.guard = fill(textwrap.dedent(op.guard.lines).strip()).split("\n")
        spec.raises = fill(op.guard.raises)
    return spec


EMPTY_GUARD = Guard(
    {
        "exc": EXCEPTIONS,
        "cond": ["len({p}) == 0", "not {p}"],
        "msg": [
            "{p} must not be empty",
            "expected at least one value",
            "cannot work with an empty {p} list",
        ],
    },
    """
    # guard against an empty {p} list
    if {cond}:
        raise {exc}("{msg}")
    """,
    "{exc} if not {p}",
)
ZERO_GUARD = Guard(
    {"exc": EXCEPTIONS},
    """
    # a zero {whole} would divide by zero
    if {whole} == 0:
        raise {exc}("{whole} must be non-zero")
    """,
    "{exc} if {whole} == 0",
)


# The function families, in the order the rng indexes them.
# fmt: off
CODE_OPS: tuple[CodeOp, ...] = (
    CodeOp("total", {
        "p s hint": list_name(LIST_NAMES), "v": loop_var_over(), "acc": ACCUMULATORS,
        "name": "total_{p} sum_{p} compute_total_{p} calculate_{s}_total get_total_{p} add_up_{p}",
    }, """
        Add up every entry in {p} and return the sum
        {p}: list[float] -- the numbers to add up
        -> float -- the sum of all entries
        canonical: sum({p})
        ---
        # start the {acc} at zero
        {acc} = 0
        for {v} in {p}:
            # add the current {v} to the {acc}
            {acc} = {acc} + {v}
        return {acc}
        ---
        # use the built-in sum to add everything up
        {acc} = sum({p})
        return {acc}
    """),
    CodeOp("discounted", {
        "p s hint": list_name("prices costs amounts charges fees"), "v": loop_var_over(),
        "r": "rate discount discount_rate reduction", "d": "0.05 0.1 0.15 0.2 0.25 0.3",
        "acc": ACCUMULATORS,
        "name": "discounted_{p}_total apply_discount total_after_discount net_{s}_total"
                " compute_discounted_total",
    }, """
        Return the total of {p} after taking the discount off
        {p}: list[float] -- the individual amounts
        {r}: float = {d} -- the fraction to take off
        -> float -- the discounted total
        canonical: sum({p}) * (1 - {r})
        ---
        {acc} = 0
        for {v} in {p}:
            {acc} += {v}
        # take the {r} off the whole {acc}
        return {acc} * (1 - {r})
        ---
        # first add everything up
        {acc} = sum({p})
        # then apply the {r}
        {acc} = {acc} * (1 - {r})
        return {acc}
    """),
    CodeOp("average", {
        "p s hint": list_name(LIST_NAMES), "v": loop_var_over(), "acc": ACCUMULATORS,
        "cnt": "count how_many n_items counter",
        "name": "average_{s} mean_{s} compute_average_{p} get_mean_{p} calculate_{s}_average",
    }, """
        Compute the arithmetic mean of {p}
        {p}: list[float] -- the numbers to average
        -> float -- the average value
        canonical: sum({p}) / len({p})
        ---
        {acc} = 0
        {cnt} = 0
        for {v} in {p}:
            {acc} += {v}
            {cnt} += 1
        # divide the {acc} by the number of entries
        return {acc} / {cnt}
        ---
        {acc} = sum({p})
        {cnt} = len({p})
        # the mean is the sum over the count
        return {acc} / {cnt}
    """, guard=EMPTY_GUARD),
    CodeOp("extreme", {
        "p s hint": list_name(LIST_NAMES), "v": loop_var_over(),
        "best": "best current_best winner extreme champion",
        "fn cmp word": coin(("max", ">", "largest"), ("min", "<", "smallest")),
        "name": "{word}_{s} find_{word}_{s} get_{fn}_{s} {fn}_of_{p}",
    }, """
        Find the {word} value in {p}
        {p}: list[float] -- the numbers to search
        -> float -- the {word} entry
        canonical: {fn}({p})
        ---
        {best} = {p}[0]
        # walk the rest and keep the {word} so far
        for {v} in {p}[1:]:
            if {v} {cmp} {best}:
                {best} = {v}
        return {best}
        ---
        # let the built-in do the work
        {best} = {fn}({p})
        return {best}
    """, guard=EMPTY_GUARD),
    CodeOp("filter_above", {
        "p": LIST_NAMES, "v": loop_var_over(), "lim": "limit threshold minimum cutoff",
        "d": "0 1 5 10 50 100 500", "out": "kept selected above filtered matches",
        "name": "{p}_above_{lim} filter_{p} keep_large_{p} select_{p}_over_{lim}",
    }, """
        Return only the entries of {p} that are above {lim}
        {p}: list[float] -- the numbers to filter
        {lim}: float = {d} -- values must be strictly greater than this
        -> list[float] -- a new list with the kept values
        canonical: [{v} for {v} in {p} if {v} > {lim}]
        ---
        {out} = []
        for {v} in {p}:
            # keep it only if it is above the {lim}
            if {v} > {lim}:
                {out}.append({v})
        return {out}
        ---
        # a list comprehension keeps the entries above the {lim}
        {out} = [{v} for {v} in {p} if {v} > {lim}]
        return {out}
    """),
    CodeOp("scale", {
        "p": LIST_NAMES, "v": loop_var_over(), "k": "factor scale multiplier ratio",
        "d": "2 3 10 100 0.5 1.5", "out": "scaled result converted adjusted",
        "name": "scale_{p} multiply_{p} rescale_{p} apply_{k}_to_{p}",
    }, """
        Multiply each entry of {p} by the {k}
        {p}: list[float] -- the numbers to scale
        {k}: float = {d} -- what to multiply each entry by
        -> list[float] -- a new list of scaled values
        canonical: [{v} * {k} for {v} in {p}]
        ---
        {out} = []
        for {v} in {p}:
            # scale this entry
            {out}.append({v} * {k})
        return {out}
        ---
        {out} = [{v} * {k} for {v} in {p}]
        # the input list is left untouched
        return {out}
    """),
    CodeOp("count", {
        "p s hint": list_name([*LIST_NAMES, *WORDS_NAMES]), "v": loop_var_over("target"),
        "t": "target wanted needle expected", "cnt": "count matches hits occurrences",
        "name": "count_{t} count_matching_{p} occurrences_in_{p} how_many_{t}",
    }, """
        Count how many entries of {p} equal {t}
        {p}: {hint} -- the entries to scan
        {t}: str -- the value to look for
        -> int -- the number of matches
        canonical: {p}.count({t})
        ---
        {cnt} = 0
        for {v} in {p}:
            if {v} == {t}:
                # found one more
                {cnt} += 1
        return {cnt}
        ---
        # lists already know how to count
        {cnt} = {p}.count({t})
        return {cnt}
    """),
    CodeOp("join", {
        "p": WORDS_NAMES, "v": loop_var_over(), "sep": "sep separator delimiter glue",
        "d": ['" "', '", "', '"-"', '"/"', '"; "'], "out": "joined combined result text_out",
        "name": "join_{p} combine_{p} {p}_to_string glue_{p}",
    }, """
        Join the {p} into one string with the {sep} between them
        {p}: list[str] -- the pieces to join
        {sep}: str = {d} -- what goes between pieces
        -> str -- the joined string
        canonical: {sep}.join({p})
        ---
        {out} = ""
        for position, {v} in enumerate({p}):
            # only add the {sep} between pieces, not before the first
            if position > 0:
                {out} += {sep}
            {out} += {v}
        return {out}
        ---
        {out} = {sep}.join({p})
        return {out}
    """),
    CodeOp("normalize", {
        "p": TEXT_NAMES, "a": "stripped trimmed cleaned", "b": "lowered normalized lowercase_text",
        "name": "normalize_{p} clean_{p} canonical_{p} tidy_{p}",
    }, """
        Trim the whitespace around {p} and lowercase it
        {p}: str -- the raw input
        -> str -- the normalized text
        canonical: {p}.strip().lower()
        ---
        # remove leading and trailing whitespace
        {a} = {p}.strip()
        # compare case-insensitively later on
        {b} = {a}.lower()
        return {b}
        ---
        {b} = {p}.strip().lower()
        return {b}
    """),
    CodeOp("lookup", {
        "m": MAP_NAMES, "k": "key name field code", "d": "default fallback",
        "dv dv_hint": [
            ("None", "str | None"), ('""', "str"), ("0", "str | int"), ('"unknown"', "str"),
        ],
        "name": "lookup_{k} get_from_{m} find_{k} read_{m}_entry",
    }, """
        Look up {k} in {m}, falling back to the {d}
        {m}: dict[str, str] -- where to look
        {k}: str -- what to look up
        {d}: {dv_hint} = {dv} -- returned when the key is missing
        -> {dv_hint} -- the stored value or the {d}
        canonical: {m}.get({k}, {d})
        ---
        if {k} in {m}:
            # the key exists, return what is stored
            return {m}[{k}]
        # the key is missing
        return {d}
        ---
        try:
            return {m}[{k}]
        except KeyError:
            # fall back when the key is missing
            return {d}
    """),
    CodeOp("clamp", {
        "x": "value level volume speed score", "lo": "low lower minimum",
        "hi": "high upper maximum",
        "lo_d hi_d": [("0", "1"), ("0", "10"), ("0", "100"), ("-1", "1"), ("1", "5")],
        "name": "clamp_{x} limit_{x} bound_{x} keep_{x}_in_range",
    }, """
        Clamp {x} into the range from {lo} to {hi}
        {x}: float -- the number to clamp
        {lo}: float = {lo_d} -- lower bound
        {hi}: float = {hi_d} -- upper bound
        -> float -- {x}, limited to the range
        canonical: max({lo}, min({hi}, {x}))
        ---
        if {x} < {lo}:
            # too small, use the lower bound
            return {lo}
        elif {x} > {hi}:
            # too big, use the upper bound
            return {hi}
        return {x}
        ---
        # cap it at the upper bound first
        capped = min({hi}, {x})
        # then lift it to the lower bound
        return max({lo}, capped)
    """),
    CodeOp("fahrenheit", {
        "c": "celsius degrees_c temp_c temperature",
        "name": "celsius_to_fahrenheit to_fahrenheit convert_{c} c_to_f",
    }, """
        Convert a Celsius temperature to Fahrenheit
        {c}: float -- a temperature in degrees Celsius
        -> float -- the temperature in Fahrenheit
        canonical: {c} * 9 / 5 + 32
        ---
        # scale by nine fifths
        scaled = {c} * 9 / 5
        # then shift by thirty-two
        fahrenheit = scaled + 32
        return fahrenheit
        ---
        fahrenheit = {c} * 9 / 5 + 32
        return fahrenheit
    """),
    CodeOp("is_even", {
        "n": "n number count index value", "name": "is_even {n}_is_even check_even even_{n}",
    }, """
        Tell whether {n} is an even number
        {n}: int -- the integer to test
        -> bool -- True for even numbers, False otherwise
        canonical: {n} % 2 == 0
        ---
        remainder = {n} % 2
        # even numbers leave no remainder
        if remainder == 0:
            return True
        else:
            return False
        ---
        # an even number divides by two exactly
        result = {n} % 2 == 0
        return result
    """),
    CodeOp("reverse", {
        "p": TEXT_NAMES, "ch": "char character letter symbol",
        "out": "reversed_text backwards flipped result",
        "name": "reverse_{p} flip_{p} {p}_backwards reversed_{p}",
    }, """
        Return {p} with its characters in reverse order
        {p}: str -- the string to reverse
        -> str -- the reversed string
        canonical: {p}[::-1]
        ---
        {out} = ""
        for {ch} in {p}:
            # put each character in front
            {out} = {ch} + {out}
        return {out}
        ---
        # reversed() gives the characters back to front
        {out} = "".join(reversed({p}))
        return {out}
    """),
    CodeOp("head", {
        "p s hint": list_name([*LIST_NAMES, *WORDS_NAMES]), "v": loop_var_over(),
        "n": "n count limit size", "d": "3 5 10 20", "out": "first_items head selection result",
        "name": "first_{p} head_of_{p} take_{p} top_{p}",
    }, """
        Return the first {n} entries of {p}
        {p}: {hint} -- the full list
        {n}: int = {d} -- how many to keep
        -> {hint} -- the leading entries
        canonical: {p}[:{n}]
        ---
        {out} = []
        for {v} in {p}:
            # stop once we have enough
            if len({out}) == {n}:
                break
            {out}.append({v})
        return {out}
        ---
        # slicing copes with lists shorter than {n}
        {out} = {p}[:{n}]
        return {out}
    """),
    CodeOp("unique_sorted", {
        "p s hint": list_name([*LIST_NAMES, *WORDS_NAMES]), "v": loop_var_over(),
        "seen": "seen unique distinct",
        "name": "unique_{p} distinct_{p} dedupe_{p} sorted_unique_{p}",
    }, """
        Return the distinct entries of {p} in sorted order
        {p}: {hint} -- entries that may repeat
        -> {hint} -- a sorted list without repeats
        canonical: sorted(set({p}))
        ---
        {seen} = []
        for {v} in {p}:
            # skip entries we already have
            if {v} not in {seen}:
                {seen}.append({v})
        {seen}.sort()
        return {seen}
        ---
        # a set drops the repeats, sorted() orders them
        {seen} = set({p})
        return sorted({seen})
    """),
    CodeOp("word_count", {
        "p": TEXT_NAMES, "w": "words pieces tokens",
        "name": "count_words word_count {p}_word_count number_of_words",
    }, """
        Count the whitespace-separated words in {p}
        {p}: str -- the text to measure
        -> int -- how many words there are
        canonical: len({p}.split())
        ---
        # split on any run of whitespace
        {w} = {p}.split()
        count = len({w})
        return count
        ---
        count = 0
        for _ in {p}.split():
            count += 1
        return count
    """),
    CodeOp("percentage", {
        "part": "part done passed used", "whole": "whole total capacity attempted",
        "name": "percentage percent_{part} {part}_ratio share_of_{whole}",
    }, """
        Express {part} as a percentage of {whole}
        {part}: float -- the partial amount
        {whole}: float -- the full amount
        -> float -- a number between 0 and 100
        canonical: {part} / {whole} * 100
        ---
        fraction = {part} / {whole}
        # turn the fraction into a percentage
        return fraction * 100
        ---
        # percentage = part over whole, times a hundred
        result = {part} / {whole} * 100
        return result
    """, guard=ZERO_GUARD),
    CodeOp("invert", {
        "m": MAP_NAMES, "out": "inverted reverse_map flipped result",
        "name": "invert_{m} reverse_{m} flip_{m} swap_keys_and_values",
    }, """
        Swap the keys and values of {m}
        {m}: dict[str, str] -- the mapping to invert
        -> dict[str, str] -- a new dict mapping values to keys
        canonical: {{v: k for k, v in {m}.items()}}
        ---
        {out} = {{}}
        for k, v in {m}.items():
            # the value becomes the key
            {out}[v] = k
        return {out}
        ---
        {out} = {{v: k for k, v in {m}.items()}}
        return {out}
    """),
    CodeOp("squares", {
        "p": LIST_NAMES, "v": loop_var_over(), "out": "squares squared result powers",
        "name": "square_{p} squares_of_{p} {p}_squared power_two_{p}",
    }, """
        Square every entry of {p}
        {p}: list[float] -- the numbers to square
        -> list[float] -- a new list of squares
        canonical: [{v} ** 2 for {v} in {p}]
        ---
        {out} = []
        for {v} in {p}:
            # multiply the entry by itself
            {out}.append({v} * {v})
        return {out}
        ---
        {out} = [{v} ** 2 for {v} in {p}]
        return {out}
    """),
    CodeOp("flatten", {
        "p": "rows groups batches chunks nested", "row": "row group batch chunk inner",
        "v": "item value cell x", "out": "flat flattened result merged",
        "name": "flatten_{p} merge_{p} concat_{p} flat_{p}",
    }, """
        Flatten {p} into one list, keeping the order
        {p}: list[list[str]] -- a list of lists
        -> list[str] -- a single flat list
        canonical: [{v} for {row} in {p} for {v} in {row}]
        ---
        {out} = []
        for {row} in {p}:
            # copy every entry of this inner list
            for {v} in {row}:
                {out}.append({v})
        return {out}
        ---
        {out} = [{v} for {row} in {p} for {v} in {row}]
        return {out}
    """),
    CodeOp("prefix", {
        "p": WORDS_NAMES, "v": loop_var_over("prefix"), "pre": "prefix start beginning",
        "out": "matches kept selected", "name": "{p}_with_prefix filter_{p}_by_{pre} starting_{p}",
    }, """
        Keep the {p} that begin with the {pre}
        {p}: list[str] -- the strings to filter
        {pre}: str -- the required beginning
        -> list[str] -- the matching strings
        canonical: [{v} for {v} in {p} if {v}.startswith({pre})]
        ---
        {out} = []
        for {v} in {p}:
            if {v}.startswith({pre}):
                # this one begins with the {pre}
                {out}.append({v})
        return {out}
        ---
        {out} = [{v} for {v} in {p} if {v}.startswith({pre})]
        return {out}
    """),
)
# fmt: on

DOC_EXTRA = [
    "This helper is used by the reporting code.",
    "It has no side effects.",
    "Kept small on purpose so it is easy to test.",
    "The input is never modified.",
    "Written during the big cleanup of the utilities module.",
]


def code_output(spec: CodeSpec) -> str:
    facts = {
        "name": spec.name,
        "args": ", ".join(p.canonical() for p in spec.params),
        "returns": spec.returns,
    }
    if spec.raises:
        facts["raises"] = spec.raises
    return render_output("fn", facts, ("name", "args", "raises", "returns"))


def code_source(rng: random.Random, spec: CodeSpec, verbose: bool = True) -> str:
    """The verbose function: optional hints, a docstring in one of three styles, comments."""
    hints = rng.random() < 0.5
    sig = ", ".join(p.source(hints) for p in spec.params)
    lines = [f"def {spec.name}({sig})" + (f" -> {spec.return_hint}:" if hints else ":")]
    # Google style (Args/Returns) is the longest and says least; a quarter of the rows is enough.
    style = rng.choice(["oneline", "google", "prose", "oneline"]) if verbose else "none"
    if style == "oneline":
        lines.append(f'    """{spec.summary}."""')
    elif style == "prose":
        lines += [f'    """{spec.summary}.', "", f"    {pick(rng, DOC_EXTRA)}", '    """']
    elif style == "google":
        lines += [f'    """{spec.summary}.', "", "    Args:"]
        lines += [f"        {p.name}: {p.doc}." for p in spec.params]
        lines += [
            "",
            "    Returns:",
            f"        {spec.returns_doc[0].upper()}{spec.returns_doc[1:]}.",
            '    """',
        ]
    keep_comments = rng.random() < 0.7 if verbose else False
    body = [*spec.guard, *spec.bodies[rng.randrange(len(spec.bodies))]]
    for line in body:
        if line.lstrip().startswith("#") and not keep_comments:
            continue
        lines.append(f"    {line}")
    return "\n".join(lines)


def verbose_source(rng: random.Random, spec: CodeSpec) -> str | None:
    """A rendering of spec verbose enough to be a clean row, or None after a few draws."""
    output = code_output(spec)
    for _ in range(20):
        text = code_source(rng, spec)
        if compressive(text, output):
            return text
    return None


def code_pair(rng: random.Random) -> Pair:
    while True:
        op = CODE_OPS[rng.randrange(len(CODE_OPS))]
        spec = code_spec(rng, op)
        text = verbose_source(rng, spec)
        if text is not None:
            return Pair(text, code_output(spec), op.task)


# ---------------------------------------------------------------------------------------------
# Personal data (fake, but shaped like the real thing).
# ---------------------------------------------------------------------------------------------
def ascii_person(rng: random.Random) -> tuple[str, str]:
    first = pick(rng, [n for n in FIRST if n.isascii() and n.isalpha()])
    last = pick(rng, [n for n in LAST if n.isascii() and n.isalpha()])
    return first, last


def fake_email(rng: random.Random, first: str, last: str) -> str:
    local = pick(rng, [f"{first}.{last}", f"{first[0]}{last}", f"{first}"]).lower()
    return f"{local}@{pick(rng, EMAIL_DOMAINS)}"


def fake_phone(rng: random.Random) -> str:
    a, b = rng.randint(201, 989), rng.randint(100, 9999)
    return pick(
        rng,
        [
            f"+1 {a} 555 {b:04d}",
            f"({a}) 555-{b:04d}",
            f"+44 20 7946 {b:04d}",
            f"+49 30 {rng.randint(100000, 999999)}",
            f"{a}-555-{b:04d}",
        ],
    )


def fake_key(rng: random.Random, prefix: str) -> str:
    if prefix == "sk-":
        return "sk-" + "".join(rng.choice(ALNUM) for _ in range(48))
    if prefix == "ghp_":
        return "ghp_" + "".join(rng.choice(ALNUM) for _ in range(36))
    return "AKIA" + "".join(rng.choice(UPPER_ALNUM) for _ in range(16))


def fake_ip(rng: random.Random) -> str:
    r = rng.randint
    return pick(
        rng,
        [
            f"10.{r(0, 255)}.{r(0, 255)}.{r(1, 254)}",
            f"192.168.{r(0, 255)}.{r(1, 254)}",
            f"172.{r(16, 31)}.{r(0, 255)}.{r(1, 254)}",
            f"203.0.113.{r(1, 254)}",
        ],
    )


def nl_pii_pair(rng: random.Random, scenario: str) -> Pair:
    """scenario: contact_email | contact_phone | contact_both | key_<prefix> | server_ip."""
    facts: dict[str, str] = {}
    if scenario.startswith("contact"):
        rtype = PII_TYPES["contact"]
        first, last = ascii_person(rng)
        facts["name"] = f"{first} {last}"
        if rng.random() < 0.5:
            facts["company"] = pick(rng, VENDORS)
        if scenario in ("contact_email", "contact_both"):
            facts["email"] = fake_email(rng, first, last)
        if scenario in ("contact_phone", "contact_both"):
            facts["phone"] = fake_phone(rng)
    elif scenario.startswith("key_"):
        rtype = PII_TYPES["access"]
        prefix = scenario.removeprefix("key_")
        facts = {
            "owner": person(rng),
            "service": KEY_SERVICES[prefix],
            "key": fake_key(rng, prefix),
        }
    else:
        rtype = PII_TYPES["server"]
        facts = {"host": pick(rng, HOSTS), "ip": fake_ip(rng), "owner": person(rng)}
    output = render_output(rtype.name, facts, rtype.keys)
    n_filler = rng.choice([0, 1, 2])
    text = compose_nl(rng, rtype, facts, n_filler)
    while not compressive(text, output):
        n_filler += 1
        text = compose_nl(rng, rtype, facts, n_filler)
    return Pair(text, output, rtype.name)


# The personal data is a parameter's default. code_pii_pair gives the slots `first last` (an
# ASCII name for the e-mail address) and, for an API key, `prefix arg service`.
# fmt: off
CODE_PII_OPS: dict[str, CodeOp] = {op.task: op for op in (
    CodeOp("email", {
        "m": "message body text", "r": "recipient to_address",
        "name": "notify_team send_alert build_notification",
        "email": lambda rng, s: f'"{fake_email(rng, s["first"], s["last"])}"',
    }, """
        Build the notification payload for the on-call inbox
        {m}: str -- what to send
        {r}: str = {email} -- who receives it
        -> dict[str, str] -- the payload dict
        canonical: {{"to": {r}, "body": {m}}}
        ---
        payload = {{}}
        payload["to"] = {r}
        payload["body"] = {m}
        return payload
        ---
        payload = {{"to": {r}, "body": {m}}}
        return payload
    """),
    CodeOp("phone", {
        "g": "region team site", "ph": "phone hotline",
        "name": "support_line format_hotline contact_line",
        "phone": lambda rng, s: f'"{fake_phone(rng)}"',
    }, """
        Format the support hotline for display
        {g}: str -- where the caller is
        {ph}: str = {phone} -- the number to call
        -> str -- a display string
        canonical: f"{{{g}}}: {{{ph}}}"
        ---
        label = f"{{{g}}}: {{{ph}}}"
        return label
        ---
        return f"{{{g}}}: {{{ph}}}"
    """),
    CodeOp("api_key", {
        "other": "model repo bucket project", "name": "auth_headers build_headers client_config",
        "key": lambda rng, s: f'"{fake_key(rng, s["prefix"])}"',
    }, """
        Build the request headers for {service}
        {other}: str -- what the request is about
        {arg}: str = {key} -- the credential
        -> dict[str, str] -- the header dict
        canonical: {{"Authorization": "Bearer " + {arg}, "scope": {other}}}
        ---
        headers = {{}}
        headers["Authorization"] = "Bearer " + {arg}
        headers["scope"] = {other}
        return headers
        ---
        headers = {{"Authorization": "Bearer " + {arg}, "scope": {other}}}
        return headers
    """),
    CodeOp("ip", {
        "db": "name database db_name", "name": "database_url db_url connection_string",
        "ip": lambda rng, s: f'"{fake_ip(rng)}"',
    }, """
        Build the connection URL for the reporting database
        {db}: str -- the database to open
        host: str = {ip} -- the server address
        port: int = 5432 -- the server port
        -> str -- a postgresql URL
        canonical: f"postgresql://{{host}}:{{port}}/{{{db}}}"
        ---
        url = f"postgresql://{{host}}:{{port}}/{{{db}}}"
        return url
        ---
        return f"postgresql://{{host}}:{{port}}/{{{db}}}"
    """),
    CodeOp("contact_card", {
        "name": "contact_card owner_details escalation_contact",
        "email": lambda rng, s: f'"{fake_email(rng, s["first"], s["last"])}"',
        "phone": lambda rng, s: f'"{fake_phone(rng)}"',
    }, """
        Return the escalation contact as a dict
        name: str -- who to contact
        email: str = {email} -- their address
        phone: str = {phone} -- their number
        -> dict[str, str] -- the contact dict
        canonical: {{"name": name, "email": email, "phone": phone}}
        ---
        card = {{"name": name, "email": email, "phone": phone}}
        return card
    """),
)}
# fmt: on

KEY_ARGS = {"sk-": "api_key", "ghp_": "token", "AKIA": "access_key_id"}


def code_pii_pair(rng: random.Random, scenario: str) -> Pair:
    """A function whose default argument is personal data, kept verbatim in the summary."""
    first, last = ascii_person(rng)
    given = {"first": first, "last": last}
    op = CODE_PII_OPS["api_key" if scenario in API_KEY_PREFIXES else scenario]
    if scenario in API_KEY_PREFIXES:
        given |= {"prefix": scenario, "arg": KEY_ARGS[scenario], "service": KEY_SERVICES[scenario]}
    spec = code_spec(rng, op, given)
    text = verbose_source(rng, spec)
    if text is None:  # the defaults made it too long to summarize tersely: draw again
        return code_pii_pair(rng, scenario)
    return Pair(text, code_output(spec), spec.name)


# ---------------------------------------------------------------------------------------------
# Defect builders.
# ---------------------------------------------------------------------------------------------
def think_block(rng: random.Random, pair: Pair) -> str:
    head = pair.output.split(" | ", 1)[0]
    if head == "fn":
        name = pair.output.split(" | ", 2)[1].removeprefix("name: ")
        reasoning = pick(
            rng,
            [
                f"The function {name} is verbose. The loop and temporaries are one expression.",
                "Docstring and comments restate the code, so drop them; keep name, args, result.",
                f"Let me read {name}: what does it return, does it raise? Then write the summary.",
            ],
        )
        return pick(rng, [f"<think>\n{reasoning}\n</think>\n\n", f"<think>{reasoning}</think>\n"])
    reasoning = pick(
        rng,
        [
            f"The user wants a {head} record. Keep every fact and drop the pleasantries.",
            f"Let me extract the fields for {head}: names, dates and numbers exactly as given.",
            f"This is a {head}. Fixed key order, values copied from the text, nothing else.",
            "Okay, so the task is to compress this. Remove filler, keep all facts, fixed order.",
        ],
    )
    return pick(
        rng,
        [
            f"<think>\n{reasoning}\n</think>\n\n",
            f"<think>{reasoning}</think>\n",
            f"<think>\n{reasoning}\n</think>\n",
        ],
    )


def tool_block(rng: random.Random, pair: Pair) -> str:
    head = pair.output.split(" | ", 1)[0]
    call = pick(
        rng,
        [
            {"name": "extract_fields", "arguments": {"type": head}},
            {"name": "compress", "arguments": {"mode": "terse"}},
            {"name": "lookup_schema", "arguments": {"record": head}},
        ],
    )
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>\n"


def with_tags(rng: random.Random, pair: Pair, tag: str) -> Pair:
    block = think_block(rng, pair) if tag == "think" else tool_block(rng, pair)
    if tag == "tool_call" and rng.random() < 0.3:  # a call after the answer is stripped too
        return Pair(pair.input, f"{pair.output}\n{block.rstrip()}", pair.task)
    return Pair(pair.input, block + pair.output, pair.task)


PADS_BEFORE = [
    "",
    "pls log: ",
    "fyi - ",
    "note: ",
    "quick one: ",
    "for the record: ",
    "todo ",
    "reminder: ",
    "log this: ",
    "heads up: ",
    "from standup: ",
    "ok so ",
]
PADS_AFTER = ["", " thx", " - thanks", " pls", ", cheers", " (from chat)", " ty", " :)"]


def terse_nl_input(
    rng: random.Random, rtype: RecordType, facts: dict[str, str], keyed: bool
) -> str:
    """What a user writes when the note is already terse: the facts, barely any words."""
    sep = pick(rng, ["; ", ", "])
    values = [f"{k} {facts[k]}" if keyed else facts[k] for k in rtype.keys if k in facts]
    return f"{rtype.name}{pick(rng, [': ', ' - '])}" + sep.join(values)


def ratio_nl_pair(rng: random.Random, low: float, high: float) -> Pair:
    """An already-terse note whose canonical output is not shorter: ratio in (low, high]."""
    while True:
        rtype = NL_TYPES[rng.randrange(len(NL_TYPES))]
        facts, _ = sample_facts(rng, rtype)
        output = render_output(rtype.name, facts, rtype.keys)
        # Keyed notes are a few characters shorter than the output: padding them lands the
        # ratio just under 1.0. Bare values are far shorter.
        core = terse_nl_input(rng, rtype, facts, keyed=high < 1.0)
        options = [b + core + a for b in PADS_BEFORE for a in PADS_AFTER]
        fits = [t for t in options if low < char_ratio(t, output) <= high]
        if fits:
            return Pair(pick(rng, fits), output, rtype.name)


def ratio_code_pair(rng: random.Random) -> Pair:
    """A function that already is a one-liner: the summary is longer than the code."""
    while True:
        op = CODE_OPS[rng.randrange(len(CODE_OPS))]
        spec = code_spec(rng, op)
        if spec.raises:
            continue
        args = ", ".join(p.canonical() for p in spec.params)
        text = f"def {spec.name}({args}): return {spec.returns}"
        output = code_output(spec)
        if char_ratio(text, output) > 1.05:
            return Pair(text, output, op.task)


def near_variant(
    rng: random.Random, text: str, output: str, is_code: bool, taken: Sequence[str]
) -> str:
    """Change only case, whitespace or punctuation; the normalized text stays equal.

    The variant differs from every text in `taken` (the group so far), so a near group never
    hides an exact pair.
    """
    for _ in range(100):
        out = text
        if is_code:
            lines = out.split("\n")
            choice = rng.randrange(3)
            if choice == 0:  # trailing whitespace on a few lines
                for i in rng.sample(range(len(lines)), min(3, len(lines))):
                    lines[i] += pick(rng, [" ", "  ", "\t"])
            elif choice == 1:  # an extra blank line after the signature
                lines.insert(1, "")
            else:  # recase the comments and docstring
                lines = [
                    ln.lower() if ('"""' in ln or ln.lstrip().startswith("#")) else ln
                    for ln in lines
                ]
            out = "\n".join(lines)
        else:
            choice = rng.randrange(4)
            if choice == 0:
                out = out.lower()
            elif choice == 1:
                out = out.replace(". ", ".  ").replace("\n\n", "\n") + pick(rng, [" ", "\n"])
            elif choice == 2:
                out = re.sub(r",(\s)", r"\1", out)
            else:
                out = re.sub(r"[.!](\s|$)", lambda m: pick(rng, ["!", "", "..."]) + m.group(1), out)
        # The copy must pass every other filter, so only dedup can remove it.
        if out not in taken and normalize(out) == normalize(text) and compressive(out, output):
            return out
    raise RuntimeError(f"could not make a near-duplicate of {text[:60]!r}")


def overlong_nl_pair(rng: random.Random) -> Pair:
    """A request with a whole pasted e-mail thread under it: thousands of tokens, same facts."""
    pair = nl_pair(rng)
    quoted: list[str] = []
    while sum(len(q) + 1 for q in quoted) < OVERLONG_MIN_CHARS + rng.randrange(8000):
        quoted.append("> " + " ".join(rng.sample(FILLER, 4)))
    thread = "\n".join(quoted)
    return Pair(
        f"{pair.input}\n\n---- earlier messages, pasted for context ----\n{thread}",
        pair.output,
        pair.task,
    )


def overlong_code_pair(rng: random.Random) -> Pair:
    """A function buried under a pasted changelog comment block."""
    pair = code_pair(rng)
    notes = [
        "refactored for readability",
        "renamed variables to be clearer",
        "added comments for the new team members",
        "checked the edge cases again",
        "reformatted after the style guide change",
        "reviewed during the audit",
    ]
    log: list[str] = []
    while sum(len(x) + 1 for x in log) < OVERLONG_MIN_CHARS + rng.randrange(6000):
        log.append(f"# - {pick(rng, notes)}; behaviour unchanged, see the review thread")
    return Pair("\n".join(["# CHANGELOG", *log, pair.input]), pair.output, pair.task)


# ---------------------------------------------------------------------------------------------
# Assembling a file.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How many lines of each kind one file gets. Every defect row carries exactly one defect."""

    kind: str
    prefix: str
    clean: int
    think: int
    tool_call: int
    ratio_between: int  # char ratio in (0.95, 1.0]: rejected only at the NL threshold
    ratio_above: int  # char ratio > 1.0
    exact_copies: tuple[int, ...]  # extra copies per exact-duplicate group
    near_copies: tuple[int, ...]  # extra variants per near-duplicate group
    pii: tuple[tuple[str, int], ...]  # scenario -> rows
    empty: tuple[tuple[str, int], ...]
    malformed: tuple[tuple[str, int], ...]
    blank_line: bytes | None  # one blank line mid-file (its bytes), or none
    overlong: int
    bom: bool


# The kinds of personal data each PII scenario puts in a row.
SCENARIO_PII: dict[str, tuple[str, ...]] = {
    "contact_email": ("email",),
    "contact_phone": ("phone",),
    "contact_both": ("email", "phone"),
    "key_sk-": ("api_key",),
    "key_ghp_": ("api_key",),
    "key_AKIA": ("api_key",),
    "server_ip": ("ipv4",),
    "email": ("email",),
    "phone": ("phone",),
    "sk-": ("api_key",),
    "ghp_": ("api_key",),
    "AKIA": ("api_key",),
    "ip": ("ipv4",),
    "contact_card": ("email", "phone"),
}

NL_PLAN = Plan(
    kind="nl",
    prefix="nl",
    clean=1800,
    think=40,
    tool_call=25,
    ratio_between=12,
    ratio_above=18,
    exact_copies=(1, 1, 1, 1, 1, 1, 2, 2, 1, 3),
    near_copies=(1, 1, 1, 1, 1, 1, 1, 1, 2, 2),
    pii=(
        ("contact_email", 10),
        ("contact_phone", 8),
        ("contact_both", 6),
        ("key_sk-", 5),
        ("key_ghp_", 4),
        ("key_AKIA", 4),
        ("server_ip", 9),
    ),
    empty=(
        ("empty_input", 1),
        ("whitespace_input", 1),
        ("empty_output", 2),
        ("whitespace_output", 1),
        ("both_empty", 1),
    ),
    malformed=(
        ("invalid_json", 3),
        ("not_object", 1),
        ("wrong_type", 4),
        ("missing_field", 2),
        ("invalid_utf8", 2),
    ),
    blank_line=b"",
    overlong=3,
    bom=False,
)
CODE_PLAN = Plan(
    kind="code",
    prefix="code",
    clean=880,
    think=20,
    tool_call=12,
    ratio_between=0,
    ratio_above=15,
    exact_copies=(1, 1, 1, 2, 1, 2),
    near_copies=(1, 1, 1, 1, 2),
    pii=(
        ("email", 5),
        ("phone", 4),
        ("sk-", 3),
        ("ghp_", 3),
        ("AKIA", 3),
        ("ip", 5),
        ("contact_card", 2),
    ),
    empty=(("empty_input", 1), ("whitespace_input", 1), ("empty_output", 2)),
    malformed=(
        ("invalid_json", 2),
        ("not_object", 1),
        ("wrong_type", 2),
        ("missing_field", 2),
        ("invalid_utf8", 1),
    ),
    blank_line=b"  \t",
    overlong=2,
    bom=True,
)


@dataclass(eq=False)
class Line:
    """One physical line to write: a row (maybe malformed on purpose) and what it is."""

    category: str  # "clean" or a defect name
    sub: str = ""  # defect subtype (e.g. "invalid_json"), or the duplicate group id
    pair: Pair | None = None
    raw: bytes | None = None  # a blank line


class Uniq:
    """Rejects pairs that would collide with an earlier one under normalization."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add(self, pair: Pair) -> bool:
        keys = {
            "i" + normalize(pair.input),
            "o" + normalize(strip_tags(pair.output)),
            "I" + normalize_deleting(pair.input),
        }
        if keys & self.seen:
            return False
        self.seen |= keys
        return True


def fresh(make: Callable[[], Pair], uniq: Uniq) -> Pair:
    while True:
        pair = make()
        if uniq.add(pair):
            return pair


def build_lines(rng: random.Random, plan: Plan) -> list[Line]:
    is_code = plan.kind == "code"
    uniq = Uniq()

    def base() -> Pair:
        return code_pair(rng) if is_code else nl_pair(rng)

    def tagged_base() -> Pair:  # long enough that the raw tagged output still compresses
        pair = code_pair(rng) if is_code else nl_pair(rng, min_filler=2)
        return pair

    lines = [Line("clean", pair=fresh(base, uniq)) for _ in range(plan.clean)]
    for tag, count in (("think", plan.think), ("tool_call", plan.tool_call)):
        made = 0
        while made < count:
            pair = with_tags(rng, fresh(tagged_base, uniq), tag)
            if compressive(pair.input, pair.output, TAGGED_MAX_RAW_RATIO):
                lines.append(Line(tag, pair=pair))
                made += 1
    for _ in range(plan.ratio_between):
        lines.append(
            Line(
                "ratio",
                "between_0.95_and_1.0",
                fresh(lambda: ratio_nl_pair(rng, 0.955, 0.995), uniq),
            )
        )
    for _ in range(plan.ratio_above):
        make_above: Callable[[], Pair] = (
            (lambda: ratio_code_pair(rng)) if is_code else (lambda: ratio_nl_pair(rng, 1.05, 9.0))
        )
        lines.append(Line("ratio", "above_1.0", fresh(make_above, uniq)))
    for scenario, count in plan.pii:
        make_pii = functools.partial(code_pii_pair if is_code else nl_pii_pair, rng, scenario)
        lines += [Line("pii", scenario, fresh(make_pii, uniq)) for _ in range(count)]
    for sub, count in plan.empty:
        for _ in range(count):
            pair = fresh(base, uniq)
            blank_in = "" if sub in ("empty_input", "both_empty") else " \n\t "
            blank_out = "" if sub in ("empty_output", "both_empty") else "   "
            if sub in ("empty_input", "whitespace_input", "both_empty"):
                pair.input = blank_in
            if sub in ("empty_output", "whitespace_output", "both_empty"):
                pair.output = blank_out
            lines.append(Line("empty", sub, pair))
    for sub, count in plan.malformed:
        lines += [Line("malformed", sub, fresh(base, uniq)) for _ in range(count)]
    make_long = (lambda: overlong_code_pair(rng)) if is_code else (lambda: overlong_nl_pair(rng))
    lines += [Line("overlong", pair=fresh(make_long, uniq)) for _ in range(plan.overlong)]
    rng.shuffle(lines)

    # Duplicates: copies go after their (clean) original, so keep-first dedup keeps the original.
    originals = rng.sample(
        [ln for ln in lines if ln.category == "clean"],
        len(plan.exact_copies) + len(plan.near_copies),
    )
    groups = [("exact", n) for n in plan.exact_copies] + [("near", n) for n in plan.near_copies]
    for gid, ((dup_kind, copies), original) in enumerate(zip(groups, originals, strict=True)):
        assert original.pair is not None
        original.sub = f"group-{gid}"
        taken = [original.pair.input]
        for _ in range(copies):
            src = original.pair
            text = (
                src.input
                if dup_kind == "exact"
                else near_variant(rng, src.input, src.output, is_code, taken)
            )
            taken.append(text)
            copy = Line(f"{dup_kind}_duplicate", f"group-{gid}", Pair(text, src.output, src.task))
            start = next(i for i, ln in enumerate(lines) if ln is original) + 1
            lines.insert(rng.randint(start, len(lines)), copy)
    if plan.bom:  # the BOM sits on line 1, which must be an ordinary clean row
        first = next(i for i, ln in enumerate(lines) if ln.category == "clean" and not ln.sub)
        lines.insert(0, lines.pop(first))
    if plan.blank_line is not None:
        lines.insert(
            rng.randint(len(lines) // 3, 2 * len(lines) // 3), Line("blank", raw=plan.blank_line)
        )
    return lines


def row_dict(line_no: int, plan: Plan, pair: Pair, rng: random.Random) -> dict[str, Any]:
    return {
        "id": f"{plan.prefix}-{line_no:05d}",
        "input": pair.input,
        "output": pair.output,
        "kind": plan.kind,
        "meta": {
            "task": pair.task,
            "generator": "synth-llm-v2",
            "temperature": rng.choice([0.3, 0.5, 0.7, 0.9]),
        },
    }


def dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def malformed_bytes(rng: random.Random, sub: str, row: dict[str, Any], nth: int) -> bytes:
    """The nth malformed line of this subtype, built from an ordinary row."""
    if sub == "invalid_json":
        text = json.dumps(row, ensure_ascii=False)
        variants = [
            text[: int(len(text) * 0.6)],  # truncated mid-string (the generator was cut off)
            text[:-1] + ", }",  # trailing comma
            repr(row),  # a Python dict printed instead of JSON
        ]
        return variants[nth % len(variants)].encode("utf-8")
    if sub == "not_object":
        return dumps([row["input"], row["output"]])
    if sub == "wrong_type":
        broken = dict(row)
        key, value = [
            ("output", 42),
            ("output", row["output"].split(" | ")),
            ("input", None),
            ("output", {"text": row["output"]}),
        ][nth % 4]
        broken[key] = value
        return dumps(broken)
    if sub == "missing_field":
        return dumps({k: v for k, v in row.items() if k != ("output", "input")[nth % 2]})
    if sub == "invalid_utf8":
        if nth % 2 == 0:  # a stray byte inside the input string
            data = dumps(row)
            cut = data.index(b'"input": "') + 10 + rng.randrange(5, 30)
            return data[:cut] + pick(rng, [b"\xff", b"\xc3\x28", b"\xe2\x82"]) + data[cut:]
        # a row written by a Latin-1 tool: valid JSON, invalid UTF-8 (the name has an accent)
        return json.dumps(row, ensure_ascii=False).encode("latin-1")
    raise ValueError(f"unknown malformed subtype {sub}")


def latin1_row_input(rng: random.Random) -> Pair:
    """A clean-looking NL pair whose text has a non-ASCII (Latin-1) character."""
    while True:
        pair = nl_pair(rng)
        if (
            not pair.input.isascii()
            and pair.input.encode("latin-1", "ignore").decode("latin-1") == pair.input
        ):
            return pair


def render(rng: random.Random, plan: Plan, lines: list[Line]) -> tuple[bytes, dict[str, Any]]:
    """Serialize the lines and record, per category, the 1-based line numbers."""
    out: list[bytes] = []
    where: dict[str, dict[str, list[int]]] = {}
    groups: dict[str, list[int]] = {}
    nth: dict[str, int] = {}
    for i, line in enumerate(lines):
        line_no = i + 1
        if line.raw is not None:
            out.append(line.raw)
            where.setdefault("blank", {}).setdefault("", []).append(line_no)
            continue
        assert line.pair is not None
        if line.category == "malformed" and line.sub == "invalid_utf8" and nth.get(line.sub, 0) % 2:
            line.pair = latin1_row_input(rng)
        row = row_dict(line_no, plan, line.pair, rng)
        if line.category == "malformed":
            k = nth.get(line.sub, 0)
            nth[line.sub] = k + 1
            out.append(malformed_bytes(rng, line.sub, row, k))
        else:
            out.append(dumps(row))
        if line.category in ("exact_duplicate", "near_duplicate") or line.sub.startswith("group-"):
            groups.setdefault(line.sub, []).append(line_no)
        if line.category != "clean":
            where.setdefault(line.category, {}).setdefault(line.sub, []).append(line_no)
    data = b"\n".join(out) + b"\n"
    if plan.bom:
        data = b"\xef\xbb\xbf" + data
    record: dict[str, Any] = {"where": where, "groups": groups}
    return data, record


# ---------------------------------------------------------------------------------------------
# The audit: classify every line from the bytes alone, with the documented rules.
# ---------------------------------------------------------------------------------------------
@dataclass
class Audit:
    lines: int = 0
    bom: bool = False
    blank: list[int] = field(default_factory=list)
    malformed: dict[str, list[int]] = field(default_factory=dict)
    rows: int = 0
    defects: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    exact_groups: list[list[int]] = field(default_factory=list)
    near_groups: list[list[int]] = field(default_factory=list)
    clean: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stats: dict[str, list[int]] = field(default_factory=dict)

    def flag(self, category: str, sub: str, line_no: int) -> None:
        self.defects.setdefault(category, {}).setdefault(sub, []).append(line_no)


def empty_subtype(inp: str, out: str) -> str:
    if not inp.strip() and not out.strip():
        return "both_empty"
    if not inp.strip():
        return "empty_input" if inp == "" else "whitespace_input"
    return "empty_output" if out == "" else "whitespace_output"


def pii_kinds(text: str) -> list[str]:
    return [kind for kind, rx in PII_PATTERNS.items() if rx.search(text)]


def audit_file(path: Path, kind: str) -> Audit:
    """Classify every line of a pairs file; record problems where a row breaks a rule."""
    data = path.read_bytes()
    a = Audit()
    if data.startswith(b"\xef\xbb\xbf"):
        a.bom, data = True, data[3:]
    physical = data.split(b"\n")
    if physical[-1] == b"":
        physical.pop()
    a.lines = len(physical)
    exact: dict[tuple[str, str], list[int]] = {}
    near: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    near_del: dict[tuple[str, str], list[int]] = {}
    for line_no, raw in enumerate(physical, start=1):
        if raw.strip() == b"":
            a.blank.append(line_no)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            a.malformed.setdefault("invalid_utf8", []).append(line_no)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            a.malformed.setdefault("invalid_json", []).append(line_no)
            continue
        if not isinstance(obj, dict):
            a.malformed.setdefault("not_object", []).append(line_no)
            continue
        if "input" not in obj or "output" not in obj:
            a.malformed.setdefault("missing_field", []).append(line_no)
            continue
        if not isinstance(obj["input"], str) or not isinstance(obj["output"], str):
            a.malformed.setdefault("wrong_type", []).append(line_no)
            continue
        a.rows += 1
        inp, raw_out = obj["input"], obj["output"]
        found: list[tuple[str, str]] = []
        if not inp.strip() or not raw_out.strip():
            a.flag("empty", empty_subtype(inp, raw_out), line_no)
            continue
        if obj.get("id") != f"{kind}-{line_no:05d}" or obj.get("kind") != kind:
            a.problems.append(f"{path.name}:{line_no}: id/kind do not match the line")
        out = strip_tags(raw_out)
        if "<think>" in raw_out:
            found.append(("think", ""))
        if "<tool_call>" in raw_out:
            found.append(("tool_call", ""))
        if len(inp) > OVERLONG_CHARS:
            found.append(("overlong", ""))
        ratio = char_ratio(inp, out)
        if ratio > 1.0:
            found.append(("ratio", "above_1.0"))
        elif ratio > MAX_RATIO[kind]:
            found.append(("ratio", "between_0.95_and_1.0"))
        kinds_in, kinds_out = pii_kinds(inp), pii_kinds(out)
        if kinds_in or kinds_out:
            found.append(("pii", "+".join(kinds_in)))
            for k in kinds_in:
                a.stats.setdefault(f"pii_{k}", []).append(line_no)
            if kinds_in != kinds_out or not all(
                m in out for k in kinds_in for m in PII_PATTERNS[k].findall(inp)
            ):
                a.problems.append(f"{path.name}:{line_no}: PII differs between input and output")
        exact.setdefault((inp, out), []).append(line_no)
        near.setdefault((normalize(inp), normalize(out)), []).append((line_no, inp, out))
        near_del.setdefault((normalize_deleting(inp), normalize_deleting(out)), []).append(line_no)
        if len(found) > 1:
            a.problems.append(f"{path.name}:{line_no}: more than one defect: {found}")
        for category, sub in found:
            a.flag(category, sub, line_no)
        if not OUTPUT_GRAMMAR.fullmatch(out):
            a.problems.append(f"{path.name}:{line_no}: output breaks the grammar: {out[:80]!r}")
        if not found:
            a.clean.append(line_no)
            a.stats.setdefault("clean_ratio_x1000", []).append(round(ratio * 1000))
            a.stats.setdefault("clean_input_chars", []).append(len(inp))
            a.stats.setdefault("clean_output_chars", []).append(len(out))
        if not found or found[0][0] in ("think", "tool_call"):
            # Clean after stripping: what the model trains on must be unambiguous.
            if not compressive(inp, out) or len(inp) > CLEAN_MAX_INPUT_CHARS:
                a.problems.append(f"{path.name}:{line_no}: clean row too long, short or ratio")
            if found and not compressive(inp, raw_out, TAGGED_MAX_RAW_RATIO):
                a.problems.append(f"{path.name}:{line_no}: tagged output too long before strip")
            if LOOSE_PII.search(inp) or LOOSE_PII.search(out):
                a.problems.append(f"{path.name}:{line_no}: clean row looks like it has PII")
            if kind == "nl" and NEGATION_RE.search(inp):
                a.problems.append(f"{path.name}:{line_no}: clean NL input has a negation")
    a.exact_groups = [nos for nos in exact.values() if len(nos) > 1]
    for members in near.values():
        distinct = {(inp, out) for _, inp, out in members}
        if len(distinct) == 1:
            continue  # a pure exact group (or a single row)
        if len(distinct) != len(members):
            a.problems.append(f"{path.name}: lines {[m[0] for m in members]} mix exact and near")
        a.near_groups.append([m[0] for m in members])
    near_line_groups = sorted(g for g in ([m[0] for m in ms] for ms in near.values()) if len(g) > 1)
    if near_line_groups != sorted(g for g in near_del.values() if len(g) > 1):
        a.problems.append(f"{path.name}: the two punctuation normalizations disagree on groups")
    for groups, name in ((a.exact_groups, "exact_duplicate"), (a.near_groups, "near_duplicate")):
        for g in groups:
            for n in g[1:]:
                a.flag(name, "", n)
                if n in a.clean:
                    a.clean.remove(n)
    return a


# ---------------------------------------------------------------------------------------------
# Manifest, README, writing.
# ---------------------------------------------------------------------------------------------
def file_manifest(
    plan: Plan, data: bytes, rec: dict[str, Any], lines: list[Line]
) -> dict[str, Any]:
    where: dict[str, dict[str, list[int]]] = rec["where"]
    groups: dict[str, list[int]] = rec["groups"]

    def lines_of(category: str) -> list[int]:
        return sorted(n for nos in where.get(category, {}).values() for n in nos)

    def by_sub(category: str) -> dict[str, Any]:
        subs = where.get(category, {})
        return {sub: {"count": len(nos), "lines": nos} for sub, nos in sorted(subs.items())}

    dup: dict[str, Any] = {}
    for dup_kind in ("exact", "near"):
        gl = [
            groups[g]
            for g in sorted(groups, key=lambda s: int(s.split("-")[1]))
            if any(ln.category == f"{dup_kind}_duplicate" and ln.sub == g for ln in lines)
        ]
        dup[f"{dup_kind}_duplicates"] = {
            "groups": len(gl),
            "rows_in_groups": sum(len(g) for g in gl),
            "rows_removed": sum(len(g) - 1 for g in gl),
            "lines_removed": lines_of(f"{dup_kind}_duplicate"),
            "group_lines": gl,
        }
    pii_lines = lines_of("pii")
    # Expected from the scenarios the plan asked for; the check finds them with the regexes.
    rows_with = {k: sum(n for s, n in plan.pii if k in SCENARIO_PII[s]) for k in PII_PATTERNS}
    key_prefix = {p: sum(n for s, n in plan.pii if s.endswith(p)) for p in API_KEY_PREFIXES}
    malformed = by_sub("malformed")
    empty = by_sub("empty")
    n_blank = len(where.get("blank", {}).get("", []))
    n_malformed = sum(v["count"] for v in malformed.values())
    n_rows = len(lines) - n_blank - n_malformed
    counts = {
        c: len(lines_of(c)) for c in ("think", "tool_call", "ratio", "pii", "empty", "overlong")
    }
    n_clean = sum(1 for ln in lines if ln.category == "clean")
    return {
        "kind": plan.kind,
        "max_char_ratio": MAX_RATIO[plan.kind],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bom": plan.bom,
        "physical_lines": len(lines),
        "blank_lines": {"count": n_blank, "lines": where.get("blank", {}).get("", [])},
        "malformed": {"count": n_malformed, **malformed},
        "rows": n_rows,
        "clean_rows": n_clean,
        "defects": {
            "think": {"count": counts["think"], "lines": lines_of("think")},
            "tool_call": {"count": counts["tool_call"], "lines": lines_of("tool_call")},
            "ratio": {"count": counts["ratio"], **by_sub("ratio")},
            **dup,
            "pii": {
                "count": counts["pii"],
                "rows_containing": rows_with,
                "api_key_rows_by_prefix": key_prefix,
                "lines": pii_lines,
            },
            "empty": {"count": counts["empty"], **empty},
            "overlong": {
                "count": counts["overlong"],
                "lines": lines_of("overlong"),
                "input_chars": sorted(
                    len(ln.pair.input) for ln in lines if ln.category == "overlong" and ln.pair
                ),
            },
        },
        "expected": {
            "rows_after_all_filters": n_clean + counts["think"] + counts["tool_call"],
            "note": "clean rows + think/tool_call rows recovered by stripping; every other row "
            "is rejected (PII rows, if a stage redacts instead of dropping, are kept: "
            "add defects.pii.count)",
        },
    }


def compare(manifest: dict[str, Any], name: str, a: Audit) -> list[str]:
    """Every count and line number in the manifest must match the audit of the bytes."""
    m = manifest["files"][name]
    errs = list(a.problems)

    def want(label: str, expected: object, got: object) -> None:
        if expected != got:
            errs.append(f"{name}: {label}: manifest says {expected}, the file has {got}")

    want("bom", m["bom"], a.bom)
    want("physical lines", m["physical_lines"], a.lines)
    want("blank lines", m["blank_lines"]["lines"], a.blank)
    for sub in set(m["malformed"]) - {"count"} | set(a.malformed):
        want(f"malformed/{sub}", m["malformed"].get(sub, {}).get("lines"), a.malformed.get(sub))
    want("rows", m["rows"], a.rows)
    d = m["defects"]
    for cat in ("think", "tool_call", "overlong"):
        want(cat, d[cat]["lines"], sorted(n for v in a.defects.get(cat, {}).values() for n in v))
    for cat in ("ratio", "empty"):
        subs = {k: v["lines"] for k, v in d[cat].items() if k != "count"}
        want(cat, subs, {k: sorted(v) for k, v in a.defects.get(cat, {}).items()})
    want("pii", d["pii"]["lines"], sorted(n for v in a.defects.get("pii", {}).values() for n in v))
    for k in PII_PATTERNS:
        want(f"pii rows with {k}", d["pii"]["rows_containing"][k], len(a.stats.get(f"pii_{k}", [])))
    want(
        "exact duplicate groups",
        sorted(d["exact_duplicates"]["group_lines"]),
        sorted(a.exact_groups),
    )
    want(
        "near duplicate groups", sorted(d["near_duplicates"]["group_lines"]), sorted(a.near_groups)
    )
    want("clean rows", m["clean_rows"], len(a.clean))
    return errs


def summary_table(manifest: dict[str, Any]) -> str:
    nl, code = manifest["files"][NL_FILE], manifest["files"][CODE_FILE]

    def cell(f: dict[str, Any], *path: str) -> str:
        node: Any = f
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return str(node) if not isinstance(node, dict) else "0"

    rows = [
        ("physical lines", ("physical_lines",)),
        ("rows (valid objects)", ("rows",)),
        ("clean rows", ("clean_rows",)),
        ("`<think>` blocks", ("defects", "think", "count")),
        ("`<tool_call>` blocks", ("defects", "tool_call", "count")),
        ("ratio in (0.95, 1.0]", ("defects", "ratio", "between_0.95_and_1.0", "count")),
        ("ratio > 1.0", ("defects", "ratio", "above_1.0", "count")),
        ("exact duplicate groups / rows removed", ()),
        ("near duplicate groups / rows removed", ()),
        ("PII rows", ("defects", "pii", "count")),
        ("empty or whitespace-only fields", ("defects", "empty", "count")),
        ("overlong inputs", ("defects", "overlong", "count")),
        ("malformed lines", ("malformed", "count")),
        ("blank lines", ("blank_lines", "count")),
        ("UTF-8 BOM at file start", ("bom",)),
        ("rows left after every filter", ("expected", "rows_after_all_filters")),
    ]
    out = [f"| | `{NL_FILE}` | `{CODE_FILE}` |", "|---|---:|---:|"]
    for label, path in rows:
        if not path:
            key = "exact_duplicates" if label.startswith("exact") else "near_duplicates"
            vals = [
                f"{f['defects'][key]['groups']} / {f['defects'][key]['rows_removed']}"
                for f in (nl, code)
            ]
        else:
            vals = [cell(nl, *path), cell(code, *path)]
        out.append(f"| {label} | {vals[0]} | {vals[1]} |")
    return "\n".join(out)


def pii_counts(f: dict[str, Any]) -> str:
    rows, keys = (
        f["defects"]["pii"]["rows_containing"],
        f["defects"]["pii"]["api_key_rows_by_prefix"],
    )
    by_prefix = ", ".join(f"`{p}` {n}" for p, n in keys.items())
    return (
        f"{f['defects']['pii']['count']} rows: e-mail {rows['email']}, phone {rows['phone']}, "
        f"API key {rows['api_key']} ({by_prefix}), IPv4 {rows['ipv4']}"
    )


def indent_block(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.split("\n"))


def readme_text(manifest: dict[str, Any], examples: dict[str, Pair]) -> str:
    """README.md, generated so its counts and examples always match the files."""
    nl, code = manifest["files"][NL_FILE], manifest["files"][CODE_FILE]
    types = "\n".join(f"| `{t.name}` | {', '.join(f'`{k}`' for k in t.keys)} |" for t in NL_TYPES)
    pii_types = "\n".join(
        f"| `{t.name}` (PII rows only) | {', '.join(f'`{k}`' for k in t.keys)} |"
        for t in PII_TYPES.values()
    )
    ex_nl, ex_code = examples[NL_FILE], examples[CODE_FILE]
    return f"""# Demo dataset: raw synthetic compression pairs

Generated by `scripts/make_demo_data.py` (seed {SEED}, standard library only); do not edit by
hand. `uv run python scripts/make_demo_data.py` rewrites this folder byte for byte and then
verifies it; `uv run python scripts/make_demo_data.py --check` only verifies. `manifest.json`
holds every count below, the line number of every defect and the sha256 of each file.

## The task

Rewrite a verbose input into a terse form that keeps every fact. This mirrors what users feed
the pipeline: pairs an LLM generated for them (`nl_v2.jsonl` and `code_v2.jsonl` in the
runbook), natural language filtered at a max output/input ratio of 0.95, code at 1.0.

- **Natural language** (`{NL_FILE}`): requests and notes (meetings, reminders, trips, orders,
  incidents, expenses, deliveries, leave, tasks, table bookings), worded many ways: greetings,
  filler, politeness, reordered clauses, e-mail layout. Values come from large pools, so the
  held-out split has unseen combinations and the model must copy values from the input.
- **Code** (`{CODE_FILE}`): a verbose Python function (docstring in three styles, comments,
  optional type hints, loops where a builtin would do, temporaries) summarized as its name, its
  arguments and the equivalent one-expression result.

The first clean row of each file:

    input:
{indent_block(ex_nl.input)}
    output:
{indent_block(ex_nl.output)}

    input:
{indent_block(ex_code.input)}
    output:
{indent_block(ex_code.output)}

### Output grammar (both files)

```
output := type (" | " key ": " value)+
type   := [a-z]+        key := [a-z]+        value := one line, never containing " | "
```

Keys come in a fixed order per type. Every NL input states every key of its type; a code
summary has `raises` exactly when the function has a guard clause. Exact match compares whole
outputs. Field-level F1: split on `" | "` and compare the sets of segments (the type is the
first segment).

| type | keys in order |
|---|---|
{types}
| `fn` (code) | `name`, `args`, `raises`?, `returns` |
{pii_types}

A `contact` row states `company` in about half the rows, and an e-mail address, a phone number
or both.

What the model must normalize (every other value is copied verbatim from the input):
- `when`: `Tue 15:00` from "Tuesday", "Tue" or "this Tuesday" and a 24-hour time.
- dates (`date`, `eta`, `due`, leave `from`/`to`): `Mar 14` from "March 14", "Mar 14" or
  "March 14th".
- `severity`: `P2` from "P2", "sev 2", "severity 2" or "SEV-2".
- `priority`: `high`, `normal` or `low` from a sentence ("It's urgent.", "It's routine work.").
- `repeat`: `daily`, `weekly` or `monthly` from "every week", "once a month", ...
- `fn`: `args` lists parameter names with their defaults (`rate=0.1`), type hints dropped;
  `returns` is the canonical expression (`sum(prices) * (1 - rate)`; comprehension variables
  as in the input); `raises` is `ValueError if not prices` for a guard clause (message
  dropped). Docstrings and comments are dropped: they restate the code.

## Row schema

One JSON object per line, UTF-8:

```json
{{"id": "nl-00042", "input": "...", "output": "...", "kind": "nl",
 "meta": {{"task": "meeting", "generator": "synth-llm-v2", "temperature": 0.7}}}}
```

- `input` (string, required): the verbose text or code.
- `output` (string, required): what the synthetic-data LLM returned, hence the defects.
- `id`: `<kind>-<line number>`, so an id leads to its line.
- `kind`: `nl` or `code`, the file's kind. `meta`: what the generator recorded (`task` is the
  record type or the function's operation); nothing in it marks a defect.

## Defects (each row carries at most one)

Counts per file, exact (the data-stage tests assert them):

{summary_table(manifest)}

"Rows left after every filter" = clean rows + the `<think>` and `<tool_call>` rows that
stripping repairs; every other row is rejected. A sanitizer that redacts PII instead of dropping
the row keeps the PII rows too.

How each is defined (the `--check` audit uses exactly these rules):

1. **`<think>` / `<tool_call>` blocks** in `output`: reasoning or a tool call leaked around the
   answer. Remove each whole block (`<think>.*?</think>`, `<tool_call>.*?</tool_call>`, dot
   matching newlines), then strip outer whitespace: what is left is the correct output. Tool
   calls come before the answer in most rows and after it in some. Even before stripping,
   these rows are below {TAGGED_MAX_RAW_RATIO} in characters and in approximate tokens, so the
   order of stripping and ratio filtering does not change the counts.
2. **Compression ratio** = `len(output) / len(input)` in characters (code points), the output
   stripped as in 1. A row is rejected above its file's threshold (NL 0.95, code 1.0). The NL
   file has rows in (0.955, 0.995] (rejected at 0.95, kept by a character filter at 1.0) and
   both files have rows above 1.05 (notes and one-line functions that were already terse).
   Clean rows are at most {CLEAN_MAX_RATIO} in characters and {CLEAN_MAX_TOKEN_RATIO} in
   approximate tokens (a word, a digit or a punctuation mark counting one; SmolLM2 splits
   digits one by one), so a token-based filter at 0.95 keeps every clean row. With SmolLM2's
   tokenizer the ratio-defect rows measured at or above 1.0 in tokens when this was made, so a
   token filter at 0.95 rejects the same rows.
3. **Duplicates**: exact = same `input` and same (stripped) `output`; near = equal once both
   fields are lowercased, every character matching `[^\\w\\s]` is replaced by a space and
   whitespace is collapsed (deleting punctuation instead gives the same groups). Near copies
   differ from their group's first row only in the input's case, whitespace or punctuation.
   Each group's first row is clean and comes first in the file, so keep-first dedup removes
   exactly the copies (`rows_removed`); `group_lines` lists each group, first row first. Copies
   pass every other filter, so only dedup removes them.
4. **PII**, in both `input` and `output` (the fact is kept verbatim). A row counts once however
   many kinds it holds. Regexes:
   - e-mail `{PII_PATTERNS["email"].pattern}`
   - phone `{PII_PATTERNS["phone"].pattern}`
   - API key `{PII_PATTERNS["api_key"].pattern}`
   - IPv4 `{PII_PATTERNS["ipv4"].pattern}`

   NL: {pii_counts(nl)}. Code: {pii_counts(code)}.
   Clean rows hold no `@`, no dotted number triples, no 7-character digit runs (spaces,
   dashes and brackets allowed) and no 20-character alphanumeric runs, so a stricter net
   catches nothing more.
5. **Empty fields**: an `input` or `output` whose `strip()` is empty (subtypes `empty_input`,
   `whitespace_input`, `empty_output`, `whitespace_output`, `both_empty`). Their ratio is
   undefined: test emptiness first.
6. **Malformed lines** (report file:line and carry on): `invalid_json` (truncated, trailing
   comma, a Python dict repr), `not_object` (a JSON array), `wrong_type` (`output` a number, a
   list or an object; `input` null), `missing_field` (no `output`, no `input`), `invalid_utf8`
   (a stray byte; a row written as Latin-1). Decode line by line: decoding the whole file at
   once fails on the invalid bytes.
7. **Blank lines**: one per file (NL: empty; code: spaces and a tab). A line whose `strip()` is
   empty is skipped, neither a row nor malformed; line numbers still count it.
8. **BOM**: `{CODE_FILE}` starts with a UTF-8 byte order mark (saved by a Windows editor). Its
   first row is an ordinary clean row: read with `utf-8-sig`, or strip the BOM from line 1.
9. **Overlong inputs**: a pasted e-mail thread (NL) or a changelog comment block (code), over
   {OVERLONG_MIN_CHARS:,} characters (several thousand tokens). Clean inputs are under
   {CLEAN_MAX_INPUT_CHARS:,} characters (a few hundred tokens), so any length limit in between
   flags exactly these.

Clean NL inputs contain no negation words ("not", "no", "n't", ...), so a check that negations
survive compression has nothing to flag.

## manifest.json

`files.<name>` holds, per file: `bytes`, `sha256`, `bom`, `physical_lines`, `rows`,
`clean_rows`, `blank_lines`, `malformed.<subtype>`, `defects.<kind>` (each with `count` and
the 1-based `lines`; `ratio` and `empty` per subtype; duplicates with `groups`,
`rows_in_groups`, `rows_removed`, `lines_removed`, `group_lines`; `pii` with
`rows_containing` per kind and `api_key_rows_by_prefix`), and
`expected.rows_after_all_filters`.
"""


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shared through git
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate() -> dict[str, bytes]:
    """All four files' bytes."""
    rng = random.Random(SEED)  # noqa: S311 - reproducible fake data, not security
    files: dict[str, bytes] = {}
    manifest: dict[str, Any] = {
        "generator": "scripts/make_demo_data.py",
        "seed": SEED,
        "line_numbers": "1-based physical lines (a BOM does not count); id = <kind>-<line>",
        "files": {},
    }
    examples: dict[str, Pair] = {}
    for name, plan in ((NL_FILE, NL_PLAN), (CODE_FILE, CODE_PLAN)):
        lines = build_lines(rng, plan)
        data, rec = render(rng, plan, lines)
        files[name] = data
        manifest["files"][name] = file_manifest(plan, data, rec, lines)
        first = next(ln.pair for ln in lines if ln.category == "clean" and ln.pair)
        examples[name] = first
    files[MANIFEST] = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    files[README] = readme_text(manifest, examples).encode("utf-8")
    return files


def check(folder: Path) -> list[str]:
    """Audit the files in folder against its manifest; returns one line per mismatch."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing; run scripts/make_demo_data.py to create it"]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    errs: list[str] = []
    for name, kind in ((NL_FILE, "nl"), (CODE_FILE, "code")):
        path = folder / name
        if not path.is_file():
            errs.append(f"{path}: missing; run scripts/make_demo_data.py to create it")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
            errs.append(f"{path}: sha256 differs from {manifest_path}; regenerate both")
        errs += compare(manifest, name, audit_file(path, kind))
    return errs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write")
    parser.add_argument("--check", action="store_true", help="only verify the folder")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.check:
        errs = check(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        files = generate()
        # Verify a staged copy first, so a bad generation never replaces good files.
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-staging-"))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            errs = check(staging)
            if not errs:
                for name, data in files.items():
                    write_atomic(out / name, data)
        finally:
            shutil.rmtree(staging)
    for err in errs:
        print(err, file=sys.stderr)
    if errs:
        return 1
    sizes = ", ".join(f"{n} {(out / n).stat().st_size:,} B" for n in (NL_FILE, CODE_FILE))
    print(f"{out}: OK ({sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
