"""Issue 10's mechanisms, property-tested: the sweep of stale temporaries, the one JSON reader, the stats
file's truncation on resume, the checks of checkpoint metadata and the O(1) append. (The same mechanisms
met through the command line: tests/test_hostile.py.)

Defects these tests found in src/ were fixed; none is expected to fail.
"""

import dataclasses
import hashlib
import json
import math
import os
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mpdiff.config import RunOptions
from mpdiff.errors import CheckpointError, ConfigError
from mpdiff.storage import files
from mpdiff.storage.files import append_line, read_json
from mpdiff.storage.layout import RunLayout, checkpoint_name
from mpdiff.train.checkpoint import check_metadata
from mpdiff.train.report import truncate_stats
from mpdiff.train.run import check_existing_run, contract_of, resolve_run
from mpdiff.train.state import HEALTH_COUNTERS

PROPERTY = {"deadline": None, "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}


def one_line(error):
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


# ======================================================================================================
# The sweep of stale temporaries
# ======================================================================================================

# Names that atomic_write gives the temporaries of the files mpdiff writes, per directory of a run
# ("" is the run directory itself). Written out by hand: this is the specification, not the code's table.
OURS = {
    "": [".config.json.abcd1234.tmp", ".log.txt.a_b_c_d_.tmp", ".stats.jsonl.00000000.tmp",
         ".ema-traditional.safetensors.zzzzzzzz.tmp"],
    "checkpoints": [".training-state-000000000128.safetensors.x1y2z3w4.tmp"],
    "snapshots": [".ema-000000000064-0.050.safetensors.x1y2z3w4.tmp"],
    "phema": [".phema-000000000256-0.070.safetensors.k9j8h7g6.tmp", ".profile-000000000256-0.070.png.abcdefgh.tmp"],
    "samples": [".grid-0000001.png.q1w2e3r4.tmp", ".grid-final.png.abcd1234.tmp"],
    "plots": [".dynamics-activations.png.abcd1234.tmp", ".dynamics-updates.png.q1w2e3r4.tmp"],
}
# Names that are nobody's temporaries, or temporaries of files mpdiff does not write.
FOREIGN = [".env.tmp", ".x.tmp", ".draft.tmp", ".config.json.abc.tmp", ".config.json.ABCD1234.tmp",
           ".config.json.abcd12345.tmp", "config.json.abcd1234.tmp", ".config.json.abcd1234.tmpx",
           ".notes.txt.abcd1234.tmp", ".training-state-128.safetensors.abcd1234.tmp", "..abcd1234.tmp",
           ".config.json.abcd1234.tmp.abcd1234.tmp", ".ema-000000000064-0.05.safetensors.abcd1234.tmp",
           "plain.txt", "config.json", ".mpdiff.lock"]
NAMES = sorted({name for names in OURS.values() for name in names} | set(FOREIGN))
SUBDIRS = ["checkpoints", "snapshots", "phema", "samples", "plots"]
# Where entries go: our directories, a directory of the user's, a directory inside one of ours, the
# directory that a symlinked one of ours points to.
PLACES = ["", *SUBDIRS, "notes", "checkpoints/sub", "outside"]
KINDS = ["file", "dir", "link to file", "link to dir", "dangling link", "self link", "fifo"]


def _make(path, kind, base):
    if kind == "file":
        with open(path, "w") as f:
            f.write(os.path.basename(path))
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "link to file":
        os.symlink(os.path.join(base, "outside", "target.txt"), path)
    elif kind == "link to dir":
        os.symlink(os.path.join(base, "outside"), path)
    elif kind == "dangling link":
        os.symlink(os.path.join(base, "nowhere"), path)
    elif kind == "self link":
        os.symlink(os.path.basename(path), path)
    elif kind == "fifo":
        os.mkfifo(path)


def snapshot(root):
    """{relative path: (file type, size, inode, link target)} of everything under `root`, by lstat."""
    out = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            out[os.path.relpath(path, root)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_ino, target)
    return out


subdir_states = st.fixed_dictionaries({name: st.sampled_from(["dir", "dir", "dir", "symlink", "file", "absent",
                                                              "dangling"]) for name in SUBDIRS})
kinds = st.sampled_from(["file", "file", "file", *KINDS])
entries = st.lists(
    st.one_of(  # half of them our temporaries where they belong (then it depends on the kind and the directory)
        st.sampled_from([(place, name) for place, names in OURS.items() for name in names]).flatmap(
            lambda where: st.tuples(st.just(where[0]), st.just(where[1]), kinds)),
        st.tuples(st.sampled_from(PLACES), st.sampled_from(NAMES), kinds),
    ),
    max_size=40, unique_by=lambda entry: entry[:2])


@settings(max_examples=300, **PROPERTY)
@given(states=subdir_states, entries=entries)
def test_sweep_removes_exactly_our_temporaries_in_our_own_directories(tmp_path, states, entries):
    base = tempfile.mkdtemp(dir=tmp_path)
    run, outside = os.path.join(base, "run"), os.path.join(base, "outside")
    os.makedirs(run)
    os.makedirs(outside)
    open(os.path.join(outside, "target.txt"), "w").close()
    real = {"": run, "notes": os.path.join(run, "notes"), "outside": outside}
    os.mkdir(real["notes"])
    for name, state in states.items():
        path = os.path.join(run, name)
        if state == "dir":
            os.mkdir(path)
            real[name] = path
            os.mkdir(os.path.join(path, "sub"))
            real[name + "/sub"] = os.path.join(path, "sub")
        elif state == "symlink":  # entries meant for it land in the directory it points to
            os.mkdir(os.path.join(outside, name))
            os.symlink(os.path.join(outside, name), path)
            real[name] = os.path.join(outside, name)
        elif state == "file":
            open(path, "w").close()
        elif state == "dangling":
            os.symlink(os.path.join(base, "nowhere"), path)
    expected = set()
    for place, name, kind in entries:
        if place not in real or (place == "" and name in SUBDIRS + ["notes"]):
            continue
        path = os.path.join(real[place], name)
        if os.path.lexists(path):
            continue
        _make(path, kind, base)
        if kind == "file" and name in OURS.get(place, ()) and (place == "" or states.get(place) == "dir"):
            expected.add(os.path.relpath(path, base))

    before = snapshot(base)
    layout = RunLayout(run)
    assert {os.path.relpath(p, base) for p in layout.stale_temporaries()} == expected
    layout.remove_stale_temporaries()
    after = snapshot(base)
    assert after == {rel: value for rel, value in before.items() if rel not in expected}


# ======================================================================================================
# The one JSON reader: config.json
# ======================================================================================================

@pytest.fixture(scope="module")
def resolved():
    """The resolved TINY_RUN (conftest): what check_existing_run compares a config.json with."""
    from conftest import TINY_RUN
    sections = {section: dict(values) for section, values in TINY_RUN.items()}
    run = RunOptions(**sections.pop("run"), run_dir="unused")
    value, _ = resolve_run("digits", run, **sections)
    return value


# Text without line breaks or control characters: a value that holds one has its own test below.
printable_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), printable_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(printable_text, inner,
                                                                                  max_size=4)),
                           max_leaves=12)
