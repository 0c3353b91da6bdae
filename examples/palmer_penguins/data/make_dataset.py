"""Derive penguins_classification.csv from the `palmerpenguins` package.

    pip install palmerpenguins==0.1.6
    python make_dataset.py            # rewrites penguins_classification.csv beside this file
    python make_dataset.py --check    # exits 1 if the committed file differs

The result is the package's `penguins` table (344 rows) reduced to a
classification task: the target `species`, the features `island`,
`bill_length_mm`, `bill_depth_mm`, `flipper_length_mm`, `body_mass_g` and
`sex`; the `year` column is dropped and the 11 rows with any missing value are
removed, which leaves 333 rows. Flipper length and body mass are whole numbers
in the source and are written as integers. Row order is the package's order.
See README.md beside this file for provenance and licence.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "penguins_classification.csv"
COLUMNS = ["species", "island", "bill_length_mm", "bill_depth_mm",
           "flipper_length_mm", "body_mass_g", "sex"]


def build_csv() -> str:
    from palmerpenguins import load_penguins

    frame = load_penguins()[COLUMNS].dropna().reset_index(drop=True)
    frame = frame.astype({"flipper_length_mm": "int64", "body_mass_g": "int64"})
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed file instead of writing it")
    args = parser.parse_args(argv)
    text = build_csv()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.name} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{OUTPUT.name} matches the palmerpenguins package ({text.count(chr(10)) - 1} rows)")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({text.count(chr(10)) - 1} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
