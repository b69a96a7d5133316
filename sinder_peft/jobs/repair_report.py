"""The numbers of a repair: report.json's summary of a defect analysis, whether anything needs repair, what the run
achieved (its outcome), and the summary `sinder repair` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ..analysis.detection import HIGH_NORM_FACTOR, DefectAnalysis
from ..models.other_libraries import OPEN_CLIP_FILE, parse_model_name
from ..models.timm.arguments import is_dotted_name, loading_line

Outcome = Literal["repaired", "partial", "not_repaired", "nothing_to_repair"]

OUTCOME_EXIT_CODES: dict[str, int] = {"repaired": 0, "nothing_to_repair": 0, "partial": 3, "not_repaired": 4}
"""The exit status of `sinder repair` per outcome, so that scripts can tell: 0 when the output is a model without
high-norm defect (repaired, or the input already was), 3 when some are left (`model/` is written), 4 when none was
removed (no `model/`). 1 is an error, 2 a bad command line, 130 an interruption."""


def analysis_summary(analysis: DefectAnalysis) -> dict[str, Any]:
    """Return report.json's summary of an analysis: last-layer norm ratios, defects, high-norm tokens per layer.

    `images_with_defects` counts the images with a *high-norm defect*: a token that a block made at least 4x its
    image's median norm (and at least twice as long, relative to the median, as at the embedding), at some layer
    (`DefectAnalysis.high_norm_defect_images`); `high_norm_defect_tokens` the number of such tokens over the images
    and layers. `images_defective_by_test` counts the images with a defective layer under the recipe's test
    (`defect_test`), `first_defective_layer` is each image's first one, `first_high_norm_defect_layer` where its
    high-norm defect is born. `images_with_high_norm_input_tokens` counts the images with tokens that are high-norm
    because they already were at the embedding (an input feature, not a defect). Per layer: the high-norm defect and
    input tokens, and the mean |cos| of the high-norm defect tokens with the weights' direction.
    """
    last = analysis.num_layers - 1
    tokens = analysis.grid_size[0] * analysis.grid_size[1]
    at_first = [
        int(analysis.masks[image, layer].sum()) if layer >= 0 else 0
        for image, layer in enumerate(analysis.first_defective_layer.tolist())
    ]
    ratios = analysis.max_median_norm_ratio[:, last]
    defect_counts = analysis.high_norm_defect_counts
    input_counts = analysis.high_norm_input_counts
    return {
        "max_median_norm_ratio_last_layer": ratios.tolist(),
        "mean_max_median_norm_ratio_last_layer": float(ratios.mean()),
        "defect_token_share": [count / tokens for count in at_first],
        "mean_defect_token_share": sum(at_first) / (tokens * analysis.num_images),
        "first_defective_layer": analysis.first_defective_layer.tolist(),
        "first_high_norm_defect_layer": analysis.first_high_norm_defect_layer.tolist(),
        "images_with_defects": int(analysis.high_norm_defect_images.sum()),
        "high_norm_defect_tokens": int(defect_counts.sum()),
        "images_defective_by_test": int((analysis.first_defective_layer >= 0).sum()),
        "images_with_high_norm_input_tokens": int((input_counts.sum(dim=1) > 0).sum()),
        "high_norm_defect_tokens_per_layer": defect_counts.sum(dim=0).tolist(),
        "high_norm_input_tokens_per_layer": input_counts.sum(dim=0).tolist(),
        "high_norm_weights_cosine": analysis.high_norm_weights_cosines(),
    }


def nothing_to_repair(analysis: DefectAnalysis) -> bool:
    """Return whether the analysis of a selection sample shows nothing to repair: no image has a high-norm defect
    token at any layer (no block made a token `HIGH_NORM_FACTOR` times its median norm). Tokens that are long from
    the embedding on, and cosine outliers among tokens of ordinary norm, are not defects to repair."""
    return not analysis.high_norm_defect_layers()


def repair_outcome(before: dict[str, Any], after: dict[str, Any] | None, steps: int) -> Outcome:
    """Return what a run achieved on the report images, from the `analysis_summary` before and after and the steps
    taken (`after` None: no adapter was built, the selection showed nothing to repair).

    `repaired`: no high-norm defect left; `partial`: fewer high-norm defect tokens than before, some left;
    `not_repaired`: none removed, or no step taken although the selection had high-norm defects;
    `nothing_to_repair`.
    """
    if after is None:
        return "nothing_to_repair"
    if steps == 0:
        return "not_repaired"
    if after["images_with_defects"] == 0:
        return "repaired"
    if after["high_norm_defect_tokens"] < before["high_norm_defect_tokens"]:
        return "partial"
    return "not_repaired"


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
    """Return where an analysis summary has high-norm defect tokens: "none", or the layers with the weights' |cos|."""
    layers = [layer for layer, count in enumerate(summary["high_norm_defect_tokens_per_layer"]) if count > 0]
    if not layers:
        return "none"
    cosines = summary["high_norm_weights_cosine"]
    explained = min(cosines[layer] for layer in layers)
    return (
        f"{summary['images_with_defects']} of {len(summary['first_defective_layer'])} images, layers "
        f"{layers[0]}-{layers[-1]} (lowest |cos| with the weights' direction {explained:.2f})"
    )


