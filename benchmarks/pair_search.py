"""How long `mixcls duplicates` takes to pair the perceptual hashes of a whole training set,
against scikit-learn's radius search (what it used before session 18).

Random 256-bit hashes (seed 0), `--rows` of them (default 21,397: Cassava 2020's training set),
with a few planted near pairs so both searches have something to find. Times, for each row
count, `mixcls.duplicates.find_pairs` (XOR and popcount of the packed bits) and scikit-learn's
brute-force `NearestNeighbors(metric="hamming").radius_neighbors`, and checks that both return
the same pairs. Nothing is read or downloaded.

Ends with `rows=… mixcls_s=… sklearn_s=… speedup=… same_pairs=…` for the largest row count.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np
import pandas as pd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 21397])
    parser.add_argument("--max-distance", type=int, default=None, help="default: mixcls's")
    return parser.parse_args(argv)


def planted_hashes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 256) random bits; every 100th row a copy of the row before it with 5 % of bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.random((n, 256)) < 0.5
    copies = np.arange(1, n, 100)
    hashes[copies] = hashes[copies - 1] ^ (rng.random((len(copies), 256)) < 0.05)
    return hashes


def sklearn_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int, int]]:
    """(a, b, bits) of every pair a < b within max_distance, by scikit-learn's radius search."""
    from sklearn.neighbors import NearestNeighbors

    n, bits = hashes.shape
    search = NearestNeighbors(radius=(max_distance + 0.5) / bits, metric="hamming",
                              algorithm="brute").fit(hashes)
    distances, neighbours = search.radius_neighbors(hashes, return_distance=True)
    return {(i, int(j), int(round(d * bits))) for i, (row, dist) in enumerate(zip(neighbours, distances))
            for j, d in zip(row, dist) if i < j}


def main(argv: list[str] | None = None) -> int:
    importlib.import_module("sklearn.neighbors")  # its import stays out of the first timing

    from mixcls.duplicates import DEFAULT_MAX_DISTANCE, find_pairs

    args = parse_args(argv)
    limit = DEFAULT_MAX_DISTANCE if args.max_distance is None else args.max_distance
    rows = []
    for n in args.rows:
        hashes = planted_hashes(n)
        started = time.perf_counter()
        ours = find_pairs(hashes, limit)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = sklearn_pairs(hashes, limit)
        theirs_s = time.perf_counter() - started
        same = set(map(tuple, ours[["a", "b", "bits"]].to_numpy().tolist())) == theirs
        rows.append({"rows": n, "pairs": len(ours), "mixcls_s": round(ours_s, 2),
                     "sklearn_s": round(theirs_s, 2), "speedup": round(theirs_s / ours_s, 1),
                     "same_pairs": same})
    table = pd.DataFrame(rows)
    print(f"pairs of random 256-bit hashes within {limit} bits, every pair compared")
    print(table.to_string(index=False))
    last = rows[-1]
    print(f"rows={last['rows']} mixcls_s={last['mixcls_s']} sklearn_s={last['sklearn_s']} "
          f"speedup={last['speedup']} same_pairs={int(last['same_pairs'])}")
    return 0 if all(r["same_pairs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