printable_keys = printable_text.filter(bool)


@st.composite
def config_texts(draw, valid):
    """Bytes for config.json: random bytes, JSON documents, deep nesting, or the valid config changed a little."""
    kind = draw(st.sampled_from(["bytes", "json", "nested", "changed", "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":
        depth = draw(st.sampled_from([10, 1000, 100_000, 300_000]))
        opener = draw(st.sampled_from(["[", '{"a":']))
        return (opener * depth).encode() + draw(st.sampled_from([b"", b"1" + b"]" * depth]))
    config = json.loads(json.dumps(valid))
    if kind == "changed":
        section = draw(st.sampled_from(sorted(config)))
        if isinstance(config[section], dict) and draw(st.booleans()):
            config[section][draw(st.sampled_from(sorted(config[section])) | printable_keys)] = draw(json_values)
        else:
            config[section] = draw(json_values)
    text = json.dumps(config)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut]
    return text.encode()


@settings(max_examples=200, **PROPERTY)
@given(data=st.data())
def test_config_json_gives_a_config_error_line_or_is_accepted(resolved, tmp_path, data):
    content = data.draw(config_texts(resolved.to_dict()))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.json").write_bytes(content)
    ours = dataclasses.replace(resolved, run=resolved.run.replace(run_dir=str(run_dir)))
    try:
        document = read_json(run_dir / "config.json", what="run config", error=ConfigError)
    except ConfigError as e:
        one_line(e)
        document = None
    try:
        check_existing_run(ours)
    except ConfigError as e:
        one_line(e)
    else:  # accepted: it is a config.json of this very run
        assert document is not None and contract_of(document) == resolved.contract()


def test_config_json_with_a_control_character_in_a_key_is_one_line(resolved, tmp_path):
    config = resolved.to_dict()
    config["network"]["a\nb"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        check_existing_run(dataclasses.replace(resolved, run=resolved.run.replace(run_dir=str(tmp_path))))
    one_line(e.value)


# ======================================================================================================
# stats.jsonl: truncation on resume
# ======================================================================================================

stats_lines = st.one_of(
    st.builds(lambda nimg, loss: json.dumps({"nimg": nimg, "loss": loss}).encode(),
              st.integers(0, 1024), st.floats(allow_nan=False, allow_infinity=False)),
    st.sampled_from([b'{"nimg": "64"}', b'{"x": 1}', b'{"nimg": 64.0}', b'{"nimg": null, "loss": 1}']),
    st.sampled_from([b"[1]", b'"x"', b"3", b"null", b"true", b"[]"]),
    st.sampled_from([b'{"nimg": 64, "lo', b"garbage", b"{]", b"{", b'{"nimg": 1}}', b"}"]),
    st.sampled_from([b"", b"   ", b"\t"]),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
)


def _classify(raw):
    """(kind, value) of one line as the specification reads it: 'blank', 'row' (a dict with an integer nimg),
    'no nimg' (another dict) or 'damaged' (anything else)."""
    if not raw.strip():
        return "blank", None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "damaged", None
    if not isinstance(value, dict):
        return "damaged", None
    return ("row" if isinstance(value.get("nimg"), int) else "no nimg"), value


@settings(max_examples=300, **PROPERTY)
@given(lines=st.lists(stats_lines, max_size=12), newline_at_end=st.booleans(), resume=st.integers(0, 1024))
@example(lines=[b'{"nimg": 64}', b'{"nimg": 64, "lo'], newline_at_end=False, resume=64)
@example(lines=[b"[1]", b"\xff\xfe"], newline_at_end=True, resume=0)
def test_truncate_stats_keeps_every_valid_row_and_reports_every_damaged_line(tmp_path, lines, newline_at_end, resume):
    path = tmp_path / "stats.jsonl"
    data = b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")
    path.write_bytes(data)
    notes = truncate_stats(path, resume)                         # never raises

    numbered = [(number, raw) + _classify(raw) for number, raw in enumerate(data.split(b"\n"), 1)]
    if data.endswith(b"\n"):
        numbered = numbered[:-1]
    present = [entry for entry in numbered if entry[2] != "blank"]
    after = path.read_bytes()
    assert after.endswith(b"\n") or after == b""                # whole lines only
    after = after.split(b"\n")[:-1]
    expected, damaged_notes = [], 0
    for index, (number, raw, kind, value) in enumerate(present):
        if kind == "row":
            if value["nimg"] <= resume:
                expected.append(("row", value))
        elif kind == "no nimg":
            expected.append(("no nimg", value))
        else:
            torn = [note for note in notes if f": line {number} was torn by a crash; dropped" in note]
            kept = [note for note in notes
                    if f": line {number} is damaged (" in note and note.endswith("kept as it is")]
            assert len(torn) + len(kept) == 1, (number, notes)  # every damaged line is reported, once
            damaged_notes += 1
            assert not torn or index == len(present) - 1       # only the last line can be a torn one
            if kept:
                expected.append(("damaged", raw))
    no_nimg_notes = [note for note in notes if "has no integer nimg; kept as it is" in note]
    assert len(no_nimg_notes) == sum(kind == "no nimg" for _, _, kind, _ in present)
    assert len(notes) == damaged_notes + len(no_nimg_notes)
    assert len(after) == len(expected), (after, expected)
    for line, (kind, want) in zip(after, expected):
        if kind == "damaged":                                    # kept where it was (its bytes: see below)
            try:
                text = want.decode("utf-8")
            except UnicodeDecodeError:
                continue
            assert line == text.encode("utf-8")
        else:
            assert json.dumps(json.loads(line)) == json.dumps(want)  # the same row (NaN-safe comparison)


def test_non_utf8_stats_row_is_kept_byte_for_byte(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_bytes(b'{"nimg": 64}\n\xff\xfe\x00 garbage \x80\n{"nimg": 128}\n')
    truncate_stats(path, 128)
    assert path.read_bytes().split(b"\n")[1] == b"\xff\xfe\x00 garbage \x80"


def test_stats_row_without_nimg_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_bytes(b'{"nimg": 64}\n\n{"x": 1}\n')
    assert truncate_stats(path, 64) == [f"{path}: line 3 has no integer nimg; kept as it is"]


# ======================================================================================================
# Checkpoint metadata
# ======================================================================================================

CONTRACT = {"training": {"batch": 64, "duration": 512, "ema_sigma_rels": [0.05, 0.1]}}


def valid_meta(nimg):
    counters = dict.fromkeys(HEALTH_COUNTERS, 0)
    counters["elapsed_sec"] = 1.5
    return {"nimg": nimg, "step": nimg // 64, "ema_nimg": nimg, "ema_sigma_rels": [0.05, 0.1], "counters": counters}


def consistent(meta, path):
    """The specification: every number is one the run could have written into a file of this name."""
    def count(value):
        return type(value) is int and value >= 0

    nimg, step, counters = meta.get("nimg"), meta.get("step"), meta.get("counters")
    if not (count(nimg) and count(step) and nimg <= 512 and nimg % 64 == 0 and step == nimg // 64):
        return False
    name = os.path.basename(path)
    if name.startswith("training-state-") and name != checkpoint_name(nimg):
        return False
    if meta.get("ema_nimg") != nimg or meta.get("ema_sigma_rels") != [0.05, 0.1]:
        return False
    if not isinstance(counters, dict) or set(counters) != set(HEALTH_COUNTERS) | {"elapsed_sec"}:
        return False
    elapsed = counters["elapsed_sec"]
    return all(count(counters[k]) for k in HEALTH_COUNTERS) and isinstance(elapsed, (int, float)) \
        and math.isfinite(elapsed) and elapsed >= 0


metadata_values = st.one_of(
    json_values,
    st.sampled_from([10 ** 21, -64, -1, 63, 65, 128, 192, 256, 512, 576, 2 ** 63, 128.0, True, False, None,
                     float("nan"), float("inf"), "128", [128], {"nimg": 128}]),
)


@st.composite
def checkpoint_metadata(draw):
    nimg = draw(st.sampled_from(range(0, 513, 64)))
    meta = valid_meta(nimg)
    for field in draw(st.lists(st.sampled_from(["nimg", "step", "ema_nimg", "ema_sigma_rels", "counters",
                                                "counter", "elapsed_sec", "drop"]), max_size=3)):
        if field == "counter":
            meta["counters"] = dict(meta["counters"]) if isinstance(meta.get("counters"), dict) else {}
            meta["counters"][draw(st.sampled_from(HEALTH_COUNTERS))] = draw(metadata_values)
        elif field == "elapsed_sec":
            meta["counters"] = dict(meta["counters"]) if isinstance(meta.get("counters"), dict) else {}
            meta["counters"]["elapsed_sec"] = draw(metadata_values)
        elif field == "drop":
            meta.pop(draw(st.sampled_from(sorted(meta))), None)
        else:
            meta[field] = draw(metadata_values)
    named = draw(st.one_of(st.just(nimg), st.sampled_from([0, 64, 128, 10 ** 11]), st.none()))
    path = os.path.join("run", "checkpoints", checkpoint_name(named) if named is not None else "saved.safetensors")
    return meta, path


@settings(max_examples=400, **PROPERTY)
@given(case=checkpoint_metadata())
@example(case=(dict(valid_meta(256), nimg=10 ** 21), "training-state-000000000256.safetensors"))
@example(case=(dict(valid_meta(256), nimg=-64), "training-state-000000000256.safetensors"))
@example(case=(dict(valid_meta(256), step=3), "training-state-000000000256.safetensors"))
@example(case=(dict(valid_meta(128)), "training-state-000000000256.safetensors"))
def test_checkpoint_metadata_is_accepted_only_when_consistent(case):
    meta, path = case
    try:
        check_metadata(path, json.loads(json.dumps(meta)), CONTRACT)
    except CheckpointError as e:
        assert one_line(e).startswith(f"{path}: ")
        assert not consistent(meta, path), meta
    else:
        assert consistent(meta, path), meta


def test_checkpoint_metadata_message_with_a_newline_in_a_value_is_one_line():
    with pytest.raises(CheckpointError) as e:
        check_metadata("training-state-000000000128.safetensors", dict(valid_meta(128), nimg="1\nerror: forged"),
                       CONTRACT)
    one_line(e.value)


# ======================================================================================================
# append_line
# ======================================================================================================

any_text = st.text(max_size=40)                                # control characters, lone surrogates, ...
plain_text = st.text(st.characters(whitelist_categories=("L", "M", "N", "P", "S"), whitelist_characters=" "),
                     max_size=40)


@settings(max_examples=300, **PROPERTY)
@given(existing=st.binary(max_size=200), line=st.one_of(plain_text, any_text),
       trailing=st.sampled_from(["", "\n", "\n\n"]))
@example(existing=b'{"nimg": 64, "lo', line='{"nimg": 128}', trailing="")
@example(existing=b"", line="", trailing="")
@example(existing=b"row\n", line="new run in run-\udcff", trailing="")
def test_append_line_adds_one_whole_line_after_any_content(tmp_path, existing, line, trailing):
    path = tmp_path / "stats.jsonl"
    path.write_bytes(existing)
    append_line(path, line + trailing)
    data = path.read_bytes()
    separator = b"" if not existing or existing.endswith(b"\n") else b"\n"
    assert data.startswith(existing + separator)                 # what was there is untouched
    added = data[len(existing + separator):]
    assert added.endswith(b"\n") and added.count(b"\n") == 1, added   # one line, and a whole one
    if line.isprintable():
        assert added == line.rstrip("\n").encode("utf-8") + b"\n"


def test_append_line_is_constant_time(tmp_path, monkeypatch):
    """131,072 rows and one more: the file is appended to in place (same inode, its bytes untouched), never
    read whole or rewritten (the old implementation rewrote it atomically: a new inode every row)."""
    path = tmp_path / "stats.jsonl"
    row = json.dumps({"nimg": 0, "kimg": 0.0, "loss": 0.123456789, "lr": 0.01, "img_per_sec": 1000.0}) + "\n"
    path.write_text(row * 131_072)
    before = os.stat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()

    def forbidden(*args, **kwargs):
        raise AssertionError("append_line must not read or rewrite the file")

    with monkeypatch.context() as patched:
        for name in ("atomic_write", "write_bytes", "read_bytes", "open_regular"):
            patched.setattr(files, name, forbidden)
        patched.setattr(os, "replace", forbidden)
        append_line(path, json.dumps({"nimg": 64}))

    after = os.stat(path)
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    assert after.st_size == before.st_size + len('{"nimg": 64}\n')
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read(before.st_size)).hexdigest() == digest
        assert f.read() == b'{"nimg": 64}\n'


def test_the_run_directory_lock_names_its_holder_and_is_taken_over_after_a_kill(tmp_path):
    import signal
    import subprocess
    import sys

    from mpdiff.storage.lock import RunDirectoryBusy, run_directory_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mpdiff.storage.lock import run_directory_lock\n"
                               "with run_directory_lock(sys.argv[1], 'train'):\n"
                               "    print('HELD', flush=True)\n    time.sleep(120)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(RunDirectoryBusy) as info:
            with run_directory_lock(tmp_path, "phema"):
                pass
        message = str(info.value)
        assert message.startswith(f"{tmp_path}: in use by mpdiff train (pid {holder.pid} on ") and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the flock with the killed process: the stale lock file is simply taken over.
    with run_directory_lock(tmp_path, "phema"):
        assert json.loads((tmp_path / ".mpdiff.lock").read_text())["command"] == "phema"
