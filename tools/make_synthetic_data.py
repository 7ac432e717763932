"""Write a synthetic REC or OVD data set (coloured shapes) in VLM-R1's jsonl format.

    python tools/make_synthetic_data.py --task rec --out data/rec --n 1000 [--seed 0] [--images-per-sample 1]
        [--n-test 200] [--difficulty {normal,easy,locate}]

Writes ``train.jsonl``, ``test.jsonl`` and ``test_ood.jsonl`` (held-out colour x shape pairs) with images under
``OUT/images/``; for OVD also ``<split>_coco.json``. Pair the jsonl files with ``OUT`` as their image folder.
The library behind it is ``megatron_vlmr1.data.synthetic`` (``make_rec_dataset``, ``make_ovd_dataset``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_vlmr1.data.synthetic import DIFFICULTIES, make_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("rec", "ovd"), required=True)
    parser.add_argument("--out", required=True, help="output folder (also the image folder of the jsonl files)")
    parser.add_argument("--n", type=int, required=True, help="number of training records")
    parser.add_argument("--n-test", type=int, default=None, help="records in test and in test_ood (default n/5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-sample", type=int, default=1)
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="normal",
                        help="easy: one or two large shapes in a 112 px image at four possible positions; "
                             "locate (the CPU demo): one shape filling a quadrant, over a background whose "
                             "colour codes the pixel's x and y")
    args = parser.parse_args(argv)
    try:
        written = make_dataset(args.task, args.out, args.n, args.seed, n_test=args.n_test,
                               images_per_sample=args.images_per_sample, difficulty=args.difficulty)
    except ValueError as err:
        parser.error(str(err))
    for split, path in written.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
