"""train.py's practitioner options: batches and gradient accumulation, learning-rate schedules, which
checkpoint --resume continues from, validation prompts, per-photo captions, random crops, the drift
score and several subjects in one run (tiny model, CPU)."""

import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import train
from minidb.concepts import read_subjects
from minidb.data import DataError
from minidb.files import read_metadata, read_tensors
from minidb.loop import Examples, lr_factor
from test_bad_input import one_sentence
from test_train import draw_subject, run, world  # noqa: F401  (world is a fixture)


def weights(out, name="unet"):
    return read_tensors(out / "checkpoints" / sorted(p.name for p in (out / "checkpoints").glob("step-*"))[-1]
                        / f"{name}.safetensors")[0]


def log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    return line


def gradients_of(monkeypatch, *args, **kwargs):
    """Run train.py through test_train.run, recording the gradient AdamW applies at each step."""
    seen, step = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    out = run(*args, **kwargs)
    monkeypatch.undo()
    return out, seen


def test_batch_of_two_equals_two_accumulated_micro_batches(world, tmp_path, monkeypatch):
    """The same global batch, split differently, gives the same gradient at every step (to fp32
    rounding): every example's photo, noise and timestep come from one fixed sequence of draws,
    whatever the split. (Adam's first steps move weights by about lr x sign(gradient), so weights
    whose gradient is rounding noise around 0 differ by up to 2 lr: the gradients are the test.)"""
    batched, a = gradients_of(monkeypatch, world, tmp_path / "batched", "--batch-size", 2, "--lr", 1e-3, steps=3)
    accumulated, b = gradients_of(monkeypatch, world, tmp_path / "accumulated", "--grad-accum", 2, "--lr", 1e-3, steps=3)
    assert len(a) == len(b) == 3
    # The first step's gradients agree to fp32 rounding. Later steps start from weights that Adam's sign noise
    # has moved apart (by up to 2 lr a step), so theirs agree less closely: 1.5e-5 of the largest on one AMD
    # EPYC at step 3, 5e-7 at step 1. Other examples, as batch 1 takes, differ by over 10% (below).
    for step, (ga, gb) in enumerate(zip(a, b)):
        assert (ga - gb).abs().max() <= (1e-5 if step == 0 else 1e-4) * ga.abs().max(), (step, (ga - gb).abs().max())
    assert [r["loss"] for r in log(batched)] == pytest.approx([r["loss"] for r in log(accumulated)], rel=1e-5)
    _, single = gradients_of(monkeypatch, world, tmp_path / "single", "--lr", 1e-3, steps=3)  # batch 1: other examples
    assert (single[0] - a[0]).abs().max() > 0.1 * a[0].abs().max()
    # The weights: sign noise moves a few of them apart (up to 7e-4 here), so the mean says more than the
    # largest: 2e-7 per weight, where batch 1's other examples give 1e-3 (and a largest of 6e-3, Adam's own).
    wa, wb = weights(batched), weights(accumulated)
    assert sum((wa[k] - wb[k]).abs().sum().item() for k in wa) / sum(v.numel() for v in wa.values()) < 1e-5


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "polynomial"])
def test_lr_schedules_equal_diffusers(schedule):
    from diffusers.optimization import get_scheduler
    total, warmup, lr = 50, 7, 1e-4
    ours = lr_factor(schedule, warmup, total, lr=lr)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    theirs = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total + 3):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * ours(step), rel=1e-9, abs=1e-15), step
        opt.step()
        theirs.step()


@pytest.mark.parametrize("flags,rates", [
    ([], {"unet": 1e-4, "word": 5e-3}),  # the new word at textual inversion's rate
    (["--text-encoder-lr", "1e-3"], {"unet": 1e-4, "word": 1e-3}),  # it was refused without --train-text-encoder
    (["--train-text-encoder"], {"unet": 1e-4, "text": 1e-4, "word": 5e-3}),
    (["--train-text-encoder", "--text-encoder-lr", "1e-3"], {"unet": 1e-4, "text": 1e-3, "word": 1e-3}),
])
def test_a_new_word_trains_at_the_text_encoder_rate_when_one_is_given(world, tmp_path, flags, rates):
    """--text-encoder-lr's help says it sets a new word's rate under full or lora; check() refused it unless
    --train-text-encoder trained the text encoder too."""
    from minidb.loop import optimizer_for
    from minidb.options import check, parse_args, with_method_defaults
    args = parse_args([str(a) for a in ["--images", world / "photos", "--class", "ball", "--model", world / "base",
                                        "--out", tmp_path / "out", "--method", "lora", "--new-token", "--lr", "1e-4",
                                        "--device", "cpu", *flags]], train.__doc__)
    assert with_method_defaults(args) is None and check(args) is None
    unet, text, word = (torch.nn.Linear(2, 2) for _ in range(3))
    trained = {"unet": unet, "new_word": word, **({"text_encoder": text} if args.train_text_encoder else {})}
    optimizer = optimizer_for(trained, {"text_encoder"}, args, "cpu", word_default=train.METHOD_LR["textual-inversion"])
    side = {id(p): name for name, m in (("unet", unet), ("text", text), ("word", word)) for p in m.parameters()}
    assert {side[id(g["params"][0])]: g["lr"] for g in optimizer.param_groups} == rates


