"""Input-pipeline throughput: SNI Def+2Pos examples per second through SeqIO.

Reads the natural-instructions files, formats every instance (with Tk-Instruct's token-budget
rule for demonstrations), tokenises four streams with SentencePiece, pads them to 1024 (input,
instruction, teacher source) / 128 (target) tokens and batches them as numpy arrays: exactly
what the trainer consumes. Without ``--spm`` (T5's ``spiece.model`` or a checkpoint directory
holding it) a 8000-piece SentencePiece model is trained on the SNI text first (not timed).

  python benchmarks/input_pipeline.py --sni_dir ../shared/data/sni [--spm /models/t5-base]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import seqio

from tagi_jax.data import feature_converter, ni, tasks, vocab
from tagi_jax.testing import sentencepiece_model


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sni_dir", default=os.path.join(here, "..", "..", "shared", "data", "sni")
    )
    parser.add_argument("--spm", default=None, help="spiece.model or a directory holding it")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the train split")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lines = sentencepiece_model.sni_text(args.sni_dir)
        spm_path = args.spm or sentencepiece_model.train(lines, tmp, 8000)
        vocabulary = vocab.get_vocabulary("sentencepiece", spm_path, extra_ids=0)
        config = ni.NIConfig(max_source_length=1024)  # the task name picks Def + 2 Pos
        tasks.register_tasks(
            vocabulary=vocabulary, sni_dir=args.sni_dir, sni_config=config, prefix="bench"
        )
        conv = feature_converter.TagiFeatureConverter()
        lengths = conv.task_feature_lengths(
            {"inputs": 1024, "hyper_inputs": 1024, "teacher_inputs": 1024, "targets": 128}
        )
        ds = seqio.get_dataset(
            "bench_sni_def_pos2",
            task_feature_lengths=lengths,
            dataset_split="train",
            shuffle=False,
            num_epochs=args.epochs,
            feature_converter=conv,
        )
        start, examples = time.perf_counter(), 0
        for batch in feature_converter.numpy_batches(ds, args.batch):
            examples += batch["encoder_input_tokens"].shape[0]
        seconds = time.perf_counter() - start
    print(
        f"SNI Def+2Pos, 1024/128 tokens, batch {args.batch}, {os.cpu_count()} CPU cores: "
        f"{examples} examples in {seconds:.1f}s = {examples / seconds:,.0f} examples/s "
        f"({'given' if args.spm else 'locally trained 8000-piece'} SentencePiece)"
    )


if __name__ == "__main__":
    main()
