"""Using a trained TAGI student: text in, text out.

```python
from tagi_jax.predictor import Predictor

predictor = Predictor.load("runs/main_job/export/tagi")     # any export directory
print(predictor.generate("Definition: Reverse the word.", ["Input: cat", "Input: moon"]))
adapters = predictor.adapters("Definition: Reverse the word.")   # LoraAdapters, batch 1
predictor.generate_ni("Reverse the word.", ["cat"])   # formatted as the student trained
```

An instruction is encoded, and its adapters generated, once: both are cached (per distinct
instruction text, least recently used first out) and reused for every input of that task, in
every batch. Batches are padded to ``batch_size`` rows, so decoding compiles once per length.
``beam_size`` 1 is greedy decoding (``tagi.greedy_decode``); larger beams use
``beam_search.beam_search`` with t5x's length penalty ``alpha``.

Defaults (vocabulary, input / instruction / answer lengths, how natural-instructions text is
formatted) come from the export (``export_format``'s ``data.json``); keyword arguments of
``load`` override the lengths. Imports neither the trainer nor (until a vocabulary is built)
TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from tagi_jax.data.tokens import EOS_ID, encode_padded
from tagi_jax.models import lora, t5, tagi
from tagi_jax.models.tagi_config import TagiConfig

DEFAULT_LENGTHS = {"inputs": 1024, "hyper_inputs": 1024, "targets": 128}


def decode_text(vocabulary, ids) -> str:
    """The text of decoded ids, up to the first EOS, special ids dropped."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return vocabulary.decode([i for i in ids if i > EOS_ID])


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="ex", disable=not enabled, leave=False)


