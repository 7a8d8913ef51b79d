"""Class labels of a dataset (SPEC §7.4): EDM2's ``dataset.json``, or the names of top-level folders.

:func:`parse_labels_document` checks a ``dataset.json`` against the dataset's images, refusing every
doubtful entry (and reads mpdiff's extra "class_names"); :func:`labels_from_directories` gives classes by
folder (not for EDM2's numbered chunk folders, :func:`in_chunk_folders`); :func:`one_hot` turns class ids
into the network's labels.
(Writing dataset.json is :mod:`mpdiff.storage.dataset_json`'s job.)
"""

import re

import numpy as np
import torch

from mpdiff.data.sources import MAX_FILE_BYTES, show_name
from mpdiff.errors import DatasetError
from mpdiff.storage.files import JsonProblem, parse_json

LABELS_BASE_BYTES = 2**20              # dataset.json may have LABELS_BASE_BYTES + LABELS_BYTES_PER_IMAGE per image
LABELS_BYTES_PER_IMAGE = 2**10         # (an EDM2 entry ["00000/img00000000.png", 999] is 30 bytes)
MAX_NUM_CLASSES = 65536                # class indices must lie in [0, MAX_NUM_CLASSES)
CHUNK_FOLDER = re.compile(r"\d{5}")    # EDM2's dataset tool writes 00000/img00000000.png ... 00001/img00001000.png
CHUNK_FOLDERS_UNLABELLED = "none (EDM2 chunk folders 00000/... are not classes)"  # label_source for them


def labels_file_limit(num_images):
    """The most bytes dataset.json may have in a dataset of `num_images` images."""
    return min(MAX_FILE_BYTES, LABELS_BASE_BYTES + LABELS_BYTES_PER_IMAGE * num_images)


def one_hot(class_ids, num_classes):
    """Float32 one-hot rows [N, num_classes] for integer class ids (a tensor or a list)."""
    return torch.nn.functional.one_hot(torch.as_tensor(class_ids), num_classes).to(torch.float32)


def parse_labels_document(data, where, image_names):
    """(labels or None, num_classes, class names or None) of dataset.json bytes, checked against the sorted
    image names: every defect is one DatasetError line (`where` names the file). The class names are mpdiff's
    extra key "class_names" (EDM2 reads "labels" only): a list of num_classes distinct strings, e.g. the
    folder names a converted dataset was labelled by."""
    try:
        doc = parse_json(data)  # the one JSON parse: UTF-8, no key twice, bounded nesting
    except JsonProblem as e:
        raise DatasetError(f"{where}: {e}") from None
    if not isinstance(doc, dict):
        raise DatasetError(f'{where}: top level must be a JSON object with a "labels" field, got {_describe(doc)}')
    if "labels" not in doc:
        raise DatasetError(f'{where}: missing the "labels" field (a list of [path, class] pairs, or null)')
    declared = doc.get("num_classes")
    if declared is not None and (not _is_int(declared) or not 1 <= declared <= MAX_NUM_CLASSES):
        raise DatasetError(f'{where}: "num_classes" must be an integer from 1 to {MAX_NUM_CLASSES}, '
                           f'got {_describe(declared)}')
    entries = doc["labels"]
    if entries is None:
        return None, 0, None
    if not isinstance(entries, list):
        raise DatasetError(f'{where}: "labels" must be a list of [path, class] pairs or null, got {_describe(entries)}')

    limit = declared if declared is not None else MAX_NUM_CLASSES
    index_of = {name: i for i, name in enumerate(image_names)}
    labels = np.full(len(image_names), -1, dtype=np.int64)
    entry_of = {}  # path -> first entry index, to report duplicates
    for i, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 2:
            raise DatasetError(f"{where}: labels[{i}] must be a [path, class] pair, got {_describe(entry)}")
        path, cls = entry
        if not isinstance(path, str):
            raise DatasetError(f"{where}: labels[{i}] path must be a string, got {_describe(path)}")
        if isinstance(cls, list):
            raise DatasetError(f"{where}: labels[{i}] ('{show_name(path)}') is a vector label; only integer class labels are supported")
        if not _is_int(cls) or cls < 0:
            raise DatasetError(f"{where}: labels[{i}] ('{show_name(path)}') class must be an integer >= 0, got {_describe(cls)}")
        if cls >= limit:
            bound = f'"num_classes" is {declared}' if declared is not None else f"the limit is {MAX_NUM_CLASSES} classes"
            raise DatasetError(f"{where}: labels[{i}] ('{show_name(path)}') class {cls} is out of range ({bound})")
        if path in entry_of:
            raise DatasetError(f"{where}: labels[{i}] repeats '{show_name(path)}' (already labelled by labels[{entry_of[path]}])")
        entry_of[path] = i
        if path not in index_of:
            raise DatasetError(f"{where}: labels[{i}] names '{show_name(path)}', which is not an image in the dataset")
        labels[index_of[path]] = cls
    unlabelled = np.flatnonzero(labels < 0)
    if len(unlabelled):
        raise DatasetError(f"{where}: image '{show_name(image_names[unlabelled[0]])}' has no label "
                           f"({len(unlabelled)} of {len(image_names)} images have none)")
    num_classes = declared if declared is not None else int(labels.max()) + 1
    return labels, num_classes, _class_names(doc.get("class_names"), num_classes, where)


