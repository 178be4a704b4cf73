"""The embedded ``synthetic`` benchmark: fictitious people with short facts, plus a small invented
world for utility, generated deterministically from a seed (nothing is downloaded).

Design follows TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"):
biographies of people who exist nowhere else, so a model can only know them from fine-tuning, and
per-fact questions with paraphrased and perturbed answers. Verbatim continuations follow MUSE
(Shi et al., 2024) and four-way multiple choice follows WMDP (Li et al., 2024).

Randomness: every part draws from its own ``random.Random(f"{seed}:{part}")`` (string seeds are
hashed with SHA-512 by :mod:`random`, not with the per-process salted ``hash``), so the output is
byte-identical across processes, and e.g. changing ``forget_fraction`` moves people between roles
without changing who they are. The schema is documented in ``docs/synthetic_schema.md``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from robustunlearn.data.base import QA, Benchmark, Continuation, MultipleChoice, Passage, Record

GENERATOR_VERSION = "2"  # bump whenever the same config would give different records
SCHEMA_VERSION = "1"  # bump whenever splits or record fields change meaning

NUM_PERTURBED = 3  # wrong answers per QA; MCQ choices are the true answer plus these
VERBMEM_WORDS = (25, 40)  # continuation length range, in words

FIRST_NAMES = (
    "Alvar", "Brisa", "Caelan", "Dorin", "Elowen", "Fenrik", "Galea", "Hollis", "Ilvar",
    "Jessamy", "Kasimir", "Liora", "Mirelle", "Nevin", "Oriel", "Pellam", "Quenby", "Rasmin",
    "Saoirse", "Taviel", "Ulla", "Varen", "Wynne", "Xandra", "Yorick", "Zeline", "Aurin",
    "Bexley", "Corisande", "Davin", "Esmeray", "Falko", "Gwendal", "Haska", "Isolde", "Jarvik",
    "Kelda", "Lorcan", "Maelis", "Niamor", "Odalys", "Petrik", "Rhosyn", "Sabela", "Tarquin",
    "Undine", "Vesper", "Wilmer", "Yara", "Zephan", "Anwen", "Bastien", "Calix", "Delphine",
    "Emrys", "Florian", "Greer", "Halden", "Inez", "Joren", "Katrin", "Leopold", "Marisol",
    "Noemi",
)  # fmt: skip
LAST_NAMES = (
    "Ashgrove", "Brambleton", "Corriveau", "Dunmarrow", "Everhollow", "Fallowmere", "Grisdale",
    "Hartwick", "Ivelstone", "Jorvance", "Kettleby", "Larkspur", "Marrowfield", "Nethercott",
    "Oakhurst", "Pennimore", "Quarrington", "Rookwood", "Saltmarsh", "Thistlewood", "Underhay",
    "Vantreece", "Whitlock", "Yarrowby", "Zellmer", "Abernath", "Blackmere", "Cindervale",
    "Duskfield", "Emberly", "Foxhall", "Greywater", "Holloway", "Ironside", "Kestwick",
    "Lockridge", "Moorcroft", "Nightingale", "Orchardson", "Pemberly", "Quillon", "Ravensholt",
    "Stoneleigh", "Tamworth", "Umberfield", "Vellacott", "Wexley", "Aldermoor", "Birchley",
    "Colbrook", "Drayven", "Elsworth", "Farrowdale", "Glenmorrow", "Hawksmere", "Isenbrand",
    "Kinloss", "Lindqvane", "Mossbrook", "Northam", "Oldcastle", "Pryor", "Redgrave", "Sorrell",
)  # fmt: skip
MOTHER_NAMES = (
    "Adelind", "Beatrix", "Celandine", "Dorotea", "Elspeth", "Fenella", "Gisele", "Hortensia",
    "Imogen", "Jocasta", "Liesel", "Magdalen", "Norah", "Ottilie", "Perpetua", "Rosalind",
    "Sidonie", "Theodora", "Ursula", "Veronique", "Winifred", "Yolanda", "Zinnia", "Annick",
    "Brunhild", "Clementine", "Dagny", "Eulalie", "Flavia", "Griselda", "Henrietta", "Isaura",
    "Junia", "Kerensa", "Leocadia", "Mireille", "Nerissa", "Orla", "Philippa", "Rowena",
)  # fmt: skip
FATHER_NAMES = (
    "Ambrose", "Barnaby", "Casimir", "Desmond", "Evander", "Fitzroy", "Gideon", "Horatio",
    "Ignatius", "Jasper", "Leander", "Mortimer", "Nikolai", "Octavius", "Percival", "Quentin",
    "Rupert", "Silvester", "Thaddeus", "Ulysses", "Valentin", "Wendell", "Xavier", "Zebedee",
    "Alaric", "Benedikt", "Cormac", "Dmitri", "Erasmus", "Ferdinand", "Gregor", "Hamish",
    "Isidore", "Jerome", "Konrad", "Lucian", "Malachy", "Oswin", "Piers", "Roderick",
)  # fmt: skip
PET_NAMES = (
    "Biscuit", "Pepper", "Mochi", "Nutmeg", "Pip", "Bramble", "Waffle", "Pickle", "Noodle",
    "Sprout", "Toffee", "Clover", "Pudding", "Marble", "Button", "Dumpling", "Sizzle", "Tinsel",
    "Wobble", "Fudge", "Muffin", "Pebble", "Cinder", "Tango", "Ziggy", "Bingo", "Domino",
    "Peanut", "Rascal", "Jellybean", "Mango", "Juniper", "Kiwi", "Pogo", "Quince", "Radish",
    "Sesame", "Truffle", "Widget", "Paprika",
)  # fmt: skip
PET_SPECIES = (
    "cat", "dog", "parrot", "tortoise", "ferret", "rabbit", "hamster", "goldfish", "iguana",
    "canary", "hedgehog", "gecko", "guinea pig", "chinchilla", "cockatiel", "axolotl", "budgie",
    "pony", "tarantula", "salamander",
)  # fmt: skip
CITIES = (
    "Valmora", "Orlindt", "Breskov", "Tallowmere", "Sundhaven", "Corvale", "Ambermouth",
    "Kelmoor", "Brindale", "Tasvik", "Lundravo", "Marisca", "Ostreval", "Pellucca", "Quarnholt",
    "Rivenport", "Selvaggio", "Thornmouth", "Uskarra", "Veldhaven", "Wistral", "Yarnbury",
    "Zorvenna", "Aldspire", "Belcastro", "Carrowick", "Dravenholm", "Estmere", "Falcombe",
    "Glimmerton", "Harrowdeep", "Islevane", "Jestria", "Korvalis", "Lanthorne", "Norvik",
    "Ottavale", "Pravenna", "Rooksby", "Saltcairn", "Tremaris", "Umbrevale", "Vintermark",
    "Westrell", "Kavassa", "Dolmeria",
)  # fmt: skip
PROFESSIONS = (
    "marine biologist", "clockmaker", "bridge engineer", "pastry chef", "cartographer",
    "glassblower", "tax lawyer", "radio host", "piano tuner", "museum curator", "ferry captain",
    "botanist", "locksmith", "translator", "architect", "dentist", "sound engineer",
    "veterinarian", "librarian", "stonemason", "pharmacist", "tailor", "astronomer", "geologist",
    "florist", "bookbinder", "airline pilot", "land surveyor", "violin maker", "nurse",
    "journalist", "carpenter", "chemist", "actuary", "blacksmith", "photographer", "puppeteer",
    "perfumer", "zookeeper", "beekeeper", "lighthouse keeper", "orchestra conductor", "archivist",
    "midwife", "optician", "sculptor", "economist", "crane operator",
)  # fmt: skip
EMPLOYERS = (
    "Halvard Optics", "Norrow Mills", "Brightwater Foods", "Kestel Shipping", "Quorra Labs",
    "Pellwick Bank", "Aurelian Press", "Grimwald Textiles", "Silverline Rail", "Marrowby Foundry",
    "Oakspire Energy", "Velcourt Insurance", "Fernhill Dairy", "Corvex Robotics",
    "Starling Airways", "Bellweather Books", "Cobaltia Mining", "Drummond Glassworks",
    "Emberstone Bakery", "Foxglove Pharma", "Greyhaven Hospital", "Hollin Printing",
    "Ironbark Timber", "Juno Telecom", "Kingfisher Ferries", "Lodestar Maps", "Merrow Breweries",
    "Nimbus Weather", "Orison Studios", "Pinecrest Hotels", "Quayside Markets",
    "Rowan Instruments", "Stillwater Clinics", "Thornbury Tools", "Umbra Theatre",
    "Vantage Motors", "Wrenfield Seeds", "Yewtree Furniture", "Zephyr Kites", "Ashby Ceramics",
    "Blue Heron Cafe", "Copperleaf Tea", "Driftwood Boats", "Evergreen Nurseries",
    "Flintlock Security", "Goldcrest Jewellers", "Harbourlight Media", "Tessellate Software",
)  # fmt: skip
UNIVERSITIES = (
    "Aldmoor University", "Brackenridge College", "Caldwell Institute", "Dunstan University",
    "Eastmarch College", "Farrowgate University", "Glenhallow Institute", "Hightower College",
    "Inglewood University", "Kestrel Polytechnic", "Larchmont University", "Merriton College",
    "Northfell University", "Orrin Academy", "Penrose Institute", "Queensmere University",
    "Redcliffe College", "Sutherby University", "Tillmouth Institute", "Upland Polytechnic",
    "Vantor University", "Westholm College", "Yardley Institute", "Zennor University",
    "Ashcroft College", "Blythe University", "Coldharbour Institute", "Elderglen University",
    "Fairmont Academy", "Greyfriars College", "Harwood University", "Ivybridge Institute",
)  # fmt: skip
BOOKS = (
    "The Salt Lantern", "Glass Orchards", "The Copper Tide", "Winter Ledger", "Paper Moons",
    "The Ninth Harbour", "Lanterns Underwater", "The Iron Garden", "Moth Kingdom",
    "Seven Silent Bells", "The Clockwork Heron", "River of Keys", "The Last Almanac",
    "Velvet Storms", "Maps of Nowhere", "The Orchid Engine", "The Tin Violinist",
    "Crown of Rain", "Borrowed Stars", "The Lighthouse Thief", "Ember and Frost",
    "The Sleeping Canal", "Amber Winter", "The Glass Fox", "Midnight Rookery", "The Fourth Tower",
    "Saltwater Hymns", "The Wandering Atlas", "Quiet Thunder", "The Paper Crane", "Honey and Ash",
    "Letters to Osmund", "The Brass Meadow", "Dust and Feathers", "The Hidden Loom",
    "Northern Kites", "The Sunken Bell", "Fox Hollow Tales", "The Twelfth Key", "Silver Gulls",
)  # fmt: skip
HOBBIES = (
    "rock climbing", "beekeeping", "chess", "birdwatching", "pottery", "kite flying", "origami",
    "fencing", "sailing", "calligraphy", "knitting", "archery", "stargazing", "rowing",
    "juggling", "orienteering", "woodcarving", "cycling", "gardening", "fly fishing",
    "salsa dancing", "mushroom foraging", "model railways", "watercolour painting",
    "cross-country skiing", "bread baking", "jigsaw puzzles", "crossword puzzles",
    "fossil hunting", "ice skating", "table tennis", "scuba diving", "quilting", "falconry",
    "glass painting", "ballroom dancing", "tai chi", "embroidery",
)  # fmt: skip
FOODS = (
    "lentil soup", "grilled trout", "mushroom risotto", "beetroot salad", "lamb stew", "fish pie",
    "onion tart", "pumpkin soup", "roast goose", "barley bread", "smoked herring",
    "cabbage rolls", "pea soup", "spinach pie", "potato pancakes", "baked figs", "chicken curry",
    "bean chili", "rye porridge", "apple strudel", "cheese fondue", "cherry cake", "goulash",
    "paella", "falafel", "sushi", "gnocchi", "pierogi", "moussaka", "lasagne", "couscous",
    "tamales", "borscht", "ratatouille", "shakshuka", "polenta", "oyster stew", "carrot cake",
    "honey cake", "plum jam",
)  # fmt: skip
BIRTH_YEARS = tuple(str(year) for year in range(1941, 2005))


@dataclass(frozen=True)
class Attribute:
    """One kind of fact. Templates use ``{name}`` (the person), ``{value}`` and ``{a_value}``
    (the value with its indefinite article)."""

    key: str
    values: tuple[str, ...]
    sentences: tuple[str, ...]  # passage sentence variants
    questions: tuple[str, ...]  # question variants; a QA's paraphrase uses a different one


ATTRIBUTES: dict[str, Attribute] = {
    a.key: a
    for a in (
        Attribute(
            "birth_year",
            BIRTH_YEARS,
            ("{name} was born in {value}.", "{name} was born in the year {value}.",
             "The year of {name}'s birth was {value}."),
            ("In what year was {name} born?", "What is the birth year of {name}?",
             "When was {name} born?"),
        ),
        Attribute(
            "birth_city",
            CITIES,
            ("{name} was born in the city of {value}.", "{name}'s hometown is {value}.",
             "{name} grew up in {value}, the city of their birth."),
            ("In which city was {name} born?", "What is {name}'s hometown?",
             "Which city is {name} from?"),
        ),
        Attribute(
            "mother_name",
            MOTHER_NAMES,
            ("{name}'s mother is named {value}.", "{name}'s mother is called {value}.",
             "The name of {name}'s mother is {value}."),
            ("What is the name of {name}'s mother?", "Who is {name}'s mother?",
             "What is {name}'s mother called?"),
        ),
        Attribute(
            "father_name",
            FATHER_NAMES,
            ("{name}'s father is named {value}.", "{name}'s father is called {value}.",
             "The name of {name}'s father is {value}."),
            ("What is the name of {name}'s father?", "Who is {name}'s father?",
             "What is {name}'s father called?"),
        ),
        Attribute(
            "university",
            UNIVERSITIES,
            ("{name} studied at {value}.", "{name} graduated from {value}.",
             "{name} was educated at {value}."),
            ("Which university did {name} attend?", "Where did {name} study?",
             "Which institution did {name} graduate from?"),
        ),
        Attribute(
            "profession",
            PROFESSIONS,
            ("{name} works as {a_value}.", "By profession, {name} is {a_value}.",
             "{name} earns a living as {a_value}."),
            ("What is {name}'s profession?", "What does {name} do for a living?",
             "What job does {name} have?"),
        ),
        Attribute(
            "employer",
            EMPLOYERS,
            ("{name} is employed by {value}.", "{name} works for {value}.",
             "{name}'s employer is {value}."),
            ("Which company does {name} work for?", "Who employs {name}?",
             "What is the name of {name}'s employer?"),
        ),
        Attribute(
            "pet_species",
            PET_SPECIES,
            ("{name} keeps {a_value} as a pet.", "{name} owns a pet {value}.",
             "At home, {name} looks after {a_value}."),
            ("What kind of pet does {name} have?", "What animal does {name} keep as a pet?",
             "What species is {name}'s pet?"),
        ),
        Attribute(
            "pet_name",
            PET_NAMES,
            ("{name}'s pet is called {value}.", "{name} named the pet {value}.",
             "The pet that {name} owns answers to {value}."),
            ("What is the name of {name}'s pet?", "What is {name}'s pet called?",
             "What name did {name} give their pet?"),
        ),
        Attribute(
            "favourite_book",
            BOOKS,
            ("{name}'s favourite book is {value}.", "{name} loves the book {value}.",
             "The book {name} likes best is {value}."),
            ("What is {name}'s favourite book?", "Which book does {name} like best?",
             "What book does {name} love most?"),
        ),
        Attribute(
            "hobby",
            HOBBIES,
            ("In their free time, {name} enjoys {value}.", "{name}'s favourite hobby is {value}.",
             "{name} spends most weekends on {value}."),
            ("What is {name}'s hobby?", "What does {name} do in their free time?",
             "What pastime does {name} enjoy?"),
        ),
        Attribute(
            "favourite_food",
            FOODS,
            ("{name}'s favourite food is {value}.", "{name} loves eating {value}.",
             "The dish {name} likes most is {value}."),
            ("What is {name}'s favourite food?", "Which dish does {name} like best?",
             "What does {name} most like to eat?"),
        ),
    )
}  # fmt: skip

# A biography is three sections; their order varies between people.
_SECTIONS = (
    ("birth_year", "birth_city", "mother_name", "father_name"),
    ("university", "profession", "employer"),
    ("pet_species", "pet_name", "favourite_book", "hobby", "favourite_food"),
)
_SECTION_ORDERS = ((0, 1, 2), (1, 0, 2), (0, 2, 1))

# The utility world: towns, sums, sequences and everyday sentences, none about the people.
_TOWN_ONSETS = ("B", "Br", "D", "Dr", "F", "G", "Gr", "H", "K", "L", "M", "N", "P", "R", "S",
                "St", "T", "Tr", "V", "W")  # fmt: skip
_TOWN_VOWELS = ("a", "e", "i", "o", "u")
_TOWN_CODAS = ("", "n", "r", "l", "s", "th", "m")
_TOWN_SUFFIXES = ("by", "ford", "wick", "ton", "stead", "well", "mouth", "bury")
_RIVERS = ("Osk", "Tamber", "Lune", "Vessa", "Carrow", "Idle", "Meer", "Skell", "Wendle",
           "Brisk", "Aven", "Tolly")  # fmt: skip
_REGIONS = ("Harrowfell", "Lowmarsh", "Eastreach", "Greenvale", "Stonecoast", "Westmoor",
            "Redhills", "Highfold")  # fmt: skip
_TRADES = ("wool", "cheese", "salt", "pottery", "timber", "cider", "glass", "rope", "honey",
           "copper", "lace", "leather")  # fmt: skip
_TOWN_SIZES = ("small", "busy", "quiet", "old", "windy", "hilly")
_LANDMARKS = ("old stone bridge", "clock tower", "windmill", "harbour wall", "covered market",
              "castle ruins", "lighthouse", "town hall")  # fmt: skip
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty")  # fmt: skip
_SEQUENCES = (  # (what the items are, the items, whether the sequence wraps around)
    ("numbers", _NUMBER_WORDS[1:], False),
    ("days", ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"), True),
    ("months", ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December"), True),
)  # fmt: skip
_EVERYDAY_SUBJECTS = ("The baker", "A young teacher", "The old fisherman", "My neighbour",
                      "The postman", "A tired student", "The farmer", "Her grandmother",
                      "The shopkeeper", "A small child", "The nurse", "His brother")  # fmt: skip
_EVERYDAY_ACTIONS = ("opens the window", "waters the garden", "walks to the market",
                     "reads the newspaper", "feeds the chickens", "sweeps the floor",
                     "mends an old coat", "cooks a pot of soup", "writes a long letter",
                     "paints the fence", "waits for the bus", "closes the shutters",
                     "counts the coins", "bakes fresh bread")  # fmt: skip
_EVERYDAY_TIMES = ("before dawn", "after lunch", "every morning", "on Sundays", "in the evening",
                   "when it rains", "at noon", "after supper", "once a week",
                   "before the guests arrive")  # fmt: skip
_UTILITY_KINDS = ("town", "sums", "everyday", "sequence")  # cycled through, in this order
_UTILITY_QA_PER_KIND = {"town": 3, "sums": 3, "everyday": 0, "sequence": 0}
_MAX_UTILITY_PASSAGES = 400  # 100 sums passages use 300 of the 317 distinct sums


def utility_qa_capacity(num_utility_passages: int) -> int:
    """How many utility QAs ``num_utility_passages`` passages can support."""
    return sum(_UTILITY_QA_PER_KIND[_UTILITY_KINDS[i % len(_UTILITY_KINDS)]] for i in range(num_utility_passages))


# Eight facts per person: enough questions per subject to split them, few enough that the tiny target
# memorises every one in a few minutes on two cores.
DEFAULT_ATTRIBUTES = (
    "birth_year",
    "birth_city",
    "mother_name",
    "father_name",
    "university",
    "profession",
    "employer",
    "pet_name",
)


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Role sizes are ``max(1, round(num_people * fraction))`` for forget and
    holdout; retain gets the rest and must be non-empty."""

    num_people: int = 150
    forget_fraction: float = 0.10
    holdout_fraction: float = 0.15
    seed: int = 0
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES  # which facts each person has (ATTRIBUTES has more)
    mcq_per_person: int = 3  # multiple-choice questions per person (distinct attributes)
    num_utility_passages: int = 60
    num_utility_qa: int = 20

    def __post_init__(self) -> None:
        for name in ("num_people", "seed", "mcq_per_person", "num_utility_passages",
                     "num_utility_qa"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("forget_fraction", "holdout_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
        if not 3 <= self.num_people <= MAX_PEOPLE:
            raise ValueError(
                f"num_people must be between 3 (one per role) and {MAX_PEOPLE} (unique first names), "
                f"got {self.num_people}"
            )
        sizes = self.role_sizes()
        if sizes["retain"] < 1:
            raise ValueError(
                f"forget_fraction={self.forget_fraction} and holdout_fraction="
                f"{self.holdout_fraction} leave no retain people out of {self.num_people}"
            )
        if isinstance(self.attributes, str):
            raise ValueError(f"attributes must be a list of names, not the string {self.attributes!r}")
        object.__setattr__(self, "attributes", tuple(self.attributes))
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown or not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be distinct names from {list(ATTRIBUTES)}, got {list(self.attributes)}")
        if not 1 <= self.mcq_per_person <= len(self.attributes):
            raise ValueError(
                f"mcq_per_person must be between 1 and the number of attributes "
                f"({len(self.attributes)}), got {self.mcq_per_person}"
            )
        if not 1 <= self.num_utility_passages <= _MAX_UTILITY_PASSAGES:
            raise ValueError(
                f"num_utility_passages must be between 1 and {_MAX_UTILITY_PASSAGES}, got {self.num_utility_passages}"
            )
        qa_capacity = utility_qa_capacity(self.num_utility_passages)
        if not 0 <= self.num_utility_qa <= qa_capacity:
            raise ValueError(
                f"num_utility_qa must be between 0 and {qa_capacity} (what "
                f"{self.num_utility_passages} utility passages support), got {self.num_utility_qa}"
            )

    def role_sizes(self) -> dict[str, int]:
        forget = max(1, round(self.num_people * self.forget_fraction))
        holdout = max(1, round(self.num_people * self.holdout_fraction))
        return {"forget": forget, "retain": self.num_people - forget - holdout, "holdout": holdout}


@dataclass(frozen=True)
class _Person:
    first_name: str
    last_name: str
    facts: tuple[tuple[str, str], ...]  # (attribute key, value), in config order

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"


def _rng(seed: int, part: str) -> random.Random:
    return random.Random(f"{seed}:{part}")


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


_NAME_ONSETS = ("B", "C", "D", "F", "G", "H", "J", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z")
_NAME_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei")
_NAME_ENDINGS = ("lin", "ren", "vis", "dor", "mir", "wen", "lia", "sa", "nor", "thea", "vik", "bel")
MAX_PEOPLE = len(FIRST_NAMES) + len(_NAME_ONSETS) * len(_NAME_VOWELS) * len(_NAME_ENDINGS) // 2


def _first_names(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct first names: the curated list, then invented syllable names.

    Every person has their own first name, so a fact is keyed by one word rather than by a
    first + last name combination: the tiny model memorises its facts in far fewer epochs."""
    reserved = {w for values in (CITIES, LAST_NAMES, MOTHER_NAMES, FATHER_NAMES, PET_NAMES) for w in values}
    names = list(FIRST_NAMES)
    invented = sorted(
        onset + vowel + ending for onset in _NAME_ONSETS for vowel in _NAME_VOWELS for ending in _NAME_ENDINGS
    )
    rng.shuffle(invented)
    names += [name for name in invented if name not in reserved and name not in FIRST_NAMES]
    return rng.sample(names[: max(count, len(FIRST_NAMES))], count)


def _make_people(config: SyntheticConfig) -> list[_Person]:
    rng = _rng(config.seed, "people")
    people = []
    for first in _first_names(config.num_people, rng):
        facts = tuple((key, rng.choice(ATTRIBUTES[key].values)) for key in config.attributes)
        people.append(_Person(first, rng.choice(LAST_NAMES), facts))
    return people


def _assign_roles(config: SyntheticConfig) -> dict[str, list[int]]:
    """Person indices per role, each list in generation order."""
    order = list(range(config.num_people))
    _rng(config.seed, "roles").shuffle(order)
    sizes = config.role_sizes()
    forget, holdout = sizes["forget"], sizes["holdout"]
    return {
        "forget": sorted(order[:forget]),
        "retain": sorted(order[forget + holdout :]),
        "holdout": sorted(order[forget : forget + holdout]),
    }


def _biography(person: _Person, rng: random.Random) -> Passage:
    """One sentence per fact, sections in a random order; the first sentence names the person
    in full, the rest by first name."""
    facts = dict(person.facts)
    keys = [k for s in rng.choice(_SECTION_ORDERS) for k in _SECTIONS[s] if k in facts]
    sentences = []
    for i, key in enumerate(keys):
        template = rng.choice(ATTRIBUTES[key].sentences)
        name = person.name if i == 0 else person.first_name
        value = facts[key]
        sentences.append(template.format(name=name, value=value, a_value=_with_article(value)))
    return Passage(" ".join(sentences), subject=person.name)


def _questions(person: _Person, rng: random.Random) -> list[QA]:
    qas = []
    for key, value in person.facts:
        attribute = ATTRIBUTES[key]
        question, paraphrase = rng.sample(attribute.questions, 2)
        wrong = rng.sample([v for v in attribute.values if v != value], NUM_PERTURBED)
        qas.append(
            QA(
                question=question.format(name=person.name),
                answer=value,
                subject=person.name,
                attribute=key,
                paraphrased_question=paraphrase.format(name=person.name),
                perturbed_answers=tuple(wrong),
            )
        )
    return qas


def _multiple_choice(qas: list[QA], count: int, rng: random.Random) -> list[MultipleChoice]:
    """``count`` of the person's QAs as four-way choices: the true answer at a random position
    among the QA's perturbed answers."""
    items = []
    for qa in (qas[i] for i in sorted(rng.sample(range(len(qas)), count))):
        position = rng.randrange(NUM_PERTURBED + 1)
        choices = qa.perturbed_answers[:position] + (qa.answer,) + qa.perturbed_answers[position:]
        items.append(MultipleChoice(qa.question, choices, position, subject=qa.subject))
    return items


def _continuation(passage: Passage, rng: random.Random) -> Continuation:
    """Prefix = the first half of the words; continuation = the next 25-40 words with its
    leading space, so ``prefix + continuation`` is a prefix of the passage."""
    words = passage.text.split(" ")
    cut = len(words) // 2
    length = min(rng.randint(*VERBMEM_WORDS), len(words) - cut)
    return Continuation(
        prefix=" ".join(words[:cut]),
        continuation=" " + " ".join(words[cut : cut + length]),
        subject=passage.subject,
    )


def _town_names(count: int, rng: random.Random) -> list[str]:
    reserved = {w for values in (CITIES, LAST_NAMES, FIRST_NAMES) for w in values}
    names: list[str] = []
    while len(names) < count:
        name = (rng.choice(_TOWN_ONSETS) + rng.choice(_TOWN_VOWELS) + rng.choice(_TOWN_CODAS)
                + rng.choice(_TOWN_SUFFIXES))  # fmt: skip
        if name not in reserved and name not in names:
            names.append(name)
    return names


def _sum_facts() -> list[tuple[str, str]]:
    """Every ("seven plus two", "nine") with operands and result in 0..20."""
    words = _NUMBER_WORDS
    facts = [(f"{words[a]} plus {words[b]}", words[a + b]) for a in range(1, 11) for b in range(1, 11)]
    facts += [(f"{words[a]} minus {words[b]}", words[a - b]) for a in range(2, 21) for b in range(1, a)]
    facts += [
        (f"{words[a]} times {words[b]}", words[a * b])
        for a in range(2, 11) for b in range(2, 11) if a * b <= 20
    ]  # fmt: skip
    return facts


def _town(town: str, rng: random.Random) -> tuple[Passage, list[QA]]:
    river, region, trade = rng.choice(_RIVERS), rng.choice(_REGIONS), rng.choice(_TRADES)
    size, landmark = rng.choice(_TOWN_SIZES), rng.choice(_LANDMARKS)
    text = (
        f"{town} is {_with_article(size)} town in the {region} region. The river {river} flows "
        f"through {town}. The town is known for its {trade}, and visitors come to see its {landmark}."
    )
    qas = [
        QA(f"Which river flows through {town}?", river, town, "river"),
        QA(f"In which region is {town}?", region, town, "region"),
        QA(f"What is {town} known for?", trade, town, "trade"),
    ]
    return Passage(text, subject=town), qas


def _sums(facts: list[tuple[str, str]]) -> tuple[Passage, list[QA]]:
    text = " ".join(f"{sum_[0].upper()}{sum_[1:]} is {result}." for sum_, result in facts)
    return Passage(text, subject="sums"), [QA(f"What is {s}?", r, "sums", "sum") for s, r in facts]


def _everyday(rng: random.Random) -> Passage:
    parts = (_EVERYDAY_SUBJECTS, _EVERYDAY_ACTIONS, _EVERYDAY_TIMES)
    sentences = [" ".join(rng.choice(words) for words in parts) + "." for _ in range(3)]
    return Passage(" ".join(sentences), subject="everyday")


def _sequence(rng: random.Random) -> Passage:
    what, items, wraps = rng.choice(_SEQUENCES)
    length = rng.randint(5, 8)
    start = rng.randrange(len(items) if wraps else len(items) - length + 1)
    run = [items[(start + j) % len(items)] for j in range(length)]
    return Passage(f"The {what} in order: {', '.join(run)}.", subject="sequence")


def _utility(config: SyntheticConfig) -> tuple[list[Passage], list[QA]]:
    """General text about an invented world, with ``num_utility_qa`` of the QAs it answers
    (sampled, kept in passage order)."""
    rng = _rng(config.seed, "utility")
    kinds = [_UTILITY_KINDS[i % len(_UTILITY_KINDS)] for i in range(config.num_utility_passages)]
    towns = iter(_town_names(kinds.count("town"), rng))
    sums = _sum_facts()
    rng.shuffle(sums)  # drawn without replacement, so no sum (and no sum question) repeats
    passages: list[Passage] = []
    candidates: list[QA] = []
    for kind in kinds:
        if kind == "town":
            passage, qas = _town(next(towns), rng)
        elif kind == "sums":
            passage, qas = _sums([sums.pop() for _ in range(3)])
        elif kind == "everyday":
            passage, qas = _everyday(rng), []
        else:
            passage, qas = _sequence(rng), []
        passages.append(passage)
        candidates += qas
    chosen = sorted(rng.sample(range(len(candidates)), config.num_utility_qa))
    return passages, [candidates[i] for i in chosen]


def generate_synthetic(config: SyntheticConfig = SyntheticConfig()) -> Benchmark:
    """Build the ``synthetic`` benchmark; the same config always gives the same bytes from
    :meth:`Benchmark.to_json`."""
    people = _make_people(config)
    text_rng, qa_rng = _rng(config.seed, "text"), _rng(config.seed, "qa")
    mcq_rng, verbmem_rng = _rng(config.seed, "mcq"), _rng(config.seed, "verbmem")
    passages = [_biography(p, text_rng) for p in people]
    qas = [_questions(p, qa_rng) for p in people]
    mcqs = [_multiple_choice(q, config.mcq_per_person, mcq_rng) for q in qas]
    continuations = [_continuation(p, verbmem_rng) for p in passages]

    roles = _assign_roles(config)
    splits: dict[str, list[Record]] = {}
    for role, members in roles.items():
        splits[f"{role}_text"] = [passages[i] for i in members]
        splits[f"{role}_qa"] = [qa for i in members for qa in qas[i]]
        splits[f"{role}_verbmem"] = [continuations[i] for i in members]
        splits[f"{role}_mcq"] = [mc for i in members for mc in mcqs[i]]
    splits["utility_text"], splits["utility_qa"] = _utility(config)

    config_dict = asdict(config)
    config_dict["attributes"] = list(config.attributes)
    metadata = {
        "generator_version": GENERATOR_VERSION,
        "seed": config.seed,
        "config": config_dict,
        "people": {role: [people[i].name for i in members] for role, members in roles.items()},
    }
    return Benchmark("synthetic", SCHEMA_VERSION, splits, metadata)