def test_the_log_follows_the_schedule_and_scale_lr_multiplies(world, tmp_path):
    out = run(world, tmp_path / "cosine", "--lr-schedule", "cosine", "--warmup-steps", 2, "--lr", 1e-3,
              "--batch-size", 2, "--scale-lr", "--save-every", 3, "--checkpoints-keep", 2, steps=6)
    assert json.load(open(out / "settings.json"))["lr"] == 1e-3  # as given, so that a resume compares it as given
    peak = 2e-3  # 1e-3 x 2 images per step
    rates = [r["lr"] for r in log(out)]
    assert rates == pytest.approx([peak * lr_factor("cosine", 2, 6)(s) for s in range(6)])
    # a resume from step 3, alone or with the same flags, keeps that rate and scales it once
    for again in ([], ["--lr", "1e-3", "--scale-lr", "--batch-size", "2"]):
        first_three = (out / "log.jsonl").read_text().splitlines(keepends=True)[:3]
        (out / "log.jsonl").write_text("".join(first_three))  # so the rates of steps 4 to 6 are the resume's own
        train.main(["--out", str(out), "--resume", "3", *again])
        assert [r["lr"] for r in log(out)] == rates


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_resume_with_more_steps_follows_the_stretched_schedule_from_its_first_step(world, tmp_path, schedule):
    """The first resumed step took the optimizer's saved rate, the old schedule's: at its end 0, a wasted step."""
    out = run(world, tmp_path / schedule, "--lr-schedule", schedule, "--lr", 1e-3, steps=2)
    train.main(["--out", str(out), "--resume", "--steps", "4"])
    assert [r["lr"] for r in log(out)] == pytest.approx([1e-3 * lr_factor(schedule, 0, 2)(s) for s in range(2)]
                                                        + [1e-3 * lr_factor(schedule, 0, 4)(s) for s in (2, 3)])


def test_a_warm_up_as_long_as_the_run_is_warned_of(world, tmp_path):
    """The rate climbs for the whole run and never reaches --lr (the log shows it): a warning says so; a
    warm-up shorter than the run gives none."""
    with pytest.warns(UserWarning, match=r"--warmup-steps 3 is not shorter than the run \(--steps 3\), so the "
                                         r"learning rate never reaches --lr 0.001"):
        out = run(world, tmp_path / "long", "--warmup-steps", 3, "--lr", 1e-3, steps=3)
    assert max(r["lr"] for r in log(out)) < 1e-3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="--warmup-steps")
        run(world, tmp_path / "short", "--warmup-steps", 2, "--lr", 1e-3, steps=3)


