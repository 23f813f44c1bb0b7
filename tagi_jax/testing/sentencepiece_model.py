"""A SentencePiece model with T5's id layout, trained on the fly on the SNI sample text.

No T5 ``spiece.model`` can be downloaded here; tests and benchmarks that need a real subword
tokenizer train one (seconds) on the natural-instructions text they read anyway.
"""

from __future__ import annotations

import glob
import json
import os


def sni_text(sni_dir: str) -> list[str]:
    """Definitions, demonstrations, inputs and outputs of every task file, one per line."""
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(sni_dir, "tasks", "*.json"))):
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
        lines += task["Definition"] + [e["input"] for e in task.get("Positive Examples", [])]
        lines += [i["input"] for i in task["Instances"]]
        lines += [o for i in task["Instances"] for o in i["output"]]
    return [line.replace("\n", " ") for line in lines]


def train(lines: list[str], out_dir: str, vocab_size: int) -> str:
    """Writes ``out_dir/spiece.model`` (pad 0, EOS 1, UNK 2, no BOS: T5's layout); returns
    ``out_dir``, a directory ``vocab.get_vocabulary`` accepts."""
    import sentencepiece as spm

    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(out_dir, "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return out_dir
