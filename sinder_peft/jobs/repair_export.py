"""What a repair writes when training ends: adapter/, model/ (merged, with its image processor and card),
report.json and figures/, then the evaluation and the upload when asked."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.detection import find_defect_tokens
from ..analysis.preservation import clean_token_cosine, clean_token_mask, output_features, pooled_cosine
from ..evaluation.arguments import EvaluationArguments
from ..evaluation.evaluate import evaluate_models
from ..images.datasets import ImageFileDataset
from ..images.preprocessing import denormalize_image
from ..models.hub import RepairCard, push_folder_to_hub, write_model_card
from ..models.loading import TRANSFORMERS_MODEL_DIR, load_backbone
from ..models.other_libraries import foreign_model_kwargs, parse_model_name, save_in_source_format
from ..models.processor import save_image_processor
from ..training.arguments import TrainingArguments
from ..training.state import TrainerState
from ..training.trainer import capped_stop_window, compute_directions
from ..tuner.architectures import ImageNormalization
from ..version import __version__
from ..visualization.figures import save_before_after_figure, save_diagnosis_figure, save_layer_norm_plot
from .repair_arguments import MAX_LISTED_UNREADABLE, RepairArguments, evaluation_settings
from .repair_report import analysis_summary, card_numbers, earliest_defective_layer, repair_outcome
from .repair_setup import RepairSetup

logger = logging.getLogger(__name__)


def _write_directory(target: Path, write: Any) -> Path:
    """Write a directory through `write(temporary_path)` under a temporary name, then move it into place, so that
    `target` is either complete or absent."""
    temporary = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
    return target


def export_repair(
    args: RepairArguments,
    training: TrainingArguments,
    output_dir: Path,
    setup: RepairSetup,
    *,
    state: TrainerState,
    processes: int,
    requested_resolution: int,
) -> dict[str, Any]:
    """Write adapter/, model/ (merged, with its image processor and card), report.json and figures/; evaluate and
    push when asked. Returns the report.

    report.json's `"outcome"` says what the run achieved on the report images (`repair_report.repair_outcome`):
    `repaired` or `partial` write adapter/ and model/ (`"repaired": true`); `not_repaired` (no high-norm defect
    removed, or no step taken) and `nothing_to_repair` write neither (the input is the result), do not evaluate or
    push, and remove a model/ or adapter/ left by an earlier run in the directory.
    """
    model = setup.model
    trained = model is not None and state.step > 0
    report_count = min(args.report_images, len(setup.selection.paths))
    report_paths = setup.selection.paths[:report_count]
    resolution = setup.resolution
    before_report = setup.before.first_images(report_count)
    report_pixels = setup.selection.pixel_values[:report_count]
    merged: nn.Module | None = None
    after, after_features = before_report, setup.before_features
    layers: list[int] = []
    pending_adapter = output_dir / ".tmp-adapter"
    if trained:
        adapter = model.peft_config["default"]
        # with the blocks adapted during training
        layers = list(adapter.layers_to_transform) if adapter.layers_to_transform is not None else []
        # saved before the merge, moved into place below if the run repaired something
        shutil.rmtree(pending_adapter, ignore_errors=True)
        model.save_pretrained(pending_adapter)
        merged = model.merge_and_unload().eval()
        report_pixels = report_pixels.to(next(merged.parameters()).device)
        after = find_defect_tokens(
            merged,
            report_pixels,
            compute_directions(merged),
            direction_source=training.directions,
            test=training.defect_test,
        )
        after_features = output_features(merged, report_pixels)
    before_summary = analysis_summary(before_report)
    after_summary = analysis_summary(after)
    outcome = repair_outcome(before_summary, after_summary if model is not None else None, state.step)
    repaired = outcome in ("repaired", "partial")
    if repaired:
        shutil.rmtree(output_dir / "adapter", ignore_errors=True)
        pending_adapter.rename(output_dir / "adapter")
    else:
        shutil.rmtree(pending_adapter, ignore_errors=True)
        layers = []
    clean = clean_token_mask(before_report.token_norms[:, -1])
    selection_images: list[str] | list[int] = (
        setup.selection.paths if isinstance(setup.dataset, ImageFileDataset) else setup.selection.indices
    )
    source = parse_model_name(args.model, args.model_kwargs)
    report = {
        "model": args.model,
        "model_kwargs": foreign_model_kwargs(source),
        "data": args.data or "bundled demo images",
        "outcome": outcome,
        "repaired": repaired,
        "resolution": resolution,
        "requested_resolution": requested_resolution,
        "layers_adapted": layers,
        "training": {
            **asdict(training),
            "lr": training.resolved_lr,
            "stop_window": capped_stop_window(
                training.resolved_stop_window, setup.dataset, seeded=training.stop_window_seeded
            ),
            "stop_window_seeded": training.stop_window_seeded,
            "stop_skip_ratio": training.resolved_stop_skip_ratio,
            "norm_gap": training.defect_test.norm_gap,
        },
        "defect_test": training.defect_test.to_dict(),
        "directions": setup.directions.to_dict(),
        "processes": processes,
        "steps": state.step,
        "images_seen": state.images_seen,
        "images_skipped": state.images_skipped,
        "images_unreadable": len(state.unreadable),
        "nan_steps": state.nan_steps,
        "stop_reason": state.stop_reason,
        "seconds": round(state.seconds, 2),
        "defective_layers_during_training": state.defective_layers,
        "selection_images": selection_images,
        "report_images": report_paths,
        "unreadable_images": state.unreadable[:MAX_LISTED_UNREADABLE],
        "before": before_summary,
        "after": after_summary,
        "clean_token_cosine": clean_token_cosine(setup.before_features, after_features, clean),
        "cls_cosine": pooled_cosine(setup.before_features, after_features),
        "sinder_peft_version": __version__,
    }

    def write_model(directory: Path) -> None:
        assert merged is not None
        merged.save_pretrained(directory)
        save_image_processor(directory, setup.processor_config, setup.normalization, resolution)
        write_model_card(
            directory,
            RepairCard(
                base_model=args.model,
                data=report["data"],
                steps=state.step,
                images_seen=state.images_seen,
                images_skipped=state.images_skipped,
                learning_rate=training.resolved_lr,
                momentum=training.momentum,
                resolution=resolution,
                layers=layers,
                seconds=state.seconds,
                before=card_numbers(report["before"]),
                after=card_numbers(report["after"]),
                clean_token_cosine=report["clean_token_cosine"],
                sinder_peft_version=__version__,
                repo_id=args.push_to_hub,
                num_report_images=len(report_paths),
            ),
        )

    if repaired and source.is_foreign:
        # model/ in the source library's format, model-transformers/ the same weights as transformers loads them
        _write_directory(output_dir / TRANSFORMERS_MODEL_DIR, write_model)
        final = (output_dir / "model").resolve()
        _write_directory(
            output_dir / "model", lambda directory: save_in_source_format(source, merged, directory, load_path=final)
        )
    elif repaired:
        _write_directory(output_dir / "model", write_model)
    if not repaired or not source.is_foreign:
        # a directory left by an earlier run in this directory (--overwrite) is not this run's result
        stale = ("model", "adapter", TRANSFORMERS_MODEL_DIR) if not repaired else (TRANSFORMERS_MODEL_DIR,)
        for name in stale:
            shutil.rmtree(output_dir / name, ignore_errors=True)

    def write_figures(directory: Path) -> None:
        directory.mkdir(parents=True)
        for index, path in enumerate(report_paths):
            picture = denormalize_image(report_pixels[index].cpu(), setup.normalization)
            title = f"{Path(path).name}: last-layer token norms and features"
            if repaired:
                save_before_after_figure(
                    picture,
                    before_report.token_norms[index, -1],
                    before_report.last_patch_features[index],
                    after.token_norms[index, -1],
                    after.last_patch_features[index],
                    directory / f"before_after_{index}_{_file_stem(path)}.png",
                    title=title,
                )
            else:
                save_diagnosis_figure(
                    picture,
                    before_report.token_norms[index, -1],
                    before_report.last_patch_features[index],
                    directory / f"diagnosis_{index}_{_file_stem(path)}.png",
                    title=f"{title} (nothing to repair)",
                )
        save_layer_norm_plot(
            before_report.max_median_norm_ratio.tolist(),
            earliest_defective_layer(before_report),
            directory / "layer_norms_before.png",
        )
        if repaired:
            save_layer_norm_plot(
                after.max_median_norm_ratio.tolist(),
                earliest_defective_layer(after),
                directory / "layer_norms_after.png",
            )

    _write_directory(output_dir / "figures", write_figures)
    evaluation = evaluation_settings(args, output_dir)
    if evaluation is not None and repaired:
        report["evaluation"] = _evaluate_original_and_repaired(args, evaluation, merged, setup.normalization)
    elif evaluation is not None:
        logger.warning("Nothing was repaired: the --evaluate-* evaluation is skipped (the input is the result).")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    if args.push_to_hub and not repaired:
        logger.warning("Nothing was repaired: nothing is pushed to %s.", args.push_to_hub)
    elif args.push_to_hub:
        hub = {"token": args.hub_token, "endpoint": args.hub_endpoint}
        report["pushed_to"] = push_folder_to_hub(output_dir / "model", args.push_to_hub, **hub)
        if args.push_adapter:
            push_folder_to_hub(output_dir / "adapter", args.push_to_hub, path_in_repo="adapter", **hub)
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _evaluate_original_and_repaired(
    args: RepairArguments, settings: EvaluationArguments, merged: nn.Module, normalization: ImageNormalization
) -> dict[str, Any]:
    """Evaluate the original model (loaded again: the merge wrote into its weights) next to the repaired one with
    `sinder evaluate`'s probes, write `evaluation/`, and return `evaluation.json`'s content."""
    original, _ = load_backbone(args.model, model_kwargs=args.model_kwargs)
    original = original.to(next(merged.parameters()).device)
    return evaluate_models([(args.model, original, normalization), ("repaired", merged, normalization)], settings)


def _file_stem(path: str) -> str:
    """Return a file-name-safe stem for an image path (🤗 dataset items are named "source:split:index")."""
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in Path(path).stem)
