"""Near-duplicate images of a training table: a perceptual hash (or a CNN embedding) per image,
the pairs within a distance, and groups (their connected components) for grouped folds.

Competition photo sets hold the same subject more than once: Cassava's 2019 and 2020 images
overlap, and resized, recompressed or re-shot copies are common. A copy that lands in another
fold than its twin is validated by a model that trained on the twin, so CV reads high. `mixcls
duplicates` writes the table with a group column, and `mixcls train --group-col` then keeps each
group in one fold. Pairs whose labels differ are label noise found for free. `--against DIR`
lists instead which images of another folder (the test images, an extra data set) copy a
training image (`write_matches`).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mixcls.data import TrainTable

# imagehash's pHash of 16 x 16 DCT coefficients: 256 bits. On photos of one garment on a plain
# backdrop its 64-bit default put different garments within 4 bits of each other, where 256
# bits keep them 38 or more apart (benchmarks/duplicates.py measures both).
HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
# pHash looks at a 64 x 64 grey image; a JPEG decoded at a reduced DCT scale to a short side of
# 128 loses nothing it sees, and an 800 x 600 photo decodes several times faster.
DECODE_SHORT_SIDE = 128
DEFAULT_MAX_DISTANCE = 24  # of 256 bits; benchmarks/duplicates.py measures what it finds and misses
DEFAULT_MIN_SIMILARITY = 0.92  # cosine of two embeddings; measured there too


def hash_image(path: str | Path) -> np.ndarray:
    """The 256-bit perceptual hash (imagehash.phash) of one image file, as (256,) bools."""
    import imagehash
    from PIL import Image

    from mixcls.image_cache import decode_image

    pixels = decode_image(path, short_side=DECODE_SHORT_SIDE)
    return imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIZE).hash.reshape(-1)


def hash_images(paths: Sequence[str | Path], *, workers: int = 0,
                progress: Callable | None = None) -> np.ndarray:
    """(N, 256) bool perceptual hashes of `paths`, in their order; `workers` > 0 decodes in that
    many processes. `progress` wraps the iterator (tqdm) when given."""
    def wrap(items):
        return progress(items, total=len(paths)) if progress is not None else items

    if workers <= 0:
        rows = [hash_image(p) for p in wrap(paths)]
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(wrap(pool.map(hash_image, paths, chunksize=64)))
    return np.array(rows, dtype=bool).reshape(len(paths), HASH_BITS)


# Hamming distances by hand: scikit-learn's metric "hamming" works on one float per bit, and
# its radius search took 91.7 s for the pairs of 21,397 random 256-bit hashes (Cassava's
# training set) on this project's 2-core machine. XOR and popcount (numpy's bitwise_count) on
# the bits packed into 64-bit words give the same pairs in 6.0 s there, in blocks of rows that
# bound the memory (benchmarks/pair_search.py; tests check both searches against slow loops).
BLOCK_WORDS = 1 << 22  # 64-bit words XORed per block: 32 MiB, and 4 MiB of their counts


def _packed(hashes: np.ndarray) -> np.ndarray:
    """(N, W) uint64: each row of (N, B) bool hashes packed into words, zero-padded."""
    packed = np.packbits(np.asarray(hashes, dtype=bool), axis=1)
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    return np.ascontiguousarray(packed).view(np.uint64)


def _block_rows(n_columns: int, words: int) -> int:
    """Rows per block of rows compared against n_columns rows, within BLOCK_WORDS."""
    return max(1, BLOCK_WORDS // max(1, n_columns * words))


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) int32 differing bits of packed rows a against packed rows b."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int32)


def find_pairs(hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Every pair of rows i < j whose hashes (N, B) bool differ in at most `max_distance` bits:
    columns a, b (row indices) and bits (the distance), sorted by bits, then a, then b."""
    words = _packed(hashes)
    n, step = len(words), _block_rows(len(words), words.shape[1])
    found = [np.zeros((0, 3), dtype=np.int64)]
    for start in range(0, n, step):
        block = _distances(words[start:start + step], words[start:])  # row start + i, column start + j
        i, j = np.nonzero(block <= max_distance)
        keep = i < j
        found.append(np.stack([i[keep] + start, j[keep] + start, block[i[keep], j[keep]]], axis=1))
    rows = np.concatenate(found).astype(np.int64)
    pairs = pd.DataFrame({"a": rows[:, 0], "b": rows[:, 1], "bits": rows[:, 2]})
    return pairs.sort_values(["bits", "a", "b"], ignore_index=True)


