"""Top-1 accuracy of structured pruning on real trained models, with and without a short fine-tune.

    python tools/prune_accuracy.py                      # digits CNN and sequence LSTM, 30/50/70%
    python tools/prune_accuracy.py --criteria l1 taylor --epochs 2

For each trained model (orca_compiler.trained: trained in seconds in this process) and ratio:
prune-channels removes the channels / hidden units, the accuracy of the pruned model is measured
on the held-out test set, then `orca_compiler.finetune` trains the pruned model for `--epochs` on
the training set and the accuracy is measured again, and the fine-tuned model is compiled (O2)
and measured once more (it must equal the eager fine-tuned accuracy). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time

import orca_compiler as oc
from orca_compiler import trained

BATCH = 64


def evaluate(model_name: str, ratios, criteria, epochs: int) -> list[dict]:
    """One row per (criterion, ratio): weights, accuracy before / pruned / fine-tuned / compiled."""
    base = getattr(trained, model_name)()
    inputs = base.example_inputs(BATCH)
    calibration = [(x, y) for x, y in base.batches(BATCH)[:4]]
    rows = []
    for criterion in criteria:
        for ratio in ratios:
            model = getattr(trained, model_name)().model
            pipeline = f"prune-channels{{ratio={ratio},criterion={criterion}}}"
            start = time.perf_counter()
            pruned, report = oc.prune(model, inputs, pipeline, calibration_data=calibration,
                                      calibration_loss=base.loss)
            seconds = time.perf_counter() - start
            before_bytes, after_bytes = report.weight_bytes
            pruned_acc = base.accuracy(pruned, BATCH)
            tune = oc.finetune(pruned, base.loss, base.batches(BATCH), epochs=epochs, lr=1e-3)
            tuned_acc = base.accuracy(pruned, BATCH)
            compiled = oc.compile(pruned, inputs, pipeline="O2")
            rows.append({"model": model_name, "criterion": criterion, "ratio": ratio,
                         "weights": f"{before_bytes / 1024:.0f} -> {after_bytes / 1024:.0f} KB",
                         "original": base.test_accuracy, "pruned": pruned_acc, "finetuned": tuned_acc,
                         "compiled": base.accuracy(compiled, BATCH), "prune_s": seconds,
                         "finetune_s": tune.seconds})
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['criterion']} | {r['ratio']:.0%} | {r['weights']} | {r['original']:.4f} "
            f"| {r['pruned']:.4f} | {r['finetuned']:.4f} | {r['compiled']:.4f} | {r['prune_s']:.1f} "
            f"| {r['finetune_s']:.1f} |")


HEADER = ("| model | criterion | ratio | weights | original top-1 | pruned | + fine-tune | compiled (O2) "
          "| prune s | fine-tune s |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "sequence_lstm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--criteria", nargs="+", default=["l1", "taylor"])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    print(HEADER)
    for name in args.models:
        evaluate(name, args.ratios, args.criteria, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
