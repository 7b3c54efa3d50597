"""The demo's CNN section end to end on a small setting: BatchNorm CNNs trained with the CNN recipe
on digits (8x8), merged with and without REPAIR, the table naming the BatchNorm reset."""

from fastmerge.cli import main
from fastmerge.demo import run_demo


def test_demo_merges_batch_norm_cnns(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMERGE_CACHE", str(tmp_path))
    r = run_demo("digits", arch="vgg_bn", hidden=16, seeds=2, epochs=6, pairing="disjoint", progress=False,
                 methods=("average", "permute", "cca"))
    table = r.table()
    assert "VGG-BN 8/16" in table and "2 models (BN reset)" in table and "disjoint pairs" in table
    assert min(r.parents) > 85
    assert r.mean("permute", 2, False) > r.mean("average", 2, False) + 10
    assert r.mean("cca", 2, False) > r.mean("average", 2, False) + 10
    assert ("permute", 2, True) in r.rows and ("cca", 4, False) not in r.rows  # 2 seeds: no 4-model merge


def test_demo_command_takes_an_architecture(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FASTMERGE_CACHE", str(tmp_path))
    assert main(["demo", "--dataset", "digits", "--arch", "vgg", "--hidden", "8", "--seeds", "2", "--quiet"]) == 0
    assert "digits, VGG 4/8, 2 seeds" in capsys.readouterr().out
