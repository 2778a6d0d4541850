"""The only code that reads images and turns them into batches (see :mod:`mimc.data.source`).

A data spec is a folder of images (flat, or one subfolder per class, recursive: then labels come with
them), a ``.npy`` array (memory-mapped) or ``.npz`` with ``images`` (and optionally ``labels``,
``class_names``), WebDataset tar shards (``train-{000..099}.tar``), a saved Hugging Face ``datasets``
folder, or ``builtin`` (the labelled images shipped with mimc, ``mimc/models/ref/``).
"""
from mimc.data.preprocess import preprocess, prepare_image
from mimc.data.readers import BUILTIN, BUILTIN_PATH, IMAGE_SUFFIXES, check_array_values
from mimc.data.shards import expand_braces
from mimc.data.source import (
    CACHE_BYTES,
    Batch,
    ImageSet,
    ImageSource,
    ImageStream,
    IndexedImages,
    as_source,
    default_workers,
    deterministic_inputs,
    load_images,
    spec_of,
)
from mimc.data.spec import open_reader

__all__ = ["as_source", "spec_of", "ImageSet", "ImageSource", "ImageStream", "IndexedImages", "Batch", "load_images", "deterministic_inputs",
           "preprocess", "prepare_image", "open_reader", "expand_braces", "check_array_values", "default_workers",
           "BUILTIN", "BUILTIN_PATH", "IMAGE_SUFFIXES", "CACHE_BYTES"]
