"""`mpdiff metrics --images` reads back the network evaluations per image (NFE) that `mpdiff generate`
counted and recorded in the sample folder's dataset.json (issue 31, Deliver 2), and prints and records
them with the scores; a folder without the record has none, and a damaged record is a warning line,
never a wrong number or a failed measurement. Mechanism: mpdiff.metrics.recorded.recorded_evaluations."""

import json
import shutil

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "digits-ref.npz"
    result = run_cli("ref", "digits", "--out", path, "--metrics", "fd_digits", "--no-progress")
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def guided_folder(partial_run, tmp_path_factory):
    """4 digits, 5 DPM-Solver++(3M) steps, guided inside (0.5, 10]: 5 NFE, the guide in 1 of them."""
    out = tmp_path_factory.mktemp("generated") / "samples"
    result = run_cli("generate", partial_run, "--seeds", "0-3", "--sampler", "dpmpp-3m", "--nfe", "5", "--out", out,
                     "--guide", partial_run, "--guidance", "2", "--guidance-interval", "0.5,10", "--no-progress")
    assert result.exit_code == 0, result.output
    return out


def _metrics(folder, ref, *extra):
    return run_cli("metrics", "--images", folder, "--ref", ref, "--metrics", "fd_digits", "--no-progress", *extra)


def test_metrics_of_a_generated_folder_print_and_record_its_nfe(guided_folder, ref, tmp_path):
    shown = _metrics(guided_folder, ref)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert "nfe        5 per image" in lines and "guide_nfe  1 per image" in lines
    as_json = _metrics(guided_folder, ref, "--json")
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.stdout)
    assert (result["nfe"], result["guide_nfe"], result["num_images"]) == (5, 1, 4)
    # A ZIP of the folder carries its dataset.json, and with it the count.
    archive = shutil.make_archive(str(tmp_path / "samples"), "zip", guided_folder)
    zipped = json.loads(_metrics(archive, ref, "--json").stdout)
    assert (zipped["nfe"], zipped["guide_nfe"]) == (5, 1) and zipped["fd_digits"] == result["fd_digits"]


def test_a_folder_without_a_record_has_no_nfe(guided_folder, ref, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(guided_folder, folder)
    meta = json.loads((folder / "dataset.json").read_text())
    del meta["generation"]  # a dataset.json with labels only, as EDM2's tool writes it
    (folder / "dataset.json").write_text(json.dumps(meta))
    for case in ("labels only", "no dataset.json"):
        result = _metrics(folder, ref, "--json")
        assert result.exit_code == 0 and not result.stderr.strip(), (case, result.output)
        assert "nfe" not in json.loads(result.stdout) and "guide_nfe" not in json.loads(result.stdout), case
        (folder / "dataset.json").unlink(missing_ok=True)


@pytest.mark.parametrize("record, defect", [
    ({"nfe": "five", "guide_nfe": 0}, 'does not hold the counts generate writes'),
    ({"nfe": 5}, 'does not hold the counts generate writes'),
    ({"nfe": 5, "guide_nfe": 6}, 'guide_nfe <= nfe'),
    ({"nfe": True, "guide_nfe": 0}, 'does not hold the counts generate writes'),
    ("not json", "not valid JSON"),
])
def test_a_damaged_record_is_one_warning_line_and_no_nfe(guided_folder, ref, tmp_path, record, defect):
    folder = tmp_path / "copy"
    shutil.copytree(guided_folder, folder)
    if record == "not json":
        (folder / "dataset.json").write_text('{"labels": null, "generation": {"nfe": 5,')
    else:
        meta = json.loads((folder / "dataset.json").read_text())
        (folder / "dataset.json").write_text(json.dumps(dict(meta, generation=record)))
    result = _metrics(folder, ref, "--json")
    assert result.exit_code == 0, result.output  # the scores do not depend on dataset.json
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("NFE per image unknown: ") and defect in warning[0], warning
    assert "dataset.json" in warning[0] and "Traceback" not in result.output
    assert "nfe" not in json.loads(result.stdout)
