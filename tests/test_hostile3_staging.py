"""Hostile inputs, round three (issue 30): staging folders, one writer per destination, the sample folder's
own files, and generated images checked before they are written. Each through the command line.

Mechanisms: storage.staging (a folder is ours only if it carries its token, name and inode as made;
destination_lock: one writer per destination; folder_written_whole), storage.samples.StreamingSampleFolder
(a manifest that carries the folder's and its chunk folders' tokens, read like user input; every entry it
did not write refused; a previous sample folder replaced only if dataset.json fingerprints exactly its
images; refuse_blank_images at every write), diffusion.generate (refuse_non_finite for every batch;
_keep_whole_images reads back the images of a killed run)."""

import os
import pathlib
import shutil

import pytest
import torch
from conftest import deadline, digests, pixels, png_bytes, run_cli, write_files

import mpdiff.storage.samples as samples

GEN = ["--seeds", "0-3", "--steps", "2", "--no-progress"]


def _refused(result):
    """The error line of a command that failed as it should: a non-zero exit, no traceback, one error line
    (after the lines a command prints before it fails, such as generate's "network: PATH")."""
    assert result.exit_code not in (0, 130) and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and result.output.rstrip("\n").endswith(errors[0]), result.output
    return errors[0]


def _tree(root):
    """{relative path: bytes} of every file under `root` (links not followed)."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _killed(monkeypatch, source, after, *flags):
    """`generate SOURCE GEN --out out FLAGS`, interrupted once `after` images are written: returns the
    folder it leaves, .out.generating."""
    real, written = samples.save_png, []

    def dies(path, image):
        if len(written) == after:
            raise KeyboardInterrupt
        written.append(path)
        real(path, image)

    monkeypatch.setattr(samples, "save_png", dies)
    result = run_cli("generate", source, *GEN, "--out", "out", *flags)
    monkeypatch.setattr(samples, "save_png", real)
    assert result.exit_code == 130, result.output
    return pathlib.Path(".out.generating")


# ---- ours is proven by a token, never guessed from a name -----------------------------------------------

def test_generate_sweeps_only_the_staging_folders_that_carry_their_token(partial_run, monkeypatch):
    real_rename = os.rename

    def killed_before_naming(src, dst):  # a SIGKILL between making the staging folder and naming it
        if os.path.basename(dst) == ".out.generating":
            raise KeyboardInterrupt
        real_rename(src, dst)

    def leftover():
        monkeypatch.setattr(os, "rename", killed_before_naming)
        assert run_cli("generate", partial_run, *GEN, "--out", "out").exit_code == 130
        monkeypatch.setattr(os, "rename", real_rename)
        [name] = [n for n in os.listdir(".") if n.startswith(".out.generating.") and n not in kept]
        return name

    kept = set()
    os.rename(leftover(), ".out.generating.old")                  # ours, renamed by its user: theirs now
    kept.add(".out.generating.old")
    shutil.copytree(leftover(), ".out.generating.bak")            # a copy of ours, with the user's notes in it
    write_files(".out.generating.bak", {"notes.txt": "mine"})
    kept.add(".out.generating.bak")
    ours = leftover()  # the previous one, ours, was swept when this one was made
    before = {name: _tree(name) for name in kept}
    result = run_cli("generate", partial_run, *GEN, "--out", "out")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(".")) == [".out.generating.bak", ".out.generating.old", "out", "out-grid.png"]
    assert not os.path.exists(ours) and {name: _tree(name) for name in kept} == before


def test_convert_sweeps_only_the_partial_folders_that_carry_their_token(monkeypatch):
    import mpdiff.data.convert as convert

    write_files("src", {f"{i}.png": png_bytes(pixels(i, 8)) for i in range(3)})
    real_write = convert.write_bytes

    def killed_at_the_second_image(path, data):
        if os.path.basename(path) == "img00000001.png":
            raise KeyboardInterrupt
        real_write(path, data)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(convert, "write_bytes", killed_at_the_second_image)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # SIGKILL: no clean-up
    assert run_cli("dataset", "convert", "src", "out", "--no-progress").exit_code == 130
    monkeypatch.setattr(convert, "write_bytes", real_write)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    [ours] = [n for n in os.listdir(".") if n.startswith(".out.partial-")]
    # The leftover carries its token; a user's copy of it, or a folder merely named like it, does not.
    shutil.copytree(ours, ".out.partial-mybackup")
    write_files(".out.partial-mine", {"00000/img00000000.png": png_bytes(pixels(9, 8)), "notes.txt": "mine"})
    before = {name: _tree(name) for name in (".out.partial-mybackup", ".out.partial-mine")}
    result = run_cli("dataset", "convert", "src", "out", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(".")) == [".out.partial-mine", ".out.partial-mybackup", "out", "src"]
    assert {name: _tree(name) for name in before} == before


def test_only_a_sample_folder_as_generate_finished_it_is_replaced(partial_run):
    write_files("mine", {"000000.png": png_bytes(pixels(0, 8, 1)), "dataset.json": '{"labels": null}'})
    assert run_cli("generate", partial_run, *GEN, "--out", "previous").exit_code == 0
    shutil.copytree("previous", "edited")  # a copy of a sample folder, one image of which its user changed
    write_files("edited", {"000001.png": png_bytes(pixels(1, 8, 1))})
    for folder in ("mine", "edited"):
        before = _tree(folder)
        line = _refused(run_cli("generate", partial_run, *GEN, "--out", folder))
        assert f"--out {folder} is not empty and is not a previous sample folder" in line, line
        assert _tree(folder) == before
    assert run_cli("generate", partial_run, "--seeds", "4-5", "--steps", "2", "--no-progress",
                   "--out", "previous").exit_code == 0  # as generate finished it: replaced
    assert sorted(os.listdir("previous")) == ["000004.png", "000005.png", "dataset.json"]


# ---- one writer per destination ----------------------------------------------------------------------

def test_a_second_convert_into_one_destination_is_refused_while_the_first_writes(monkeypatch):
    import mpdiff.data.convert as convert

    write_files("src", {f"{i}.png": png_bytes(pixels(i, 8)) for i in range(3)})
    real_write, second = convert.write_bytes, []

    def meanwhile(path, data):  # while the first writes its images, a second conversion into the same DEST
        if not second:
            second.append(run_cli("dataset", "convert", "src", "out", "--no-progress"))
        real_write(path, data)

    monkeypatch.setattr(convert, "write_bytes", meanwhile)
    first = run_cli("dataset", "convert", "src", "out", "--no-progress")
    assert first.exit_code == 0 and "wrote 3 images" in first.output, first.output
    line = _refused(second[0])
    assert line.startswith(f"error: out: being written by mpdiff dataset (pid {os.getpid()} on "), line
    assert sorted(os.listdir("out/00000")) == [f"img0000000{i}.png" for i in range(3)]
    assert sorted(os.listdir(".")) == ["out", "src"]  # and the lock is gone with its holder


def test_a_second_generate_into_one_folder_is_refused_while_the_first_writes(partial_run, monkeypatch):
    real, second = samples.save_png, []

    def meanwhile(path, image):
        if not second:
            second.append(run_cli("generate", partial_run, *GEN, "--out", "out"))
        real(path, image)

    monkeypatch.setattr(samples, "save_png", meanwhile)
    first = run_cli("generate", partial_run, *GEN, "--out", "out")
    assert first.exit_code == 0, first.output
    line = _refused(second[0])
    assert f"out: being written by mpdiff generate (pid {os.getpid()}" in line, line
    assert sorted(os.listdir("out")) == ["000000.png", "000001.png", "000002.png", "000003.png", "dataset.json"]
    assert sorted(os.listdir(".")) == ["out", "out-grid.png"]


# ---- the sample folder's own files are read back like user input ----------------------------------------

def test_a_chunk_folder_replaced_by_a_symlink_is_refused_and_nothing_written_through_it(partial_run, monkeypatch):
    partial = _killed(monkeypatch, partial_run, 1, "--subdirs")
    assert sorted(os.listdir(partial / "000000")) == ["000000.png"]
    write_files("victim", {"000001.png": b"the user's file"})
    shutil.rmtree(partial / "000000")
    os.symlink(os.path.abspath("victim"), partial / "000000")
    line = _refused(run_cli("generate", partial_run, *GEN, "--out", "out", "--subdirs"))
    assert "000000: not the chunk folder generation made" in line, line
    assert _tree("victim") == {"000001.png": b"the user's file"} and not os.path.exists("out")


def test_a_fifo_as_the_manifest_is_refused_without_blocking(partial_run, monkeypatch):
    partial = _killed(monkeypatch, partial_run, 1)
    os.remove(partial / ".generation.json")
    os.mkfifo(partial / ".generation.json")
    with deadline(60, "generate with a FIFO as its manifest"):
        line = _refused(run_cli("generate", partial_run, *GEN, "--out", "out"))
    assert ".generation.json: expected a regular generation manifest, found a FIFO" in line, line


def test_damaged_or_foreign_images_of_a_killed_run_are_made_again(partial_run, monkeypatch):
    partial = _killed(monkeypatch, partial_run, 3)
    damaged = partial / "000000.png"
    damaged.write_bytes(damaged.read_bytes()[:-20])                                   # truncated
    (partial / "000001.png").write_bytes(png_bytes(pixels(1, 16, 1)))                 # another size
    (partial / "000002.png").write_bytes(png_bytes(pixels(2, 8, 3)))                  # RGB, not grayscale
    result = run_cli("generate", partial_run, *GEN, "--out", "out")
    assert result.exit_code == 0, result.output
    remade = [line for line in result.stderr.splitlines() if line.endswith("; making it again")]
    assert len(remade) == 3 and all(f"{n}.png" in line for n, line in zip(("000000", "000001", "000002"), remade))
    assert run_cli("generate", partial_run, *GEN, "--out", "whole").exit_code == 0
    assert digests("out") == digests("whole")  # bit for bit the folder of an uninterrupted run


@pytest.mark.parametrize("stray", ["0000002.png", "1234567.png", "notes.txt"])
def test_an_entry_generation_did_not_write_is_refused_never_listed(partial_run, monkeypatch, stray):
    # 0000002.png was taken for seed 2 (int of the name), and dataset.json then listed 000002.png, which did not exist.
    partial = _killed(monkeypatch, partial_run, 1)
    write_files(partial, {stray: png_bytes(pixels(5, 8, 1))})
    line = _refused(run_cli("generate", partial_run, *GEN, "--out", "out"))
    assert f".out.generating/{stray}: a regular file that this generation did not write" in line, line
    assert (partial / stray).exists() and not os.path.exists("out")


# ---- every generated batch is checked before it is written ------------------------------------------------

@pytest.mark.parametrize("below, message", [
    (1e9, "the network produced NaN or infinite values at sigma=80 (step 1 of 2); check the network file"),
    (1.0, "sampling became NaN or infinite in step 1 of 2 (sigma 80 -> 0.002); the network or the sampler options"),
])
def test_a_network_that_produces_nan_writes_no_image(partial_run, monkeypatch, below, message):
    import mpdiff.diffusion.generate as generation

    class NanNetwork(generation.Counted):  # what a broken network file does, below a noise level
        def __call__(self, x, sigma, *args, **kwargs):
            out = super().__call__(x, sigma, *args, **kwargs)
            return out * float("nan") if float(torch.as_tensor(sigma).max()) < below else out

    monkeypatch.setattr(generation, "Counted", NanNetwork)
    line = _refused(run_cli("generate", partial_run, *GEN, "--sampler", "heun", "--out", "out"))  # its correction at 0.002
    assert f"error: seeds 0..3: {message}" in line, line
    assert not os.path.exists("out") and [n for n in os.listdir(".out.generating") if n.endswith(".png")] == []


@pytest.fixture(scope="module")
def latent_network(tmp_path_factory):
    """A tiny 4-channel network as a plain state_dict (NVIDIA's layout: generate needs --vae to decode it)."""
    from conftest import randomized_network

    path = tmp_path_factory.mktemp("latent") / "latent.pt"
    net = randomized_network(img_channels=4, img_resolution=8, label_dim=0, attn_resolutions=(4,))
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.parametrize("vae", ["collapsed", "nan"])
def test_a_vae_that_decodes_to_nothing_writes_no_image(latent_network, vae):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    with torch.no_grad():
        if vae == "collapsed":  # finite, and every image one grey
            model.decoder.conv_out.weight.zero_()
            model.decoder.conv_out.bias.fill_(0.3)
        else:
            model.decoder.conv_out.bias.fill_(float("nan"))
    model.save_pretrained("vae")
    line = _refused(run_cli("generate", latent_network, "--seeds", "0-1", "--steps", "2", "--vae", "vae",
                                     "--out", "out", "--no-progress"))
    if vae == "collapsed":
        assert "seeds 0..1: every image came out one flat value (76): the network, or the VAE decoding its " \
               "latents (--vae), produced NaN or collapsed output" in line, line
    else:
        assert "non-finite values (NaN or infinity)" in line or "one flat value (0)" in line, line
    assert not os.path.exists("out") and [n for n in os.listdir(".out.generating") if n.endswith(".png")] == []