def embed_images(paths: Sequence[str | Path], *, run: str | Path | None = None,
                 model: str | None = None, pretrained_file: str | None = None,
                 pretrained: bool = False, img_size: int = 224, device: str = "auto",
                 batch_size: int = 64, workers: int = 0) -> np.ndarray:
    """(N, D) float32 unit-length embeddings: the pooled penultimate features of the plain
    images, from a trained run's fold models (mean over the folds, `predict.extract_features`)
    or from timm model `model` with its pretrained weights (hub or `pretrained_file`), at
    `img_size`, normalised with the weights' own mean and std."""
    from mixcls import predict
    from mixcls.config import Config, ModelConfig
    from mixcls.devices import resolve_device
    from mixcls.models import build_model

    if run is not None:
        features = predict.extract_features(run, [str(p) for p in paths], device=device,
                                            batch_size=batch_size, workers=workers)
    else:
        cfg = Config()
        cfg.model = ModelConfig(name=model, pretrained=pretrained, pretrained_file=pretrained_file)
        cfg.data.img_size = img_size
        dev = resolve_device(device)
        net = build_model(cfg.model, 1).to(dev).eval()  # the classifier is never used
        loaded = predict.LoadedModel(net, cfg, ["0"], 0)
        features = predict.predict_fold_outputs([loaded], [str(p) for p in paths], device=dev,
                                                views=("orig",), batch_size=batch_size,
                                                workers=workers, features=True).features[0]
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def find_similar_pairs(embeddings: np.ndarray, min_similarity: float) -> pd.DataFrame:
    """Every pair of rows i < j of unit-length `embeddings` (N, D) whose cosine similarity is
    at least `min_similarity`: columns a, b, similarity, most similar first (then a, then b);
    scikit-learn's brute-force radius search, metric cosine."""
    from sklearn.neighbors import NearestNeighbors

    n = len(embeddings)
    if n < 2:
        return pd.DataFrame({"a": pd.Series(dtype=np.int64), "b": pd.Series(dtype=np.int64),
                             "similarity": pd.Series(dtype=np.float64)})
    search = NearestNeighbors(radius=1.0 - min_similarity + 1e-9, metric="cosine",
                              algorithm="brute").fit(embeddings)
    distances, neighbours = search.radius_neighbors(embeddings, return_distance=True)
    a = np.repeat(np.arange(n), [len(row) for row in neighbours])
    b = np.concatenate(neighbours).astype(np.int64)
    similarity = 1.0 - np.concatenate(distances)
    keep = a < b
    pairs = pd.DataFrame({"a": a[keep], "b": b[keep], "similarity": similarity[keep]})
    return pairs.sort_values(["similarity", "a", "b"], ascending=[False, True, True],
                             ignore_index=True)


def nearest_hashes(queries: np.ndarray, references: np.ndarray) -> pd.DataFrame:
    """For each row of `queries` (M, B) bool, the row of `references` (N, B) whose hash differs
    in the fewest bits (the first of them on a tie): columns ref (index) and bits."""
    q, r = _packed(queries), _packed(references)
    ref, bits = np.zeros(len(q), dtype=np.int64), np.zeros(len(q), dtype=np.int64)
    step = _block_rows(len(r), r.shape[1])
    for start in range(0, len(q), step):
        block = _distances(q[start:start + step], r)
        ref[start:start + len(block)] = block.argmin(axis=1)
        bits[start:start + len(block)] = block.min(axis=1)
    return pd.DataFrame({"ref": ref, "bits": bits})


def nearest_embeddings(queries: np.ndarray, references: np.ndarray) -> pd.DataFrame:
    """For each unit-length row of `queries` (M, D), the row of `references` (N, D) of highest
    cosine similarity (one of them on a tie): columns ref (index) and similarity."""
    from sklearn.neighbors import NearestNeighbors

    search = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(references)
    distances, index = search.kneighbors(queries, return_distance=True)
    return pd.DataFrame({"ref": index[:, 0].astype(np.int64), "similarity": 1.0 - distances[:, 0]})


