"""The built-in instruction suite: procedurally generated tasks in natural-instructions format.

It is the dataset of the README demo, which trains a tiny byte-level TAGI model on a laptop CPU
in minutes and then evaluates it on tasks it never saw. Everything needed is in this module (a
fixed word list and the task rules); nothing is downloaded.

Each task applies one string rule from a *family* (letter replacement, reversal, ...) with one
*parameter* (which letter, which joining word, which position, ...), and its Definition states
the rule and the parameter completely: the Definition alone determines every output.

**Splits.** Three: ``train`` (54 tasks), ``validation`` (18) and ``test`` (19), every family in
each. The held-out splits hold out parameters, not families: each (family, parameter) task is
in exactly one split, and every held-out parameter value is one the model has met in training,
only in another combination: "replace 'a' with 'e'" is a test task while 'a' -> 'o' and
'e' -> 'a' are train tasks; "reverse the word order and put 'and' between the words" is a test
task while training reverses the word order with other joining words and puts 'and' between
letter-reversed words. A held-out task's inputs are drawn as its family's are (one word or a
phrase; to replace or delete a letter, a word that holds it), so nothing about an input tells
the model which output is wanted; only reading the instruction and binding its parameter does.
Validation is built as test is, from other combinations: every choice (steps, rates, ...) is
made on validation, and test is scored once.

**Visibility.** The suite is scored with the official SNI metrics
(``tagi_jax.evaluation.ni_metrics``): ROUGE-L over rouge-score's tokens (lower-cased, every
non-alphanumeric character a separator, Porter-stemmed) and exact match after lower-casing and
dropping punctuation. A rule whose effect these normalisations erase is invisible to them:
uppercasing, joining words with '/' or '_' rather than spaces, wrapping the input in brackets.
So is, mostly, a rule that changes one word of several (a copy of the input keeps the others)
or a parameter the metrics barely see (a word written 4 times rather than 5 is 89 ROUGE-L). On
such a task a model that ignores the instruction scores about as well as one that follows it,
and the held-out score stops measuring instruction following. So every held-out rule changes
what the metrics see: letter rules apply to one word or to every word of a phrase, joining and
template words are words rather than punctuation, and held-out parameters are ones that change
the output's tokens. Tested on every validation and test task: copying the input scores a mean
ROUGE-L of at most 50 and never an exact match, and the rule of any training task of the same
family, applied to the task's inputs, at most 70 ROUGE-L (60 at most: a template or joining
word differs in 2 of 5 tokens) and 60 exact match (chance agreement of letter counts).

Layout written by ``write_suite`` (the upstream natural-instructions one, read by
``tagi_jax.data.ni``)::

    <out_dir>/tasks/<task_name>.json
    <out_dir>/splits/default/{train,validation,test}_tasks.txt
    <out_dir>/suite.json        seed, parameters, version, task lists; written last

``out_dir`` may be local or in cloud storage (``gs://...``, through ``tagi_jax.paths``).

Task files are ``json.dumps(task, indent=4, ensure_ascii=False)`` with no trailing newline, as
upstream. Each task has 2 positive examples, 1 negative example and N instances with one output
each; inputs are at most 30 ASCII characters and outputs at most 32, so a byte-level model's
sequences stay short, and Definitions at most 110, so the main job's 128-byte instruction
(``Definition: ...`` and EOS) holds them whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable

from tagi_jax import paths
from tagi_jax.data import example_index

# 2: validation split; visible held-out rules (new Reversal, Selection, Sorting, Affixation,
# Letter Repetition and Template Wrapping families; one-word letter replacement and deletion).
SUITE_VERSION = 2
MANIFEST = "suite.json"
SPLITS = ("train", "validation", "test")
MAX_INPUT_CHARS = 30
MAX_OUTPUT_CHARS = 32
MAX_DEFINITION_CHARS = 110

# Common English words, lowercase ASCII, 3 to 7 letters, all distinct. None of them is a
# joining or template word (JOINERS, TEMPLATE_LEFT, TEMPLATE_RIGHT), so those stay visible.
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
    # more words with 's', 'l', 'n' and 't', so the one-word letter tasks have variety
    "bus", "nest", "nose", "rose", "mouse", "sock", "soup", "seed", "sheep", "smile",
    "snake", "spoon", "sugar", "soap", "seven", "shirt", "stick", "glove", "hill", "lemon",
    "kite", "nail", "tent", "list",
)  # fmt: skip

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}
# Words written between the words of the Reversal family's outputs.
JOINERS = ("and", "or", "then", "with")
# Template Wrapping: a template is "<left> {input} <right>"; no word is in two parts.
TEMPLATE_LEFT = ("we like", "you see", "i said", "they want")
TEMPLATE_RIGHT = ("so much", "right now", "once more", "for sure")
VOWELS = "aeiou"
_MAX_TRIES = 10_000
_DISTINCT_TRIES_PER_INPUT = 20
_MAX_COUNT = 3  # letter counting answers 0..3


class SuiteExistsError(FileExistsError):
    """``out_dir`` already holds a suite (or its paths) that this call would replace."""


@dataclasses.dataclass(frozen=True)
class SuiteSummary:
    train_tasks: tuple[str, ...]
    validation_tasks: tuple[str, ...]
    test_tasks: tuple[str, ...]
    categories: tuple[str, ...]
    train_instances: int
    validation_instances: int
    test_instances: int


@dataclasses.dataclass(frozen=True)
class _TaskSpec:
    """One (family, parameter) task: its text and its rule.

    ``rule`` is total: it maps any input of any task of its family to a string (possibly
    empty), so the rule of one task can be tried on another's inputs."""

    name: str
    category: str
    definition: str
    rule: Callable[[str], str]
    draw: Callable[[random.Random], str]
    explain: Callable[[str, str], str]  # (input, output) -> why the output is right
    mistake: Callable[[str], tuple[str, str]]  # input -> (wrong output, why it is wrong)

    def sample(self, rng: random.Random) -> str:
        """An input within the size limits whose output is not empty and differs from it (an
        input the rule leaves unchanged would teach copying, not the rule)."""
        for _ in range(_MAX_TRIES):
            text = self.draw(rng)
            output = self.rule(text)
            if (
                output
                and output != text
                and len(text) <= MAX_INPUT_CHARS
                and len(output) <= MAX_OUTPUT_CHARS
            ):
                return text
        raise RuntimeError(f"{self.name}: no usable input in {_MAX_TRIES} draws")


