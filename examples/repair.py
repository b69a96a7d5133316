"""Repair the singular defects of a Vision Transformer (DINOv2, DINOv3, CLIP, SigLIP, ViT, DeiT).

    accelerate launch examples/repair.py --model demo
    accelerate launch examples/repair.py --model facebook/dinov2-base --data path/to/images --output-dir runs/base
    accelerate launch --num_processes 2 examples/repair.py --model facebook/dinov2-giant --data imagenet-1k \
        --streaming --output-dir runs/giant

See `python examples/repair.py --help` for every flag; the default recipe is `preserve`, `--recipe paper` is the
paper's.
"""

from sinder_peft.jobs.repair import main

if __name__ == "__main__":
    raise SystemExit(main())
