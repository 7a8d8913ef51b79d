"""EDM2's `dataset.json` as mpdiff writes it (sample folders, converted and encoded datasets).
Reading it, with every check on what a user's file may hold, is mpdiff.data.labels' job."""

import os

import numpy as np

from mpdiff.storage.files import write_json

LABELS_FILE = "dataset.json"           # EDM2 label file, at the dataset root only


def write_dataset_json(directory, entries, num_classes=None, generation=None):
    """Write EDM2-style `dataset.json` into `directory` (atomically); return its path.

    entries: (relative posix path, class int or None) per image. All None -> `"labels": null`;
    mixing None and classes is a caller error. `num_classes` is written when labels exist.
    `generation` (a JSON object: how a sample folder was made, e.g. its NFE per image) is written under
    that key; readers of dataset.json look at "labels" and "num_classes" only.
    """
    out = os.path.join(os.fspath(directory), LABELS_FILE)
    doc = labels_document(entries, num_classes)
    if generation is not None:
        doc["generation"] = generation
    write_json(out, doc)
    return out


def labels_document(entries, num_classes=None, class_names=None):
    """The EDM2 `dataset.json` document (a dict) for `entries`, as :func:`write_dataset_json` writes it.
    `class_names` (one per class, when labels exist) is written under mpdiff's extra key "class_names";
    EDM2 reads "labels" only."""
    entries = [(path, cls) for path, cls in entries]
    seen = set()
    for path, cls in entries:
        if not isinstance(path, str) or not path or "\\" in path or path.startswith("/"):
            raise ValueError(f"dataset entry path must be a relative posix path, got {path!r}")
        if path in seen:
            raise ValueError(f"dataset entry {path!r} appears twice")
        seen.add(path)
        if cls is not None and (isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or cls < 0):
            raise ValueError(f"class of {path!r} must be a non-negative int or None, got {cls!r}")
    classes = [cls for _, cls in entries]
    if all(cls is None for cls in classes):
        doc = {"labels": None}
    elif any(cls is None for cls in classes):
        raise ValueError("either every entry has a class or none has")
    else:
        doc = {"labels": [[path, int(cls)] for path, cls in entries]}
        if num_classes is not None:
            if int(num_classes) <= max(classes):
                raise ValueError(f"num_classes={num_classes} but the largest class is {max(classes)}")
            doc["num_classes"] = int(num_classes)
        if class_names is not None:
            names = [str(name) for name in class_names]
            if len(names) != doc.get("num_classes", max(classes) + 1):
                raise ValueError(f"{len(names)} class names for {doc.get('num_classes', max(classes) + 1)} classes")
            doc["class_names"] = names
    return doc