def identical_files(paths: Sequence[str | Path]) -> list[list[int]]:
    """Groups (two or more row indices, ascending) of files with identical bytes, in the order
    of their first rows. Only files of equal size are read (SHA-1 of their bytes), so a set of
    photos with no copies costs one stat per file."""
    import hashlib
    import os

    sizes = pd.Series([os.path.getsize(p) for p in paths])
    candidates = np.flatnonzero(sizes.duplicated(keep=False).to_numpy())
    digests = {}
    for i in candidates:
        with open(paths[i], "rb") as f:
            digests[int(i)] = (int(sizes.iat[i]), hashlib.sha1(f.read()).hexdigest())
    groups: dict[tuple[int, str], list[int]] = {}
    for i, key in digests.items():
        groups.setdefault(key, []).append(i)
    return sorted((rows for rows in groups.values() if len(rows) > 1), key=lambda rows: rows[0])


def group_rows(n_rows: int, pairs: pd.DataFrame) -> np.ndarray:
    """(N,) the smallest row index of each row's group: the connected components of the pairs
    (a twin of a twin is in the same group, so no fold split can separate them)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs["a"].to_numpy(), pairs["b"].to_numpy())),
                       shape=(n_rows, n_rows))
    _, component = connected_components(graph, directed=False)
    first = pd.Series(np.arange(n_rows)).groupby(component).transform("min")
    return first.to_numpy(dtype=np.int64)


@dataclass(frozen=True)
class HashFinder:
    """Near-duplicates by perceptual hash: at most `max_distance` of the 256 bits differ."""

    max_distance: int = DEFAULT_MAX_DISTANCE
    workers: int = 0  # processes that decode and hash (0: this one)

    def check(self) -> None:
        from mixcls.data import DataError

        if not 0 <= self.max_distance < HASH_BITS:
            raise DataError(f"max_distance {self.max_distance} must be in 0 … {HASH_BITS - 1} bits")

    def describe(self) -> str:
        return f"within {self.max_distance} of {HASH_BITS} bits"

    def vectors(self, paths: Sequence[str], progress: Callable | None) -> np.ndarray:
        return hash_images(paths, workers=self.workers, progress=progress)

    def pairs(self, vectors: np.ndarray) -> pd.DataFrame:
        return find_pairs(vectors, self.max_distance)

    def nearest(self, queries: np.ndarray, references: np.ndarray) -> pd.DataFrame:
        """ref, bits, and near (within max_distance) for each query."""
        found = nearest_hashes(queries, references)
        return found.assign(near=found["bits"] <= self.max_distance)


@dataclass(frozen=True)
class EmbeddingFinder:
    """Near-duplicates by CNN embedding: cosine similarity at least `min_similarity`, from a
    trained run (`run`) or a pretrained timm model (`model`, hub or `pretrained_file`)."""

    min_similarity: float = DEFAULT_MIN_SIMILARITY
    run: str | None = None
    model: str | None = None
    pretrained_file: str | None = None
    pretrained: bool = False
    img_size: int = 224
    device: str = "auto"
    batch_size: int = 64
    workers: int = 0

    def check(self) -> None:
        from mixcls.data import DataError
        from mixcls.models import check_model_name, check_pretrained_available
        from mixcls.runs import RunError, RunFolder

        if not 0.0 < self.min_similarity <= 1.0:
            raise DataError(f"min_similarity {self.min_similarity} must be in (0, 1]")
        if (self.run is None) == (self.model is None):
            raise DataError("embeddings come from --run RUN (its fold models) or from --model NAME "
                            "with --pretrained-file FILE or --pretrained: give exactly one")
        if self.run is not None:
            run = RunFolder(Path(self.run))
            run.classes  # a folder that is not a run fails here
            if not any((d / "best.pt").is_file() for d in run.fold_dirs.values()):
                raise RunError(f"{run.path}: no fold_*/best.pt checkpoints; is this a finished "
                               "mixcls run?")
            return
        check_model_name(self.model)
        if self.pretrained_file is not None and not Path(self.pretrained_file).is_file():
            raise DataError(f"pretrained_file {self.pretrained_file} does not exist")
        if self.pretrained_file is None and not self.pretrained:
            raise DataError(f"--model {self.model}: random weights embed nothing; pass "
                            "--pretrained-file FILE or --pretrained")
        if self.pretrained_file is None:
            check_pretrained_available(self.model)

    def describe(self) -> str:
        source = f"run {self.run}" if self.run is not None else f"{self.model} at {self.img_size} px"
        return f"with cosine similarity >= {self.min_similarity} ({source})"

    def vectors(self, paths: Sequence[str], progress: Callable | None) -> np.ndarray:
        return embed_images(paths, run=self.run, model=self.model,
                            pretrained_file=self.pretrained_file, pretrained=self.pretrained,
                            img_size=self.img_size, device=self.device,
                            batch_size=self.batch_size, workers=self.workers)

    def pairs(self, vectors: np.ndarray) -> pd.DataFrame:
        return find_similar_pairs(vectors, self.min_similarity)

    def nearest(self, queries: np.ndarray, references: np.ndarray) -> pd.DataFrame:
        """ref, similarity, and near (at least min_similarity) for each query."""
        found = nearest_embeddings(queries, references)
        return found.assign(near=found["similarity"] >= self.min_similarity - 1e-9)


@dataclass
class DuplicateResult:
    """What `write_duplicate_groups` wrote: the table with its group column, the pairs
    (image_a, image_b, bits or similarity, label_a, label_b, same_label), the images folder,
    and each image's hash or embedding."""

    table: pd.DataFrame
    pairs: pd.DataFrame
    column: str
    finder: HashFinder | EmbeddingFinder
    images_dir: Path
    vectors: np.ndarray = field(repr=False)  # (N, 256) bool hashes or (N, D) embeddings, row order

    def summary(self) -> str:
        groups = self.table[self.column].value_counts()
        shared = groups[groups > 1]
        conflicts = int((~self.pairs["same_label"]).sum())
        return (f"{len(self.table)} images: {int(shared.sum())} in {len(shared)} group(s) of "
                f"near-duplicates (largest {int(shared.max()) if len(shared) else 0}); "
                f"{len(self.pairs)} pair(s) {self.finder.describe()}, {conflicts} of them with "
                "different labels")