@pytest.mark.parametrize("flags, warned", [
    (["--prior-weight", "0", "--class-images", "50"], "--class-images 50 does nothing while the prior-preservation "
     "loss is off (--prior-weight 0), so no class images are drawn; leave it out, or turn the prior on with --prior-weight."),
    (["--method", "textual-inversion", "--class-images", "50"], "(--prior-weight 0, as textual-inversion has it)"),
    (["--prior-weight", "0"], None),  # the count's default says nothing
    (["--class-images", "50"], None),  # the prior is on: the count is used
    (["--method", "textual-inversion", "--prior-weight", "1", "--class-images", "50"], None),
    (["--method", "textual-inversion", "--drift-images", "4"], "--drift-images 4 does nothing for "
     "textual-inversion, whose model stays as it was and cannot drift; leave it out."),
    (["--method", "textual-inversion", "--drift-images", "0"], None),
    (["--method", "lora", "--drift-images", "4"], None),
    (["--checkpoints-keep", "3"], "--checkpoints-keep 3 keeps the latest of the checkpoints that --save-every "
     "writes, but without it the run writes one, at its end; add --save-every N, or leave --checkpoints-keep out."),
    (["--checkpoints-keep", "3", "--save-every", "100"], None),
])
def test_a_flag_that_does_nothing_beside_another_is_warned_of(world, tmp_path, flags, warned):
    """--class-images with the prior off, --drift-images for textual inversion and --checkpoints-keep without
    --save-every were taken without a word, and did nothing. Warnings, not refusals: the toy lab's experiments
    give each of their runs (with and without the prior, each method) the same --train-args."""
    from minidb.options import DRIFT_IMAGES, parse_args, with_method_defaults
    args = parse_args([str(a) for a in ["--images", world / "photos", "--class", "ball", "--model", world / "base",
                                        "--out", tmp_path / "out", *flags]], train.__doc__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert with_method_defaults(args) is None
    said = [str(w.message) for w in caught if str(w.message).startswith("--")]
    assert (said == []) if warned is None else (len(said) == 1 and warned in said[0]), said
    assert args.drift_images == (int(flags[flags.index("--drift-images") + 1]) if "--drift-images" in flags
                                 else DRIFT_IMAGES)  # the default, filled in after the check


def test_resume_from_an_earlier_step_sets_later_checkpoints_aside_and_continues_exactly(world, tmp_path):
    straight = run(world, tmp_path / "straight", "--save-every", 2, "--checkpoints-keep", 3, steps=6)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    branch = tmp_path / "branch"
    shutil.copytree(straight, branch)
    run(world, branch, "--save-every", 2, "--checkpoints-keep", 3, "--resume", 2, steps=6)
    assert sorted(p.name for p in (branch / "checkpoints" / "abandoned").iterdir()) == ["step-000004", "step-000006"]
    a, b = weights(straight), weights(branch)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log(straight)] == [r["loss"] for r in log(branch)]
    # a second branch from step 4 sets its step 6 aside beside the first branch's, and ends the same again
    run(world, branch, "--save-every", 2, "--checkpoints-keep", 3, "--resume", 4, steps=6)
    assert sorted(p.name for p in (branch / "checkpoints" / "abandoned").iterdir()) == \
        ["step-000004", "step-000006", "step-000006-2"]
    assert all(torch.equal(a[k], v) for k, v in weights(branch).items())
    # a checkpoint folder's path works too, and a missing step is named with the ones there are
    other = tmp_path / "other"
    shutil.copytree(straight, other)
    run(world, other, "--save-every", 2, "--checkpoints-keep", 3, "--resume", other / "checkpoints" / "step-000004", steps=6)
    assert all(torch.equal(a[k], v) for k, v in weights(other).items())


def test_resume_names_the_checkpoints_a_run_has(world, tmp_path, capsys):
    out = run(world, tmp_path / "run", "--save-every", 2, "--checkpoints-keep", 2, steps=4)
    line = refused(capsys, ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", out,
                            "--steps", 4, "--resolution", 32, "--sample-steps", 2, "--class-cache", world / "cache",
                            "--class-images", 2, "--drift-images", 2, "--save-dtype", "fp32", "--resume", 3,
                            "--mixed-precision", "no"])
    assert "no checkpoint of step 3 (it has: 2, 4)" in line


def test_validation_grid_has_a_row_per_subject_and_one_for_the_extra_prompts(world, tmp_path):
    out = run(world, tmp_path / "run", "--validation-prompt", "a red ball", "--validation-prompt", "a [V] ball in snow",
              "--validation-images", 2, steps=1)
    assert Image.open(out / "validation" / "step-000001.png").size == (3 * 2 * 32, 2 * 32)
    rows = (out / "validation" / "step-000001.txt").read_text().splitlines()
    identifier = json.load(open(out / "settings.json"))["identifier"]
    assert rows[1] == f"a red ball | a {identifier} ball in snow" and rows[0].endswith("| a photo of a ball")


def test_a_photo_caption_stands_in_for_the_instance_prompt(world, tmp_path):
    """Every photo captioned "[V] on grass, a ball" trains exactly as --instance-prompt 'nrf on grass, a ball'."""
    photos = tmp_path / "photos"
    shutil.copytree(world / "photos", photos)
    identifier = json.load(open(run(world, tmp_path / "plain", steps=1) / "settings.json"))["identifier"]
    for photo in photos.iterdir():
        photo.with_suffix(".txt").write_text("[V] on grass, a ball\n")
    captioned = run(world, tmp_path / "captioned", "--images", photos, steps=2)
    prompted = run(world, tmp_path / "prompted", "--instance-prompt", f"{identifier} on grass, a ball", steps=2)
    bracketed = run(world, tmp_path / "bracketed", "--instance-prompt", "[V] on grass, a ball", steps=2)
    a, b, c = weights(captioned), weights(prompted), weights(bracketed)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)  # [V] is the identifier everywhere
    assert json.load(open(bracketed / "settings.json"))["instance_prompt"] == f"{identifier} on grass, a ball"


