"""torchrun: two processes on the CPU (gloo) train what one process trains at the same global batch,
share one class-prior cache, and resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minidb.dreambooth import shard
from minidb.files import read_tensors
from test_train import ROOT, run, world  # noqa: F401  (world is a fixture)
from test_train_options import log, weights


def torchrun(world, out, cache, *extra, steps=3):
    args = ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", out, "--steps", steps,
            "--resolution", 32, "--sample-steps", 2, "--class-cache", cache, "--class-images", 6, "--drift-images", 2,
            "--device", "cpu", "--lr", 1e-3, "--mixed-precision", "no",
            *(["--save-dtype", "fp32"] if "lora" not in extra else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_shards_cover_every_missing_batch_once():
    for have, count, world_size in ((0, 200, 2), (5, 23, 3), (8, 8, 2), (0, 3, 4)):
        firsts = [f for rank in range(world_size) for f in shard(have, count, 4, rank, world_size)]
        assert sorted(firsts) == list(range(have, count, 4))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_train_what_one_process_trains_at_the_same_global_batch(world, tmp_path, method):
    extra = ["--method", "lora", "--lora-rank", 2] if method == "lora" else []
    two = torchrun(world, tmp_path / "two", tmp_path / "cache2", *extra)
    one = run(world, tmp_path / "one", "--batch-size", 2, "--lr", 1e-3, "--class-images", 6,
              "--class-cache", tmp_path / "cache1", *extra, steps=3)
    assert [r["loss"] for r in log(two)] == pytest.approx([r["loss"] for r in log(one)], rel=1e-4)
    a, b = weights(two, "unet" if method == "full" else "lora"), weights(one, "unet" if method == "full" else "lora")
    # the mean, not the largest: three Adam steps at lr 1e-3 move any weight by 3e-3 at most, whatever trained
    assert sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(v.numel() for v in a.values()) < 1e-5
    # one shared cache, each image drawn once, the same images one process draws
    (drawn,) = [f for f in (tmp_path / "cache2").iterdir() if len(list(f.glob("0*.safetensors"))) == 6]
    (alone,) = [f for f in (tmp_path / "cache1").iterdir() if len(list(f.glob("0*.safetensors"))) == 6]
    for i in range(6):
        x, y = (read_tensors(f / f"{i:05d}.safetensors")[0]["latent"] for f in (drawn, alone))
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    assert json.load(open(two / "settings.json"))["batch_size"] == 1
    assert (two / ("model.safetensors" if method == "full" else "lora.safetensors")).is_file()


def test_every_process_of_a_resume_finds_the_run_on_its_device(world, tmp_path, monkeypatch):
    """Under torchrun each process takes its own card (cuda becomes cuda:LOCAL_RANK), but the run's settings
    record --device as given, so that the resume's check agrees in every process, not in the first alone.
    The card mapping is played on the CPU, where "cpu:N" is the CPU: the run starts as process 0, and
    resumes as process 1 would see it."""
    import train
    for local in (0, 1):
        monkeypatch.setattr(train.distributed, "start", lambda device, local=local: (0, 1, f"{device}:{local}"))
        run(world, tmp_path / "run", *(["--resume"] if local else []), steps=2 + local)
    assert json.load(open(tmp_path / "run" / "settings.json"))["device"] == "cpu"
    assert [r["step"] for r in log(tmp_path / "run")] == [1, 2, 3]


def test_ctrl_c_under_torchrun_saves_a_checkpoint_and_resume_finishes_the_same_run(world, tmp_path):
    """A terminal's Ctrl-C reaches the launcher and every process: they stop at the same step, the first
    one saves, and --resume under torchrun continues, with the same losses, to the same weights as a run
    never stopped. (The stopped run was asked for 60 steps, so that the signal lands well before its end;
    both runs then go to three steps past the checkpoint, as a resume with a larger --steps may.)"""
    out, cache = tmp_path / "interrupted", tmp_path / "cache"
    args = ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", out, "--steps", 60,
            "--resolution", 32, "--sample-steps", 2, "--class-cache", cache, "--class-images", 6, "--drift-images", 2,
            "--device", "cpu", "--lr", 1e-3, "--save-dtype", "fp32", "--mixed-precision", "no"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the launcher and both processes get it
    _, err = proc.communicate(timeout=300)
    assert "interrupted: saved" in err, err[-3000:]
    (saved,) = (out / "checkpoints").glob("step-*")
    assert not (out / "model.safetensors").exists()
    steps = int(saved.name[5:]) + 3
    assert steps < 60  # the run was stopped, not finished
    torchrun(world, out, cache, "--resume", steps=steps)
    straight = torchrun(world, tmp_path / "straight", cache, steps=steps)
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log(straight)] == [r["loss"] for r in log(out)]
    assert [r["step"] for r in log(out)] == list(range(1, steps + 1))


def test_a_resume_may_change_the_processes_but_not_the_global_batch(world, tmp_path, monkeypatch, capsys):
    """settings.json did not record the number of processes: a run of 2 processes at --batch-size 1 resumed as
    1 process at --batch-size 1 (half the global batch, and the example order changed) with no word, while
    1 process at --batch-size 2, which trains the same global batch (see the test above), was refused."""
    import train
    from minidb.resume import check_global_batch
    from minidb.runs import RunError
    saved = {"processes": 2, "batch_size": 1}
    assert check_global_batch(tmp_path, saved, {"processes": 1, "batch_size": 2}) is None
    with pytest.raises(RunError) as e:
        check_global_batch(tmp_path, saved, {"processes": 1, "batch_size": 1})
    assert str(e.value) == (f"the run in {tmp_path} trains a global batch of 2 (2 processes at --batch-size 1), but "
                            "this command's is 1 (1 process at --batch-size 1), which would not continue the same run; "
                            "resume with --batch-size 2 on 1 process, or under torchrun --nproc_per_node 2 at "
                            "--batch-size 1.")
    with pytest.raises(RunError) as e:  # on as many processes, the run's own batch is the one way (it was offered twice)
        check_global_batch(tmp_path, saved, {"processes": 2, "batch_size": 2})
    assert str(e.value).endswith("which would not continue the same run; resume under torchrun --nproc_per_node 2 "
                                 "at --batch-size 1.")
    with pytest.raises(RunError, match="records 2.5 processes at --batch-size 1, which train.py never writes"):
        check_global_batch(tmp_path, {"processes": 2.5, "batch_size": 1}, {"processes": 1, "batch_size": 2})
    # train.py records its processes, and compares them on --resume (a second process played by rank_and_world:
    # the check comes before any collective call)
    run(world, tmp_path / "run", "--batch-size", 2, steps=2)
    assert json.load(open(tmp_path / "run" / "settings.json"))["processes"] == 1
    monkeypatch.setattr(train.distributed, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(train.distributed, "share", lambda value: value)
    with pytest.raises(SystemExit) as e:
        run(world, tmp_path / "run", "--resume", steps=3)
    assert e.value.code == 2
    assert "trains a global batch of 2 (1 process at --batch-size 2), but this command's is 4 (2 processes at " \
           "--batch-size 2)" in capsys.readouterr().err
    monkeypatch.undo()
    # and the same global batch on another number of processes goes on as the run would have: 2 processes at
    # --batch-size 1 resumed as 1 process at --batch-size 2 gives the losses of 1 process at --batch-size 2 throughout
    cache = tmp_path / "cache"
    resumed = torchrun(world, tmp_path / "two", cache, steps=2)
    run(world, resumed, "--resume", "--batch-size", 2, "--class-images", 6, "--class-cache", cache, steps=3)
    straight = run(world, tmp_path / "one", "--batch-size", 2, "--lr", 1e-3, "--class-images", 6, "--class-cache", cache,
                   steps=3)
    assert [r["step"] for r in log(resumed)] == [1, 2, 3]
    assert [r["loss"] for r in log(resumed)] == pytest.approx([r["loss"] for r in log(straight)], rel=1e-4)


FIRST_PROCESS_DISK_IS_FULL = """import os, runpy, sys
import minidb.writes
if os.environ["RANK"] == "0":  # only the first process checks the disk (it alone writes)
    minidb.writes.room_problem = lambda *args: "The disk holding the run has 1 kB free; free some space."
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_check_of_the_first_process_alone_stops_every_process(world, tmp_path):
    """The first process alone checks the disk; when it stopped, the second, waiting on it, ended in a gloo
    traceback ('Connection closed by peer'); on GPUs NCCL would have waited out its timeout."""
    (tmp_path / "full.py").write_text(FIRST_PROCESS_DISK_IS_FULL)
    args = ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", tmp_path / "run",
            "--steps", 2, "--resolution", 32, "--sample-steps", 2, "--class-cache", tmp_path / "cache",
            "--class-images", 2, "--drift-images", 2, "--device", "cpu", "--mixed-precision", "no",
            "--warmup-steps", 5]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "full.py"), str(ROOT / "train.py"), *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("error: The disk holding the run has 1 kB free; free some space.") == 2, done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "DistBackendError" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1 and done.stdout.count("subject: ") == 1  # the first process speaks
    assert "cpu, 2 processes (torchrun)" in done.stdout
    assert done.stderr.count("warning: --warmup-steps 5 is not shorter") == 1, done.stderr[-3000:]  # the first's
