"""Datasets (TFDS builders prepared as array_record, no TensorFlow) and the grain input pipeline."""

from jaxsd.data.image_folder import prepare_image_folder
from jaxsd.data.input_pipeline import InputPipeline, PipelineStats, list_prepared, make_dataset
from jaxsd.data.shapes import (BACKGROUNDS, CENTERS, COLORS, POSITIONS, RGB, SHAPES, SIZES, Shapes, ShapesConfig,
                               caption_for, prepare_shapes)

__all__ = [
    "BACKGROUNDS",
    "CENTERS",
    "COLORS",
    "POSITIONS",
    "RGB",
    "SHAPES",
    "SIZES",
    "InputPipeline",
    "PipelineStats",
    "Shapes",
    "ShapesConfig",
    "caption_for",
    "list_prepared",
    "make_dataset",
    "prepare_image_folder",
    "prepare_shapes",
]