@dataclass
class TrainingImages:
    """A training table as `mixcls duplicates` reads it: the checked TrainTable, the table's
    own columns as text (`raw`; a class-per-folder tree's is image_id, label), its label column,
    and where it came from."""

    table: TrainTable
    raw: pd.DataFrame
    label_col: str
    source: str

    @classmethod
    def read(cls, data: str | Path | None, *, csv: str | Path | None, images: str | Path | None,
             id_col: str, label_col: str, out: str | Path) -> "TrainingImages":
        """The table, its files checked (headers), and `out` refused when it is the table."""
        from mixcls.data import DataError, load_train_table, read_text_table, resolve_layout

        csv_path, images_dir = resolve_layout(data, csv, images)
        table = load_train_table(data, csv=csv, images=images, id_col=id_col, label_col=label_col,
                                 check_images="header")
        if csv_path is None:  # a class-per-folder tree: its table is the scan's ids and folders
            label_col = "label"
            raw = pd.DataFrame({"image_id": table.frame["image_id"],
                                "label": np.asarray(table.classes, dtype=object)[table.labels]})
        else:
            raw = read_text_table(csv_path)
            if Path(out).resolve() == csv_path.resolve():
                raise DataError(f"--out {out} is the training table itself; write beside it")
        return cls(table, raw, label_col, str(csv_path or images_dir))

    @property
    def ids(self) -> np.ndarray:
        return self.table.frame["image_id"].to_numpy()

    @property
    def labels(self) -> np.ndarray:
        """Each row's label as the table writes it."""
        return self.raw[self.label_col].str.strip().to_numpy()

    @property
    def paths(self) -> list[str]:
        return self.table.frame["path"].tolist()


