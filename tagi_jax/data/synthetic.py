"""The built-in instruction suite: procedurally generated tasks in natural-instructions format.

It is the dataset of the README demo, which trains a tiny byte-level TAGI model on a laptop CPU
in minutes and then evaluates it on tasks it never saw. Everything needed is in this module (a
fixed word list and the task rules); nothing is downloaded.

Each task applies one string rule from a *family* (letter replacement, word reversal, ...) with
one *parameter* (which letter, which separator, which word position, ...), and its Definition
states the rule and the parameter completely: the Definition alone determines every output.

The train/test split holds out parameters, not families. Every family appears in both splits, but
each (family, parameter) task is in exactly one, and every held-out parameter value is one the
model has met in training, only in another combination: "replace 'a' with 'e'" is a test task
while 'a' -> 'o' and 'e' -> 'a' are train tasks; the reversal family is tested with the
separators '/' and '_', which training only shows in the repetition family. A test task's input
distribution is its family's, so nothing about an input tells the model which output is wanted;
only reading the instruction and binding its parameter does. Test accuracy above the
family-level baseline (e.g. applying some train parameter of the family) therefore measures
instruction following rather than memorisation of the training tasks.

Layout written by ``write_suite`` (the upstream natural-instructions one, read by
``tagi_jax.data.ni``)::

    <out_dir>/tasks/<task_name>.json
    <out_dir>/splits/default/{train,test}_tasks.txt
    <out_dir>/suite.json        seed, parameters, version, task lists; written last

Task files are ``json.dumps(task, indent=4, ensure_ascii=False)`` with no trailing newline, as
upstream. Each task has 2 positive examples, 1 negative example and N instances with one output
each; inputs are at most 30 ASCII characters and outputs at most 32, so a byte-level model's
sequences stay short.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable

SUITE_VERSION = 1
MANIFEST = "suite.json"
MAX_INPUT_CHARS = 30
MAX_OUTPUT_CHARS = 32

# Common English words, lowercase ASCII, 3 to 7 letters, all distinct.
WORDS: tuple[str, ...] = (
    "able", "air", "animal", "answer", "apple", "around", "baby", "back", "ball", "bank",
    "bed", "bird", "black", "blue", "boat", "book", "box", "boy", "bread", "bridge",
    "brown", "call", "car", "card", "castle", "cat", "chair", "city", "cloud", "coat",
    "cold", "corn", "cup", "dark", "day", "desk", "dog", "door", "dream", "drink",
    "early", "earth", "east", "egg", "face", "farm", "fast", "field", "fire", "fish",
    "flower", "food", "forest", "friend", "game", "garden", "girl", "glass", "gold", "grass",
    "green", "hand", "happy", "hat", "horse", "house", "idea", "island", "jump", "key",
    "king", "lake", "lamp", "letter", "light", "lion", "long", "love", "milk", "money",
    "moon", "mother", "music", "night", "north", "ocean", "open", "orange", "paper", "party",
    "pencil", "pink", "plant", "rain", "red", "river", "road", "rock", "room", "salt",
    "sand", "school", "sea", "ship", "shoe", "silver", "sister", "small", "snow", "song",
    "south", "spring", "star", "stone", "storm", "street", "summer", "sun", "table", "tea",
    "tiger", "time", "train", "tree", "water", "west", "white", "wind", "window", "winter",
    "wolf", "word", "world", "yellow",
    # longer words, so the tasks on one long word ("the first five letters") have variety
    "basket", "bottle", "butter", "candle", "carpet", "circle", "dinner", "doctor", "dragon",
    "family", "finger", "jacket", "kitchen", "ladder", "market", "mirror", "monkey", "morning",
    "number", "picture", "planet", "pocket", "rabbit", "rocket", "ticket", "village",
)  # fmt: skip

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}
# separator -> (slug for task names, how a Definition names it)
SEPARATORS = {
    " ": ("space", "single spaces"),
    "-": ("hyphen", "the character '-' and no spaces"),
    ",": ("comma", "the character ',' and no spaces"),
    "+": ("plus", "the character '+' and no spaces"),
    "/": ("slash", "the character '/' and no spaces"),
    "_": ("underscore", "the character '_' and no spaces"),
}
_MAX_TRIES = 10_000
_DISTINCT_TRIES_PER_INPUT = 20
_MAX_COUNT = 3  # letter counting answers 0..3


class SuiteExistsError(FileExistsError):
    """``out_dir`` already holds a suite (or its paths) that this call would replace."""


@dataclasses.dataclass(frozen=True)
class SuiteSummary:
    train_tasks: tuple[str, ...]
    test_tasks: tuple[str, ...]
    categories: tuple[str, ...]
    train_instances: int
    test_instances: int


@dataclasses.dataclass(frozen=True)
class _TaskSpec:
    """One (family, parameter) task: its text and its rule."""

    name: str
    category: str
    definition: str
    rule: Callable[[str], str]
    draw: Callable[[random.Random], str]
    explain: Callable[[str, str], str]  # (input, output) -> why the output is right
    mistake: Callable[[str], tuple[str, str]]  # input -> (wrong output, why it is wrong)

    def sample(self, rng: random.Random) -> str:
        """An input within the size limits whose output differs from it (an input the rule
        leaves unchanged would teach copying, not the rule)."""
        for _ in range(_MAX_TRIES):
            text = self.draw(rng)
            output = self.rule(text)
            if output != text and len(text) <= MAX_INPUT_CHARS and len(output) <= MAX_OUTPUT_CHARS:
                return text
        raise RuntimeError(f"{self.name}: no usable input in {_MAX_TRIES} draws")


def _phrase(
    rng: random.Random, min_words: int, max_words: int, max_chars: int, must_contain: str = ""
) -> str:
    """Distinct words from WORDS joined by spaces (distinct, so word order is always visible)."""
    for _ in range(_MAX_TRIES):
        text = " ".join(rng.sample(WORDS, rng.randint(min_words, max_words)))
        if len(text) <= max_chars and must_contain in text:
            return text
    raise RuntimeError(f"no phrase of {min_words}-{max_words} words within {max_chars} chars")


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _letters(k: int) -> str:
    return "letter" if k == 1 else f"{NUMBERS[k]} letters"


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


# --- families: each builder returns the task of one parameter -----------------------------


def _letter_replacement(old: str, new: str) -> _TaskSpec:
    return _TaskSpec(
        name=f"synth_letter_replacement_{old}_to_{new}",
        category="Letter Replacement",
        definition=(
            f"Replace every letter '{old}' in the input with the letter '{new}' and keep all "
            "other characters as they are."
        ),
        rule=lambda text: text.replace(old, new),
        draw=lambda rng: _phrase(rng, 2, 3, 24, must_contain=old),
        explain=lambda text, out: f"Every '{old}' in the input becomes '{new}'.",
        mistake=lambda text: (text, f"The letter '{old}' was not replaced with '{new}'."),
    )


def _letter_deletion(letter: str) -> _TaskSpec:
    return _TaskSpec(
        name=f"synth_letter_deletion_{letter}",
        category="Letter Deletion",
        definition=(
            f"Delete every letter '{letter}' from the input and keep all other characters, "
            "spaces included, as they are."
        ),
        rule=lambda text: text.replace(letter, ""),
        draw=lambda rng: _phrase(rng, 2, 3, 24, must_contain=letter),
        explain=lambda text, out: f"Every '{letter}' is removed from the input.",
        mistake=lambda text: (text, f"The letter '{letter}' was not deleted."),
    )


def _letter_counting(letter: str) -> _TaskSpec:
    def draw(rng: random.Random) -> str:
        # The count is drawn first, uniformly in 0-3: random phrases mostly hold the letter
        # once, and a model that always answered "1" would look good.
        target = rng.randint(0, _MAX_COUNT)
        for _ in range(_MAX_TRIES):
            text = _phrase(rng, 1, 3, 24)
            if text.count(letter) == target:
                return text
        raise RuntimeError(f"no phrase holds the letter {letter!r} {target} times")

    def mistake(text: str) -> tuple[str, str]:
        n = text.count(letter)
        return str(n + 1), f"The letter '{letter}' appears {_times(n)} in the input, not {n + 1}."

    return _TaskSpec(
        name=f"synth_letter_counting_{letter}",
        category="Letter Counting",
        definition=(
            f"Count how many times the letter '{letter}' appears in the input and answer with "
            "that number as a single digit."
        ),
        rule=lambda text: str(text.count(letter)),
        draw=draw,
        explain=lambda text, out: f"The letter '{letter}' appears {_times(int(out))} in the input.",
        mistake=mistake,
    )


def _word_reversal(sep: str) -> _TaskSpec:
    slug, phrase = SEPARATORS[sep]
    return _TaskSpec(
        name=f"synth_word_reversal_{slug}",
        category="Word Reversal",
        definition=f"Reverse the order of the words in the input and join them with {phrase}.",
        rule=lambda text: sep.join(reversed(text.split())),
        draw=lambda rng: _phrase(rng, 2, 4, 28),
        explain=lambda text, out: f"The words are written last to first, joined by {phrase}.",
        mistake=lambda text: (
            sep.join(text.split()),
            "The words are joined correctly but their order was not reversed.",
        ),
    )


def _word_selection(k: int, from_end: bool) -> _TaskSpec:
    where = " counting from the end" if from_end else ""

    def ordered(text: str) -> list[str]:
        words = text.split()
        return words[::-1] if from_end else words

    def mistake(text: str) -> tuple[str, str]:
        words = ordered(text)
        wrong = words[k] if k < len(words) else words[k - 2]  # a neighbour of the right word
        return wrong, f"'{wrong}' is not the {ORDINALS[k]} word of the input{where}."

    return _TaskSpec(
        name=f"synth_word_selection_{ORDINALS[k]}{'_from_end' if from_end else ''}",
        category="Word Selection",
        definition=f"Output only the {ORDINALS[k]} word of the input{where}.",
        rule=lambda text: ordered(text)[k - 1],
        draw=lambda rng: _phrase(rng, 4, 5, MAX_INPUT_CHARS),
        explain=lambda text, out: f"'{out}' is the {ORDINALS[k]} word of the input{where}.",
        mistake=mistake,
    )


def _sorting(unit: str, descending: bool) -> _TaskSpec:
    order = "reverse alphabetical" if descending else "alphabetical"
    other = "alphabetical" if descending else "reverse alphabetical"
    letters = unit == "letters"

    def arrange(text: str, reverse: bool) -> str:
        return (
            "".join(sorted(text, reverse=reverse))
            if letters
            else " ".join(sorted(text.split(), reverse=reverse))
        )

    if letters:
        definition = f"Sort the letters of the input word in {order} order."
    else:
        definition = (
            f"Sort the words of the input in {order} order and separate them with single spaces."
        )
    return _TaskSpec(
        name=f"synth_sorting_{unit}_{'descending' if descending else 'ascending'}",
        category="Sorting",
        definition=definition,
        rule=lambda text: arrange(text, descending),
        draw=_word if letters else lambda rng: _phrase(rng, 3, 4, 28),
        explain=lambda text, out: f"The {unit} of the input are written in {order} order.",
        mistake=lambda text: (
            arrange(text, not descending),
            f"The {unit} are in {other} order instead of {order} order.",
        ),
    )


# which -> (Definition, explanation, how the words change)
_CASE_RULES: dict[str, tuple[str, str, Callable[[list[str]], list[str]]]] = {
    "all": (
        "Rewrite the input with every letter in uppercase.",
        "Every letter is made uppercase.",
        lambda ws: [w.upper() for w in ws],
    ),
    "first_word": (
        "Rewrite the input with the first word in uppercase and the other words unchanged.",
        "Only the first word is made uppercase.",
        lambda ws: [ws[0].upper(), *ws[1:]],
    ),
    "last_word": (
        "Rewrite the input with the last word in uppercase and the other words unchanged.",
        "Only the last word is made uppercase.",
        lambda ws: [*ws[:-1], ws[-1].upper()],
    ),
    "initials": (
        "Rewrite the input with the first letter of each word in uppercase and the other "
        "letters unchanged.",
        "The first letter of each word is made uppercase.",
        lambda ws: [w[0].upper() + w[1:] for w in ws],
    ),
    "finals": (
        "Rewrite the input with the last letter of each word in uppercase and the other "
        "letters unchanged.",
        "The last letter of each word is made uppercase.",
        lambda ws: [w[:-1] + w[-1].upper() for w in ws],
    ),
}


def _case_conversion(which: str) -> _TaskSpec:
    definition, explanation, change = _CASE_RULES[which]
    return _TaskSpec(
        name=f"synth_case_conversion_{which}",
        category="Case Conversion",
        definition=definition,
        rule=lambda text: " ".join(change(text.split())),
        # At least two words, so "first word", "last word" and "all" never coincide.
        draw=lambda rng: _phrase(rng, 2, 3, 24),
        explain=lambda text, out: explanation,
        mistake=lambda text: (text, "The input was copied without making any letter uppercase."),
    )


def _word_repetition(k: int, sep: str) -> _TaskSpec:
    slug, phrase = SEPARATORS[sep]
    return _TaskSpec(
        name=f"synth_word_repetition_{NUMBERS[k]}_{slug}",
        category="Word Repetition",
        definition=f"Write the input word {NUMBERS[k]} times, joined by {phrase}.",
        rule=lambda text: sep.join([text] * k),
        draw=_word,  # words too long for k copies are rejected by _TaskSpec.sample
        explain=lambda text, out: f"The word is written {NUMBERS[k]} times, joined by {phrase}.",
        mistake=lambda text: (
            sep.join([text] * (k - 1)),
            f"The word is written {'once' if k == 2 else NUMBERS[k - 1] + ' times'} instead of "
            f"{NUMBERS[k]} times.",
        ),
    )


def _substring(k: int, from_end: bool) -> _TaskSpec:
    end = "last" if from_end else "first"

    def take(text: str, n: int) -> str:
        return text[-n:] if from_end else text[:n]

    return _TaskSpec(
        name=f"synth_substring_{end}_{NUMBERS[k]}",
        category="Substring Extraction",
        definition=f"Output only the {end} {_letters(k)} of the input word.",
        rule=lambda text: take(text, k),
        draw=_word,  # words of k letters or fewer are rejected (the output would be the input)
        explain=lambda text, out: f"'{out}' is the {end} {_letters(k)} of '{text}'.",
        mistake=lambda text: (
            take(text, k + 1),
            f"The output has the {end} {_letters(k + 1)} instead of the {end} {_letters(k)}.",
        ),
    )


def _template_wrapping(slug: str, left: str, right: str) -> _TaskSpec:
    template = f"{left}{{input}}{right}"
    return _TaskSpec(
        name=f"synth_template_wrapping_{slug}",
        category="Template Wrapping",
        definition=(
            f"Put the input into the template '{template}': write '{left}' before the input and "
            f"'{right}' after it."
        ),
        rule=lambda text: f"{left}{text}{right}",
        draw=lambda rng: _phrase(rng, 1, 3, 24),
        explain=lambda text, out: f"The input is placed inside '{template}'.",
        mistake=lambda text: (text, f"The input was not put into the template '{template}'."),
    )


@dataclasses.dataclass(frozen=True)
class _Family:
    build: Callable[..., _TaskSpec]
    train: tuple[tuple, ...]
    test: tuple[tuple, ...]


# The split. Every test parameter value also occurs in training (in another pair, position or
# family), so a test task is a new combination of familiar parts; see the module docstring.
FAMILIES: tuple[_Family, ...] = (
    _Family(
        _letter_replacement,
        train=(("a", "o"), ("e", "a"), ("o", "e"), ("i", "u"), ("s", "z"), ("t", "d"),
               ("r", "l"), ("n", "m")),
        test=(("a", "e"), ("o", "u"), ("t", "s")),
    ),
    _Family(
        _letter_deletion,
        train=(("a",), ("e",), ("o",), ("s",), ("r",)),
        test=(("i",), ("t",)),
    ),
    _Family(
        _letter_counting,
        train=(("a",), ("e",), ("o",), ("r",), ("s",)),
        test=(("i",), ("n",)),
    ),
    _Family(
        _word_reversal,
        train=((" ",), ("-",), (",",), ("+",)),
        test=(("/",), ("_",)),
    ),
    _Family(
        _word_selection,
        train=((1, False), (2, False), (4, False), (1, True), (3, True)),
        test=((3, False), (2, True)),
    ),
    _Family(
        _sorting,
        train=(("letters", False), ("letters", True), ("words", False)),
        test=(("words", True),),
    ),
    _Family(
        _case_conversion,
        train=(("all",), ("first_word",), ("initials",), ("finals",)),
        test=(("last_word",),),
    ),
    _Family(
        _word_repetition,
        train=((2, " "), (3, " "), (5, " "), (2, "-"), (4, "/"), (3, "_")),
        test=((4, " "), (3, ",")),
    ),
    _Family(
        _substring,
        train=((1, False), (2, False), (3, False), (5, False), (1, True), (3, True), (4, True)),
        test=((4, False), (2, True)),
    ),
    _Family(
        _template_wrapping,
        train=(("angle", "<", ">"), ("double_angle", "<<", ">>"), ("paren", "(", ")"),
               ("double_paren", "((", "))"), ("square", "[", "]"), ("star", "*", "*"),
               ("hash", "#", "#")),
        test=(("double_square", "[[", "]]"), ("double_star", "**", "**")),
    ),
)  # fmt: skip


# --- task dicts -----------------------------------------------------------------------------


def _distinct_inputs(spec: _TaskSpec, rng: random.Random, count: int) -> list[str]:
    inputs: list[str] = []
    seen: set[str] = set()
    for _ in range(_DISTINCT_TRIES_PER_INPUT * count):
        if len(inputs) == count:
            return inputs
        text = spec.sample(rng)
        if text not in seen:
            seen.add(text)
            inputs.append(text)
    # A single-word task can have fewer usable inputs than `count`: repeat some then.
    return inputs + [spec.sample(rng) for _ in range(count - len(inputs))]


def _task_dict(spec: _TaskSpec, seed: int, num_instances: int) -> dict:
    # One RNG per task, seeded by its name (str seeds are hashed with SHA-512, stable across
    # processes): a task's content depends on nothing but the seed and its own parameters.
    rng = random.Random(f"{seed}/{spec.name}")
    inputs = _distinct_inputs(spec, rng, num_instances + 3)
    positives = [
        {
            "input": text,
            "output": spec.rule(text),
            "explanation": spec.explain(text, spec.rule(text)),
        }
        for text in inputs[:2]
    ]
    wrong, why = spec.mistake(inputs[2])
    if wrong == spec.rule(inputs[2]):
        raise AssertionError(f"{spec.name}: the negative example's output is the right one")
    return {
        "Contributors": ["tagi_jax"],
        "Source": ["tagi_jax_synthetic"],
        "URL": [],
        "Categories": [spec.category],
        "Reasoning": [],
        "Definition": [spec.definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": positives,
        "Negative Examples": [{"input": inputs[2], "output": wrong, "explanation": why}],
        "Instances": [
            {"id": f"{spec.name}-{i}", "input": text, "output": [spec.rule(text)]}
            for i, text in enumerate(inputs[3:])
        ],
        "Instance License": ["Apache 2.0"],
    }


def _specs(split: str) -> list[_TaskSpec]:
    return [family.build(*params) for family in FAMILIES for params in getattr(family, split)]


def generate_tasks(
    seed: int = 0, *, instances_per_train_task: int = 64, instances_per_test_task: int = 32
) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """``(train, test)``: ``[(task_name, task_dict)]`` in a fixed order, deterministic given
    ``seed`` (the same shape as ``tagi_jax.data.ni.load_split``). The tasks and the split do
    not depend on the seed; their examples and instances do."""
    if instances_per_train_task < 1 or instances_per_test_task < 1:
        raise ValueError("instances_per_train_task and instances_per_test_task must be >= 1")
    train_specs, test_specs = _specs("train"), _specs("test")
    # Guards against a future edit of FAMILIES that leaks a train task into the test split.
    names = [s.name for s in train_specs + test_specs]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate task names in FAMILIES")
    if {s.definition for s in train_specs} & {s.definition for s in test_specs}:
        raise AssertionError("a test Definition equals a train Definition")
    train = [(s.name, _task_dict(s, seed, instances_per_train_task)) for s in train_specs]
    test = [(s.name, _task_dict(s, seed, instances_per_test_task)) for s in test_specs]
    return train, test


# --- writing ----------------------------------------------------------------------------------


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False)  # upstream format, no final newline


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _summary(manifest: dict) -> SuiteSummary:
    return SuiteSummary(
        train_tasks=tuple(manifest["train_tasks"]),
        test_tasks=tuple(manifest["test_tasks"]),
        categories=tuple(manifest["categories"]),
        train_instances=manifest["train_instances"],
        test_instances=manifest["test_instances"],
    )


def _read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SuiteExistsError(f"{path} is not a readable suite manifest ({e})") from e
    return manifest if isinstance(manifest, dict) else None


def write_suite(
    out_dir: str,
    *,
    seed: int = 0,
    instances_per_train_task: int = 64,
    instances_per_test_task: int = 32,
    overwrite: bool = False,
) -> SuiteSummary:
    """Write the suite under ``out_dir`` (layout in the module docstring) and summarise it.

    Byte-identical output for the same arguments. If ``out_dir`` already holds a suite made
    with the same seed, counts and version, nothing is rewritten and its summary is returned.
    Any other existing ``tasks/``, ``splits/`` or ``suite.json`` there raises
    ``SuiteExistsError`` unless ``overwrite=True``, which deletes those three paths (and only
    them) first. ``suite.json`` is written last, so an interrupted write is never mistaken for
    a finished suite.
    """
    params = {
        "version": SUITE_VERSION,
        "seed": seed,
        "instances_per_train_task": instances_per_train_task,
        "instances_per_test_task": instances_per_test_task,
    }
    owned = [os.path.join(out_dir, p) for p in ("tasks", "splits", MANIFEST)]
    existing = [p for p in owned if os.path.lexists(p)]
    if existing and not overwrite:
        manifest = _read_manifest(out_dir)
        if manifest is not None and {k: manifest.get(k) for k in params} == params:
            missing = [
                name
                for name in manifest["train_tasks"] + manifest["test_tasks"]
                if not os.path.isfile(os.path.join(out_dir, "tasks", f"{name}.json"))
            ]
            if missing:
                raise SuiteExistsError(
                    f"the suite in {out_dir} lacks {len(missing)} task files (e.g. "
                    f"{missing[0]}.json); pass overwrite=True to write it again"
                )
            return _summary(manifest)
        found = "a suite made with other parameters" if manifest else "existing data"
        raise SuiteExistsError(
            f"{out_dir} already holds {found} ({', '.join(existing)}); requested {params}. "
            "Pass overwrite=True to replace it, or choose another directory."
        )
    # Generate before deleting anything, so bad arguments leave an existing suite in place.
    train, test = generate_tasks(
        seed,
        instances_per_train_task=instances_per_train_task,
        instances_per_test_task=instances_per_test_task,
    )
    for path in existing:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for name, task in train + test:
        _write_text(os.path.join(out_dir, "tasks", f"{name}.json"), _dump(task))
    for split, tasks in (("train", train), ("test", test)):
        lines = "".join(f"{name}\n" for name, _ in tasks)
        _write_text(os.path.join(out_dir, "splits", "default", f"{split}_tasks.txt"), lines)
    manifest = {
        **params,
        "train_tasks": [name for name, _ in train],
        "test_tasks": [name for name, _ in test],
        "categories": sorted({task["Categories"][0] for _, task in train + test}),
        "train_instances": sum(len(task["Instances"]) for _, task in train),
        "test_instances": sum(len(task["Instances"]) for _, task in test),
    }
    _write_text(os.path.join(out_dir, MANIFEST), _dump(manifest))
    return _summary(manifest)