@dataclasses.dataclass
class Predictor:
    """A student ready to generate. ``Predictor.load(export_dir)`` builds one from an export;
    the constructor takes the pieces (e.g. from ``export_format.load``)."""

    config: TagiConfig
    params: Any
    vocabulary: Any
    data: dict = dataclasses.field(default_factory=dict)
    input_length: int | None = None
    instruction_length: int | None = None
    max_decode_len: int | None = None
    batch_size: int = 32
    cache_size: int = 256

    def __post_init__(self):
        lengths = {**DEFAULT_LENGTHS, **(self.data.get("feature_lengths") or {})}
        self.input_length = self.input_length or lengths["inputs"]
        self.instruction_length = self.instruction_length or lengths["hyper_inputs"]
        self.max_decode_len = self.max_decode_len or lengths["targets"]
        for name in ("input_length", "instruction_length", "max_decode_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Predictor.{name} must be a positive int, got {value!r}")
        if self.vocabulary.vocab_size > self.config.t5.logits_width:
            raise ValueError(
                f"the vocabulary has {self.vocabulary.vocab_size} ids, the student predicts "
                f"{self.config.t5.logits_width}: not the vocabulary it was trained with"
            )
        self._cache: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.encodings = 0  # instructions encoded so far (cache misses)

    @classmethod
    def load(cls, export_dir: str, **overrides) -> Predictor:
        """The student of an export directory (``python -m tagi_jax.export``'s, or a finished
        run's ``MODEL_DIR/export``), on one device. ``overrides``: ``input_length``,
        ``instruction_length``, ``max_decode_len``, ``batch_size``, ``cache_size``. An export
        whose parameters hold NaN or Inf is refused (``export_format.NonFiniteParamsError``):
        it would only ever generate garbage."""
        from tagi_jax.artifacts import export_format

        loaded = export_format.load(export_dir)
        return cls(loaded.config, loaded.params, loaded.vocabulary(), data=loaded.data, **overrides)

    # --- the instruction, once per task ---------------------------------------------------

    def instruction_ids(self, instruction: str) -> np.ndarray:
        return encode_padded(self.vocabulary, [instruction], self.instruction_length)

    def encode(self, instruction: str):
        """``(instruction_ids [1, L], instruction states | None, adapters | None)`` of one
        instruction, computed once and cached (``tagi.encode_task``)."""
        if not isinstance(instruction, str):
            raise TypeError(f"an instruction is a str, got {type(instruction).__name__}")
        hit = self._cache.get(instruction)
        if hit is not None:
            self._cache.move_to_end(instruction)
            return hit
        ids = self.instruction_ids(instruction)
        self.encodings += 1
        states, adapters = tagi.encode_task(self.config, self.params, jnp.asarray(ids))
        self._cache[instruction] = (ids, states, adapters)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return self._cache[instruction]

    def adapters(self, instruction: str) -> lora.LoraAdapters | None:
        """The LoRA adapters the hypernetwork generates for ``instruction`` (batch 1; None when
        the student has no adapter targets)."""
        return self.encode(instruction)[2]

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        instruction: str | Sequence[str],
        inputs: str | Sequence[str],
        *,
        beam_size: int = 1,
        alpha: float = 0.6,
        max_decode_len: int | None = None,
        progress: bool = False,
    ) -> list[str] | str:
        """Answers for ``inputs`` under ``instruction`` (one for all, or one per input). The
        texts are what the hypernetwork and the student read, verbatim (``format_ni`` builds
        them the way natural-instructions training did). A single input str gives a str."""
        single = isinstance(inputs, str)
        inputs = [inputs] if single else list(inputs)
        instructions = (
            [instruction] * len(inputs) if isinstance(instruction, str) else list(instruction)
        )
        if len(instructions) != len(inputs):
            raise ValueError(
                f"{len(instructions)} instructions for {len(inputs)} inputs: give one "
                "instruction, or one per input"
            )
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for index, text in enumerate(instructions):
            groups[text].append(index)
        answers: list[str | None] = [None] * len(inputs)
        with _progress(len(inputs), "generating", progress) as bar:
            for text, indices in groups.items():
                decoded = self._generate_task(
                    text,
                    [inputs[i] for i in indices],
                    beam_size=beam_size,
                    alpha=alpha,
                    max_decode_len=max_decode_len or self.max_decode_len,
                    bar=bar,
                )
                for index, answer in zip(indices, decoded, strict=True):
                    answers[index] = answer
        return answers[0] if single else answers

    def generate_base(
        self, inputs: Sequence[str], *, max_decode_len: int | None = None, progress=False
    ) -> list[str]:
        """The backbone alone (no adapters, no instruction): the "base model" baseline."""
        answers = []
        length = max_decode_len or self.max_decode_len
        with _progress(len(inputs), "base model", progress) as bar:
            for chunk, rows in self._chunks(list(inputs)):
                ids = encode_padded(self.vocabulary, rows, self.input_length)
                tokens = t5.greedy_decode(
                    self.config.t5, self.params["t5"], jnp.asarray(ids), max_decode_len=length
                )
                answers += [decode_text(self.vocabulary, t) for t in np.asarray(tokens)[:chunk]]
                bar.update(chunk)
        return answers

    def _chunks(self, texts: list[str]):
        """``(real rows, rows padded to batch_size)`` per batch: one compilation for all."""
        size = self.batch_size
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            yield len(chunk), chunk + [chunk[-1]] * (size - len(chunk))

    def _generate_task(self, instruction, inputs, *, beam_size, alpha, max_decode_len, bar):
        if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
            raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
        ids, states, adapters = self.encode(instruction)
        rows = self.batch_size
        batch = {"hyper_input_tokens": jnp.asarray(np.repeat(ids, rows, axis=0))}
        answers = []
        for chunk, texts in self._chunks(inputs):
            batch["encoder_input_tokens"] = jnp.asarray(
                encode_padded(self.vocabulary, texts, self.input_length)
            )
            if beam_size == 1:
                tokens = tagi.greedy_decode(
                    self.config,
                    self.params,
                    batch,
                    max_decode_len=max_decode_len,
                    adapters=adapters,  # the task's, one row: greedy_decode's fastest form
                    instruction_states=states,
                )
            else:
                from tagi_jax.models import beam_search

                tokens, _ = beam_search.beam_search(
                    self.config,
                    self.params,
                    batch,
                    beam_size=beam_size,
                    max_decode_len=max_decode_len,
                    alpha=alpha,
                    adapters=None
                    if adapters is None
                    else lora.take(adapters, jnp.zeros(rows, jnp.int32)),
                    instruction_states=states,
                )
                tokens = tokens[:, 0]  # the best beam
            tokens = np.asarray(tokens)
            answers += [decode_text(self.vocabulary, t) for t in tokens[:chunk]]
            bar.update(chunk)
        return answers

    # --- natural-instructions formatting ------------------------------------------------------

    def ni_config(self, **overrides):
        """The NIConfig the student trained with (``overrides`` applied); Tk-Instruct's
        defaults for a student that did not train on natural-instructions data."""
        from tagi_jax.artifacts import export_format
        from tagi_jax.data import ni as ni_lib

        return export_format.ni_config_from(self.data, **overrides) or ni_lib.NIConfig()

    def format_ni(
        self, definition: str, task_input: str, positive_examples: Sequence[dict] = ()
    ) -> tuple[str, str]:
        """``(instruction, student input)`` of one natural-instructions instance, formatted as
        the student trained (``ni.format_instance`` with the export's NIConfig): the
        hypernetwork reads the Definition (+ the demonstrations ``positive_examples``, dicts
        with ``input``/``output``, as many as the config's ``num_pos_examples``)."""
        from tagi_jax.data import ni as ni_lib

        config = self.ni_config()
        budget = {}
        if config.max_source_length is not None:
            count_tokens, cut_source = ni_lib.token_budget(
                self.vocabulary, config.max_source_length
            )
            budget = dict(
                max_source_length=config.max_source_length,
                count_tokens=count_tokens,
                cut_source=cut_source,
            )
        task = {"Definition": [definition], "Positive Examples": list(positive_examples)}
        example = ni_lib.format_instance(
            task,
            {"input": task_input, "output": []},
            num_pos_examples=config.pos_examples,
            num_neg_examples=0,
            add_definition=config.add_definition,
            add_explanation=config.add_explanation,
            student_input=config.student_input,
            **budget,
        )
        return example["hyper_inputs"], example["inputs"]

    def generate_ni(
        self,
        definition: str,
        inputs: str | Sequence[str],
        positive_examples: Sequence[dict] = (),
        **kwargs,
    ) -> list[str] | str:
        """``generate`` for a natural-instructions task given by its Definition: each input is
        formatted as the student trained (``format_ni``)."""
        single = isinstance(inputs, str)
        pairs = [
            self.format_ni(definition, x, positive_examples)
            for x in ([inputs] if single else inputs)
        ]
        answers = self.generate([p[0] for p in pairs], [p[1] for p in pairs], **kwargs)
        return answers[0] if single else answers
