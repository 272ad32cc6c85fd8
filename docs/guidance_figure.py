"""docs/study_guidance.png from a study_guidance sweep's table: FID (with its bootstrap spread
and the floor) and class accuracy (with the classifier's own test accuracy) against the guidance
scale s, the unconditional model's FID as a line.

    python docs/guidance_figure.py outputs/studies/guidance/results.csv docs/study_guidance.png
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCALES = {"s0": 0.0, "": 1.0, "s1_5": 1.5, "s2": 2.0, "s3": 3.0, "s5": 5.0}


def main(table: str, figure: str) -> None:
    with open(table) as f:
        rows = {row["conditioning"]: row for row in csv.DictReader(f)}
    cond, uncond = rows["class"], rows["none"]

    def value(name: str, key: str) -> float:
        return float(cond[f"test/{name}/{key}" if name else f"test/{key}"])

    s = list(SCALES.values())
    fid = [value(n, "fid") for n in SCALES]
    spread = [value(n, "fid_bootstrap_std") for n in SCALES]
    accuracy = [value(n, "class_accuracy") for n in SCALES]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    left.errorbar(s, fid, yerr=spread, marker="o", capsize=3, label="conditional model, guided")
    left.axhline(float(uncond["test/fid"]), color="tab:red", label="unconditional model")
    left.axhline(float(cond["test/fid_floor"]), color="0.5", ls="--", label="floor (real digits)")
    left.set(xlabel="guidance scale s", ylabel="FID (digit classifier features)")
    left.legend(fontsize=8)
    right.plot(s, accuracy, marker="o", label="samples of the class asked for")
    right.axhline(
        float(cond["test/class_accuracy_real"]),
        color="0.5",
        ls="--",
        label="classifier on real test digits",
    )
    right.set(xlabel="guidance scale s", ylabel="class accuracy", ylim=(0, 1.05))
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle("Classifier-free guidance on the digits (s = 1: conditional, 0: unconditional)")
    fig.tight_layout()
    fig.savefig(figure)


if __name__ == "__main__":
    main(*sys.argv[1:3])
