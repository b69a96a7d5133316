"""Time to build the dataset of an ImageNet-shaped image folder: listing, not reading.

Creates a tree of `--classes` folders of `--per-class` empty `.JPEG` files (ImageNet-1k's `train/` has 1,000 folders
of about 1,281 images; the default, 1,000 x 200 = 200,000 files, is a sixth of it), then times:

* `list_image_files`: the directory walk `ImageFolderDataset` uses (`os.scandir`, entry types from the listing);
* `ImageFolderDataset`: the walk plus the numpy array of paths the dataset keeps;
* `rglob`: `sorted(p for p in root.rglob("*") if p.is_file() and ...)`, the walk of sinder-peft 0.1.0 (one `stat`
  per entry and a `Path` object per file), for comparison.

No file is opened by any of them (the files are empty: opening one would fail loudly in the dataset). Each is run
`--repeats` times on a warm directory cache (the first, cold walk is reported apart).

Usage:
    python benchmarks/bench_listing.py --output results/listing.json
    python benchmarks/bench_listing.py --quick --output /tmp/listing.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import format_table, machine_description, summarize_times, write_json

from sinder_peft.images.datasets import IMAGE_EXTENSIONS, ImageFolderDataset, list_image_files


def build_tree(root: Path, classes: int, per_class: int) -> int:
    """Create `classes` folders of `per_class` empty `.JPEG` files under `root`; return the number of files."""
    for label in range(classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            (folder / f"n{label:08d}_{index}.JPEG").touch()
    return classes * per_class


def rglob_listing(root: Path) -> list[Path]:
    """The image-folder walk of sinder-peft 0.1.0."""
    return sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def measure(name: str, function: Any, repeats: int, expected: int) -> dict[str, Any]:
    """Time `function()` once cold-ish (first call) and `repeats` times warm; check it finds `expected` files."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        found = function()
        times.append(time.perf_counter() - started)
        if len(found) != expected:
            raise AssertionError(f"{name} found {len(found)} files, expected {expected}")
    timing = summarize_times(times[1:], warmup=1)
    return {"variant": name, "first_s": times[0], "median_s": timing.median_s, "files": expected}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="where to build the tree (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="20 x 100 files, one repeat")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.per_class, args.repeats = 20, 100, 1

    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="sinder-listing-"))
    root = base / "train"
    try:
        started = time.perf_counter()
        count = build_tree(root, args.classes, args.per_class)
        created = time.perf_counter() - started
        results = [
            measure("list_image_files", lambda: list_image_files(root), args.repeats, count),
            measure("ImageFolderDataset", lambda: ImageFolderDataset(root, 224, 14), args.repeats, count),
            measure("rglob (0.1.0)", lambda: rglob_listing(root), args.repeats, count),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)

    rows = [
        [entry["variant"], f"{entry['files']:,}", f"{entry['first_s']:.2f}", f"{entry['median_s']:.2f}"]
        for entry in results
    ]
    print(f"Tree of {args.classes} x {args.per_class} files (created in {created:.1f} s):")
    print(format_table(["variant", "files", "first (s)", "median warm (s)"], rows))
    if args.output:
        payload = {
            "machine": machine_description(),
            "classes": args.classes,
            "per_class": args.per_class,
            "results": results,
        }
        write_json(args.output, payload)


if __name__ == "__main__":
    main()