def _input_line(summary: dict[str, Any]) -> str:
    """Return a line on the high-norm input tokens of an analysis summary, or "" when there is none."""
    count = summary["images_with_high_norm_input_tokens"]
    if not count:
        return ""
    return (
        f"  high-norm input tokens (>= {HIGH_NORM_FACTOR:g}x the median from the embedding on: a feature of the "
        f"image, not a defect; left as they are): {count} of {len(summary['first_defective_layer'])} images\n"
    )


def _numbers(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Return the before -> after numbers of the summary's first line."""
    return (
        f"images with a high-norm defect {before['images_with_defects']} -> {after['images_with_defects']} of "
        f"{len(before['first_defective_layer'])} report images, high-norm defect tokens "
        f"{before['high_norm_defect_tokens']} -> {after['high_norm_defect_tokens']}, max/median token norm (last "
        f"layer) {before['mean_max_median_norm_ratio_last_layer']:.1f} -> "
        f"{after['mean_max_median_norm_ratio_last_layer']:.1f}"
    )


_OUTCOME_WORDS = {
    "repaired": "Repaired: no high-norm defect left",
    "partial": "Partly repaired: high-norm defects are left",
    "not_repaired": "Not repaired: no high-norm defect was removed",
}


def summary_text(report: dict[str, Any], output_dir: Path) -> str:
    """Return the summary `sinder repair` prints for a report. Its first line says the outcome in words, with the
    before/after numbers; a run that removed nothing never starts with "Repaired"."""
    before, after = report["before"], report["after"]
    data_layers = [entry["layer"] for entry in report["directions"]["layers"] if entry["source"] == "data"]
    directions = f"from the data at layers {data_layers}" if data_layers else "the weights' at every layer"
    outcome = report["outcome"]
    if outcome == "nothing_to_repair":
        return (
            f"Nothing needed repair: the {len(report['selection_images'])} selection images have no high-norm defect "
            f"(no block makes a token >= {HIGH_NORM_FACTOR:g}x its image's median norm).\n"
            f"{_input_line(before)}"
            f"No model written: the input is the result. Report in {output_dir / 'report.json'}"
        )
    training = (
        f"{report['steps']} steps, {report['images_seen']} images checked ({report['images_skipped']} without "
        f"defect), {report['seconds']:.0f} s; stopped by {report['stop_reason']}"
    )
    lines = [f"{_OUTCOME_WORDS[outcome]} ({_numbers(before, after)}).", f"  training: {training}"]
    if outcome == "not_repaired" and report["steps"] == 0:
        lines.append(
            f"  The defect test found no defect along the directions ({directions}) in the images checked, but "
            f"high-norm defect tokens are present: {_high_norm_line(before)}. A low |cos| means the weights' "
            "direction does not explain them: --directions auto (the default) or data takes it from them."
        )
    lines.append(f"  high-norm defect tokens after: {_high_norm_line(after)}; directions: {directions}")
    inputs_after = _input_line(after)
    if inputs_after:
        lines.append(inputs_after.rstrip("\n"))
    if report["repaired"]:
        lines.append(
            f"  mean cosine to the original: clean tokens {report['clean_token_cosine']:.3f}, CLS "
            f"{report['cls_cosine']:.3f}"
        )
        lines.append(f"Outputs in {output_dir}: {_model_outputs(report, output_dir)}, adapter/, report.json, figures/")
    else:
        lines.append(f"No model written: nothing was removed. Report in {output_dir / 'report.json'}")
        if report["steps"] > 0:
            lines.append(
                f"  The training checkpoint is kept: --resume {output_dir} with a larger --max-steps continues it."
            )
    return "\n".join(lines)


def _model_outputs(report: dict[str, Any], output_dir: Path) -> str:
    """Return how the summary names the repaired model's directories, and how each is loaded, for the report's
    `model` (a timm model's line passes its layer arguments again, as model/README.md does)."""
    source = parse_model_name(report["model"])
    if source.library == "timm":
        layers = {key: value for key, value in report.get("model_kwargs", {}).items() if is_dotted_name(value)}
        line = loading_line(str(output_dir / "model"), layers).removeprefix("model = ")
        return f"model/ ({line}), model-transformers/ (AutoModel.from_pretrained)"
    if source.library == "open_clip":
        architecture = source.name.split("/", 1)[0]
        checkpoint = output_dir / "model" / OPEN_CLIP_FILE
        return (
            f'model/{OPEN_CLIP_FILE} (open_clip.create_model_and_transforms("{architecture}", '
            f'pretrained="{checkpoint}")), model-transformers/ (AutoModel.from_pretrained)'
        )
    return "model/ (AutoModel.from_pretrained)"
