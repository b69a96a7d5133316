"""Find and draw the singular defects of a ViT: a small script around `sinder_peft.jobs.diagnose.diagnose`.

    python examples/diagnose.py                                   # offline demo: planted-defect model, demo images
    python examples/diagnose.py --model facebook/dinov2-base photo.jpg photos/ --output-dir diagnose-out

Same as `sinder diagnose`; writes report.json, NAME_diagnosis.png per image and layer_norms.png.
"""

from __future__ import annotations

import argparse
import logging

from transformers import HfArgumentParser

from sinder_peft.jobs.diagnose import DEFAULT_RESOLUTION, diagnose
from sinder_peft.models.other_libraries import ModelKwargsArguments


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[HfArgumentParser(ModelKwargsArguments, add_help=False)],
    )
    parser.add_argument("images", nargs="*", help="image files or folders (none with --model demo: demo images)")
    parser.add_argument(
        "--model",
        default="demo",
        help="Hub id, save_pretrained directory, 'demo', timm:NAME_OR_DIR or timm:hf-hub:ORG/NAME",
    )
    parser.add_argument("--output-dir", default="diagnose-out")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    report = diagnose(
        args.model,
        args.images,
        output_dir=args.output_dir,
        resolution=args.resolution,
        model_kwargs=args.model_kwargs,
    )

    print(
        f"{report['num_defective_images']} of {report['num_images']} images are defective ({report['recipe']} "
        f"recipe's test), {report['num_images_with_high_norm_defects']} have a high-norm defect."
    )
    for entry in report["images"]:
        ratios = entry["max_median_norm_ratio"]
        print(
            f"{entry['path']}: first defective layer {entry['first_defective_layer']}, "
            f"max/median token norm {min(ratios):.1f} (lowest layer) to {max(ratios):.1f} (highest), "
            f"figure {args.output_dir}/{entry['figure']}"
        )


if __name__ == "__main__":
    main()