def _phrase(rng: random.Random, min_words: int, max_words: int, max_chars: int) -> str:
    """Distinct words from WORDS joined by spaces (distinct, so word order is always visible)."""
    for _ in range(_MAX_TRIES):
        text = " ".join(rng.sample(WORDS, rng.randint(min_words, max_words)))
        if len(text) <= max_chars:
            return text
    raise RuntimeError(f"no phrase of {min_words}-{max_words} words within {max_chars} chars")


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _word_containing(letter: str) -> Callable[[random.Random], str]:
    pool = tuple(w for w in WORDS if letter in w)
    if not pool:
        raise ValueError(f"no word in WORDS holds the letter {letter!r}")
    return lambda rng: rng.choice(pool)


def _letters(k: int) -> str:
    return "letter" if k == 1 else f"{NUMBERS[k]} letters"


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


# --- families: each builder returns the task of one parameter -----------------------------
# Letter-level rules see one word, or every word of a phrase: a rule that changed one word of
# several would leave the others for a copy of the input to score on (module docstring).


def _letter_replacement(old: str, new: str) -> _TaskSpec:
    return _TaskSpec(
        name=f"synth_letter_replacement_{old}_to_{new}",
        category="Letter Replacement",
        definition=(
            f"Replace every letter '{old}' in the input word with the letter '{new}' and keep "
            "the other letters."
        ),
        rule=lambda text: text.replace(old, new),
        draw=_word_containing(old),
        explain=lambda text, out: f"Every '{old}' in the word becomes '{new}'.",
        mistake=lambda text: (text, f"The letter '{old}' was not replaced with '{new}'."),
    )