def test_an_instance_prompt_without_the_identifier_is_warned_of(world, tmp_path):
    """'a photo of my ball' trains the subject under words every ball shares, against the prior loss."""
    with pytest.warns(UserWarning, match=r"The instance prompt 'a photo of my ball' does not name the identifier "
                                         r"\w+, so the subject is learned under its other words"):
        run(world, tmp_path / "mine", "--instance-prompt", "a photo of my ball", steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The instance prompt")
        run(world, tmp_path / "upper", "--identifier", "zwx", "--instance-prompt", "a photo of ZWX ball", steps=1)



def test_a_class_with_an_article_is_warned_of():
    """--class "a cup" made 'a photo of a sks a cup' and 'a photo of a a cup', silently."""
    from minidb.concepts import Subject, name_subjects
    with pytest.warns(UserWarning, match=r"The class 'a cup' starts with 'a', and the prompts made from it add their "
                                         r"own \('a photo of a a cup'\); give the noun alone, e.g. 'cup'."):
        name_subjects([Subject("photos", "a cup", "sks", None, None)], None, None, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The class")
        name_subjects([Subject("photos", "cup", "sks", None, None)], None, None, 0)
        name_subjects([Subject("photos", "antelope", "sks", None, None)], None, None, 0)
        name_subjects([Subject("photos", "the cup", "sks", "a photo of sks", "a photo of the cup")], None, None, 0)


def test_a_word_is_found_whole_in_any_case_and_with_its_own_punctuation():
    """The one rule for "does the prompt name this word" (train.py's identifier checks, sample.py's notes):
    whole words, any case; a word that starts or ends in punctuation, such as <sks>, is found too, where
    a \\b regex needs a letter at its edges."""
    from minidb.concepts import mentions
    assert mentions("a photo of SKS dog", "sks") and mentions("sks, a dog", "sks") and mentions("sks", "sks")
    assert not mentions("it asks for a dog", "sks") and not mentions("a sksdog", "sks") and not mentions("", "sks")
    assert mentions("a photo of <sks> dog", "<sks>") and not mentions("a photo of <sks>x dog", "<sks>")
    assert mentions("a.b", "a.b") and not mentions("axb", "a.b")  # the word's letters, not a pattern


def test_random_crops_stay_inside_the_photo_and_reach_both_edges():
    examples = Examples([2], [("p", 0)], torch.Generator().manual_seed(0), rooms=[[(0, 16), (8, 0)]])
    crops = {e["photo"]: set() for e in examples.draw(0, 1, (4, 2, 2))}
    for e in examples.draw(0, 400, (4, 2, 2)):
        crops.setdefault(e["photo"], set()).add(e["crop"])
    assert crops[0] == {(0, left) for left in range(17)} and crops[1] == {(top, 0) for top in range(9)}


def test_random_crop_trains_on_wide_photos(world, tmp_path):
    out = run(world, tmp_path / "run", "--random-crop", "--flip", steps=3)  # the photos are 64 x 48
    assert len(log(out)) == 3 and all(torch.isfinite(v).all() for v in weights(out).values())


def test_drift_is_logged_at_each_validation_beside_the_base_models(world, tmp_path):
    out = run(world, tmp_path / "still", "--lr", 1e-12, "--validate-every", 2, "--drift-images", 3, steps=4)
    rows = [r for r in log(out) if "drift" in r]
    assert [r["step"] for r in rows] == [2, 4]
    # a model that has not moved has not drifted: the score is the base model's
    assert all(r["drift"] == pytest.approx(r["drift_base"], rel=1e-4) for r in rows)
    assert rows[0]["drift_base"] > 0 and (out / "loss.png").is_file()


def test_two_subjects_take_turns_with_their_own_identifiers(world, tmp_path, capsys):
    second = tmp_path / "cups"
    second.mkdir()
    for i in range(2):
        draw_subject(second / f"{i}.png", (40, 60, 200), 3 * i)
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"images": str(world / "photos"), "class": "ball"},
                                    {"images": "cups", "class": "cup", "identifier": "zwx"}]))
    out = tmp_path / "run"
    train.main([str(a) for a in ["--concepts", concepts, "--model", world / "base", "--out", out, "--steps", 2,
                                 "--resolution", 32, "--sample-steps", 2, "--class-cache", tmp_path / "cache",
                                 "--class-images", 2, "--drift-images", 0, "--save-dtype", "fp32"]])
    settings = json.load(open(out / "settings.json"))
    first, other = settings["subjects"]
    assert other["identifier"] == "zwx" and first["identifier"] not in ("zwx", "")
    readme = (out / "README.md").read_text()
    assert f"`{first['identifier']}` (a ball)" in readme and "`zwx` (a cup)" in readme
    assert Image.open(out / "validation" / "step-000002.png").size == (3 * 32, 2 * 32)  # a row per subject
    assert len(list((tmp_path / "cache").iterdir())) == 2  # a class prior per class
    examples = Examples([3, 2], [("ball", 2), ("cup", 2)], torch.Generator().manual_seed(0))
    assert [e["subject"] for e in examples.draw(0, 6, (4, 2, 2))] == [0, 1, 0, 1, 0, 1]
    # the model's record names both subjects, but not the folders of their photos: those are the user's own
    recorded = json.loads(read_metadata(out / "model.safetensors")["minidb_run"])["subjects"]
    assert [r["identifier"] for r in recorded] == [first["identifier"], "zwx"] and "images" not in recorded[0]
    assert other["images"] == str(second)
    # --resume alone keeps --concepts, and not the first subject's identifier and prompts that the settings
    # record beside it (they would clash with --concepts)
    train.main(["--out", str(out), "--resume", "--steps", "3"])
    resumed = json.load(open(out / "settings.json"))
    assert resumed["subjects"] == settings["subjects"] and resumed["steps"] == 3
    # the file edited since (its subjects swapped) is refused, naming the file and the first subject that differs
    concepts.write_text(json.dumps(json.loads(concepts.read_text())[::-1]))
    err = refused(capsys, ["--out", out, "--resume", "--steps", 4])
    assert f"--concepts {concepts} gives other subjects than the run in {out} started with (subject 1 differs)" in err
    # the same file moved: --resume alone says where it was; with its new place the run goes on (it was refused
    # as a change of --concepts, and told to resume with the old path)
    concepts.write_text(json.dumps(json.loads(concepts.read_text())[::-1]))
    moved = concepts.rename(tmp_path / "moved.json")
    err = refused(capsys, ["--out", out, "--resume", "--steps", 4])
    assert f"the run's --concepts {concepts} is no longer there; give --concepts with the file's new place" in err
    train.main(["--out", str(out), "--resume", "--concepts", str(moved), "--steps", "4"])
    assert json.load(open(out / "settings.json"))["subjects"] == settings["subjects"]
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))][-1] == 4
    # a run begun before class prompts read alike shared a prior recorded its own spelling: it resumes as before
    older = json.load(open(out / "settings.json"))
    older["subjects"][1]["class_prompt"] = "a photo of a  Cup"
    (out / "settings.json").write_text(json.dumps(older))
    train.main(["--out", str(out), "--resume", "--concepts", str(moved), "--steps", "5"])
    assert [r["step"] for r in map(json.loads, open(out / "log.jsonl"))][-1] == 5


