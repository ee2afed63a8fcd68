"""A deterministic synthetic movie world: catalogue, users with latent tastes, histories, queries.

The bundled default dataset (data/synth-movies) is built by this module. The world is
small but structured the way real data is: people recur across films (directors and
actors specialise in genres and eras), users have latent tastes (genres, decades, people)
and watch in themed sessions, and demographic groups lean towards some genres and
decades, so the interaction graph carries signal a graph embedding can find.

    python -m rerec_mini.datasets synth --out data/synth-movies --seed 0
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from .data import Item, User, write_dataset
from .querygen import build_queries
from .splits import add_split_argument

GENRES = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
COUNTRY_LANGUAGE = {"USA": "English", "UK": "English", "France": "French", "Italy": "Italian",
                    "Japan": "Japanese", "Spain": "Spanish", "Germany": "German", "India": "Hindi",
                    "Korea": "Korean", "Mexico": "Spanish"}
DECADES = ["1950s", "1960s", "1970s", "1980s", "1990s", "2000s", "2010s"]
AGES = ["under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
# Older groups lean towards older films: the decade each age group remembers fondly.
AGE_DECADE = dict(zip(AGES, ["2010s", "2000s", "1990s", "1980s", "1970s", "1960s", "1950s"]))
OCCUPATIONS = ["student", "engineer", "artist", "doctor", "lawyer", "programmer", "retired", "teacher"]

FIRST = """Ada Alma Amos Anya Arlo Bea Bram Cara Cleo Dara Dov Edda Emil Ezra Faye Finn Gil Greta
Hana Hugo Ida Ines Ivo Jada Jonas Kai Kira Lars Lena Lior Mara Milo Nadia Nils Noor Omar Orla Pia
Quinn Rafa Rhea Rosa Sami Selma Soren Tova Udo Vera Wim Xena Yara Yuri Zane Zoe""".split()
LAST = """Abbot Alder Ambrose Ash Bell Birch Blake Brandt Brook Calder Cane Carrow Dale Dorn Drake
Ellery Esk Farrow Fenn Frost Gale Garro Grieve Hale Hart Holt Iver Jarrow Keel Kerr Lark Lund Marsh
Moss Nash Noble Oake Orme Pike Quill Rook Rowe Sable Shaw Stroud Thorne Tull Vale Voss Wilde Wren
Yates Zell""".split()
ADJ = """Silent Broken Golden Hidden Last Crimson Frozen Wild Hollow Distant Burning Quiet Lost Bright
Dark Iron Paper Glass Velvet Savage Gentle Endless Restless Silver Scarlet Northern Midnight Secret
Open Falling Sleeping Wandering Final Lonely Electric Eternal Little Stolen Bitter Borrowed""".split()
NOUN = """Harbor River Garden Crown Mirror Road Tide Signal Orchard Lantern Frontier Winter Summer
Promise Kingdom Station Letter Voyage Circus Storm Island Engine Canyon Harvest Echo Compass Empire
Shadow Stranger Bridge Carnival Desert Mountain Kitchen Violin Widow Soldier Courier Prophet Detective
Dancer Pilot Sailor Ghost Machine Orbit Horizon Fortress Meadow Cellar Ballroom""".split()


@dataclass
class Person:
    name: str
    genres: tuple[str, ...]  # the genres this person works in
    era: int  # centre of the working life, a year
    fame: float  # sampling weight: famous people recur more
    country: str


@dataclass
class Taste:
    genres: list[str]
    decades: list[str]
    actors: list[str]
    directors: list[str]


def _people(rng: random.Random, n: int, names: list[str], genre_w: list[float]) -> list[Person]:
    out = []
    for k in range(n):
        genres = tuple(dict.fromkeys(rng.choices(GENRES, genre_w, k=2)))
        fame = 1.0 / (k + 3) ** 0.7  # Zipf-like: a few people work a lot
        out.append(Person(names.pop(), genres, rng.randint(1955, 2015), fame, rng.choice(list(COUNTRY_LANGUAGE))))
    rng.shuffle(out)  # fame must not follow name order
    return out


def _pick(rng: random.Random, people: list[Person], genres, year: int, k: int) -> list[str]:
    """k distinct people who work in one of `genres` near `year` (anyone, if none fits)."""
    fit = [p for p in people if set(p.genres) & set(genres) and abs(p.era - year) <= 15] or people
    chosen: list[str] = []
    while len(chosen) < min(k, len(fit)):
        p = rng.choices(fit, [p.fame for p in fit])[0]
        if p.name not in chosen:
            chosen.append(p.name)
    return chosen


def make_catalogue(rng: random.Random, n_items: int) -> tuple[list[Item], dict[str, Person]]:
    genre_w = [rng.uniform(0.5, 2.0) for _ in GENRES]
    n_dir, n_wri, n_act = max(8, n_items // 6), max(8, n_items // 5), max(12, n_items // 2)
    names = sorted({f"{f} {l}" for f in FIRST for l in LAST})
    if n_dir + n_wri + n_act > len(names):  # large catalogues: add middle initials
        names += sorted(f"{f} {m}. {l}" for m in "ABCDEFGHJKLMNPRSTVW" for f in FIRST for l in LAST)
    rng.shuffle(names)
    directors = _people(rng, n_dir, names, genre_w)
    writers = _people(rng, n_wri, names, genre_w)
    actors = _people(rng, n_act, names, genre_w)
    titles: set[str] = set()
    items = []
    for k in range(n_items):
        genres = list(dict.fromkeys(rng.choices(GENRES, genre_w, k=rng.choice([1, 2, 2, 3]))))
        year = min(2019, int(1950 + 70 * rng.random() ** 0.8))
        director = _pick(rng, directors, genres, year, 1)[0]
        home = next(p.country for p in directors if p.name == director)
        writer = [director] if rng.random() < 0.25 else _pick(rng, writers, genres, year, rng.choice([1, 1, 2]))
        starring = _pick(rng, actors, genres, year, 3)
        country = home if rng.random() < 0.8 else rng.choice(list(COUNTRY_LANGUAGE))
        language = COUNTRY_LANGUAGE[country] if rng.random() < 0.9 else rng.choice(sorted(set(COUNTRY_LANGUAGE.values())))
        while True:
            a, n, m = rng.choice(ADJ), rng.choice(NOUN), rng.choice(NOUN)
            name = rng.choice([f"The {a} {n}", f"{a} {n}", f"The {n} of {m}s", f"{n} and {m}", f"The {a} {n}s"])
            title = f"{name} ({year})"
            if title not in titles and n != m:
                titles.add(title)
                break
        attrs = {
            "genre": genres, "director": [director], "writer": writer, "starring": starring,
            "year": [str(year)], "decade": [f"{year // 10 * 10}s"], "country": [country], "language": [language],
        }
        items.append(Item(f"m{k:04d}", title, attrs))
    return items, {p.name: p for p in directors + writers + actors}


def make_users(rng: random.Random, n_users: int, items: list[Item]) -> tuple[list[User], dict[str, Taste]]:
    # Each demographic value leans towards a few genres (drawn at random: no stereotypes baked in).
    lean = {v: rng.sample(GENRES, 3) for v in ["female", "male"] + AGES + OCCUPATIONS}
    by_genre: dict[str, list[Item]] = {g: [] for g in GENRES}
    for it in items:
        for g in it.attributes["genre"]:
            by_genre[g].append(it)
    users, tastes = [], {}
    for k in range(n_users):
        u = User(f"u{k:04d}", rng.choice(["female", "male"]), rng.choice(AGES), rng.choice(OCCUPATIONS))
        pool = lean[u.gender] + lean[u.age] + lean[u.occupation] + GENRES  # leaning genres count double
        genres = list(dict.fromkeys(rng.sample(pool, 3)))[:2]
        decades = [AGE_DECADE[u.age]] if rng.random() < 0.7 else []
        decades.append(rng.choice(DECADES))
        liked = [it for g in genres for it in by_genre[g]]
        actors = [rng.choice(rng.choice(liked).attributes["starring"]) for _ in range(2)] if liked else []
        directors = [rng.choice(liked).attributes["director"][0]] if liked else []
        users.append(u)
        tastes[u.user_id] = Taste(genres, list(dict.fromkeys(decades)), actors, directors)
    return users, tastes


def make_histories(rng: random.Random, users: list[User], tastes: dict[str, Taste], items: list[Item],
                   lo: int, hi: int) -> dict[str, list[str]]:
    """Each user watches in themed sessions drawn from their tastes, plus some popular strays."""
    pop = [1.0 / (r + 10) ** 0.8 for r in range(len(items))]
    rng.shuffle(pop)
    by_pair: dict[tuple[str, str], list[int]] = {}  # (relation, value) -> item rows, catalogue order
    for k, it in enumerate(items):
        for rel, vals in it.attributes.items():
            for v in vals:
                by_pair.setdefault((rel, v), []).append(k)
    histories = {}
    for u in users:
        t = tastes[u.user_id]

        def affinity(it: Item) -> float:
            a = it.attributes
            return (1.5 * len(set(t.genres) & set(a["genre"])) + 1.0 * (a["decade"][0] in t.decades)
                    + 2.0 * len(set(t.actors) & set(a["starring"])) + 2.0 * (a["director"][0] in t.directors))

        weight = [math.exp(affinity(it)) * p for it, p in zip(items, pop)]
        themes = ([("genre", g) for g in t.genres] + [("decade", d) for d in t.decades]
                  + [("starring", a) for a in t.actors] + [("director", d) for d in t.directors])
        target, seen, hist = rng.randint(lo, hi), set(), []
        stall = 0
        while len(hist) < target and stall < 50:
            if rng.random() < 0.15:  # a popular stray between sessions
                pick = rng.choices(range(len(items)), pop)[0]
                if pick not in seen:
                    seen.add(pick)
                    hist.append(pick)
                continue
            rel, val = rng.choice(themes)
            if rng.random() < 0.4 and rel == "genre" and t.decades:
                extra = ("decade", rng.choice(t.decades))
            else:
                extra = None
            fit = [k for k in by_pair.get((rel, val), []) if k not in seen
                   and (extra is None or extra[1] in items[k].attributes[extra[0]])]
            if len(fit) < 2:
                stall += 1
                continue
            for _ in range(min(len(fit), rng.randint(2, 6), target - len(hist))):
                pick = rng.choices(fit, [weight[k] for k in fit])[0]
                fit.remove(pick)
                seen.add(pick)
                hist.append(pick)
        histories[u.user_id] = [items[k].item_id for k in hist]
    return histories


def build(out: str, *, seed: int = 0, n_items: int = 600, n_users: int = 300, per_type: int = 200,
          test_frac: float = 0.2, history_min: int = 20, history_max: int = 60, max_gt: int = 10,
          split_by: str = "component") -> dict:
    """Generate the world and write it to `out`. Returns the query-builder report. The split is by
    component unless split_by="query" (querygen.build_queries); the world itself does not depend on it."""
    rng = random.Random(seed)
    items, _ = make_catalogue(rng, n_items)
    users, tastes = make_users(rng, n_users, items)
    histories = make_histories(rng, users, tastes, items, history_min, history_max)
    queries, report = build_queries(items, histories, {u.user_id: u for u in users},
                                    per_type=per_type, seed=seed, test_frac=test_frac, max_gt=max_gt,
                                    split_by=split_by)
    # Timestamps: one event every 1-3 days from 2000-01-01, per user.
    rows = []
    for u in users:
        t = 946684800 + rng.randint(0, 86400 * 365)
        for iid in histories[u.user_id]:
            t += rng.randint(86400, 3 * 86400)
            rows.append((u.user_id, iid, t))
    write_dataset(out, items, rows, queries, users)
    return report


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (same arguments -> byte-identical files)")
    p.add_argument("--items", type=int, default=600, help="catalogue size")
    p.add_argument("--users", type=int, default=300, help="number of users")
    p.add_argument("--per-type", type=int, default=200, help="queries of each type (train + test)")
    p.add_argument("--test-frac", type=float, default=0.2, help="share of each type held out for test")
    p.add_argument("--history-min", type=int, default=20, help="shortest user history")
    p.add_argument("--history-max", type=int, default=60, help="longest user history")
    p.add_argument("--max-gt", type=int, default=10, help="most ground-truth items per query")
    add_split_argument(p)
    p.set_defaults(run=_run)


def _run(args) -> None:
    t0 = time.perf_counter()
    report = build(args.out, seed=args.seed, n_items=args.items, n_users=args.users, per_type=args.per_type,
                   test_frac=args.test_frac, history_min=args.history_min, history_max=args.history_max,
                   max_gt=args.max_gt, split_by=args.split_by)
    for k, v in report.items():
        print(f"  {k}: {v}")
    print(f"built in {time.perf_counter() - t0:.1f}s")