def _letter_deletion(letter: str) -> _TaskSpec:
    return _TaskSpec(
        name=f"synth_letter_deletion_{letter}",
        category="Letter Deletion",
        definition=f"Delete every letter '{letter}' from the input word and keep the other letters.",
        rule=lambda text: text.replace(letter, ""),
        draw=_word_containing(letter),
        explain=lambda text, out: f"Every '{letter}' is removed from the word.",
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


def _reversal(unit: str, joiner: str) -> _TaskSpec:
    """``unit`` "words": the word order is reversed; "letters": each word's letters are. Either
    way the output's words are joined by the word ``joiner`` (a visible token: a separator
    character would vanish in ROUGE-L's tokenisation and exact match's normalisation)."""
    if joiner not in JOINERS:
        raise ValueError(f"joiner={joiner!r} is not one of JOINERS {JOINERS}")
    if unit == "words":
        definition = (
            f"Reverse the order of the words in the input and put the word '{joiner}' between "
            "each two of them."
        )
        explanation = f"The words are written last to first, with '{joiner}' between each two."

        def change(words: list[str]) -> list[str]:
            return words[::-1]

        wrong_why = f"The words are joined with '{joiner}' but their order was not reversed."
    else:
        definition = (
            f"Reverse the letters of each word in the input and put the word '{joiner}' "
            "between each two words."
        )
        explanation = f"Each word is written backwards, with '{joiner}' between each two."

        def change(words: list[str]) -> list[str]:
            return [w[::-1] for w in words]

        wrong_why = f"The words are joined with '{joiner}' but their letters were not reversed."
    return _TaskSpec(
        name=f"synth_reversal_{unit}_{joiner}",
        category="Reversal",
        definition=definition,
        rule=lambda text: f" {joiner} ".join(change(text.split())),
        # Three words: the joining word is two of five output tokens, the other three the
        # (reversed) input, so both parameters show in ROUGE-L.
        draw=lambda rng: _phrase(rng, 3, 3, 22),
        explain=lambda text, out: explanation,
        mistake=lambda text: (f" {joiner} ".join(text.split()), wrong_why),
    )


def _selection(unit: str, k: int) -> _TaskSpec:
    """``unit`` "word": the k-th word of a phrase; "letter": the k-th letter of one word.
    (Counting words from the end is not a parameter: with inputs of n = 4 or 5 words, the k-th
    word is the (n + 1 - k)-th from the end, and a held-out position agreed with a training one
    on 44-47% of the inputs.)"""
    if unit == "word":
        definition = f"Output only the {ORDINALS[k]} word of the input."

        def parts(text: str) -> list[str]:
            return text.split()

        def draw(rng: random.Random) -> str:
            return _phrase(rng, 4, 5, MAX_INPUT_CHARS)

        where = "the input"
    else:
        definition = f"Output only the {ORDINALS[k]} letter of the input word."

        def parts(text: str) -> list[str]:
            return list(text)

        draw = _word  # words shorter than k letters are rejected (empty output)
        where = "the word"

    def rule(text: str) -> str:
        items = parts(text)
        return items[k - 1] if k <= len(items) else ""

    def mistake(text: str) -> tuple[str, str]:
        items, right = parts(text), rule(text)
        wrong = next(x for x in items[k:] + items[: k - 1][::-1] if x != right)  # a neighbour
        return wrong, f"'{wrong}' is not the {ORDINALS[k]} {unit} of {where}."

    return _TaskSpec(
        name=f"synth_selection_{unit}_{ORDINALS[k]}",
        category="Selection",
        definition=definition,
        rule=rule,
        draw=draw,
        explain=lambda text, out: f"'{out}' is the {ORDINALS[k]} {unit} of {where}.",
        mistake=mistake,
    )


def _sorting(unit: str, descending: bool) -> _TaskSpec:
    """``unit`` "word": the letters of one word; "each": the letters within each word of a
    phrase, words kept in place; "words": the words of a phrase. (Sorted words are the input's
    own words, so copying the input scores well on "words": it is only a training unit.)"""
    order = "reverse alphabetical" if descending else "alphabetical"
    other = "alphabetical" if descending else "reverse alphabetical"

    def arrange(text: str, reverse: bool) -> str:
        if unit == "word":
            return "".join(sorted(text, reverse=reverse))
        if unit == "each":
            return " ".join("".join(sorted(w, reverse=reverse)) for w in text.split())
        return " ".join(sorted(text.split(), reverse=reverse))

    definition, draw, what = {
        "word": (f"Sort the letters of the input word in {order} order.", _word, "letters"),
        "each": (
            f"Sort the letters within each word of the input in {order} order and keep the "
            "word order.",
            lambda rng: _phrase(rng, 2, 3, 24),
            "letters of each word",
        ),
        "words": (
            f"Sort the words of the input in {order} order and separate them with single spaces.",
            lambda rng: _phrase(rng, 3, 4, 28),
            "words",
        ),
    }[unit]
    return _TaskSpec(
        name=f"synth_sorting_{unit}_{'descending' if descending else 'ascending'}",
        category="Sorting",
        definition=definition,
        rule=lambda text: arrange(text, descending),
        draw=draw,
        explain=lambda text, out: f"The {what} are written in {order} order.",
        mistake=lambda text: (
            arrange(text, not descending),
            f"The {what} are in {other} order instead of {order} order.",
        ),
    )


def _affixation(where: str, affix: str) -> _TaskSpec:
    """Letters added to every word: every output token is new. (It replaces a case conversion
    family, invisible to both metrics, which lower-case.) The Porter stemmer never strips a
    whole affix (of 're' at the end, only the 'e'), so the stemmed tokens differ too."""
    start = where == "start"
    other = "end" if start else "start"

    def add(text: str, at_start: bool) -> str:
        return " ".join(affix + w if at_start else w + affix for w in text.split())

    return _TaskSpec(
        name=f"synth_affixation_{affix}_{where}",
        category="Affixation",
        definition=f"Add the letters '{affix}' to the {where} of every word in the input.",
        rule=lambda text: add(text, start),
        draw=lambda rng: _phrase(rng, 1, 3, 24),
        explain=lambda text, out: f"Every word gets '{affix}' at its {where}.",
        mistake=lambda text: (
            add(text, not start),
            f"'{affix}' was added to the {other} of the words instead of the {where}.",
        ),
    )


# which -> (Definition with {n}, what is repeated, which letters of a word are repeated)
_REPEATED: dict[str, tuple[str, str, Callable[[str, int], bool]]] = {
    "every": (
        "Write each letter of the input word {n} times in a row.",
        "Each letter is",
        lambda word, i: True,
    ),
    "first": (
        "Write the first letter of the input word {n} times and every other letter once.",
        "The first letter is",
        lambda word, i: i == 0,
    ),
    "last": (
        "Write the last letter of the input word {n} times and every other letter once.",
        "The last letter is",
        lambda word, i: i == len(word) - 1,
    ),
    "vowels": (
        "Write every vowel (a, e, i, o, u) of the input word {n} times and every other letter "
        "once.",
        "Each vowel is",
        lambda word, i: word[i] in VOWELS,
    ),
}


def _letter_repetition(which: str, k: int) -> _TaskSpec:
    """Letters repeated inside one word: the output is one new token. (It replaces a word
    repetition family: "w w w" against "w w w w" is 86 ROUGE-L, and the separators it varied
    are not tokens.)"""
    definition, subject, repeated = _REPEATED[which]

    def repeat(text: str, n: int) -> str:
        return "".join(ch * (n if repeated(text, i) else 1) for i, ch in enumerate(text))

    def times(n: int) -> str:
        return "once" if n == 1 else f"{NUMBERS[n]} times"

    return _TaskSpec(
        name=f"synth_letter_repetition_{which}_{NUMBERS[k]}",
        category="Letter Repetition",
        definition=definition.format(n=NUMBERS[k]),
        rule=lambda text: repeat(text, k),
        draw=_word,  # words without a vowel are rejected for "vowels" (nothing would change)
        explain=lambda text, out: f"{subject} written {times(k)}.",
        mistake=lambda text: (
            repeat(text, k - 1),
            f"{subject} written {times(k - 1)} instead of {times(k)}.",
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


def _template_wrapping(left: int, right: int) -> _TaskSpec:
    """The template's parts are words (brackets or stars would vanish in both metrics) and the
    input is one word, so the parts are four of five output tokens."""
    before, after = TEMPLATE_LEFT[left], TEMPLATE_RIGHT[right]
    template = f"{before} {{input}} {after}"
    return _TaskSpec(
        name=f"synth_template_wrapping_{before.replace(' ', '_')}_{after.replace(' ', '_')}",
        category="Template Wrapping",
        definition=f"Put the input word into the template '{template}'.",
        rule=lambda text: f"{before} {text} {after}",
        draw=_word,
        explain=lambda text, out: f"The word takes the place of {{input}} in '{template}'.",
        mistake=lambda text: (f"{before} {text}", f"'{after}' is missing after the word."),
    )


@dataclasses.dataclass(frozen=True)
class _Family:
    build: Callable[..., _TaskSpec]
    train: tuple[tuple, ...]
    validation: tuple[tuple, ...]
    test: tuple[tuple, ...]


# The splits. Every held-out (validation or test) parameter value also occurs in training: at
# the same place in another of the family's train tasks, or, for the one-parameter letter
# families, in other families' train tasks. See the module docstring.
FAMILIES: tuple[_Family, ...] = (
    _Family(
        _letter_replacement,
        train=(("a", "o"), ("e", "a"), ("o", "e"), ("i", "u"), ("s", "z"), ("t", "d"),
               ("r", "l"), ("n", "m")),
        validation=(("e", "o"), ("i", "a"), ("r", "m")),
        test=(("a", "e"), ("o", "u"), ("t", "l")),
    ),
    _Family(
        _letter_deletion,
        train=(("a",), ("e",), ("o",), ("s",), ("r",)),
        validation=(("n",), ("l",)),
        test=(("i",), ("t",)),
    ),
    _Family(
        _letter_counting,
        train=(("a",), ("e",), ("o",), ("r",), ("s",)),
        validation=(("t",), ("l",)),
        test=(("i",), ("n",)),
    ),
    _Family(
        _reversal,
        train=(("words", "or"), ("words", "then"), ("words", "with"), ("letters", "and"),
               ("letters", "then")),
        validation=(("letters", "with"),),
        test=(("words", "and"), ("letters", "or")),
    ),
    _Family(
        _selection,
        train=(("word", 1), ("word", 2), ("word", 4), ("letter", 3), ("letter", 5)),
        validation=(("letter", 4),),
        test=(("word", 3), ("letter", 2)),
    ),
    _Family(
        _sorting,
        train=(("word", False), ("each", False), ("words", False), ("words", True)),
        validation=(("word", True),),
        test=(("each", True),),
    ),
    _Family(
        _affixation,
        train=(("start", "un"), ("start", "re"), ("end", "ex"), ("end", "ko")),
        validation=(("end", "re"), ("start", "ko"), ("start", "ex")),
        test=(("end", "un"),),
    ),
    _Family(
        _letter_repetition,
        train=(("every", 2), ("first", 3), ("last", 2), ("vowels", 3)),
        validation=(("first", 2), ("vowels", 2)),
        test=(("every", 3), ("last", 3)),
    ),
    _Family(
        _substring,
        train=((1, False), (2, False), (3, False), (5, False), (1, True), (3, True), (4, True)),
        validation=((5, True),),
        test=((4, False), (2, True)),
    ),
    _Family(
        _template_wrapping,  # (left, right): indices into TEMPLATE_LEFT and TEMPLATE_RIGHT
        train=((0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (1, 2), (2, 3)),
        validation=((1, 3), (2, 0)),
        test=((0, 2), (3, 1)),
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


def task_specs(split: str) -> list[_TaskSpec]:
    """The task specs of ``split`` (one of ``SPLITS``), in suite order: names, categories,
    Definitions and rules (e.g. to score a rule on another task's inputs)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return [family.build(*params) for family in FAMILIES for params in getattr(family, split)]


def generate_tasks(
    seed: int = 0, *, instances_per_train_task: int = 64, instances_per_test_task: int = 32
) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], list[tuple[str, dict]]]:
    """``(train, validation, test)``: ``[(task_name, task_dict)]`` each, in a fixed order,
    deterministic given ``seed`` (the same shape as ``tagi_jax.data.ni.load_split``).
    ``instances_per_test_task`` is the instance count of every held-out task, validation and
    test alike. The tasks and the splits do not depend on the seed; their examples and
    instances do."""
    if instances_per_train_task < 1 or instances_per_test_task < 1:
        raise ValueError("instances_per_train_task and instances_per_test_task must be >= 1")
    specs = {split: task_specs(split) for split in SPLITS}
    # Guards against a future edit of FAMILIES that puts one task (or instruction) in two
    # splits.
    names = [s.name for split in SPLITS for s in specs[split]]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate task names in FAMILIES")
    definitions = [{s.definition for s in specs[split]} for split in SPLITS]
    if sum(map(len, definitions)) != len(set().union(*definitions)):
        raise AssertionError("a Definition occurs in two splits")
    counts = {
        "train": instances_per_train_task,
        "validation": instances_per_test_task,
        "test": instances_per_test_task,
    }
    train, validation, test = (
        [(s.name, _task_dict(s, seed, counts[split])) for s in specs[split]] for split in SPLITS
    )
    return train, validation, test


# --- writing ----------------------------------------------------------------------------------


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False)  # upstream format, no final newline


def _write_text(path: str, text: str) -> None:
    if paths.is_uri(path):  # one upload, whole or not at all; no directories to make
        paths.write_text(path, text)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _summary(manifest: dict) -> SuiteSummary:
    return SuiteSummary(
        **{f"{split}_tasks": tuple(manifest[f"{split}_tasks"]) for split in SPLITS},
        categories=tuple(manifest["categories"]),
        **{f"{split}_instances": manifest[f"{split}_instances"] for split in SPLITS},
    )


def _read_manifest(out_dir: str) -> dict | None:
    path = paths.join(out_dir, MANIFEST)
    try:
        with example_index.open_text(path) as f:
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

    ``instances_per_test_task`` applies to every held-out task, validation and test alike.
    Byte-identical output for the same arguments. If ``out_dir`` already holds a suite made
    with the same seed, counts and version, nothing is rewritten and its summary is returned.
    Any other existing ``tasks/``, ``splits/`` or ``suite.json`` there (a suite of another
    ``SUITE_VERSION`` included) raises ``SuiteExistsError`` unless ``overwrite=True``, which
    deletes those three paths (and only them) first. ``suite.json`` is written last, so an
    interrupted write is never mistaken for a finished suite.
    """
    params = {
        "version": SUITE_VERSION,
        "seed": seed,
        "instances_per_train_task": instances_per_train_task,
        "instances_per_test_task": instances_per_test_task,
    }
    owned = [paths.join(out_dir, p) for p in ("tasks", "splits", MANIFEST)]
    existing = [p for p in owned if paths.lexists(p)]
    if existing and not overwrite:
        manifest = _read_manifest(out_dir)
        if manifest is not None and {k: manifest.get(k) for k in params} == params:
            missing = [
                name
                for split in SPLITS
                for name in manifest[f"{split}_tasks"]
                if not paths.isfile(paths.join(out_dir, "tasks", f"{name}.json"))
            ]
            if missing:
                raise SuiteExistsError(
                    f"the suite in {out_dir} lacks {len(missing)} task files (e.g. "
                    f"{missing[0]}.json); pass overwrite=True to write it again"
                )
            return _summary(manifest)
        if not manifest:
            found = "existing data"
        elif manifest.get("version") != SUITE_VERSION:
            found = (
                f"a suite of version {manifest.get('version')} (this code writes version "
                f"{SUITE_VERSION}: other tasks and splits)"
            )
        else:
            found = "a suite made with other parameters"
        raise SuiteExistsError(
            f"{out_dir} already holds {found} ({', '.join(existing)}); requested {params}. "
            "Pass overwrite=True to replace it, or choose another directory."
        )
    # Generate before deleting anything, so bad arguments leave an existing suite in place.
    splits = dict(
        zip(
            SPLITS,
            generate_tasks(
                seed,
                instances_per_train_task=instances_per_train_task,
                instances_per_test_task=instances_per_test_task,
            ),
            strict=True,
        )
    )
    for path in existing:
        if paths.isdir(path) and not paths.islink(path):
            paths.rmtree(path)
        else:
            paths.remove(path)
    for tasks in splits.values():
        for name, task in tasks:
            _write_text(paths.join(out_dir, "tasks", f"{name}.json"), _dump(task))
    for split, tasks in splits.items():
        lines = "".join(f"{name}\n" for name, _ in tasks)
        _write_text(paths.join(out_dir, "splits", "default", f"{split}_tasks.txt"), lines)
    every_task = [task for tasks in splits.values() for _, task in tasks]
    manifest = {
        **params,
        **{f"{split}_tasks": [name for name, _ in tasks] for split, tasks in splits.items()},
        "categories": sorted({task["Categories"][0] for task in every_task}),
        **{
            f"{split}_instances": sum(len(task["Instances"]) for _, task in tasks)
            for split, tasks in splits.items()
        },
    }
    _write_text(paths.join(out_dir, MANIFEST), _dump(manifest))
    return _summary(manifest)