MAX_CLASS_NAME = 200                   # characters of one class name in dataset.json


def _class_names(names, num_classes, where):
    """dataset.json's "class_names" checked: None, or a tuple of num_classes distinct non-empty strings."""
    if names is None:
        return None
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetError(f'{where}: "class_names" must be a list of {num_classes} names (one per class), got '
                           f'{_describe(names)}')
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or len(name) > MAX_CLASS_NAME:
            raise DatasetError(f'{where}: class_names[{i}] must be a name of 1 to {MAX_CLASS_NAME} characters, got '
                               f'{_describe(name)}')
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise DatasetError(f"{where}: class name '{show_name(twice, 40)}' appears twice in \"class_names\"")
    return tuple(names)


def class_names_of_directories(image_names):
    """The sorted top-level folder names that :func:`labels_from_directories` made classes of, in class order."""
    return tuple(sorted({name.split("/", 1)[0] for name in image_names}))


def shown_class_names(names, limit=10):
    """'cat, dog, horse' (the first `limit`, then '... (N in all)') for messages; '' without names."""
    if not names:
        return ""
    shown = ", ".join(show_name(name, 40) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def labels_from_directories(image_names, where="dataset"):
    """Classes from sorted top-level folder names (EDM2 dataset tool), or (None, 0) when the
    images are not all inside top-level folders, there is only one folder, or every folder is
    an EDM2 chunk folder (:func:`in_chunk_folders`)."""
    if any("/" not in name for name in image_names) or in_chunk_folders(image_names):
        return None, 0
    tops = [name.split("/", 1)[0] for name in image_names]
    classes = sorted(set(tops))
    if len(classes) < 2:
        return None, 0
    if len(classes) > MAX_NUM_CLASSES:
        raise DatasetError(f"{where}: {len(classes)} top-level folders would be classes; the limit is {MAX_NUM_CLASSES} "
                           f"(write a dataset.json or pass use_labels=False)")
    class_of = {top: i for i, top in enumerate(classes)}
    return np.array([class_of[top] for top in tops], dtype=np.int64), len(classes)


def in_chunk_folders(image_names):
    """True when every image lies in a top-level folder named by five digits (00000/, 00001/, ...):
    the chunks of 1000 images that EDM2's dataset tool writes, which are not classes."""
    return all("/" in name and CHUNK_FOLDER.fullmatch(name.split("/", 1)[0]) for name in image_names)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value):
    """Short JSON-flavoured description of a parsed value, for messages (never recursive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 24 else text[:21] + "..."
    if isinstance(value, str):
        return "'" + show_name(value, 40) + "'"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return "an object"
