"""`python -m minidb.toy.lab train-base` is resumable: a run cut off in either stage and continued
with --resume writes the same model as one that ran straight through."""

import pytest
import torch

from minidb.files import read_tensors
from minidb.toy import lab

TINY = ["--vae-steps", "3", "--vae-ch", "32", "--steps", "4", "--batch", "2", "--pictures", "8", "--save-every", "2"]


def train_base(tmp_path, name, *extra):
    out = tmp_path / f"{name}.safetensors"
    lab.main(["train-base", "--out", str(out), "--work", str(tmp_path / name), *TINY, *extra])
    return out


@pytest.mark.parametrize("stage, stop_at", [("vae", 2), ("unet", 2)])
def test_an_interrupted_base_run_resumes_to_the_same_model(tmp_path, monkeypatch, stage, stop_at):
    straight = read_tensors(train_base(tmp_path, "straight"))[0]
    save = lab.checkpoint

    def cut_off(folder, step, *args, **kwargs):  # Ctrl-C right after the checkpoint of `stop_at`
        save(folder, step, *args, **kwargs)
        if folder.name == stage and step == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(lab, "checkpoint", cut_off)
    with pytest.raises(KeyboardInterrupt):
        train_base(tmp_path, "cut")
    assert not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(lab, "checkpoint", save)
    resumed = read_tensors(train_base(tmp_path, "cut", "--resume"))[0]
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_train_base_refuses_to_clobber_or_change_a_run(tmp_path, capsys):
    train_base(tmp_path, "run")
    for extra, words in ((), "--resume"), (("--resume", "--lr", "1e-3"), "--lr is 0.001 now"):
        with pytest.raises(SystemExit) as e:
            train_base(tmp_path, "run", *extra)
        assert e.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        lab.main(["train-base", "--vae-ch", "48"])
    assert e.value.code == 2 and "multiple of 32" in capsys.readouterr().err
