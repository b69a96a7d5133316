"""The numbers of a repair: report.json's summary of a defect analysis, whether anything needs repair, and the
summary `sinder repair` prints."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from ..analysis.detection import DEFECT_NORM_GAP, DefectAnalysis
from ..models.other_libraries import OPEN_CLIP_FILE, parse_model_name


def analysis_summary(analysis: DefectAnalysis) -> dict[str, Any]:
    """Return report.json's summary of an analysis: last-layer norm ratios, defect-token shares, defective layers.

    `images_with_defects` counts the images with a defect that is a real norm outlier (`high_norm_defects`: a
    flagged token at 4x its image's median norm or more); `images_with_cosine_outliers` those with a defective layer
    by the cosine test alone, which a flat, repaired model can still show by chance. `images_with_high_norm_tokens`
    counts the images with a high-norm token (4x the median norm) at any layer, whether or not a direction explains
    it; `high_norm_tokens_per_layer` and `high_norm_weights_cosine` (the mean |cos| of those tokens with the
    weights' direction, None where there is none) give them per layer.
    """
    last = analysis.num_layers - 1
    tokens = analysis.grid_size[0] * analysis.grid_size[1]
    at_first = [
        int(analysis.masks[image, layer].sum()) if layer >= 0 else 0
        for image, layer in enumerate(analysis.first_defective_layer.tolist())
    ]
    ratios = analysis.max_median_norm_ratio[:, last]
    high_norm_counts = analysis.high_norm_counts
    return {
        "max_median_norm_ratio_last_layer": ratios.tolist(),
        "mean_max_median_norm_ratio_last_layer": float(ratios.mean()),
        "defect_token_share": [count / tokens for count in at_first],
        "mean_defect_token_share": sum(at_first) / (tokens * analysis.num_images),
        "first_defective_layer": analysis.first_defective_layer.tolist(),
        "images_with_defects": int(analysis.high_norm_defects(DEFECT_NORM_GAP).sum()),
        "images_with_cosine_outliers": int((analysis.first_defective_layer >= 0).sum()),
        "images_with_high_norm_tokens": int((high_norm_counts.sum(dim=1) > 0).sum()),
        "high_norm_tokens_per_layer": high_norm_counts.sum(dim=0).tolist(),
        "high_norm_weights_cosine": analysis.high_norm_weights_cosines(),
    }


def nothing_to_repair(analysis: DefectAnalysis) -> bool:
    """Return whether the analysis of a selection sample shows nothing to repair: no image has a high-norm token
    (`analysis.detection.HIGH_NORM_FACTOR` times its median norm) at any layer, and none has a defect whose flagged
    tokens reach `DEFECT_NORM_GAP` times the median norm. Cosine outliers among tokens of ordinary norm, which every
    image shows by chance, are not defects to repair."""
    return not analysis.high_norm_layers() and not bool(analysis.high_norm_defects(DEFECT_NORM_GAP).any())


def first_images(analysis: DefectAnalysis, count: int) -> DefectAnalysis:
    """Return the analysis of the first `count` images only."""
    per_image = (
        "cosines",
        "masks",
        "first_defective_layer",
        "token_norms",
        "max_median_norm_ratio",
        "high_norm_share",
        "last_patch_features",
        "weights_cosines",
    )
    values = {name.name: getattr(analysis, name.name) for name in fields(analysis)}
    values.update({name: values[name][:count] for name in per_image})
    return DefectAnalysis(**values)


def earliest_defective_layer(analysis: DefectAnalysis) -> int | None:
    """Return the earliest first defective layer over the analysed images, or None if none is defective."""
    layers = [layer for layer in analysis.first_defective_layer.tolist() if layer >= 0]
    return min(layers) if layers else None


def card_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """Return the averages of a report summary that the model card shows (NaN where no image is defective)."""
    layers = [layer for layer in summary["first_defective_layer"] if layer >= 0]
    return {
        "max_median_norm_ratio": summary["mean_max_median_norm_ratio_last_layer"],
        "defect_token_share": summary["mean_defect_token_share"],
        "first_defective_layer": sum(layers) / len(layers) if layers else float("nan"),
    }


def _high_norm_line(summary: dict[str, Any]) -> str:
    """Return where an analysis summary has high-norm tokens: "none", or the layers with the weights' |cos|."""
    layers = [layer for layer, count in enumerate(summary["high_norm_tokens_per_layer"]) if count > 0]
    if not layers:
        return "none"
    cosines = summary["high_norm_weights_cosine"]
    explained = min(cosines[layer] for layer in layers)
    return (
        f"{summary['images_with_high_norm_tokens']} of {len(summary['first_defective_layer'])} images, layers "
        f"{layers[0]}-{layers[-1]} (lowest |cos| with the weights' direction {explained:.2f})"
    )


def summary_text(report: dict[str, Any], output_dir: Path) -> str:
    """Return the summary `sinder repair` prints for a report: the before/after numbers, or, when nothing was
    repaired, why, and that no model was written."""
    before, after = report["before"], report["after"]
    data_layers = [entry["layer"] for entry in report["directions"]["layers"] if entry["source"] == "data"]
    directions = f"from the data at layers {data_layers}" if data_layers else "the weights' at every layer"
    if not report["repaired"]:
        if before["images_with_high_norm_tokens"]:
            return (
                f"No defect found along the directions in the {report['images_seen']} images checked, but "
                f"high-norm tokens are present: {_high_norm_line(before)}.\n"
                f"  directions: {directions}. A low |cos| means the weights' direction does not explain them: "
                "--directions auto (the default) or data takes it from them.\n"
                f"No model written: the input is unchanged. Report in {output_dir / 'report.json'}"
            )
        reason = (
            f"the {len(report['selection_images'])} selection images have no high-norm token and no defect"
            if report["stop_reason"] == "nothing_to_repair"
            else f"no defect in the {report['images_seen']} images checked (stop window "
            f"{report['training']['stop_window']})"
        )
        return (
            f"Nothing needed repair: {reason}.\n"
            f"  high-norm tokens (>= 4x the median norm): none\n"
            f"No model written: the input is the result. Report in {output_dir / 'report.json'}"
        )
    return (
        f"Repaired in {report['steps']} steps ({report['images_seen']} images, {report['images_skipped']} without "
        f"defect, {report['seconds']:.0f} s; stopped by {report['stop_reason']}).\n"
        f"  max/median token norm, last layer: {before['mean_max_median_norm_ratio_last_layer']:.1f} -> "
        f"{after['mean_max_median_norm_ratio_last_layer']:.1f}\n"
        f"  images with a high-norm defect: {before['images_with_defects']} -> {after['images_with_defects']} "
        f"(of {len(before['first_defective_layer'])})\n"
        f"  images with high-norm tokens: {before['images_with_high_norm_tokens']} -> "
        f"{after['images_with_high_norm_tokens']}; after: {_high_norm_line(after)}\n"
        f"  directions: {directions}\n"
        f"  mean cosine to the original: clean tokens {report['clean_token_cosine']:.3f}, CLS "
        f"{report['cls_cosine']:.3f}\n"
        f"Outputs in {output_dir}: {_model_outputs(report['model'], output_dir)}, adapter/, report.json, figures/"
    )


def _model_outputs(model: str, output_dir: Path) -> str:
    """Return how the summary names the repaired model's directories, and how each is loaded, for `--model`."""
    source = parse_model_name(model)
    if source.library == "timm":
        return (
            f'model/ (timm.create_model("local-dir:{output_dir / "model"}", pretrained=True)), model-transformers/ '
            "(AutoModel.from_pretrained)"
        )
    if source.library == "open_clip":
        architecture = source.name.split("/", 1)[0]
        checkpoint = output_dir / "model" / OPEN_CLIP_FILE
        return (
            f'model/{OPEN_CLIP_FILE} (open_clip.create_model_and_transforms("{architecture}", '
            f'pretrained="{checkpoint}")), model-transformers/ (AutoModel.from_pretrained)'
        )
    return "model/ (AutoModel.from_pretrained)"
