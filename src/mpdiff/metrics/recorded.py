"""What a sample folder says about how it was made: `mpdiff metrics --images` reports the network
evaluations per image (NFE, issue 31) that `mpdiff generate` counted and recorded in the folder's
dataset.json under "generation" ({"settings": ..., "nfe": 25, "guide_nfe": 7}), next to the scores.

A folder that generate did not make (real images, a built-in dataset, a dataset.json without the record)
has no NFE: nothing is reported. The scores do not depend on dataset.json (`--images` ignores its
labels), so a record that cannot be read is not an error either: :func:`recorded_evaluations` returns
no NFE and one line saying why, for the command to print as a warning.
"""

import os

from mpdiff.data.digits import BUILTIN_DATASETS
from mpdiff.data.labels import labels_file_limit
from mpdiff.data.sources import open_source
from mpdiff.errors import MpdiffError, first_line
from mpdiff.storage.dataset_json import LABELS_FILE
from mpdiff.storage.files import JsonProblem, parse_json

RECORD_KEY = "generation"           # dataset.json's key for how generate made the folder
EVALUATION_KEYS = ("nfe", "guide_nfe")  # the counted evaluations per image it holds (Batch.evaluations)


def recorded_evaluations(spec, num_images, warn=None):
    """{"nfe": ..., "guide_nfe": ...} of the folder or ZIP `spec` holding `num_images` images: the network
    evaluations per image that `mpdiff generate` counted and recorded in its dataset.json; {} when there
    is no record (no dataset.json, or one without "generation"). When the file or its record cannot be
    read, {} too, and `warn` (if given) is called with one line naming the file and the defect."""
    evaluations, problem = _read_record(spec, num_images)
    if problem and warn is not None:
        warn(problem)
    return evaluations


def _read_record(spec, num_images):
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        return {}, None  # a built-in dataset (open_dataset's reading of the name): no folder
    spec = os.fsdecode(os.fspath(spec))
    try:
        with open_source(spec) as source:
            if LABELS_FILE not in source.list_files():
                return {}, None
            where = source.where(LABELS_FILE)
            data = source.read(LABELS_FILE, labels_file_limit(num_images))
    except MpdiffError as e:
        return {}, f"NFE per image unknown: {first_line(e)}"
    try:
        doc = parse_json(data)  # the one JSON parse: UTF-8, no key twice, bounded nesting
    except JsonProblem as e:
        return {}, f"NFE per image unknown: {where}: {e}"
    record = doc.get(RECORD_KEY) if isinstance(doc, dict) else None
    if record is None:
        return {}, None
    values = tuple(record.get(k) for k in EVALUATION_KEYS) if isinstance(record, dict) else (None, None)
    if not all(_is_count(v) for v in values) or values[1] > values[0]:
        return {}, (f"NFE per image unknown: {where}: \"{RECORD_KEY}\" does not hold the counts generate writes "
                    f"(\"nfe\" and \"guide_nfe\", whole numbers, guide_nfe <= nfe)")
    return dict(zip(EVALUATION_KEYS, values)), None


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31
