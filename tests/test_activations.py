"""Calibration activations beyond --activation-budget spill to files (slimc.activations)."""
import gc
import json

import pytest
import torch
from torch import nn

import slimc
from slimc import activations, resume
from slimc.calibrate import BlockInputs, run_block
from slimc.errors import SlimcError

from test_stream import OPTS, Killed, _files, _source


def _resident_kb(path) -> int:
    """Resident pages this process maps from `path` (/proc/self/smaps): only the spilled file's own
    pages, so a library paged in meanwhile cannot move the number (RssFile counted those too)."""
    resident, in_file = 0, False
    try:
        smaps = open("/proc/self/smaps").read().splitlines()
    except OSError:
        pytest.skip("no /proc/self/smaps")
    for line in smaps:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            in_file = len(head) >= 6 and head[5] == str(path)
        elif in_file and line.startswith("Rss:"):
            resident += int(head[1])
    return resident


def test_a_spilled_stream_keeps_its_data_and_hands_back_its_pages(tmp_path):
    spill = activations.SpillDir(tmp_path)
    t = spill.empty((16, 256, 1024))  # 16 MiB
    (path,) = tmp_path.iterdir()
    assert activations.spill_path(t) == path and activations.spill_path(t[3:5]) == path
    values = torch.randn(16, 256, 1024, generator=torch.Generator().manual_seed(0))
    assert _resident_kb(path) < 1_000
    t.copy_(values)
    assert _resident_kb(path) > 12_000  # written pages are resident...
    activations.release(t)
    assert _resident_kb(path) < 1_000  # ...until handed back
    assert torch.equal(t, values)  # from the page cache (or the disk): nothing lost
    del t
    gc.collect()
    assert not path.exists()  # a stream's file dies with it


def test_a_pinned_stream_outlives_its_tensor_until_unpinned(tmp_path):
    t = activations.SpillDir(tmp_path).empty((2, 3, 4))
    t.fill_(7.0)
    path = activations.spill_path(t)
    activations.pin(path)
    del t
    gc.collect()
    assert path.is_file()
    again = activations.open_spilled(path, (2, 3, 4))
    assert torch.equal(again, torch.full((2, 3, 4), 7.0))
    activations.unpin(path)
    assert path.is_file()  # still mapped by `again`
    del again
    gc.collect()
    assert not path.exists()
    with pytest.raises(SlimcError, match="missing"):
        activations.open_spilled(path, (2, 3, 4))


def test_run_block_over_a_spilled_stream_gives_the_ram_outputs_in_a_spilled_stream(tmp_path):
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(10, 7, 32)
    in_ram = run_block(block, BlockInputs(x, {}), batch_size=3, device="cpu")
    spilled_x = activations.place(x, activations.SpillDir(tmp_path))
    out = run_block(block, BlockInputs(spilled_x, {}), batch_size=3, device="cpu")
    assert activations.spill_path(spilled_x) is not None and activations.spill_path(out) is not None
    assert activations.spill_path(out) != activations.spill_path(spilled_x)
    assert torch.equal(out, in_ram) and activations.spill_path(in_ram) is None


def test_budget_chooses_ram_or_files(tmp_path):
    shape = (4, 8, 16)  # 2 KiB a stream
    assert activations.choose(shape, 3, 3 * 2048, tmp_path) is None
    assert isinstance(activations.choose(shape, 3, 3 * 2048 - 1, tmp_path), activations.SpillDir)


@pytest.mark.parametrize("kw", [{}, {"reconstruct": True, "stream": "off"}])
def test_a_compile_over_budget_spills_and_writes_the_same_bytes(tmp_path, monkeypatch, capsys, kw):
    src = _source(tmp_path)
    _compile = lambda out, **more: slimc.compile(str(src), str(out), calib=str(src.parent / "calib.txt"),
                                                 **{**OPTS, **kw, **more})
    _compile(tmp_path / "ram")
    assert "spill" not in capsys.readouterr().err
    seen = []
    save = resume.PartialCompile.save_block

    def save_and_look(self, i, *args):
        save(self, i, *args)
        seen.append(sorted(p.name for p in (self.path / "activations").iterdir()))

    monkeypatch.setattr(resume.PartialCompile, "save_block", save_and_look)
    _compile(tmp_path / "spilled", activation_budget="1KB")
    assert "spill to" in capsys.readouterr().err
    assert _files(tmp_path / "spilled") == _files(tmp_path / "ram")
    # after each block the files of the streams alive: the next block's inputs (and the dense stream)
    assert seen and all(0 < len(names) <= 3 for names in seen), seen
    assert not (tmp_path / "spilled.partial").exists()


def test_a_killed_spilling_compile_resumes_from_its_pinned_stream(tmp_path, monkeypatch):
    src = _source(tmp_path)
    offload = tmp_path / "scratch"
    _compile = lambda out, **more: slimc.compile(str(src), str(out), calib=str(src.parent / "calib.txt"),
                                                 reconstruct=True, stream="off", **{**OPTS, **more})
    _compile(tmp_path / "straight")
    save = resume.PartialCompile.save_block

    def save_then_die(self, i, *args):
        save(self, i, *args)
        if i == 1:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(resume.PartialCompile, "save_block", save_then_die)
        with pytest.raises(Killed):
            _compile(tmp_path / "out", activation_budget="1KB", offload_dir=str(offload))
    gc.collect()
    stream_file = json.loads((tmp_path / "out.partial" / "progress.json").read_text())["stream"]
    named = resume._spilled_files(tmp_path / "out.partial" / stream_file)
    assert named and {p.parent for p in named} == {offload.resolve()}
    assert sorted(offload.iterdir()) == sorted(named)  # only what the resume needs survived the kill
    # resumed with the streams in RAM this time: where activations live does not change the bytes
    res = _compile(tmp_path / "out", resume=True)
    assert res.report["resumed"] == {"blocks_already_done": 2}
    assert _files(tmp_path / "out") == _files(tmp_path / "straight")
    gc.collect()
    assert list(offload.iterdir()) == [] and not (tmp_path / "out.partial").exists()


def test_a_malformed_budget_is_refused_in_one_line(tmp_path):
    with pytest.raises(SlimcError, match="--activation-budget") as e:
        slimc.compile("nowhere", str(tmp_path / "out"), activation_budget="lots")
    assert "\n" not in str(e.value)