def test_a_run_on_a_model_train_py_made_picks_a_word_its_subject_does_not_have(world, tmp_path, capsys):
    """The seeded pick on a DreamBooth'd base took the word its subject already had, with no warning: the new
    subject was trained onto the old one's word. The pick passes over it; given, it is used as given."""
    first = run(world, tmp_path / "first", steps=1)
    old = json.load(open(first / "settings.json"))["identifier"]
    again = run(world, tmp_path / "again", "--model", first / "model.safetensors", steps=1)  # the same seed
    new = json.load(open(again / "settings.json"))["identifier"]
    assert new != old and new in capsys.readouterr().out
    same = run(world, tmp_path / "same", "--model", first / "model.safetensors", "--identifier", old, steps=1)
    assert json.load(open(same / "settings.json"))["identifier"] == old  # the same subject, trained further
    # a run whose word is the base's (given, or picked before picks passed over such words) resumes with the
    # subject named anew, its identifier picked again: the run's own word stands
    train.main([str(a) for a in ["--out", same, "--resume", "--images", world / "photos", "--class", "ball",
                                 "--steps", 2]])
    assert [json.loads(line)["step"] for line in open(same / "log.jsonl")] == [1, 2]


@pytest.mark.parametrize("content, words", [
    ("[{\"images\": \"a\"}]", 'entry 1 needs "class"'),
    ("{\"images\": \"a\", \"class\": \"dog\"}", "must hold a non-empty list"),
    ("[{\"images\": \"a\", \"class\": \"dog\", \"colour\": \"red\"}]", "unknown key 'colour'"),
    ("[{\"images\": \"a\", \"class\": 3}]", 'entry 1 needs "class" as a class name'),
    ("not json", "is not valid JSON"),
    (" \n", 'is empty; it must be a list of {"images": ..., "class": ...} objects.'),  # "Expecting value: line 1"
    ("[{\"images\": \"a\", \"class\": \"dog\", \"identifier\": \"[V]\"}]", "entry 1's \"identifier\" [V] "
     "holds [V], the placeholder that prompts and captions read as the identifier; give a rare word such as sks"),
    ("[{\"images\": \"a\", \"class\": \"dog\", \"identifier\": \"sks\"}, "
     "{\"images\": \"b\", \"class\": \"cat\", \"identifier\": \"sks\"}]", "two subjects use the identifier sks"),
    ("[{\"images\": \"a\", \"class\": \"dog\", \"identifier\": \"sks\"}, "  # prompts read both as sks
     "{\"images\": \"b\", \"class\": \"cat\", \"identifier\": \"SKS \"}]", "two subjects use the identifier sks"),
    pytest.param("[" * 100000, "is not a valid concepts list (it is nested too deeply to read); it must be a list of",
                 id="nested-too-deep"),  # json.loads's RecursionError was a traceback
])
def test_a_bad_concepts_file_is_one_sentence(world, tmp_path, capsys, content, words):
    for name in "ab":
        shutil.copytree(world / "photos", tmp_path / name)
    concepts = tmp_path / "concepts.json"
    concepts.write_text(content)
    line = refused(capsys, ["--concepts", concepts, "--model", world / "base", "--out", tmp_path / "run",
                            "--resolution", 32, "--class-cache", tmp_path / "cache"])
    assert words in line, line