def write_duplicate_groups(data: str | Path | None, out: str | Path, *, csv: str | Path | None = None,
                           images: str | Path | None = None, id_col: str = "image_id",
                           label_col: str = "label", column: str = "dup_group",
                           finder: HashFinder | EmbeddingFinder | None = None,
                           pairs_out: str | Path | None = None,
                           progress: Callable | None = None) -> DuplicateResult:
    """Hash (or embed) every training image, write `out`: the training table (every column as
    read) plus `column`, each row's group (the image id of its group's first row in table
    order; an image without near-duplicates is its own group). With `pairs_out`, also the
    pairs CSV. `finder` defaults to HashFinder().

    Every check (table, files, the new column's name, `out` not the input, the finder's
    settings) comes before any image is hashed; both files are written under a temporary name
    and renamed.
    """
    from mixcls.data import DataError, check_classes_beside, write_table_with_classes
    from mixcls.runs import atomic_write_csv

    finder = finder if finder is not None else HashFinder()
    finder.check()
    train = TrainingImages.read(data, csv=csv, images=images, id_col=id_col, label_col=label_col,
                                out=out)
    if column in train.raw.columns:
        raise DataError(f"{train.source}: already has a column {column!r}; pass another --column")
    check_classes_beside(out, train.table.classes, source=train.source, what="grouped table")
    vectors = finder.vectors(train.paths, progress)
    pairs = finder.pairs(vectors)
    ids, labels = train.ids, train.labels
    grouped = train.raw.assign(**{column: ids[group_rows(len(ids), pairs)]})
    score = pairs.columns[2]  # bits or similarity
    named = pd.DataFrame({"image_a": ids[pairs["a"]], "image_b": ids[pairs["b"]],
                          score: pairs[score], "label_a": labels[pairs["a"]],
                          "label_b": labels[pairs["b"]]})
    named["same_label"] = named["label_a"] == named["label_b"]
    if pairs_out is not None:
        atomic_write_csv(pairs_out, named)
    write_table_with_classes(out, grouped, train.table.classes, source=train.source,
                             what="grouped table")
    return DuplicateResult(table=grouped, pairs=named, column=column, finder=finder,
                           images_dir=train.table.images_dir, vectors=vectors)


@dataclass
class MatchResult:
    """What `write_matches` wrote: one row per image of the other folder (image_id,
    train_image_id, bits or similarity, train_label, near_duplicate), near-duplicates first."""

    matches: pd.DataFrame
    against: Path
    n_train: int
    finder: HashFinder | EmbeddingFinder

    def summary(self) -> str:
        near = self.matches[self.matches["near_duplicate"]]
        labels = near["train_label"].value_counts()
        shown = ", ".join(f"{label} {count}" for label, count in labels.head(5).items())
        more = ", …" if len(labels) > 5 else ""
        return (f"{len(near)} of the {len(self.matches)} images of {self.against} have a "
                f"near-duplicate among the {self.n_train} training images "
                f"({self.finder.describe()})" + (f"; their training labels: {shown}{more}"
                                                 if len(near) else ""))


def write_matches(data: str | Path | None, against: str | Path, out: str | Path, *,
                  csv: str | Path | None = None, images: str | Path | None = None,
                  id_col: str = "image_id", label_col: str = "label",
                  finder: HashFinder | EmbeddingFinder | None = None,
                  progress: Callable | None = None) -> MatchResult:
    """For every image below `against` (the test images, an extra data set, an unlabelled pool),
    the training image nearest to it and whether it is a near-duplicate at `finder`'s limit;
    written to `out` (temporary name, then renamed), near-duplicates first, closest first.

    Every check (both folders' files, `out`, the finder's settings) comes before any image is
    hashed. A folder that is the training images folder, or holds it, is refused: its images
    would match themselves.
    """
    from mixcls.data import DataError, check_image_folder
    from mixcls.runs import atomic_write_csv

    finder = finder if finder is not None else HashFinder()
    finder.check()
    train = TrainingImages.read(data, csv=csv, images=images, id_col=id_col, label_col=label_col,
                                out=out)
    against = Path(against)
    train_dir = Path(train.table.images_dir).resolve()
    if against.resolve() == train_dir or against.resolve() in train_dir.parents:
        raise DataError(f"--against {against} is (or holds) the training images folder "
                        f"{train.table.images_dir}; leave --against out to pair the training "
                        "images among themselves")
    other_ids, other_paths = check_image_folder(against)
    vectors = finder.vectors(train.paths + other_paths, progress)  # one model load for both
    n_train = len(train.paths)
    found = finder.nearest(vectors[n_train:], vectors[:n_train])
    score = found.columns[1]  # bits or similarity
    matches = pd.DataFrame({"image_id": other_ids, "train_image_id": train.ids[found["ref"]],
                            score: found[score].to_numpy(),
                            "train_label": train.labels[found["ref"]],
                            "near_duplicate": found["near"].to_numpy()})
    matches = matches.sort_values(["near_duplicate", score, "image_id"],
                                  ascending=[False, score == "bits", True], ignore_index=True)
    atomic_write_csv(out, matches)
    return MatchResult(matches=matches, against=against, n_train=n_train, finder=finder)