def test_a_class_dir_that_is_a_concepts_subjects_folder_is_refused(tmp_path):
    """--images was refused as --class-dir; a --concepts entry's folder went on, the prior trained on that subject."""
    for name in "ab":
        (tmp_path / name).mkdir()
    concepts = tmp_path / "concepts.json"
    concepts.write_text('[{"images": "a", "class": "dog"}, {"images": "b", "class": "cat"}]')
    with pytest.raises(DataError) as e:
        read_subjects(SimpleNamespace(concepts=str(concepts), class_dir=str(tmp_path / "b")))
    assert str(e.value).startswith(f"--class-dir {tmp_path / 'b'} is the folder of a subject's own photos, so the "
                                   "prior-preservation loss would teach the class prompt that subject")
    assert len(read_subjects(SimpleNamespace(concepts=str(concepts), class_dir=str(tmp_path)))) == 2  # another folder


def test_a_concepts_file_that_is_not_utf8_says_so(tmp_path):
    concepts = tmp_path / "concepts.json"
    concepts.write_bytes('[{"images": "a", "class": "café"}]'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_subjects(SimpleNamespace(concepts=concepts))
    assert one_sentence(e) == f"--concepts {concepts} is not UTF-8 text; save it as UTF-8."


def test_a_concepts_file_with_a_byte_order_mark_is_read(tmp_path):
    """Notepad and PowerShell save UTF-8 with a byte-order mark; json refused it as 'Unexpected UTF-8 BOM'."""
    (tmp_path / "a").mkdir()
    concepts = tmp_path / "concepts.json"
    concepts.write_bytes(b"\xef\xbb\xbf" + '[{"images": "a", "class": "café"}]'.encode("utf-8"))
    assert [s.class_name for s in read_subjects(SimpleNamespace(concepts=concepts))] == ["café"]


def test_a_concepts_folder_that_is_missing_names_its_entry_and_where_it_was_looked_for(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    concepts = tmp_path / "c" / "concepts.json"
    concepts.parent.mkdir()
    concepts.write_text(json.dumps([{"images": "../a", "class": "dog"}, {"images": "w/photos", "class": "cat"}]))
    with pytest.raises(DataError) as e:
        read_subjects(SimpleNamespace(concepts=concepts))
    assert one_sentence(e) == (f"--concepts {concepts}: entry 2's \"images\" folder {concepts.parent / 'w' / 'photos'} "
                               f"does not exist (a relative folder is read from the file's own folder, "
                               f"{concepts.parent}); check it.")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is the user's home, not a folder named ~
    concepts.write_text(json.dumps([{"images": "~/a", "class": "dog"}]))
    assert [s.images for s in read_subjects(SimpleNamespace(concepts=concepts))] == [str(tmp_path / "a")]


def test_more_subjects_than_rare_tokens_is_one_sentence_not_a_hang():
    """With every rare token taken, name_subjects drew forever (a 700-subject file on the tiny vocabulary)."""
    from minidb.concepts import Subject, name_subjects
    pool = ["zq", "zx", "zv"]
    subjects = [Subject("photos", "dog") for _ in range(4)]
    problem = name_subjects(subjects, None, lambda tokenizer, rng: rng.choice(pool), 0)
    assert problem == ("the 4 subjects need more identifiers than the 3 rare tokens this model's vocabulary offers; "
                       "give the others their own \"identifier\", or train fewer subjects in one run.")
    assert name_subjects([Subject("photos", "dog") for _ in range(3)], None, lambda t, rng: rng.choice(pool), 0) is None


def test_an_identifier_that_is_a_word_of_a_class_prompt_is_warned_of():
    """--identifier ball --class ball, an identifier 'a', or one subject's identifier another's class went on
    silently, while the prior loss trains that word back toward the class."""
    from minidb.concepts import Subject, name_subjects
    with pytest.warns(UserWarning, match=r"^The identifier ball is also a word of the class prompt 'a photo of a "
                                         r"ball', so the prior loss trains it back toward any such picture; choose"):
        name_subjects([Subject("photos", "ball", "ball")], None, None, 0)
    with pytest.warns(UserWarning, match=r"^The identifier cat is also a word of the class prompt 'a photo of a cat' "
                                         r"\(subject 2\)"):
        name_subjects([Subject("photos", "ball", "cat"), Subject("photos2", "cat", "sks")], None, None, 0)
    with pytest.warns(UserWarning, match=r"^The identifier a is also a word"):
        name_subjects([Subject("photos", "ball", "a")], None, None, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name_subjects([Subject("photos", "ball", "sks"), Subject("photos2", "cat", "zwx")], None, None, 0)
        name_subjects([Subject("photos", "ball", "balls")], None, None, 0)  # a word of its own
        name_subjects([Subject("photos", "ball", "ball")], None, None, 0, prior=False)  # --prior-weight 0
    with pytest.warns(UserWarning, match=r"is learned under its other words; write \[V\]"):  # no prior loss to pull
        name_subjects([Subject("photos", "ball", "sks", "a photo of my ball")], None, None, 0, prior=False)


def test_a_class_prompt_holding_the_placeholder_is_warned_of():
    """--class-prompt 'a photo of a [V] cup' went on silently: [V] is read as the identifier only where the subject
    is meant (instance prompts, captions, validation prompts), so the prior drew and trained the letters [V]."""
    from minidb.concepts import Subject, name_subjects
    subject = Subject("photos", "cup", "sks", class_prompt="a photo of a [V] cup")
    with pytest.warns(UserWarning, match=r"^The class prompt 'a photo of a \[V\] cup' holds \[V\], which only instance "
                                         r"prompts, captions and validation prompts read as the identifier"):
        name_subjects([subject], None, None, 0)
    assert subject.class_prompt == "a photo of a [V] cup"  # kept as given: the warning says what it means
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no prior: the class prompt is not used
        name_subjects([Subject("photos", "cup", "sks", class_prompt="a photo of a [V] cup")], None, None, 0, prior=False)


def test_class_prompts_that_read_alike_share_one_prior():
    """'Dog' in one entry and 'dog' in another drew two class priors (twice the drawing, and each subject held to
    half the images), though the tokenizer lower-cases both to the same prompt."""
    from minidb.concepts import Subject, name_subjects
    from minidb.tokenizer import Tokenizer
    subjects = [Subject("a", "dog", "sks"), Subject("b", "Dog", "zwx"),
                Subject("c", "cat", "qrt", None, "a photo of  a DOG"), Subject("d", "cat", "vbn")]
    name_subjects(subjects, None, None, 0)
    assert [s.class_prompt for s in subjects] == ["a photo of a dog"] * 3 + ["a photo of a cat"]
    tokenizer = Tokenizer.from_openai_bpe()  # what the change relies on: the model reads them alike
    ids = [tokenizer.encode(p) for p in ("a photo of a Dog", "a photo of  a DOG", "a photo of a dog")]
    assert ids[0] == ids[1] == ids[2]


def test_a_key_given_twice_in_a_concepts_entry_is_refused(tmp_path):
    """json keeps the last of two "class" keys, silently."""
    (tmp_path / "a").mkdir()
    concepts = tmp_path / "concepts.json"
    concepts.write_text('[{"images": "a", "class": "dog", "class": "cat"}]')
    with pytest.raises(DataError) as e:
        read_subjects(SimpleNamespace(concepts=concepts))
    assert one_sentence(e) == (f"--concepts {concepts} gives 'class' twice in one entry, and only the last would "
                               "count; keep one.")


def test_two_concepts_on_one_folder_are_warned_of(tmp_path):
    """A concepts.json entry copied and not edited trains two identifiers on the same photos: a warning
    that names the entries; distinct folders (even written differently) give none."""
    for name in "ab":
        (tmp_path / name).mkdir()
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"images": "a", "class": "dog"}, {"images": "b", "class": "dog"},
                                    {"images": str(tmp_path / "a"), "class": "cat"}]))
    with pytest.warns(UserWarning, match=r"entries 1 and 3 both train on the photos in "):
        read_subjects(SimpleNamespace(concepts=concepts))
    concepts.write_text(json.dumps([{"images": "a", "class": "dog"}, {"images": "./b", "class": "dog"}]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.images for s in read_subjects(SimpleNamespace(concepts=concepts))] == [
            str(tmp_path / "a"), str(tmp_path / "b")]


def test_concepts_and_images_do_not_mix(world, tmp_path, capsys):
    line = refused(capsys, ["--concepts", tmp_path / "c.json", "--images", world / "photos", "--model", world / "base"])
    assert "leave out" in line and "--images" in line
    line = refused(capsys, ["--model", world / "base"])
    assert "--images FOLDER --class NAME" in line


def test_class_photos_train_without_reading_their_captions(world, tmp_path, capsys):
    """--class-dir photos train with the class prompt, so their captions are not read: an empty one stopped
    the run, and a stray one was warned of. The start line names the folder, and a resume that would give
    the run a count of prior images to draw is refused in words (the run records none)."""
    photos = tmp_path / "class"
    shutil.copytree(world / "photos", photos)
    (photos / "0.txt").write_text("  \n")
    (photos / "stray.txt").write_text("a ball")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*caption")
        out = run(world, tmp_path / "run", "--class-dir", photos, steps=1)
    assert json.load(open(out / "settings.json"))["class_dir"] == str(photos)
    assert f"; class prior weight 1 on the photos in {photos}\n" in capsys.readouterr().out
    line = refused(capsys, ["--out", out, "--resume", "--steps", 2, "--class-images", 5])
    assert line.endswith(f"--class-images is 5 now but the run in {out} started without --class-images, and changing "
                         "it would not continue the same run; resume without --class-images, or start a new run.")


def test_long_prompts_train_whole_and_differ_from_the_cut_ones(world, tmp_path):
    long = "a photo of a nrf ball, " + ", ".join(["red and green and blue stripes"] * 15)
    with pytest.warns(UserWarning, match="longer than CLIP's 77 tokens"):
        cut = run(world, tmp_path / "cut", "--instance-prompt", long, steps=2)
    whole = run(world, tmp_path / "whole", "--instance-prompt", long, "--long-prompts", steps=2)
    a, b = weights(cut), weights(whole)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bad_captions_resume_paths_and_words_with_concepts_are_one_sentence(world, tmp_path, capsys):
    base = ["--class", "ball", "--model", world / "base", "--resolution", 32, "--class-cache", tmp_path / "cache"]
    photos = tmp_path / "photos"
    shutil.copytree(world / "photos", photos)
    (photos / "0.txt").write_text("  \n")
    assert "The caption" in refused(capsys, ["--images", photos, *base, "--out", tmp_path / "a"])
    (photos / "0.txt").write_bytes(b"\xff\xfe a photo")
    assert "save it as UTF-8 text" in refused(capsys, ["--images", photos, *base, "--out", tmp_path / "b"])
    out = run(world, tmp_path / "run", steps=1)
    line = refused(capsys, ["--images", world / "photos", *base, "--out", out, "--resume", tmp_path, "--steps", 1,
                            "--sample-steps", 2, "--class-images", 2, "--drift-images", 2, "--save-dtype", "fp32",
                            "--mixed-precision", "no"])
    assert "is neither latest, a step number, a run's folder nor a checkpoint folder" in line
    concepts = tmp_path / "c.json"
    concepts.write_text(json.dumps([{"images": str(world / "photos"), "class": "ball"}]))
    line = refused(capsys, ["--concepts", concepts, "--model", world / "base", "--method", "textual-inversion"])
    assert "train those one at a time" in line


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_trains_in_bf16_autocast_by_default_only_where_bf16_is_native(world, tmp_path, monkeypatch, native):
    monkeypatch.setattr(train, "cpu_bf16", lambda: native)
    args = ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", tmp_path / "run",
            "--steps", 2, "--resolution", 32, "--sample-steps", 2, "--class-cache", world / "cache", "--class-images", 2,
            "--drift-images", 0, "--save-dtype", "fp32"]
    train.main([str(a) for a in args])
    out = tmp_path / "run"
    assert json.load(open(out / "settings.json"))["mixed_precision"] == ("bf16" if native else "no")
    exact = run(world, tmp_path / "exact", "--drift-images", 0, steps=2)  # --mixed-precision no
    a, b = log(out), log(exact)
    if native:  # the same run in bf16 arithmetic: close, not equal
        assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=0.05)
        assert [r["loss"] for r in a] != [r["loss"] for r in b]
    else:
        assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_train_warns_of_bf16_asked_for_on_a_cpu_that_emulates_it(world, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from minidb import cli
    monkeypatch.setattr(cli, "cpu_bf16", lambda: False)
    save_file({"x": torch.ones(2)}, tmp_path / "not-a-model.safetensors")  # refused once loading: a quick stop
    with pytest.warns(UserWarning, match=r"^--mixed-precision bf16 on this CPU, which has no bf16 arithmetic"), \
            pytest.raises(SystemExit):
        train.main([str(a) for a in ["--images", world / "photos", "--class", "ball", "--model",
                                     tmp_path / "not-a-model.safetensors", "--out", tmp_path / "run", "--device", "cpu",
                                     "--mixed-precision", "bf16"]])
